//! radix-sparse's engine: requests with sampling parameters and stop rules, a
//! continuous-batching scheduler with chunked prefill, prefix reuse through the radix
//! cache, page allocation with eviction and preemption, fair sharing of running slots
//! between requests, streaming, metrics; incremental detokenizing and stop strings on
//! the receiving side (`OutputStream`). `Engine` is the synchronous core (it schedules; `KvManager` owns
//! the pages and the prefix cache; `RequestRules` says which requests are valid);
//! `EngineHandle` runs it on a thread for the server and the CLI.

mod constraint;
mod detokenize;
mod engine;
mod handle;
mod kv_manager;
mod metrics;
mod output;
mod request;
mod rules;
mod runner;
mod sequence;
mod stop_strings;

pub use constraint::{Advance, Constraint, ConstraintSpec, Grammars, json_layout};
pub use detokenize::{Detokenized, Detokenizer};
pub use engine::{Engine, EngineConfig, EngineError, SparseConfig};
pub use handle::{EngineHandle, EngineInfo};
pub use kv_manager::{KvManager, KvReads, SeqPages};
pub use metrics::EngineStats;
pub use output::{OutputProcessor, OutputStream, Processed};
pub use radix_kv::{SparseBudget, SparsePolicy};
pub use request::{FinishReason, Output, PromptLogprob, Request, RequestId, StopConfig};
pub use rules::{MAX_STOP_STRING_BYTES, RequestRules, RuleError};
pub use runner::Runner;
pub use stop_strings::{StopMatch, StopMatcher};
