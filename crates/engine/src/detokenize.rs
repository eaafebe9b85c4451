//! Incremental detokenization with stop strings: text comes out in valid UTF-8 pieces,
//! and never contains (a part of) a stop string.
//!
//! Decoding token by token breaks multi-byte characters and drops the spaces some
//! tokenizers attach to the next token, so each step decodes a short window
//! (`prefix_offset..`) and emits what it adds beyond the window's earlier text, holding it
//! back while it ends in U+FFFD (an incomplete character). With stop strings, the last
//! `longest stop - 1` bytes are held back too, until they cannot start a stop string.

use radix_model::Tokenizer;

pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
    /// Text decoded so far but not yet released (the stop-string hold-back).
    pending: String,
    stop_strings: Vec<String>,
    max_stop: usize,
}

/// What one step of detokenizing produced.
#[derive(Debug, Default, PartialEq)]
pub struct Detokenized {
    pub text: String,
    /// A stop string matched: `text` ends before it and the request is done.
    pub stopped: bool,
}

impl Detokenizer {
    /// `tokens[..prompt_len]` is context only (a few of its last tokens seed the window).
    pub fn new(prompt_len: usize, stop_strings: Vec<String>) -> Self {
        let start = prompt_len.saturating_sub(5);
        let max_stop = stop_strings.iter().map(String::len).max().unwrap_or(0);
        Self {
            prefix_offset: start,
            read_offset: prompt_len,
            pending: String::new(),
            stop_strings,
            max_stop,
        }
    }

    /// Consumes the tokens appended since the last call (all of `tokens` is the sequence).
    pub fn step(&mut self, tok: &Tokenizer, tokens: &[u32], finished: bool) -> Detokenized {
        let prefix =
            tok.decode(&tokens[self.prefix_offset..self.read_offset], true).unwrap_or_default();
        let full = tok.decode(&tokens[self.prefix_offset..], true).unwrap_or_default();
        // An incomplete character at the end waits for the next token, unless none comes.
        if full.len() > prefix.len() && (finished || !full.ends_with('\u{FFFD}')) {
            let new = full.strip_prefix(prefix.as_str()).map(str::to_string).unwrap_or_else(|| {
                // A tokenizer that rewrote earlier text: emit from the first difference.
                let same = prefix
                    .chars()
                    .zip(full.chars())
                    .take_while(|(a, b)| a == b)
                    .map(|(a, _)| a.len_utf8())
                    .sum::<usize>();
                full[same..].to_string()
            });
            self.pending.push_str(&new);
            self.prefix_offset = self.read_offset;
            self.read_offset = tokens.len();
        }
        self.release(finished)
    }

    fn release(&mut self, finished: bool) -> Detokenized {
        if let Some(at) =
            self.stop_strings.iter().filter_map(|s| self.pending.find(s.as_str())).min()
        {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Detokenized { text, stopped: true };
        }
        // Hold back the longest suffix that could still grow into a stop string.
        let mut cut = self.pending.len();
        if !finished {
            let from = self.pending.len().saturating_sub(self.max_stop.saturating_sub(1));
            if let Some(start) = (from..self.pending.len()).find(|&i| {
                self.pending.is_char_boundary(i)
                    && self.stop_strings.iter().any(|s| s.starts_with(&self.pending[i..]))
            }) {
                cut = start;
            }
        }
        let text: String = self.pending.drain(..cut).collect();
        Detokenized { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, stops: &[&str]) -> (String, bool, Vec<String>) {
        let tok = Tokenizer::Bytes;
        let prompt = tok.encode("ctx", true).unwrap();
        let mut d = Detokenizer::new(prompt.len(), stops.iter().map(|s| s.to_string()).collect());
        let mut tokens = prompt.clone();
        let mut out = String::new();
        let mut pieces = Vec::new();
        let bytes = text.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            tokens.push(b as u32);
            let r = d.step(&tok, &tokens, i + 1 == bytes.len());
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
        // The earliest of several stop strings wins.
        let (out, _, _) = run("abc<end>x</s>", &["</s>", "<end>"]);
        assert_eq!(out, "abc");
    }
}
