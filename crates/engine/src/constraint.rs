//! Structured output: a grammar per sequence (llguidance), which says before each sample
//! which tokens may come next.
//!
//! - `Grammars` (one per engine, shared with the server through `EngineInfo`) holds the
//!   token trie of the vocabulary, built once on first use from the tokenizer's per-token
//!   bytes (`Tokenizer::vocab_bytes`; llguidance's own tokenizer bridge pins another
//!   `tokenizers` version). `compile` turns a `ConstraintSpec` into a `Constraint` or an
//!   error that names what is wrong: the server calls it while validating, so a bad
//!   schema is a 400 and never reaches the engine thread.
//! - `Constraint` (owned by the sequence) computes the allowed-token bitmask before a
//!   step samples (the engine does it while the forward runs) and is advanced with the
//!   sampled token. EOS is in the mask exactly when the grammar may end; the sequence
//!   stops with "stop" when EOS is sampled or the grammar allows nothing more.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use radix_model::{TokenBytes, Tokenizer};
use serde_json::{Value, json};

/// What the output must match (vLLM's `structured_outputs` kinds).
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON Schema (`response_format` json_schema, `structured_outputs.json`).
    Json(Value),
    /// Any JSON object (`response_format` json_object).
    JsonObject,
    /// A regular expression (Rust regex syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark dialect (GBNF-style `::=` rules too).
    Grammar(String),
}

/// JSON layout when the schema does not choose one (llguidance's `x-guidance` options):
/// `{"a": 1, "b": [2, 3]}`, with no free whitespace. Free whitespace lets a small model
/// pad forever (newline after newline) before it closes the object.
pub fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl ConstraintSpec {
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Self::Json(schema) => {
                let mut schema = schema.clone();
                let Value::Object(obj) = &mut schema else {
                    // `true` / `false` are schemas too, but not ones worth constraining by.
                    return Err("the JSON schema must be an object".into());
                };
                obj.entry("x-guidance").or_insert_with(json_layout);
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": json_layout()}),
            ),
            Self::Regex(rx) => {
                // llguidance takes Rust regex syntax; check it with the same crate so the
                // error reads as the user's regex, not as the Lark it is rewritten into.
                regex_syntax::Parser::new().parse(rx).map_err(|e| e.to_string())?;
                TopLevelGrammar::from_regex(rx)
            }
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err("the list of choices is empty".into());
                }
                let alternatives: Vec<String> =
                    choices.iter().map(|c| serde_json::to_string(c).expect("a string")).collect();
                // Lark string literals are JSON strings.
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Self::Grammar(g) => {
                if g.trim().is_empty() {
                    return Err("the grammar is empty".into());
                }
                TopLevelGrammar::from_lark(g.clone())
            }
        })
    }
}

/// Our tokenizer as llguidance sees it: the trie of token bytes, and tokenizing for the
/// few places the grammar engine needs it (forced prefixes).
struct TokenEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Our tokenizer where the bytes are text; the trie's greedy split otherwise (a
        // cut inside a character).
        match std::str::from_utf8(s).ok().and_then(|t| self.tokenizer.encode(t, false).ok()) {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// The vocabulary's grammar side, shared by every request of one engine.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish()
    }
}

impl Grammars {
    /// `vocab_size` is the logits' width; `eos` the model's end tokens.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: Vec<u32>) -> Self {
        Self { tokenizer, vocab_size, eos, factory: OnceLock::new() }
    }

    /// The parser factory, built on first use (a 49K vocabulary's trie takes tens of
    /// milliseconds; servers that never constrain never pay it).
    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory.get_or_init(|| self.build_factory()).as_ref().map_err(Clone::clone)
    }

    fn build_factory(&self) -> Result<ParserFactory, String> {
        let words: Vec<Vec<u8>> = self
            .tokenizer
            .vocab_bytes(self.vocab_size)
            .into_iter()
            .map(|t| match t {
                TokenBytes::Text(b) => b,
                TokenBytes::Special(name) => {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(name.as_bytes());
                    b
                }
            })
            .collect();
        let Some(&first_eos) = self.eos.first() else {
            return Err("the model has no end-of-sequence token to end a grammar with".into());
        };
        let info = TokRxInfo::new(self.vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&self.eos);
        let env: TokEnv = Arc::new(TokenEnv { trie, tokenizer: self.tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Grammar errors go into our 400s, not to stderr.
        factory.quiet();
        Ok(factory)
    }

    /// Compiles `spec` for one sequence. The error says what is wrong with it.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, String> {
        let grammar = spec.grammar()?;
        let factory = self.factory()?;
        let parser = factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Box::new(Matcher::new(Ok(parser)));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let mut c = Constraint { matcher, mask: SimpleVob::new(), eos: self.eos.clone() };
        // A grammar that allows nothing at all (an unsatisfiable schema) fails here.
        c.compute_mask()?;
        if c.mask.is_zero() {
            return Err("the grammar allows no output".into());
        }
        Ok(c)
    }
}

/// One sequence's grammar state and its latest mask.
pub struct Constraint {
    /// Boxed: the matcher is ~1.7 KB, and requests move through channels.
    matcher: Box<Matcher>,
    mask: SimpleVob,
    eos: Vec<u32>,
}

impl Clone for Constraint {
    /// An independent copy (each choice of a request advances its own).
    fn clone(&self) -> Self {
        Self {
            matcher: Box::new(self.matcher.deep_clone()),
            mask: self.mask.clone(),
            eos: self.eos.clone(),
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

/// What a sampled token did to the grammar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Advance {
    /// More may follow.
    Continue,
    /// The output is complete (EOS sampled where the grammar may end, or the grammar
    /// allows nothing more).
    Done,
}

impl Constraint {
    /// Computes the mask of the tokens allowed next (`allowed` reads it).
    pub fn compute_mask(&mut self) -> Result<(), String> {
        self.mask = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The latest mask: bit t of word t / 32 set = token t allowed.
    pub fn allowed(&self) -> &[u32] {
        self.mask.as_slice()
    }

    /// Advances past the sampled `token`.
    pub fn advance(&mut self, token: u32) -> Result<Advance, String> {
        if self.eos.contains(&token) {
            return Ok(Advance::Done);
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())?;
        Ok(if self.matcher.is_stopped() { Advance::Done } else { Advance::Continue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radix_model::synthetic;

    fn grammars() -> Grammars {
        Grammars::new(Arc::new(Tokenizer::Bytes), 320, vec![synthetic::EOS])
    }

    fn allowed(c: &Constraint, t: u32) -> bool {
        c.allowed().get(t as usize / 32).is_some_and(|w| w >> (t % 32) & 1 == 1)
    }

    /// Walks `text` through the grammar, checking each byte is allowed before it.
    fn feed(c: &mut Constraint, text: &str) -> Advance {
        let mut last = Advance::Continue;
        for b in text.bytes() {
            c.compute_mask().unwrap();
            assert!(allowed(c, b as u32), "{:?} not allowed", b as char);
            last = c.advance(b as u32).unwrap();
        }
        last
    }

    #[test]
    fn eos_is_allowed_exactly_where_the_grammar_may_end() {
        let g = grammars();
        let mut c = g.compile(&ConstraintSpec::Regex("ab+".into())).unwrap();
        assert!(allowed(&c, b'a' as u32) && !allowed(&c, b'b' as u32));
        assert!(!allowed(&c, synthetic::EOS));
        feed(&mut c, "ab");
        c.compute_mask().unwrap();
        assert!(allowed(&c, synthetic::EOS) && allowed(&c, b'b' as u32));
        assert_eq!(c.advance(synthetic::EOS).unwrap(), Advance::Done);
        // A choice is done after its last byte: nothing more may follow.
        let mut c = g.compile(&ConstraintSpec::Choice(vec!["yes".into(), "no".into()])).unwrap();
        assert_eq!(feed(&mut c, "no"), Advance::Done);
    }

    #[test]
    fn json_schemas_constrain_and_bad_ones_are_refused() {
        let g = grammars();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
            "required": ["n"], "additionalProperties": false});
        let mut c = g.compile(&ConstraintSpec::Json(schema)).unwrap();
        assert_eq!(feed(&mut c, "{\"n\": 12}"), Advance::Done);
        let err = g.compile(&ConstraintSpec::Json(json!({"type": "nonsense"}))).unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
        assert!(g.compile(&ConstraintSpec::Regex("a(".into())).is_err());
        assert!(g.compile(&ConstraintSpec::Grammar("start: foo(".into())).is_err());
        assert!(g.compile(&ConstraintSpec::Choice(vec![])).is_err());
        // A clone advances on its own.
        let c1 = g.compile(&ConstraintSpec::Regex("x|y".into())).unwrap();
        let mut c2 = c1.clone();
        assert_eq!(feed(&mut c2, "x"), Advance::Done);
        let mut c1 = c1;
        assert_eq!(feed(&mut c1, "y"), Advance::Done);
    }
}
