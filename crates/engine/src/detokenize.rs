//! Incremental detokenization with stop strings: text comes out in valid UTF-8 pieces,
//! and never contains (a part of) a stop string.
//!
//! Decoding token by token breaks multi-byte characters and drops the spaces some
//! tokenizers attach to the next token, so each step decodes a short window
//! (`prefix_offset..`) and emits what it adds beyond the window's earlier text, holding it
//! back while it ends in U+FFFD (an incomplete character). With stop strings, the text
//! that could still grow into one is held back too (`StopMatcher::pending`), until it
//! cannot. Every step costs the tokens and bytes it adds: the window is short, the
//! matcher is fed each byte once, and tokens before the window are dropped.

use radix_model::Tokenizer;

use crate::stop_strings::StopMatcher;

/// Prompt tokens that seed the window (enough for any tokenizer's look-behind).
const PROMPT_CONTEXT: usize = 5;

pub struct Detokenizer {
    /// The window's tokens and the ones after it (earlier ones are dropped).
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Text decoded but not yet released (the stop-string hold-back).
    pending: String,
    stops: Option<StopMatcher>,
    /// Bytes of text decoded before `pending` (released or not).
    released: usize,
}

/// What one step of detokenizing produced.
#[derive(Debug, Default, PartialEq)]
pub struct Detokenized {
    pub text: String,
    /// A stop string matched: `text` ends before it and the request is done.
    pub stopped: bool,
}

impl Detokenizer {
    /// `prompt` is context only (its last tokens seed the window).
    pub fn new(prompt: &[u32], stop_strings: &[String]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..];
        Self {
            tokens: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
            pending: String::new(),
            stops: StopMatcher::new(stop_strings),
            released: 0,
        }
    }

    /// Consumes newly sampled tokens; `finished`: no more will come (release everything).
    pub fn step(&mut self, tok: &Tokenizer, new_tokens: &[u32], finished: bool) -> Detokenized {
        self.tokens.extend_from_slice(new_tokens);
        let prefix = tok
            .decode(&self.tokens[self.prefix_offset..self.read_offset], true)
            .unwrap_or_default();
        let full = tok.decode(&self.tokens[self.prefix_offset..], true).unwrap_or_default();
        // An incomplete character at the end waits for the next token, unless none comes.
        if full.len() > prefix.len() && (finished || !full.ends_with('\u{FFFD}')) {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(new) => new,
                None => {
                    // A tokenizer that rewrote earlier text: emit from the first difference.
                    let same = prefix
                        .chars()
                        .zip(full.chars())
                        .take_while(|(a, b)| a == b)
                        .map(|(a, _)| a.len_utf8())
                        .sum::<usize>();
                    &full[same..]
                }
            };
            self.pending.push_str(new);
            if let Some(found) = self.stops.as_mut().and_then(|s| s.feed(new)) {
                let end = found.start.saturating_sub(self.released).min(self.pending.len());
                let mut text = std::mem::take(&mut self.pending);
                text.truncate(floor_char_boundary(&text, end));
                return Detokenized { text, stopped: true };
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            // Tokens before the window are never decoded again.
            self.tokens.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        let held = if finished { 0 } else { self.stops.as_ref().map_or(0, StopMatcher::pending) };
        let cut = floor_char_boundary(&self.pending, self.pending.len().saturating_sub(held));
        self.released += cut;
        Detokenized { text: self.pending.drain(..cut).collect(), stopped: false }
    }
}

/// The largest char boundary of `s` at or below `at`.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, stops: &[&str]) -> (String, bool, Vec<String>) {
        let tok = Tokenizer::Bytes;
        let prompt = tok.encode("ctx", true).unwrap();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut d = Detokenizer::new(&prompt, &stops);
        let mut out = String::new();
        let mut pieces = Vec::new();
        let bytes = text.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            let r = d.step(&tok, &[b as u32], i + 1 == bytes.len());
            assert!(!r.text.contains('\u{FFFD}'), "emitted a broken character: {:?}", r.text);
            out.push_str(&r.text);
            pieces.push(r.text);
            if r.stopped {
                return (out, true, pieces);
            }
        }
        (out, false, pieces)
    }

    #[test]
    fn multibyte_characters_come_out_whole() {
        let (out, stopped, pieces) = run("héllo 世界 🦀!", &[]);
        assert_eq!(out, "héllo 世界 🦀!");
        assert!(!stopped);
        assert!(pieces.iter().any(|p| p == "🦀"), "{pieces:?}");
    }

    #[test]
    fn stop_strings_end_the_text_and_never_leak() {
        let (out, stopped, _) = run("one two STOP three", &["STOP"]);
        assert_eq!((out.as_str(), stopped), ("one two ", true));
        // A partial match that does not complete is released in the end.
        let (out, stopped, _) = run("one STO two", &["STOP"]);
        assert_eq!((out.as_str(), stopped), ("one STO two", false));
        // The stop string that ends first wins.
        let (out, _, _) = run("abc<end>x</s>", &["</s>", "<end>"]);
        assert_eq!(out, "abc");
        // Multi-byte stop strings, and text held back only while it could still match.
        let (out, stopped, pieces) = run("a世b世界c", &["世界"]);
        assert_eq!((out.as_str(), stopped), ("a世b", true));
        assert!(pieces.iter().any(|p| p == "世b"), "{pieces:?}");
    }

    #[test]
    fn the_window_stays_short() {
        let tok = Tokenizer::Bytes;
        let mut d = Detokenizer::new(&[1, 2, 3, 4, 5, 6, 7], &[]);
        for _ in 0..1000 {
            d.step(&tok, &[b'x' as u32], false);
        }
        assert!(d.tokens.len() <= PROMPT_CONTEXT + 2, "{} tokens kept", d.tokens.len());
    }
}
