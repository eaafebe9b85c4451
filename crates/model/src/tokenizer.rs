//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or the
//! byte-level tokenizer of the synthetic models (every byte is a token, so any text
//! round-trips).

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::synthetic;

/// One token as a grammar sees it (`Tokenizer::vocab_bytes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenBytes {
    Text(Vec<u8>),
    /// A control token (BOS, EOS, chat markers): never part of generated text.
    Special(String),
}

pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::bad_file(&path, "missing (a tokenizer.json is required)"));
        }
        let tok =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::bad_file(&path, e))?;
        Ok(Self::Hf(Box::new(tok)))
    }

    /// Encodes `text`; `add_special` adds what the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match self {
            Self::Hf(t) => t
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
            Self::Bytes => {
                let mut ids = Vec::with_capacity(text.len() + 1);
                if add_special {
                    ids.push(synthetic::BOS);
                }
                ids.extend(text.bytes().map(u32::from));
                Ok(ids)
            }
        }
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD (the incremental detokenizer
    /// holds text back while it ends in one).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match self {
            Self::Hf(t) => {
                t.decode(ids, skip_special).map_err(|e| ModelError::Tokenizer(e.to_string()))
            }
            Self::Bytes => {
                let bytes: Vec<u8> = ids
                    .iter()
                    .filter(|&&id| id < synthetic::BYTE_VOCAB || !skip_special)
                    .filter_map(|&id| u8::try_from(id).ok())
                    .collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// The bytes token `id` stands for, even when they are not valid UTF-8 alone (the
    /// first byte of a multi-byte character): what OpenAI's log-probability `bytes` are.
    /// Decoding one token would give U+FFFD's bytes instead.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let text = self.decode(&[id], false).unwrap_or_default();
        if !text.contains('\u{FFFD}') {
            return text.into_bytes();
        }
        match self {
            Self::Bytes => u8::try_from(id).map(|b| vec![b]).unwrap_or_default(),
            Self::Hf(t) => t
                .id_to_token(id)
                .and_then(|piece| byte_fallback(&piece).or_else(|| byte_level_bytes(&piece)))
                .unwrap_or_else(|| text.into_bytes()),
        }
    }

    /// What each of the first `vocab_size` token ids (the logits' width, which may pass
    /// the tokenizer's vocabulary) stands for, for a grammar engine that matches bytes:
    /// the bytes it adds to the text, or a special token that no text produces.
    pub fn vocab_bytes(&self, vocab_size: usize) -> Vec<TokenBytes> {
        match self {
            Self::Bytes => (0..vocab_size as u32)
                .map(|id| match u8::try_from(id) {
                    Ok(b) => TokenBytes::Text(vec![b]),
                    Err(_) if id == synthetic::BOS => TokenBytes::Special("<s>".into()),
                    Err(_) if id == synthetic::EOS => TokenBytes::Special("</s>".into()),
                    Err(_) => TokenBytes::Special(format!("<|unused_{id}|>")),
                })
                .collect(),
            Self::Hf(t) => {
                let added = t.get_added_tokens_decoder();
                let pieces: Vec<Option<String>> =
                    (0..vocab_size as u32).map(|id| t.id_to_token(id)).collect();
                // GPT-2's byte alphabet writes a space as 'Ġ'; SentencePiece as '▁'.
                let byte_level = pieces.iter().flatten().any(|p| p.contains('Ġ'));
                pieces
                    .into_iter()
                    .enumerate()
                    .map(|(id, piece)| {
                        let Some(piece) = piece else {
                            return TokenBytes::Special(format!("<|unused_{id}|>"));
                        };
                        match added.get(&(id as u32)) {
                            Some(a) if a.special => return TokenBytes::Special(piece),
                            // Added tokens are matched as their literal text.
                            Some(a) => return TokenBytes::Text(a.content.clone().into_bytes()),
                            None => {}
                        }
                        let bytes = byte_fallback(&piece).or_else(|| {
                            if byte_level {
                                byte_level_bytes(&piece)
                            } else {
                                Some(piece.replace('▁', " ").into_bytes())
                            }
                        });
                        bytes.map_or(TokenBytes::Special(piece), TokenBytes::Text)
                    })
                    .collect()
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Hf(t) => t.get_vocab_size(true),
            Self::Bytes => synthetic::EOS as usize + 1,
        }
    }
}

/// A SentencePiece byte-fallback piece (`<0xE6>`): the byte it names.
fn byte_fallback(piece: &str) -> Option<Vec<u8>> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
}

/// A byte-level BPE piece (GPT-2's alphabet: Llama 3, Qwen, Mistral's Tekken): each
/// character stands for one byte. Printable Latin-1 bytes are themselves; the other 68
/// are U+0100 onwards, in byte order.
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let shifted: Vec<u8> = (0u32..=255).filter(|&b| !printable(b)).map(|b| b as u8).collect();
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            if printable(c) {
                Some(c as u8)
            } else {
                c.checked_sub(0x100).and_then(|i| shifted.get(i as usize).copied())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bytes_are_the_tokens_own() {
        let t = Tokenizer::Bytes;
        // The first byte of 'é' alone is not UTF-8: its own byte, not U+FFFD's.
        assert_eq!(t.token_bytes(0xC3), vec![0xC3]);
        assert_eq!(t.token_bytes(b'a' as u32), b"a".to_vec());
        assert_eq!(byte_fallback("<0xE6>"), Some(vec![0xE6]));
        assert_eq!(byte_fallback("<0xE>"), None);
        // GPT-2's alphabet: 'Ġ' is a space, 'Ã' is byte 0xC3, 'Ċ' a newline.
        assert_eq!(byte_level_bytes("ĠÃ"), Some(vec![b' ', 0xC3]));
        assert_eq!(byte_level_bytes("Ċ"), Some(vec![b'\n']));
        assert_eq!(byte_level_bytes("世"), None);
    }

    #[test]
    fn bytes_round_trip_any_text() {
        let t = Tokenizer::Bytes;
        let text = "héllo, 世界 🦀";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids[0], synthetic::BOS);
        assert_eq!(t.decode(&ids, true).unwrap(), text);
        // Half a multi-byte character decodes to the replacement character.
        let partial = &ids[..ids.len() - 1];
        assert!(t.decode(partial, true).unwrap().ends_with('\u{FFFD}'));
    }
}
