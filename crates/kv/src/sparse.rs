//! Query-aware sparse paging (Quest, ICML 2024): how many pages of a sequence a decode
//! step attends to. The scoring and the choice of *which* pages happen per layer and kv
//! head on the backend (`radix_kernels::sparse`); this module fixes only the counts,
//! which depend on the context length and the budget alone. So the host knows every
//! sparse table's size before the step runs (plans and CUDA graphs need that), and
//! only the page ids are chosen on the device.
//!
//! A sparse table of `keep` pages always holds the first `sink_pages` (attention
//! sinks) and the last `window_pages` (the recent tokens, the last page among them),
//! then the best-scoring pages in between. Contexts shorter than `min_context_tokens`
//! and the first `dense_layers` layers stay dense.

use std::fmt;
use std::str::FromStr;

/// How much of a sequence's KV a sparse decode step reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparseBudget {
    /// A fraction of the sequence's pages, in `(0, 1]`; 1.0 is dense.
    Fraction(f64),
    /// About this many tokens (rounded up to whole pages).
    Tokens(usize),
}

impl SparseBudget {
    /// Dense: every page, always.
    pub const DENSE: SparseBudget = SparseBudget::Fraction(1.0);

    /// A budget from an API number: `0 < x <= 1` is a fraction of pages, an integer
    /// `x > 1` a token count.
    pub fn from_number(x: f64) -> Result<Self, String> {
        if x.is_finite() && x > 0.0 && x <= 1.0 {
            Ok(Self::Fraction(x))
        } else if x.is_finite() && x > 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 {
            Ok(Self::Tokens(x as usize))
        } else {
            Err(format!(
                "sparse budget {x} must be a fraction of pages in (0, 1] or a whole number \
                 of tokens above 1"
            ))
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self, Self::Fraction(f) if *f >= 1.0)
    }
}

impl FromStr for SparseBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let x: f64 = s.trim().parse().map_err(|_| {
            format!("sparse budget {s:?} must be a number: a fraction in (0, 1] or tokens")
        })?;
        Self::from_number(x)
    }
}

impl fmt::Display for SparseBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fraction(x) => write!(f, "{x}"),
            Self::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

/// What stays dense, engine-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparsePolicy {
    /// Leading pages always kept (attention sinks).
    pub sink_pages: usize,
    /// Trailing pages always kept (recent tokens; includes the partly filled last page).
    pub window_pages: usize,
    /// Sequences with fewer tokens of context attend densely.
    pub min_context_tokens: usize,
    /// The first layers attend densely (Quest keeps the first two dense).
    pub dense_layers: usize,
}

impl Default for SparsePolicy {
    fn default() -> Self {
        Self { sink_pages: 1, window_pages: 2, min_context_tokens: 1024, dense_layers: 2 }
    }
}

impl SparsePolicy {
    /// Checks the policy: the window must hold at least one page, since the last,
    /// partly filled page of a sequence has to stay last in its sparse table.
    pub fn validate(&self) -> Result<(), String> {
        if self.window_pages == 0 {
            return Err("sparse policy: window_pages must be at least 1 (the last, partly \
                        filled page stays last in a sparse table)"
                .into());
        }
        Ok(())
    }

    /// Pages a decode step of a sequence with `context_tokens` tokens of KV (this
    /// step's included) attends to under `budget`, or `None` when it stays dense.
    pub fn pages_to_keep(
        &self,
        budget: SparseBudget,
        context_tokens: usize,
        page_size: usize,
    ) -> Option<usize> {
        if budget.is_dense() || context_tokens < self.min_context_tokens.max(1) {
            return None;
        }
        let pages = context_tokens.div_ceil(page_size.max(1));
        let wanted = match budget {
            SparseBudget::Fraction(f) => (f * pages as f64).ceil() as usize,
            SparseBudget::Tokens(t) => t.div_ceil(page_size.max(1)),
        };
        let keep = wanted.max(self.sink_pages + self.window_pages).max(1);
        (keep < pages).then_some(keep)
    }

    /// Whether `layer` may attend sparsely.
    pub fn layer_is_sparse(&self, layer: usize) -> bool {
        layer >= self.dense_layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_fractions_or_tokens() {
        assert_eq!("0.3".parse::<SparseBudget>().unwrap(), SparseBudget::Fraction(0.3));
        assert_eq!("1".parse::<SparseBudget>().unwrap(), SparseBudget::DENSE);
        assert_eq!("4096".parse::<SparseBudget>().unwrap(), SparseBudget::Tokens(4096));
        for bad in ["0", "-0.5", "1.5", "nan", "inf", "x", ""] {
            assert!(bad.parse::<SparseBudget>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keeps_the_budget_and_the_forced_pages() {
        let p = SparsePolicy::default();
        // 32K tokens = 2048 pages of 16: 30% is 615 pages.
        assert_eq!(p.pages_to_keep(SparseBudget::Fraction(0.3), 32768, 16), Some(615));
        assert_eq!(p.pages_to_keep(SparseBudget::Tokens(4096), 32768, 16), Some(256));
        // A tiny budget still keeps the sink and the window.
        assert_eq!(p.pages_to_keep(SparseBudget::Tokens(2), 32768, 16), Some(3));
        // Dense: budget 1.0, short contexts, budgets covering everything.
        assert_eq!(p.pages_to_keep(SparseBudget::DENSE, 32768, 16), None);
        assert_eq!(p.pages_to_keep(SparseBudget::Fraction(0.1), 1000, 16), None);
        assert_eq!(p.pages_to_keep(SparseBudget::Tokens(40000), 32768, 16), None);
        assert_eq!(p.pages_to_keep(SparseBudget::Fraction(0.999), 1040, 16), None);
        assert!(!p.layer_is_sparse(1) && p.layer_is_sparse(2));
    }

    #[test]
    fn policies_need_a_window_page() {
        assert!(SparsePolicy::default().validate().is_ok());
        let p =
            SparsePolicy { sink_pages: 0, window_pages: 1, min_context_tokens: 1, dense_layers: 0 };
        assert!(p.validate().is_ok());
        let err =
            SparsePolicy { window_pages: 0, ..SparsePolicy::default() }.validate().unwrap_err();
        assert!(err.contains("window_pages"), "{err}");
    }
}
