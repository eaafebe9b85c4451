//! Engine behaviour on the CPU backend with synthetic:tiny: greedy outputs do not depend
//! on the prefix cache, chunking, batching or preemption; pages all come back; seeded
//! sampling reproduces; stop rules and validation; fair shares and priorities; sparse
//! paging.

use std::sync::Arc;

use radix_engine::{
    Engine, EngineConfig, EngineError, EngineHandle, FinishReason, Output, OutputProcessor,
    Request, RequestId, SparseBudget, SparseConfig, SparsePolicy, StopConfig,
};
use radix_model::{CpuBackend, MAX_SCORED_ROWS_PER_STEP, ModelSource, SamplingParams};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn engine(cfg: EngineConfig) -> Engine {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let model = source.load(CpuBackend::new()).unwrap();
    Engine::new(Box::new(model), Arc::new(source.tokenizer), cfg).unwrap()
}

fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request::new(
        prompt.to_vec(),
        SamplingParams::greedy(),
        StopConfig { max_tokens, ignore_eos: true, ..Default::default() },
    )
}

/// Runs `reqs` to completion (all submitted up front) and returns each one's outputs,
/// with text and stop strings applied as `OutputStream` does (the engine itself runs on
/// past a stop string here: nothing aborts it).
fn run(e: &mut Engine, reqs: Vec<Request>) -> Vec<Vec<Output>> {
    let mut rxs: Vec<(UnboundedReceiver<Output>, OutputProcessor)> = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        let processor = OutputProcessor::new(&r);
        e.add(RequestId(i as u64), r, tx).unwrap();
        rxs.push((rx, processor));
    }
    let mut steps = 0;
    while e.has_work() {
        e.step();
        e.check_invariants().unwrap();
        steps += 1;
        assert!(steps < 10_000, "engine did not finish");
    }
    let tok = e.tokenizer().clone();
    rxs.into_iter()
        .map(|(mut rx, mut processor)| {
            let mut outs = Vec::new();
            while let Ok(o) = rx.try_recv() {
                outs.extend(processor.process(&tok, o).map(|p| p.output));
            }
            outs
        })
        .collect()
}

fn tokens(outs: &[Output]) -> Vec<u32> {
    outs.iter().flat_map(|o| o.token_ids.clone()).collect()
}

fn prompts() -> Vec<Vec<u32>> {
    // Shared prefixes (the cache matters), lengths on and off page boundaries.
    let base: Vec<u32> = (0..70u32).map(|i| (i * 7 + 3) % 250).collect();
    vec![
        base[..40].to_vec(),
        base.clone(),
        [&base[..33], &[9, 9, 9][..]].concat(),
        vec![5],
        (0..150u32).map(|i| (i * 13) % 256).collect(),
        base[..16].to_vec(),
    ]
}

fn all_pages_back(e: &Engine) {
    assert_eq!(e.reclaimable_pages(), e.config().num_pages, "pages leaked");
    assert_eq!(e.stats().running + e.stats().waiting, 0);
    e.check_invariants().unwrap();
}

#[test]
fn greedy_outputs_do_not_depend_on_cache_chunking_batching_or_preemption() {
    let reqs = || prompts().iter().map(|p| greedy(p, 24)).collect::<Vec<_>>();
    // Reference: each request alone, no cache, no chunking, plenty of pages.
    let alone: Vec<Vec<u32>> = prompts()
        .iter()
        .map(|p| {
            let mut e = engine(EngineConfig {
                prefix_cache: false,
                chunked_prefill: false,
                ..Default::default()
            });
            tokens(&run(&mut e, vec![greedy(p, 24)])[0])
        })
        .collect();
    assert!(alone.iter().all(|t| t.len() == 24));
    let configs = [
        ("batched, cache", EngineConfig::default()),
        ("batched, no cache", EngineConfig { prefix_cache: false, ..Default::default() }),
        (
            "chunked by 16",
            EngineConfig { max_batched_tokens: 16, max_running: 8, ..Default::default() },
        ),
        (
            "unchunked",
            EngineConfig {
                chunked_prefill: false,
                max_batched_tokens: 64,
                max_running: 8,
                ..Default::default()
            },
        ),
        ("page size 1", EngineConfig { page_size: 1, num_pages: 4096, ..Default::default() }),
        // 24 pages of 16 hold 384 tokens: less than the batch needs, so requests preempt.
        (
            "tiny pool",
            EngineConfig {
                num_pages: 24,
                max_batched_tokens: 64,
                max_running: 8,
                ..Default::default()
            },
        ),
    ];
    for (name, cfg) in configs {
        let mut e = engine(cfg);
        let outs = run(&mut e, reqs());
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(tokens(o), alone[i], "{name}: request {i}");
            assert_eq!(o.last().unwrap().finish, Some(FinishReason::Length), "{name}");
        }
        if name == "tiny pool" {
            assert!(e.stats().preemptions > 0, "the tiny pool should force preemption");
        }
        all_pages_back(&e);
    }
}

#[test]
fn a_second_identical_prompt_is_served_from_the_cache() {
    let mut e = engine(EngineConfig::default());
    let p: Vec<u32> = (0..100).collect();
    let first = run(&mut e, vec![greedy(&p, 8)]);
    let second = run(&mut e, vec![greedy(&p, 8)]);
    assert_eq!(tokens(&first[0]), tokens(&second[0]));
    assert_eq!(first[0][0].cached_tokens, 0);
    assert_eq!(second[0][0].cached_tokens, 96); // 6 full pages of 16; the last token is recomputed
    all_pages_back(&e);
}

#[test]
fn seeded_sampling_reproduces_and_differs_across_seeds() {
    let sample = |seed| {
        let mut e = engine(EngineConfig::default());
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            ..Default::default()
        };
        let req = Request::new(
            vec![1, 2, 3],
            params,
            StopConfig { max_tokens: 32, ignore_eos: true, ..Default::default() },
        );
        tokens(&run(&mut e, vec![req])[0])
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
}

#[test]
fn abort_and_disconnect_free_pages() {
    let mut e = engine(EngineConfig::default());
    let (tx, mut rx) = unbounded_channel();
    e.add(RequestId(1), greedy(&[1; 40], 1000), tx).unwrap();
    let (tx2, rx2) = unbounded_channel();
    e.add(RequestId(2), greedy(&[2; 40], 1000), tx2).unwrap();
    for _ in 0..3 {
        e.step();
    }
    assert!(e.abort(RequestId(1)));
    drop(rx2); // request 2's client goes away: aborted at its next output
    for _ in 0..3 {
        e.step();
    }
    let mut last = None;
    while let Ok(o) = rx.try_recv() {
        last = Some(o);
    }
    assert_eq!(last.unwrap().finish, Some(FinishReason::Abort));
    assert!(!e.has_work());
    all_pages_back(&e);
}

#[test]
fn stop_rules() {
    let mut e = engine(EngineConfig::default());
    // Find what greedy generates, then stop on a token and on a string from it.
    let free = tokens(&run(&mut e, vec![greedy(&[10, 20, 30], 12)])[0]);
    let stop_tok = free[5];
    let first = free.iter().position(|&t| t == stop_tok).unwrap();
    let req = Request::new(
        vec![10, 20, 30],
        SamplingParams::greedy(),
        StopConfig {
            max_tokens: 12,
            stop_token_ids: vec![stop_tok],
            ignore_eos: true,
            ..Default::default()
        },
    );
    let outs = run(&mut e, vec![req]);
    assert_eq!(tokens(&outs[0]), free[..=first].to_vec());
    assert_eq!(outs[0].last().unwrap().finish, Some(FinishReason::Stop));

    let tok = e.tokenizer().clone();
    let text = tok.decode(&free, true).unwrap();
    if let Some(stop) = text.get(3..5).filter(|s| !s.contains('\u{FFFD}')) {
        let req = Request::new(
            vec![10, 20, 30],
            SamplingParams::greedy(),
            StopConfig {
                max_tokens: 12,
                stop_strings: vec![stop.to_string()],
                ignore_eos: true,
                ..Default::default()
            },
        );
        let outs = run(&mut e, vec![req]);
        let got: String = outs[0].iter().map(|o| o.text.as_str()).collect();
        assert!(!got.contains(stop), "{got:?} contains the stop string {stop:?}");
        assert!(text.starts_with(&got), "{got:?} is not a prefix of {text:?}");
        assert_eq!(outs[0].last().unwrap().finish, Some(FinishReason::Stop));
    }
    all_pages_back(&e);
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let e = engine(EngineConfig { max_model_len: Some(64), ..Default::default() });
    let cases = [
        (greedy(&[], 4), "empty"),
        (greedy(&[1; 60], 10), "context length"),
        (greedy(&[1, 2], 0), "max_tokens"),
        (greedy(&[400], 2), "vocabulary"),
        (
            Request::new(
                vec![1],
                SamplingParams { top_p: 1.5, ..Default::default() },
                StopConfig::default(),
            ),
            "top_p",
        ),
    ];
    for (req, want) in cases {
        match e.validate(&req) {
            Err(EngineError::Invalid(m)) => {
                let m = m.to_string();
                assert!(m.contains(want), "{m:?} should mention {want:?}")
            }
            other => panic!("expected an error mentioning {want:?}, got {other:?}"),
        }
    }
    let mut e = engine(EngineConfig { max_waiting: 1, ..Default::default() });
    let (tx, _rx) = unbounded_channel();
    e.add(RequestId(1), greedy(&[1], 2), tx.clone()).unwrap();
    assert!(matches!(e.add(RequestId(2), greedy(&[1], 2), tx), Err(EngineError::QueueFull(1))));
}

#[test]
fn outputs_stream_valid_text_and_usage() {
    let mut e = engine(EngineConfig::default());
    let tok = e.tokenizer().clone();
    let prompt = tok.encode("hello", true).unwrap();
    let outs = run(&mut e, vec![greedy(&prompt, 16)]);
    let text: String = outs[0].iter().map(|o| o.text.as_str()).collect();
    let all = tokens(&outs[0]);
    // Bytes that are not UTF-8 come out as U+FFFD, as a full decode shows them.
    assert_eq!(text, tok.decode(&all, true).unwrap());
    let last = outs[0].last().unwrap();
    assert_eq!((last.prompt_tokens, last.completion_tokens), (prompt.len(), 16));
}

/// Steps until request `id`'s output finishes; returns the steps taken.
fn steps_until_done(e: &mut Engine, rx: &mut UnboundedReceiver<Output>) -> usize {
    for steps in 1..10_000 {
        e.step();
        e.check_invariants().unwrap();
        while let Ok(o) = rx.try_recv() {
            if o.finish.is_some() {
                assert_eq!(o.finish, Some(FinishReason::Length));
                return steps;
            }
        }
    }
    panic!("the request never finished");
}

#[test]
fn a_request_of_many_choices_shares_the_running_slots() {
    // One request of 64 choices on 8 slots; a small request sent after its choices are
    // running gets a slot at once instead of after all 64.
    let mut e = engine(EngineConfig { max_running: 8, ..Default::default() });
    let mut big = Vec::new();
    for i in 0..64 {
        let (tx, rx) = unbounded_channel();
        let mut r = greedy(&[7; 40], 40);
        r.group = Some(RequestId(0));
        e.add(RequestId(i), r, tx).unwrap();
        big.push(rx);
    }
    for _ in 0..3 {
        e.step();
    }
    assert_eq!((e.stats().running, e.stats().waiting), (8, 56));
    let (tx, mut rx) = unbounded_channel();
    e.add(RequestId(100), greedy(&[1, 2], 4), tx).unwrap();
    let steps = steps_until_done(&mut e, &mut rx);
    assert!(steps <= 6, "the small request took {steps} steps");
    assert!(e.stats().preemptions >= 1);
    while e.has_work() {
        e.step();
    }
    for mut rx in big {
        let mut outs = Vec::new();
        while let Ok(o) = rx.try_recv() {
            outs.push(o);
        }
        assert_eq!(tokens(&outs).len(), 40, "preempted choices continue where they were");
        // Usage counts the cache hits of the first admission (at most the prompt's two
        // full pages), not the larger ones of coming back after a preemption.
        assert!(outs.iter().all(|o| o.cached_tokens <= 32), "{:?}", outs.last());
        assert_eq!(outs.last().unwrap().finish, Some(FinishReason::Length));
    }
    all_pages_back(&e);
}

#[test]
fn priorities_order_admission_and_preempt_later_ones() {
    let mut e = engine(EngineConfig { max_running: 2, ..Default::default() });
    let request = |id: u64, priority: i32, max_tokens: usize| {
        let mut r = greedy(&[id as u32 + 1], max_tokens);
        r.priority = priority;
        r
    };
    let mut slow = Vec::new();
    for id in 0..3 {
        let (tx, rx) = unbounded_channel();
        e.add(RequestId(id), request(id, 5, 60), tx).unwrap();
        slow.push(rx);
    }
    e.step();
    assert_eq!((e.stats().running, e.stats().waiting), (2, 1));
    // More important than what runs: it takes a slot at once.
    let (tx, mut urgent) = unbounded_channel();
    e.add(RequestId(10), request(10, -1, 4), tx).unwrap();
    let steps = steps_until_done(&mut e, &mut urgent);
    assert!(steps <= 5, "the urgent request took {steps} steps");
    // Less important than what runs: it waits for a free slot.
    let (tx, mut later) = unbounded_channel();
    e.add(RequestId(11), request(11, 9, 4), tx).unwrap();
    for _ in 0..10 {
        e.step();
    }
    assert!(later.try_recv().is_err(), "a later priority must not preempt");
    while e.has_work() {
        e.step();
    }
    all_pages_back(&e);
}

#[test]
fn stop_strings_are_matched_outside_the_engine() {
    // Through the handle: the stream ends at the stop string and the engine request is
    // aborted (its pages come back) instead of running to max_tokens.
    let e = engine(EngineConfig::default());
    let tok = e.tokenizer().clone();
    let handle = EngineHandle::spawn(e, "synthetic:tiny".into());
    let prompt = tok.encode("hello", true).unwrap();
    let mut free = handle.submit(greedy(&prompt, 24)).unwrap();
    let mut text = String::new();
    while let Some(o) = free.blocking_recv() {
        text.push_str(&o.text);
    }
    let (cut, stop) = text
        .char_indices()
        .skip(2)
        .find_map(|(i, c)| (c != '\u{FFFD}' && !text[..i].contains(c)).then(|| (i, c.to_string())))
        .expect("a character that first appears after index 2");
    let mut req = greedy(&prompt, 4000);
    req.stop.stop_strings = vec![stop.clone()];
    let mut stream = handle.submit(req).unwrap();
    let mut got = String::new();
    let mut last = None;
    while let Some(o) = stream.blocking_recv() {
        got.push_str(&o.text);
        last = Some(o);
    }
    let last = last.unwrap();
    assert_eq!(got, text[..cut], "stopped at {stop:?}");
    assert_eq!(last.finish, Some(FinishReason::Stop));
    assert!(last.completion_tokens < 24, "{last:?}");
    let t = std::time::Instant::now();
    while handle.stats().running + handle.stats().waiting > 0 {
        assert!(t.elapsed().as_secs() < 10, "the engine request was not aborted");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(handle.stats().generation_tokens_total < 24 + 50);
    handle.shutdown();
}

// Sparse paging (Quest) on the CPU backend: synthetic:tiny has 2 layers, so with
// `dense_layers: 1` the second attends sparsely.

fn sparse(budget: SparseBudget) -> Option<SparseConfig> {
    let policy = SparsePolicy { min_context_tokens: 64, dense_layers: 1, ..Default::default() };
    Some(SparseConfig { budget, policy })
}

fn long_prompts() -> Vec<Vec<u32>> {
    (0..3u32).map(|k| (0..300u32).map(|i| (i * 31 + k * 17 + 5) % 256).collect()).collect()
}

#[test]
fn sparse_engine_runs_long_prompts_and_reads_less_kv() {
    let mut e =
        engine(EngineConfig { sparse: sparse(SparseBudget::Fraction(0.3)), ..Default::default() });
    let outs = run(&mut e, long_prompts().iter().map(|p| greedy(p, 8)).collect());
    for o in &outs {
        assert_eq!(tokens(o).len(), 8);
        assert_eq!(o.last().unwrap().finish, Some(FinishReason::Length));
    }
    let s = e.stats();
    assert!(s.kv_read_bytes > 0 && s.kv_read_dense_bytes > 0, "{s:?}");
    assert!(s.kv_read_bytes < s.kv_read_dense_bytes, "{s:?}");
    all_pages_back(&e);
}

#[test]
fn sparse_budget_one_matches_dense() {
    let reqs = || long_prompts().iter().map(|p| greedy(p, 8)).collect::<Vec<_>>();
    let mut dense = engine(EngineConfig::default());
    let want: Vec<Vec<u32>> = run(&mut dense, reqs()).iter().map(|o| tokens(o)).collect();
    let mut e = engine(EngineConfig { sparse: sparse(SparseBudget::DENSE), ..Default::default() });
    let got: Vec<Vec<u32>> = run(&mut e, reqs()).iter().map(|o| tokens(o)).collect();
    assert_eq!(got, want);
    // Dense reads all pages: no selection, no key bounds.
    let s = e.stats();
    assert_eq!(s.kv_read_bytes, s.kv_read_dense_bytes, "{s:?}");
    all_pages_back(&e);
}

#[test]
fn request_sparse_budgets_need_a_sparse_engine() {
    let mut req = greedy(&long_prompts()[0], 8);
    req.sparse_budget = Some(SparseBudget::Tokens(64));
    let mut e = engine(EngineConfig::default());
    match e.validate(&req) {
        Err(EngineError::Invalid(m)) => assert!(m.to_string().contains("sparse"), "{m:?}"),
        other => panic!("expected an Invalid error mentioning sparse, got {other:?}"),
    }
    let (tx, _rx) = unbounded_channel();
    assert!(
        matches!(e.add(RequestId(1), req.clone(), tx), Err(EngineError::Invalid(m)) if m.to_string().contains("sparse"))
    );
    // A sparse engine takes the request's own budget.
    let mut e = engine(EngineConfig { sparse: sparse(SparseBudget::DENSE), ..Default::default() });
    e.validate(&req).unwrap();
    let outs = run(&mut e, vec![req]);
    assert_eq!(tokens(&outs[0]).len(), 8);
    let s = e.stats();
    assert!(s.kv_read_bytes < s.kv_read_dense_bytes, "{s:?}");
    all_pages_back(&e);
}

#[test]
fn sparse_policies_without_a_window_are_refused() {
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let model = source.load(CpuBackend::new()).unwrap();
    let policy = SparsePolicy { window_pages: 0, ..Default::default() };
    let cfg = EngineConfig {
        sparse: Some(SparseConfig { budget: SparseBudget::Fraction(0.3), policy }),
        ..Default::default()
    };
    match Engine::new(Box::new(model), Arc::new(source.tokenizer), cfg) {
        Err(EngineError::Config(m)) => assert!(m.contains("window_pages"), "{m:?}"),
        Err(e) => panic!("expected a Config error, got {e:?}"),
        Ok(_) => panic!("a policy without window pages was accepted"),
    }
}

/// The logits after `tokens` (one prefill of the whole sequence on a fresh model).
fn last_logits(tokens: &[u32]) -> Vec<f32> {
    use radix_model::Backend as _;
    let source = ModelSource::open("synthetic:tiny").unwrap();
    let cfg = source.config.clone();
    let mut model = source.load(CpuBackend::new()).unwrap();
    let page = 16;
    let pages = tokens.len().div_ceil(page);
    let spec = radix_model::KvPoolSpec { num_pages: pages, page_size: page, sparse: None };
    model.backend.init_kv(&cfg, &spec).unwrap();
    let step = radix_model::Step::whole_sequence(tokens, page);
    model.forward_logits(&step).unwrap()
}

#[test]
fn top_logprobs_are_the_softmax_of_the_logits_and_logit_bias_steers() {
    let mut e = engine(EngineConfig::default());
    let prompt: Vec<u32> = vec![1, 72, 101, 108, 108, 111, 33, 17, 250];
    let mut req = greedy(&prompt, 4);
    req.sampling = SamplingParams { temperature: 0.9, seed: Some(4), ..Default::default() };
    req.logprobs = true;
    req.top_logprobs = 20;
    let outs = run(&mut e, vec![req]).remove(0);
    let sampled = tokens(&outs);
    let tops: Vec<Vec<(u32, f32)>> = outs.iter().flat_map(|o| o.top_logprobs.clone()).collect();
    let lps: Vec<f32> = outs.iter().flat_map(|o| o.logprobs.clone()).collect();
    assert_eq!((tops.len(), lps.len(), sampled.len()), (4, 4, 4));
    let mut seq = prompt.clone();
    for (j, top) in tops.iter().enumerate() {
        let logits = last_logits(&seq);
        let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
        let lz = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        assert_eq!(top.len(), 20);
        for (k, &(t, lp)) in top.iter().enumerate() {
            assert_eq!(t as usize, order[k], "position {j}, rank {k}");
            let exact = logits[t as usize] as f64 - lz;
            assert!((lp as f64 - exact).abs() < 1e-4, "position {j}: {lp} vs {exact}");
        }
        let exact = logits[sampled[j] as usize] as f64 - lz;
        assert!((lps[j] as f64 - exact).abs() < 1e-4, "sampled logprob at {j}");
        seq.push(sampled[j]);
    }
    // A +100 bias makes a token certain, a -100 one impossible; logprobs stay raw.
    let forced = 77u32;
    let mut req = greedy(&prompt, 6);
    req.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(1),
        logit_bias: vec![(forced, 100.0)],
        ..Default::default()
    };
    req.logprobs = true;
    let outs = run(&mut e, vec![req]).remove(0);
    assert!(tokens(&outs).iter().all(|&t| t == forced), "{:?}", tokens(&outs));
    assert!(outs.iter().flat_map(|o| o.logprobs.clone()).all(|l| l < -1e-3), "raw logprobs");
    let banned: Vec<(u32, f32)> = (0..320).filter(|&t| t != 66).map(|t| (t, -100.0)).collect();
    let mut req = greedy(&prompt, 3);
    req.sampling.logit_bias = banned;
    assert_eq!(tokens(&run(&mut e, vec![req]).remove(0)), vec![66; 3]);
}

#[test]
fn prompt_logprobs_score_every_prompt_token_once_in_chunks() {
    let mut e = engine(EngineConfig::default());
    // 300 tokens: more than the scored rows of one step, so several chunks; the same
    // prompt is cached first, and must still be computed (and scored) in full.
    let prompt: Vec<u32> = (0..300).map(|i| (i * 37 % 250 + 3) as u32).collect();
    run(&mut e, vec![greedy(&prompt, 2)]);
    let mut req = greedy(&prompt, 2);
    req.prompt_logprobs = Some(3);
    let mut other = greedy(&prompt[..40], 3); // a neighbour in the same steps
    other.prompt_logprobs = Some(0);
    // And a plain request behind them, which scoring must not hold up.
    let plain = greedy(&prompt[7..20], 2);
    let outs = run(&mut e, vec![req, other, plain]);
    assert_eq!(tokens(&outs[2]).len(), 2);
    for (o, len) in outs.iter().zip([300usize, 40]) {
        let scored: Vec<_> = o.iter().flat_map(|o| o.prompt_logprobs.clone()).collect();
        let positions: Vec<usize> = scored.iter().map(|s| s.position).collect();
        assert_eq!(positions, (1..len).collect::<Vec<_>>());
        let chunks = o.iter().filter(|o| !o.prompt_logprobs.is_empty()).count();
        assert!(chunks >= 3 || len < MAX_SCORED_ROWS_PER_STEP, "{chunks} chunks");
        let edges = [1, 127, 128, 129, len - 1];
        for s in scored.iter().filter(|s| edges.contains(&s.position)) {
            let logits = last_logits(&prompt[..s.position]);
            let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
            let lz = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            assert_eq!(s.token, prompt[s.position]);
            let exact = logits[s.token as usize] as f64 - lz;
            assert!((s.logprob as f64 - exact).abs() < 1e-4, "position {}", s.position);
            let top: Vec<u32> = s.top.iter().map(|t| t.0).collect();
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            order.sort_by(|&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
            });
            let want = if len == 300 { 3 } else { 0 };
            assert_eq!(top, order[..want].to_vec(), "position {}", s.position);
        }
        // Generation is as without scoring.
        assert_eq!(tokens(o).len(), if len == 300 { 2 } else { 3 });
    }
    all_pages_back(&e);
}
