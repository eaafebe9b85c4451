//! The offline benchmark's roofline: the least time any engine needs for a dataset on
//! a GPU with a given copy bandwidth and GEMM peak, if every request starts at once
//! (as in `bench offline`) and every step runs at the better of its two limits.
//!
//! - Prefill: every prompt token costs the matmul FLOPs of one token at the GEMM peak.
//! - Decode step t (1..=longest output) runs the requests still generating: the larger
//!   of reading the weights once and their matmul FLOPs at the peak, plus reading their
//!   KV cache (prompt + t tokens each) at the copy bandwidth.
//!
//! FP8 linear layers (`fp8_linear`): their weights are read at one byte per parameter
//! and multiplied at twice the bf16 peak (Hopper's FP8 tensor rate); embeddings and the
//! LM head stay bf16.
//!
//! Attention FLOPs, norms, sampling and launch gaps are left out, so real engines stay
//! above it. It tells how much of a gap to a target a dataset's shape alone explains:
//! a long tail of outputs makes many weight-bound steps for few tokens.

use radix_model::ModelConfig;

/// Seconds the roofline allows for the prefill and for the decode steps.
#[derive(Clone, Copy, Debug)]
pub struct Roofline {
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Roofline {
    pub fn total_s(&self) -> f64 {
        self.prefill_s + self.decode_s
    }
}

/// `lens`: (prompt, output) tokens per request; bf16 weights or FP8 linear layers
/// (`fp8_linear`); KV elements of `kv_bytes` (2: bf16, 1: FP8); `peak_flops`: the bf16
/// GEMM peak.
pub fn roofline(
    cfg: &ModelConfig,
    lens: &[(usize, usize)],
    copy_bps: f64,
    peak_flops: f64,
    fp8_linear: bool,
    kv_bytes: usize,
) -> Roofline {
    let embed = cfg.vocab_size * cfg.hidden_size;
    let matmul_params = (cfg.num_params() - embed) as f64; // layers (+ an untied head)
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    // The head runs only for sampled rows: leave it out of prefill tokens.
    let body = if cfg.tie_word_embeddings { matmul_params } else { matmul_params - head };
    let (weight_bytes, body_flops) = if fp8_linear {
        (2.0 * cfg.num_params() as f64 - body, 2.0 * peak_flops)
    } else {
        (2.0 * cfg.num_params() as f64, peak_flops)
    };
    let kv_per_token = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bytes) as f64;

    let prompt_tokens: usize = lens.iter().map(|l| l.0).sum();
    let prefill_s = prompt_tokens as f64 * 2.0 * body / body_flops;
    let longest = lens.iter().map(|l| l.1).max().unwrap_or(0);
    // Requests alive at step t: those whose output is at least t long.
    let mut by_len: Vec<(usize, usize)> = lens.iter().map(|&(p, o)| (o, p)).collect();
    by_len.sort_unstable();
    let (mut alive, mut ctx_sum) = (by_len.len(), lens.iter().map(|l| l.0 as f64).sum::<f64>());
    let mut next = 0;
    let mut decode_s = 0.0;
    for t in 1..=longest {
        while next < by_len.len() && by_len[next].0 < t {
            ctx_sum -= by_len[next].1 as f64; // its prompt leaves the sum
            alive -= 1;
            next += 1;
        }
        // Each alive request reads prompt + t tokens of KV at step t.
        let kv = (ctx_sum + (alive * t) as f64) * kv_per_token;
        let compute_s = alive as f64 * 2.0 * (body / body_flops + head / peak_flops);
        decode_s += (weight_bytes / copy_bps).max(compute_s) + kv / copy_bps;
    }
    Roofline { prefill_s, decode_s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        radix_model::ModelSource::open("synthetic:llama3-8b").unwrap().config
    }

    #[test]
    fn one_request_costs_its_prompt_flops_and_a_weight_read_per_output_token() {
        let c = cfg();
        let r = roofline(&c, &[(1000, 10)], 3e12, 750e12, false, 2);
        let weights = 2.0 * c.num_params() as f64;
        // Ten weight-bound steps plus a little KV.
        assert!(r.decode_s > 10.0 * weights / 3e12 && r.decode_s < 10.5 * weights / 3e12);
        assert!((r.prefill_s - 1000.0 * 2.0 * 7.0e9 / 750e12).abs() / r.prefill_s < 0.05);
    }

    /// Output tok/s of the roofline of 1,000 requests of `dataset` on synthetic:llama3-8b
    /// with the H100 figures this project measured: 2990 GB/s copy, 750 TFLOP/s bf16 GEMM.
    fn h100_roofline_tps(dataset: &str) -> f64 {
        let samples =
            crate::bench::dataset::load(dataset, 1000, &radix_model::Tokenizer::Bytes, 0).unwrap();
        let lens: Vec<(usize, usize)> =
            samples.iter().map(|s| (s.prompt.len(), s.output_len)).collect();
        let out: usize = lens.iter().map(|l| l.1).sum();
        let r = roofline(&cfg(), &lens, 2990e9, 750e12, false, 2);
        let tps = out as f64 / r.total_s();
        eprintln!(
            "{dataset} roofline: {:.2} s (prefill {:.2}, decode {:.2}), {tps:.0} out tok/s",
            r.total_s(),
            r.prefill_s,
            r.decode_s
        );
        tps
    }

    /// synthetic-sharegpt's 1,000 requests have outputs up to 1,024 tokens: ~520 steps
    /// run with 64 requests or fewer, each paying a full weight read. Its roofline stays
    /// under the 16,200 output tok/s SGLang publishes for real ShareGPT.
    #[test]
    fn synthetic_sharegpt_roofline_on_the_h100() {
        let tps = h100_roofline_tps("synthetic-sharegpt");
        assert!((10_000.0..16_200.0).contains(&tps), "{tps}");
    }

    /// The same for 1,000 real ShareGPT requests (bench/datasets/sharegpt-1000.json,
    /// cl100k token counts): its tail is longer still (outputs up to 1,395 tokens).
    #[test]
    fn real_sharegpt_lengths_roofline_on_the_h100() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/datasets/sharegpt-1000.json");
        let tps = h100_roofline_tps(&format!("lengths:{path}"));
        assert!((10_000.0..16_200.0).contains(&tps), "{tps}");
    }

    /// FP8 linear layers: a weight-bound step reads about half the bytes (the embedding
    /// and head stay bf16), and prefill runs at twice the rate.
    #[test]
    fn fp8_linear_layers_halve_the_weight_reads() {
        let c = cfg();
        let (b16, f8) = (
            roofline(&c, &[(1000, 10)], 3e12, 750e12, false, 2),
            roofline(&c, &[(1000, 10)], 3e12, 750e12, true, 2),
        );
        let ratio = f8.decode_s / b16.decode_s;
        assert!((0.52..0.58).contains(&ratio), "{ratio}"); // 1 GB of bf16 embed + head in 16
        assert!((f8.prefill_s / b16.prefill_s - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_long_tail_costs_weight_reads() {
        let c = cfg();
        let even: Vec<(usize, usize)> = (0..100).map(|_| (200, 200)).collect();
        let mut tail = even.clone();
        tail[0].1 = 1000; // one request runs 800 steps alone
        let (a, b) = (
            roofline(&c, &even, 3e12, 750e12, false, 2),
            roofline(&c, &tail, 3e12, 750e12, false, 2),
        );
        let extra = b.decode_s - a.decode_s;
        assert!(extra > 800.0 * 2.0 * c.num_params() as f64 / 3e12, "{extra}");
    }
}
