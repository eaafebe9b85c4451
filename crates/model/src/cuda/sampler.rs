//! What the GPU sampler needs beyond the rows' parameters: the step's logit biases and
//! allowed-token bitmasks (one upload), and room for the alternatives it reports. Rows
//! that ask for none of these cost nothing here: the buffers are made on first use and
//! only grow.

use radix_gpu::{Device, DeviceBuffer, PinnedStaging};
use radix_kernels::ops::{SampleRow, SamplerExtras};

use crate::error::Result;
use crate::sampling::{MAX_TOP_LOGPROBS, SampleRequest};

/// The rows of one sampling call as the kernel reads them, and their extras on the host.
/// The backend keeps one and refills it every step (no allocation once it has grown).
#[derive(Default)]
pub(super) struct SamplerPlan {
    pub rows: Vec<SampleRow>,
    /// `[bias tokens, bias values (f32 bits), masks]`, as `SamplerExtras::inputs` lays
    /// them out.
    pub inputs: Vec<u32>,
    pub bias_len: usize,
    pub mask_rows: usize,
    pub mask_words: usize,
    /// Widest row's alternatives (0: none asked for).
    pub top_stride: usize,
}

impl SamplerPlan {
    #[cfg(test)]
    pub fn new(requests: &[SampleRequest], vocab: usize) -> Self {
        let mut plan = Self::default();
        plan.fill(requests, vocab);
        plan
    }

    /// The plan of `requests`. Rows that `needs_host` are sampled by the host from the
    /// raw logits: their bias, mask and alternatives are left to it, so the kernel does
    /// not edit them; a scoring row (`target`) reads neither bias nor mask, so none are
    /// sent for it.
    pub fn fill(&mut self, requests: &[SampleRequest], vocab: usize) {
        let on_device = |r: &SampleRequest| !r.needs_host();
        let edited = |r: &&SampleRequest| on_device(r) && r.target.is_none();
        self.rows.clear();
        self.inputs.clear();
        self.mask_words = vocab.div_ceil(32);
        self.mask_rows = 0;
        self.top_stride = 0;
        let biases = || requests.iter().filter(edited).flat_map(|r| &r.params.logit_bias);
        self.inputs.extend(biases().map(|b| b.0));
        self.bias_len = self.inputs.len();
        self.inputs.extend(biases().map(|b| b.1.to_bits()));
        let mut bias_start = 0;
        for r in requests {
            let p = r.params;
            let mut row = SampleRow {
                temperature: if p.is_greedy() { 0.0 } else { p.temperature },
                top_p: p.top_p,
                min_p: p.min_p,
                top_k: p.top_k.min(i32::MAX as usize) as i32,
                seed: r.seed,
                index: r.index,
                target: r.target.map_or(-1, |t| t.min(i32::MAX as u32) as i32),
                ..Default::default()
            };
            if on_device(r) {
                row.top_n = r.top_logprobs.min(MAX_TOP_LOGPROBS).min(vocab) as i32;
                self.top_stride = self.top_stride.max(row.top_n as usize);
            }
            if edited(&r) {
                row.bias_start = bias_start as i32;
                row.bias_count = p.logit_bias.len() as i32;
                bias_start += p.logit_bias.len();
                if let Some(mask) = r.allowed {
                    row.mask_row = self.mask_rows as i32;
                    self.mask_rows += 1;
                    // A mask shorter than the vocabulary disallows the rest.
                    let words = (0..self.mask_words).map(|w| mask.get(w).copied().unwrap_or(0));
                    self.inputs.extend(words);
                }
            }
            self.rows.push(row);
        }
    }

    /// The row parameters as upload words.
    pub fn words(&self) -> impl Iterator<Item = u32> + '_ {
        self.rows.iter().flat_map(|r| r.words())
    }
}

/// Device and staging memory for the extras, grown to the largest step that used them.
#[derive(Default)]
pub(super) struct ExtrasBuffers {
    inputs: Option<(DeviceBuffer<u32>, PinnedStaging<u32>)>,
    top: Option<(DeviceBuffer<i32>, DeviceBuffer<f32>)>,
}

impl ExtrasBuffers {
    /// Uploads `plan`'s inputs and makes room for its alternatives; the extras for the
    /// kernel (empty when the plan has none).
    pub fn prepare(&mut self, device: &Device, plan: &SamplerPlan) -> Result<SamplerExtras<'_>> {
        let mut extras = SamplerExtras::default();
        let len = plan.inputs.len();
        if len > 0 {
            if self.inputs.as_ref().is_none_or(|(d, _)| d.len() < len) {
                let cap = len.next_power_of_two();
                self.inputs = Some((device.alloc(cap)?, PinnedStaging::new(device, cap)?));
            }
            let (dev, staging) = self.inputs.as_mut().expect("made above");
            staging.write()?[..len].copy_from_slice(&plan.inputs);
            staging.upload_prefix(len, dev)?;
            extras.inputs = Some(dev);
            extras.bias_len = plan.bias_len;
            extras.mask_rows = plan.mask_rows;
            extras.mask_words = plan.mask_words;
        }
        let top_len = plan.rows.len() * plan.top_stride;
        if top_len > 0 {
            if self.top.as_ref().is_none_or(|(t, _)| t.len() < top_len) {
                let cap = top_len.next_power_of_two();
                self.top = Some((device.alloc(cap)?, device.alloc(cap)?));
            }
            let (t, l) = self.top.as_mut().expect("made above");
            extras.top = Some((t, l));
            extras.top_stride = plan.top_stride;
        }
        Ok(extras)
    }

    /// The alternatives the last kernel wrote for `plan`'s rows: per row, `top_n` of
    /// `(token, logprob)`.
    pub fn read_top(&self, plan: &SamplerPlan) -> Result<Vec<Vec<(u32, f32)>>> {
        let stride = plan.top_stride;
        let Some((t, l)) = self.top.as_ref().filter(|_| stride > 0) else {
            return Ok(vec![Vec::new(); plan.rows.len()]);
        };
        let n = plan.rows.len() * stride;
        // SAFETY: read-only views within the buffers (n <= their length, see `prepare`).
        let (tokens, logprobs) = unsafe { (t.view(0, n)?.to_vec()?, l.view(0, n)?.to_vec()?) };
        Ok(plan
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                (0..row.top_n as usize)
                    .map(|j| (tokens[i * stride + j] as u32, logprobs[i * stride + j]))
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{SamplingParams, TokenCounts};

    #[test]
    fn the_plan_lays_out_what_each_row_asks_for() {
        let c = TokenCounts::default();
        let biased = SamplingParams { logit_bias: vec![(3, 1.5), (9, -2.0)], ..Default::default() };
        let penalised = SamplingParams { repetition_penalty: 1.2, ..biased.clone() };
        let plain = SamplingParams::greedy();
        let vocab = 70; // three mask words
        let mask = [0b1010u32];
        let requests = [
            SampleRequest { top_logprobs: 5, ..SampleRequest::new(&biased, &c, 1, 0) },
            SampleRequest { allowed: Some(&mask), ..SampleRequest::new(&plain, &c, 2, 0) },
            // Sampled on the host: nothing for the kernel to apply or report.
            SampleRequest { top_logprobs: 3, ..SampleRequest::new(&penalised, &c, 3, 0) },
            // Scoring: alternatives, but neither bias nor mask.
            SampleRequest {
                target: Some(7),
                top_logprobs: 2,
                allowed: Some(&mask),
                ..SampleRequest::new(&biased, &c, 4, 0)
            },
        ];
        let plan = SamplerPlan::new(&requests, vocab);
        let r = &plan.rows;
        assert_eq!((r[0].bias_start, r[0].bias_count, r[0].top_n, r[0].mask_row), (0, 2, 5, -1));
        assert_eq!((r[1].bias_count, r[1].mask_row, r[1].temperature), (0, 0, 0.0));
        assert_eq!((r[2].bias_count, r[2].top_n, r[2].mask_row), (0, 0, -1));
        assert_eq!((r[3].bias_count, r[3].top_n, r[3].mask_row, r[3].target), (0, 2, -1, 7));
        assert_eq!((plan.bias_len, plan.mask_rows, plan.mask_words, plan.top_stride), (2, 1, 3, 5));
        // Tokens, then values as f32 bits, then the mask padded to the vocabulary.
        assert_eq!(plan.inputs[..2], [3, 9]);
        assert_eq!(plan.inputs[2..4], [1.5f32.to_bits(), (-2.0f32).to_bits()]);
        assert_eq!(plan.inputs[4..], [0b1010, 0, 0]);
        assert_eq!(plan.words().count(), 4 * SampleRow::WORDS);
    }
}
