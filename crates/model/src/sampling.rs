//! Sampling from logits: greedy, temperature, top-k, top-p, min-p, logit bias, and
//! repetition / frequency / presence penalties, with vLLM's semantics, after a token mask
//! (structured output: the grammar's allowed tokens); the sampled token's
//! log-probability and the most likely alternatives (`top_logprobs`).

/// Per-request sampling parameters (OpenAI / vLLM names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability sums to at least this (1 = off).
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// > 1 discourages tokens seen in the prompt or output (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted once per earlier occurrence in the output (0 = off).
    pub frequency_penalty: f32,
    /// Subtracted once if the token occurred in the output (0 = off).
    pub presence_penalty: f32,
    pub seed: Option<u64>,
    /// Added to the logits of these tokens before penalties and sampling (OpenAI's
    /// `logit_bias`): sorted by token, each token once, values in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repetition_penalty", self.repetition_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ];
        if let Some((name, v)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} must be a finite number, got {v}"));
        }
        if self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty)
            || !(-2.0..=2.0).contains(&self.presence_penalty)
        {
            return Err("frequency_penalty and presence_penalty must be in [-2, 2]".into());
        }
        if let Some(&(t, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return Err(format!("logit_bias values must be in [-100, 100], got {b} for {t}"));
        }
        if self.logit_bias.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("logit_bias must be sorted by token, each token once".into());
        }
        Ok(())
    }

    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// Token counts a request has seen, for penalties.
#[derive(Clone, Debug, Default)]
pub struct TokenCounts {
    /// Tokens of the prompt (repetition penalty only).
    pub prompt: std::collections::HashSet<u32>,
    /// Occurrences of each token in the output so far.
    pub output: std::collections::HashMap<u32, u32>,
}

impl TokenCounts {
    pub fn new(prompt: &[u32]) -> Self {
        Self { prompt: prompt.iter().copied().collect(), output: Default::default() }
    }

    pub fn add_output(&mut self, token: u32) {
        *self.output.entry(token).or_default() += 1;
    }
}

/// Most alternatives one row may ask for (OpenAI's bound on `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The sampled token and its log-probability under the unmodified logits, with the
/// most likely tokens of that distribution when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first (lowest id on ties); `top_logprobs` long.
    pub top: Vec<(u32, f32)>,
}

/// What a backend needs to sample one logits row.
#[derive(Clone, Copy, Debug)]
pub struct SampleRequest<'a> {
    pub params: &'a SamplingParams,
    pub counts: &'a TokenCounts,
    /// The request's seed (its own, or one drawn when it arrived).
    pub seed: u64,
    /// Which output token this is (0 for the first): with `seed`, it fixes the random
    /// numbers, so a seeded request samples the same tokens however it is batched.
    pub index: u64,
    /// Alternatives to report (0..=`MAX_TOP_LOGPROBS`).
    pub top_logprobs: usize,
    /// Structured output: the tokens the row may sample, a bitmask (bit `t % 32` of word
    /// `t / 32` set: token t allowed; words cover the vocabulary). `None`: all of them.
    pub allowed: Option<&'a [u32]>,
    /// Scoring, not sampling: the row reports this token (a prompt token, for prompt
    /// log-probabilities) with its raw log-probability and the alternatives.
    pub target: Option<u32>,
}

impl<'a> SampleRequest<'a> {
    /// A request with no alternatives asked for.
    pub fn new(params: &'a SamplingParams, counts: &'a TokenCounts, seed: u64, index: u64) -> Self {
        Self { params, counts, seed, index, top_logprobs: 0, allowed: None, target: None }
    }

    /// Whether the row needs the host sampler (a backend that samples on its own
    /// device sends only these rows' logits back): penalties need the token counts.
    pub fn needs_host(&self) -> bool {
        self.params.has_penalties() && self.target.is_none()
    }

    /// The uniform in [0, 1) for this draw (`salt` tells several draws apart).
    pub fn uniform(&self, salt: u64) -> f32 {
        uniform(self.seed, self.index, salt)
    }
}

/// A counter-based uniform in [0, 1): a hash of (seed, index, salt), so draws do not
/// depend on the order requests are served in. The CUDA sampler uses the same hash.
pub fn uniform(seed: u64, index: u64, salt: u64) -> f32 {
    let mut z =
        seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Samples one token from `logits` (modified in place by penalties and temperature).
/// The log-probability is of the unmodified distribution, as OpenAI reports it.
pub fn sample(logits: &mut [f32], req: &SampleRequest) -> Sampled {
    let params = req.params;
    let log_z = log_sum_exp(logits);
    let top = top_logprobs(logits, req.top_logprobs, log_z);
    if let Some(t) = req.target {
        let logprob = logits.get(t as usize).map_or(f32::NEG_INFINITY, |l| l - log_z);
        return Sampled { token: t, logprob, top };
    }
    // Greedy without penalties or bias leaves the logits as they are; otherwise keep a
    // copy for the log-probability.
    let untouched = params.is_greedy()
        && !params.has_penalties()
        && params.logit_bias.is_empty()
        && req.allowed.is_none();
    let raw = (!untouched).then(|| logits.to_vec());
    if let Some(mask) = req.allowed {
        apply_mask(logits, mask);
    }
    apply_logit_bias(logits, &params.logit_bias);
    apply_penalties(logits, params, req.counts);
    let token = if params.is_greedy() {
        argmax(logits)
    } else {
        sample_filtered(logits, params, req.uniform(0))
    };
    let raw_logit = raw.as_ref().map_or(logits[token as usize], |r| r[token as usize]);
    Sampled { token, logprob: raw_logit - log_z, top }
}

/// The `n` most likely tokens with their log-probabilities (`log_z`: the row's
/// log-sum-exp), highest first, lowest id on ties; NaN logits rank last.
pub fn top_logprobs(logits: &[f32], n: usize, log_z: f32) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let key = |t: u32| {
        let l = logits[t as usize];
        if l.is_nan() { f32::NEG_INFINITY } else { l }
    };
    let by_rank = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by_rank);
        ids.truncate(n);
    }
    ids.sort_unstable_by(by_rank);
    ids.into_iter().map(|t| (t, logits[t as usize] - log_z)).collect()
}

fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
}

/// Disallowed tokens to -inf. A mask that allows no token with a finite logit is
/// ignored rather than turned into NaNs (the engine never sends an empty one).
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    let allowed = |t: usize| mask.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
    if !logits.iter().enumerate().any(|(t, l)| allowed(t) && l.is_finite()) {
        return;
    }
    for (t, l) in logits.iter_mut().enumerate() {
        if !allowed(t) {
            *l = f32::NEG_INFINITY;
        }
    }
}

fn apply_penalties(logits: &mut [f32], p: &SamplingParams, counts: &TokenCounts) {
    if p.repetition_penalty != 1.0 {
        let seen = counts.prompt.iter().chain(counts.output.keys());
        for &t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &n) in &counts.output {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// Highest logit, lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

fn sample_filtered(logits: &mut [f32], p: &SamplingParams, u: f32) -> u32 {
    for l in logits.iter_mut() {
        *l /= p.temperature;
    }
    // Candidates sorted by logit, descending (ties by index for determinism).
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
    });
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let max = logits[order[0] as usize];
    let mut probs: Vec<f32> = order.iter().map(|&t| (logits[t as usize] - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.min_p > 0.0 {
        let floor = p.min_p * probs[0];
        let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
        probs.truncate(keep);
    }
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, &x) in probs.iter().enumerate() {
            cum += x;
            if cum >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut u = u * total;
    for (i, &x) in probs.iter().enumerate() {
        if u < x {
            return order[i];
        }
        u -= x;
    }
    order[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        params: &'a SamplingParams,
        counts: &'a TokenCounts,
        seed: u64,
        index: u64,
    ) -> SampleRequest<'a> {
        SampleRequest::new(params, counts, seed, index)
    }

    #[test]
    fn a_mask_limits_every_mode_and_keeps_the_raw_logprob() {
        let logits: Vec<f32> = (0..70).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
        let c = TokenCounts::default();
        // Tokens 5 and 66 only (66 is in the third word).
        let mut mask = vec![0u32; 3];
        mask[0] |= 1 << 5;
        mask[2] |= 1 << (66 - 64);
        let z = log_sum_exp(&logits);
        for p in [
            SamplingParams::greedy(),
            SamplingParams::default(),
            SamplingParams { top_k: 50, top_p: 0.9, repetition_penalty: 1.3, ..Default::default() },
        ] {
            for i in 0..50 {
                let r = SampleRequest { allowed: Some(&mask), ..req(&p, &c, 3, i) };
                let s = sample(&mut logits.clone(), &r);
                assert!(s.token == 5 || s.token == 66, "{}", s.token);
                assert!((s.logprob - (logits[s.token as usize] - z)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_its_logprob() {
        let mut l = vec![0.0, 3.0, 1.0, 3.0];
        let (p, c) = (SamplingParams::greedy(), TokenCounts::default());
        let s = sample(&mut l, &req(&p, &c, 0, 0));
        assert_eq!(s.token, 1);
        let z = (1.0f32 + 2.0 * 3f32.exp() + 1f32.exp()).ln();
        assert!((s.logprob - (3.0 - z)).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.7).sin()).collect();
        let c = TokenCounts::default();
        let p = SamplingParams { top_k: 1, ..Default::default() };
        assert_eq!(sample(&mut logits.clone(), &req(&p, &c, 9, 0)).token, argmax(&logits));
        let p = SamplingParams { temperature: 0.8, top_p: 0.9, ..Default::default() };
        let draw = |seed| {
            (0..20)
                .map(|i| sample(&mut logits.clone(), &req(&p, &c, seed, i)).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Token 0 has ~88% of the mass at temperature 1.
        let logits = vec![4.0, 2.0, 0.0, -2.0];
        let c = TokenCounts::default();
        for p in [
            SamplingParams { top_p: 0.5, ..Default::default() },
            SamplingParams { min_p: 0.5, ..Default::default() },
        ] {
            for i in 0..100 {
                assert_eq!(sample(&mut logits.clone(), &req(&p, &c, 1, i)).token, 0);
            }
        }
    }

    #[test]
    fn uniforms_are_spread_and_distinct() {
        let u: Vec<f32> = (0..1000).map(|i| uniform(7, i, 0)).collect();
        assert!(u.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = u.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        assert_ne!(uniform(7, 0, 0), uniform(8, 0, 0));
        assert_ne!(uniform(7, 0, 0), uniform(7, 0, 1));
    }

    #[test]
    fn penalties_follow_vllm() {
        let mut counts = TokenCounts::new(&[0]);
        counts.add_output(1);
        counts.add_output(1);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut l = vec![4.0, -1.0, 3.0];
        apply_penalties(&mut l, &p, &counts);
        assert_eq!(l, vec![2.0, -2.0 - 1.0 - 0.25, 3.0]);
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: -1.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn top_logprobs_are_the_raw_softmax_highest_first() {
        let logits: Vec<f32> =
            (0..300).map(|i| ((i * 37 % 101) as f32 * 0.13).sin() * 4.0).collect();
        let mut with_tie = logits.clone();
        with_tie[7] = with_tie[250];
        let z: f64 = with_tie.iter().map(|&l| (l as f64).exp()).sum::<f64>();
        let (c, p) =
            (TokenCounts::default(), SamplingParams { temperature: 0.7, ..Default::default() });
        let mut r = req(&p, &c, 5, 0);
        r.top_logprobs = MAX_TOP_LOGPROBS;
        let s = sample(&mut with_tie.clone(), &r);
        assert_eq!(s.top.len(), MAX_TOP_LOGPROBS);
        let mut order: Vec<usize> = (0..with_tie.len()).collect();
        order.sort_by(|&a, &b| with_tie[b].total_cmp(&with_tie[a]).then(a.cmp(&b)));
        for (&(t, lp), &want) in s.top.iter().zip(&order) {
            assert_eq!(t as usize, want);
            let exact = with_tie[want] as f64 - z.ln();
            assert!((lp as f64 - exact).abs() < 1e-5, "{lp} vs {exact}");
        }
        // The sampled token's own log-probability is of the same distribution.
        let exact = with_tie[s.token as usize] as f64 - z.ln();
        assert!((s.logprob as f64 - exact).abs() < 1e-5);
        // More than the vocabulary: all of it; NaN ranks last.
        let mut small = vec![1.0, f32::NAN, 2.0];
        let mut r = req(&p, &c, 5, 0);
        r.top_logprobs = 5;
        let top: Vec<u32> = top_logprobs(&small, 5, 0.0).iter().map(|t| t.0).collect();
        assert_eq!(top, vec![2, 0, 1]);
        assert_eq!(sample(&mut small, &r).top.len(), 3);
    }

    #[test]
    fn logit_bias_forces_and_bans_tokens_but_logprobs_stay_raw() {
        let logits = vec![4.0, 2.0, 0.0, -2.0];
        let c = TokenCounts::default();
        let force = SamplingParams { logit_bias: vec![(3, 100.0)], ..SamplingParams::greedy() };
        let s = sample(&mut logits.clone(), &req(&force, &c, 0, 0));
        assert_eq!(s.token, 3);
        let z = logits.iter().map(|l: &f32| l.exp()).sum::<f32>().ln();
        assert!((s.logprob - (-2.0 - z)).abs() < 1e-5, "{}", s.logprob);
        let ban =
            SamplingParams { logit_bias: vec![(0, -100.0), (1, -100.0)], ..Default::default() };
        for i in 0..200 {
            let t = sample(&mut logits.clone(), &req(&ban, &c, 3, i)).token;
            assert!(t == 2 || t == 3, "{t}");
        }
        let unsorted =
            SamplingParams { logit_bias: vec![(2, 1.0), (1, 1.0)], ..Default::default() };
        assert!(unsorted.validate().is_err());
        let huge = SamplingParams { logit_bias: vec![(2, 101.0)], ..Default::default() };
        assert!(huge.validate().unwrap_err().contains("[-100, 100]"));
    }
}
