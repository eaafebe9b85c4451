//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or the
//! byte-level tokenizer of the synthetic models (every byte is a token, so any text
//! round-trips).

use std::path::Path;

use crate::error::{ModelError, Result};
use crate::synthetic;

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

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Hf(t) => t.get_vocab_size(true),
            Self::Bytes => synthetic::EOS as usize + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
