//! Benchmark workloads: what to send and how much to generate.
//!
//! - `synthetic-sharegpt`: input and output lengths drawn (fixed seed) from log-normal
//!   distributions with ShareGPT's means after vLLM's filtering, about 220 input and 200
//!   output tokens per request with long tails: ln(len) ~ N(mu, 0.9²) with
//!   mu = ln(mean) - 0.9²/2, clipped to [4, 1024]. Prompts are random printable-ASCII
//!   token ids (below 128, so they exist in every byte-level or BPE vocabulary's base).
//! - `random:IN:OUT`: every request has IN input and OUT output tokens.
//! - `shared-prefix:GROUPS:PREFIX:QUESTION:OUT`: SGLang's generated-shared-prefix
//!   workload: GROUPS system prompts of PREFIX tokens, each shared by its group's
//!   requests (the prompts spread evenly over the groups), each request adding its own
//!   QUESTION tokens and generating OUT; requests in a seeded random order. It measures
//!   the prefix cache (run it with and without `--no-enable-prefix-caching`).
//! - `lengths:FILE`: the (input, output) lengths listed in FILE, `{"lengths": [[in, out],
//!   ...]}`, with random prompts: `bench/datasets/sharegpt-1000.json` holds 1,000 real
//!   ShareGPT requests sampled as SGLang's benchmark does (`tools/sharegpt_lengths.py`),
//!   for models without a matching tokenizer (the synthetic ones).
//! - a path to a ShareGPT JSON file (`[{"conversations": [{"from": "human", "value":
//!   ...}, {"from": "gpt", "value": ...}]}]`): the first human turn is the prompt, the
//!   length of the reply (in tokenizer tokens) the output length, filtered as vLLM does
//!   (prompt and reply at least 4 tokens, prompt at most 1024, total at most 2048).

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

/// One benchmark request.
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt: Vec<u32>,
    pub output_len: usize,
}

pub const SHAREGPT_MEAN_INPUT: f64 = 220.0;
pub const SHAREGPT_MEAN_OUTPUT: f64 = 200.0;
const SIGMA: f64 = 0.9;

/// Loads `n` samples of `spec` (see the module docs).
pub fn load(
    spec: &str,
    n: usize,
    tokenizer: &radix_model::Tokenizer,
    seed: u64,
) -> anyhow::Result<Vec<Sample>> {
    anyhow::ensure!(n > 0, "--num-prompts must be at least 1");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let random_prompt = |rng: &mut rand::rngs::StdRng, len: usize| -> Vec<u32> {
        (0..len).map(|_| rng.random_range(32u32..127)).collect()
    };
    if spec == "synthetic-sharegpt" {
        let input = LogNormal::new(SHAREGPT_MEAN_INPUT.ln() - SIGMA * SIGMA / 2.0, SIGMA)?;
        let output = LogNormal::new(SHAREGPT_MEAN_OUTPUT.ln() - SIGMA * SIGMA / 2.0, SIGMA)?;
        return Ok((0..n)
            .map(|_| {
                let i = (input.sample(&mut rng).round() as usize).clamp(4, 1024);
                let o = (output.sample(&mut rng).round() as usize).clamp(4, 1024);
                Sample { prompt: random_prompt(&mut rng, i), output_len: o }
            })
            .collect());
    }
    if let Some(rest) = spec.strip_prefix("random:") {
        let (i, o) = rest
            .split_once(':')
            .and_then(|(i, o)| Some((i.parse::<usize>().ok()?, o.parse::<usize>().ok()?)))
            .filter(|&(i, o)| i > 0 && o > 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "bad dataset {spec:?}: expected random:IN:OUT with positive lengths"
                )
            })?;
        return Ok((0..n)
            .map(|_| Sample { prompt: random_prompt(&mut rng, i), output_len: o })
            .collect());
    }
    if let Some(rest) = spec.strip_prefix("shared-prefix:") {
        let parts: Vec<usize> = rest.split(':').filter_map(|x| x.parse().ok()).collect();
        let [groups, prefix, question, output] = parts[..] else {
            anyhow::bail!(
                "bad dataset {spec:?}: expected shared-prefix:GROUPS:PREFIX:QUESTION:OUT"
            );
        };
        anyhow::ensure!(
            groups > 0 && question > 0 && output > 0,
            "bad dataset {spec:?}: GROUPS, QUESTION and OUT must be positive"
        );
        let systems: Vec<Vec<u32>> = (0..groups).map(|_| random_prompt(&mut rng, prefix)).collect();
        let mut out: Vec<Sample> = (0..n)
            .map(|i| {
                let mut prompt = systems[i % groups].clone();
                prompt.extend(random_prompt(&mut rng, question));
                Sample { prompt, output_len: output }
            })
            .collect();
        use rand::seq::SliceRandom;
        out.shuffle(&mut rng);
        return Ok(out);
    }
    if let Some(path) = spec.strip_prefix("lengths:") {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("dataset {path}: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("dataset {path}: {e}"))?;
        let pairs = json["lengths"].as_array().ok_or_else(|| {
            anyhow::anyhow!("dataset {path}: expected {{\"lengths\": [[input, output], ...]}}")
        })?;
        let mut out = Vec::new();
        for (i, pair) in pairs.iter().take(n).enumerate() {
            let len = |k: usize| pair.get(k).and_then(|v| v.as_u64()).filter(|&x| x > 0);
            let (Some(input), Some(output)) = (len(0), len(1)) else {
                anyhow::bail!(
                    "dataset {path}: entry {i} is not [input, output] with positive lengths"
                );
            };
            out.push(Sample {
                prompt: random_prompt(&mut rng, input as usize),
                output_len: output as usize,
            });
        }
        anyhow::ensure!(!out.is_empty(), "dataset {path}: no lengths");
        if out.len() < n {
            tracing::warn!(
                "dataset {path} has {} requests, fewer than the {n} asked for",
                out.len()
            );
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(spec)
        .map_err(|e| anyhow::anyhow!("dataset {spec}: {e} (expected synthetic-sharegpt, random:IN:OUT, shared-prefix:GROUPS:PREFIX:QUESTION:OUT, lengths:FILE or a ShareGPT JSON file)"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("dataset {spec}: {e}"))?;
    let mut out = Vec::new();
    for conv in json.as_array().into_iter().flatten() {
        let turns = conv["conversations"].as_array();
        let (Some(human), Some(reply)) = (
            turns.and_then(|t| t.first()).and_then(|t| t["value"].as_str()),
            turns.and_then(|t| t.get(1)).and_then(|t| t["value"].as_str()),
        ) else {
            continue;
        };
        let prompt = tokenizer.encode(human, true)?;
        let output_len = tokenizer.encode(reply, false)?.len();
        if prompt.len() < 4
            || output_len < 4
            || prompt.len() > 1024
            || prompt.len() + output_len > 2048
        {
            continue;
        }
        out.push(Sample { prompt, output_len });
        if out.len() == n {
            break;
        }
    }
    anyhow::ensure!(!out.is_empty(), "dataset {spec}: no usable conversations");
    if out.len() < n {
        tracing::warn!(
            "dataset {spec} has {} usable conversations, fewer than the {n} asked for",
            out.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_files_give_their_lengths_and_reject_bad_entries() {
        let tok = radix_model::Tokenizer::Bytes;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/datasets/sharegpt-1000.json");
        let s = load(&format!("lengths:{path}"), 1000, &tok, 0).unwrap();
        assert_eq!(s.len(), 1000);
        let outputs: usize = s.iter().map(|x| x.output_len).sum();
        assert!((150_000..300_000).contains(&outputs), "{outputs}");
        assert!(s.iter().all(|x| x.prompt.len() <= 1024 && x.prompt.len() + x.output_len <= 2048));
        let dir = std::env::temp_dir().join(format!("radix-lengths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"lengths": [[3, 0]]}"#).unwrap();
        let err = load(&format!("lengths:{}", bad.display()), 1, &tok, 0).unwrap_err();
        assert!(err.to_string().contains("entry 0"), "{err}");
        std::fs::write(&bad, "[1, 2]").unwrap();
        assert!(load(&format!("lengths:{}", bad.display()), 1, &tok, 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn synthetic_sharegpt_has_sharegpt_like_means_and_is_fixed() {
        let tok = radix_model::Tokenizer::Bytes;
        let a = load("synthetic-sharegpt", 1000, &tok, 0).unwrap();
        let b = load("synthetic-sharegpt", 1000, &tok, 0).unwrap();
        assert_eq!(
            a.iter().map(|s| s.output_len).collect::<Vec<_>>(),
            b.iter().map(|s| s.output_len).collect::<Vec<_>>()
        );
        let mean_in = a.iter().map(|s| s.prompt.len()).sum::<usize>() as f64 / 1000.0;
        let mean_out = a.iter().map(|s| s.output_len).sum::<usize>() as f64 / 1000.0;
        assert!((180.0..260.0).contains(&mean_in), "{mean_in}");
        assert!((160.0..240.0).contains(&mean_out), "{mean_out}");
        assert!(a.iter().any(|s| s.prompt.len() > 600), "long tail");
    }

    #[test]
    fn shared_prefix_groups_share_their_system_prompt() {
        let tok = radix_model::Tokenizer::Bytes;
        let s = load("shared-prefix:4:300:20:8", 30, &tok, 1).unwrap();
        assert_eq!(s.len(), 30);
        assert!(s.iter().all(|x| x.prompt.len() == 320 && x.output_len == 8));
        let mut prefixes: Vec<&[u32]> = s.iter().map(|x| &x.prompt[..300]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 4, "one system prompt per group");
        let mut questions: Vec<&[u32]> = s.iter().map(|x| &x.prompt[300..]).collect();
        questions.sort();
        questions.dedup();
        assert_eq!(questions.len(), 30, "every request its own question");
        for bad in ["shared-prefix:0:10:1:1", "shared-prefix:2:10:1", "shared-prefix:a:1:1:1"] {
            assert!(load(bad, 3, &tok, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn random_and_errors() {
        let tok = radix_model::Tokenizer::Bytes;
        let r = load("random:100:7", 3, &tok, 0).unwrap();
        assert!(r.iter().all(|s| s.prompt.len() == 100 && s.output_len == 7));
        assert!(load("random:0:7", 3, &tok, 0).is_err());
        assert!(
            load("/nope.json", 3, &tok, 0).unwrap_err().to_string().contains("synthetic-sharegpt")
        );
    }
}
