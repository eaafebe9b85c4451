//! The tokenizer a GGUF file describes in its metadata, built as a `tokenizers`
//! tokenizer (what the Hugging Face folders give us too).
//!
//! Keys: `tokenizer.ggml.model` (`gpt2`: byte-level BPE; `llama`: SentencePiece BPE),
//! `tokens`, `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
//! 6 byte), `merges` (gpt2: "left right" strings), `scores` (llama: a merge's priority is
//! its result's score), `pre` (gpt2: how text is split before BPE), `bos_token_id` /
//! `eos_token_id` / `unknown_token_id`, `add_bos_token` / `add_eos_token`,
//! `add_space_prefix` (llama).

use ahash::AHashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use super::config::Meta;

const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's split (numbers in groups of up to three).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (numbers one digit at a time).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood, for error messages.
pub const PRE_TOKENIZERS: &str = "default, gpt2, smollm, starcoder, refact, codeshell, \
                                  llama-bpe, llama3, qwen2";

/// What the metadata says about special tokens, for the chat template and the config.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub fn from_metadata(meta: &Meta) -> Result<GgufTokenizer, String> {
    let kind = meta.str("tokenizer.ggml.model")?.ok_or("tokenizer.ggml.model is missing")?;
    let tokens: Vec<&str> = meta
        .array("tokenizer.ggml.tokens")?
        .ok_or("tokenizer.ggml.tokens is missing")?
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_str().ok_or(format!("tokenizer.ggml.tokens[{i}] is not a string")))
        .collect::<Result<_, _>>()?;
    let types: Vec<i64> = match meta.array("tokenizer.ggml.token_type")? {
        Some(a) => a
            .iter()
            .map(|v| v.as_i64().ok_or("tokenizer.ggml.token_type holds a non-integer"))
            .collect::<Result<_, _>>()?,
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let vocab: AHashMap<String, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let token_of = |key: &str| -> Result<Option<String>, String> {
        meta.token_id(key)?
            .map(|id| {
                tokens
                    .get(id as usize)
                    .map(|t| t.to_string())
                    .ok_or(format!("{key} = {id} is outside the {} tokens", tokens.len()))
            })
            .transpose()
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;

    let (mut tokenizer, add_bos_default) = match kind {
        "gpt2" => (gpt2(meta, vocab)?, false),
        "llama" => (sentencepiece(meta, &tokens, &types, vocab)?, true),
        other => {
            return Err(format!(
                "tokenizer.ggml.model {other:?} is not supported (gpt2 and llama are)"
            ));
        }
    };

    // Control tokens are special (skipped when decoding with skip_special); user-defined
    // ones are matched whole in the text, as Hugging Face's added tokens are.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|&(_, &ty)| ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED)
        .map(|(&t, &ty)| AddedToken::from(t, ty == TYPE_CONTROL).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&added);

    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let mut template = Vec::new();
    let mut specials = Vec::new();
    for (on, token, key) in [(add_bos, &bos, "bos_token_id"), (add_eos, &eos, "eos_token_id")] {
        if !on {
            continue;
        }
        let token = token.as_ref().ok_or(format!("add_{} but no {key}", &key[..3]))?;
        template.push(format!("{token}:0"));
        specials.push((token.clone(), vocab_id(&tokenizer, token)?));
        if key == "bos_token_id" {
            template.push("$A:0".into());
        }
    }
    if !template.contains(&"$A:0".to_string()) {
        template.insert(0, "$A:0".into());
    }
    let bos_eos = TemplateProcessing::builder()
        .try_single(template.join(" "))
        .map_err(|e| format!("special tokens {specials:?}: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| format!("special tokens: {e}"))?;
    let mut processors = Vec::new();
    if kind == "gpt2" {
        processors.push(PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, true)));
    }
    processors.push(PostProcessorWrapper::Template(bos_eos));
    tokenizer.with_post_processor(Some(ProcessorSequence::new(processors)));
    Ok(GgufTokenizer { tokenizer, bos_token: bos, eos_token: eos })
}

fn vocab_id(t: &Tokenizer, token: &str) -> Result<u32, String> {
    t.token_to_id(token).ok_or(format!("token {token:?} is not in the vocabulary"))
}

/// Byte-level BPE with the file's merges and the pre-tokenizer its `pre` names.
fn gpt2(meta: &Meta, vocab: AHashMap<String, u32>) -> Result<Tokenizer, String> {
    let merges: Vec<(String, String)> = meta
        .array("tokenizer.ggml.merges")?
        .ok_or("tokenizer.ggml.merges is missing (a gpt2 tokenizer needs them)")?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = v.as_str().ok_or(format!("tokenizer.ggml.merges[{i}] is not a string"))?;
            let (l, r) = s
                .split_once(' ')
                .ok_or(format!("tokenizer.ggml.merges[{i}] {s:?} is not \"left right\""))?;
            Ok((l.to_string(), r.to_string()))
        })
        .collect::<Result<_, String>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("BPE from the GGUF vocabulary: {e}"))?;
    let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let byte_level = |use_regex| ByteLevel::new(false, false, use_regex);
    let split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let s = Split::new(SplitPattern::Regex(regex.into()), Isolated, false)
            .map_err(|e| format!("pre-tokenizer {pre:?}: {e}"))?;
        Ok(s.into())
    };
    use tokenizers::SplitDelimiterBehavior::Isolated;
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // ByteLevel's own regex is GPT-2's split.
        "default" | "gpt2" => byte_level(true).into(),
        // StarCoder's family: every digit alone, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true).into()])
                .into()
        }
        "llama-bpe" | "llama3" => {
            PreTokenizerSequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()]).into()
        }
        "qwen2" => {
            PreTokenizerSequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()]).into()
        }
        other => {
            return Err(format!(
                "tokenizer.ggml.pre {other:?} is not supported ({PRE_TOKENIZERS} are)"
            ));
        }
    };
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(pre_tokenizer));
    t.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level(true))));
    Ok(t)
}

/// SentencePiece BPE (Llama 1/2, Mistral): merges rebuilt from the scores: a piece that
/// two other pieces concatenate to is a merge, earlier the higher its score. Unknown
/// bytes fall back to the `<0xNN>` tokens.
fn sentencepiece(
    meta: &Meta,
    tokens: &[&str],
    types: &[i64],
    vocab: AHashMap<String, u32>,
) -> Result<Tokenizer, String> {
    let scores: Vec<f64> = meta
        .array("tokenizer.ggml.scores")?
        .ok_or("tokenizer.ggml.scores is missing (a llama tokenizer needs them)")?
        .iter()
        .map(|v| v.as_f64().ok_or("tokenizer.ggml.scores holds a non-number"))
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens.len() {
        return Err(format!("{} scores for {} tokens", scores.len(), tokens.len()));
    }
    let mut merges: Vec<(f64, u32, u32, &str, &str)> = Vec::new();
    for (i, &piece) in tokens.iter().enumerate() {
        if types[i] != TYPE_NORMAL && types[i] != TYPE_USER_DEFINED {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((scores[i], li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    let merges: Vec<(String, String)> =
        merges.into_iter().map(|(_, _, _, l, r)| (l.to_string(), r.to_string())).collect();
    let unk = match meta.token_id("tokenizer.ggml.unknown_token_id")? {
        Some(id) => tokens.get(id as usize).map(|t| t.to_string()),
        None => types.iter().position(|&t| t == TYPE_UNKNOWN).map(|i| tokens[i].to_string()),
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk).fuse_unk(true);
    }
    let bpe = builder.build().map_err(|e| format!("BPE from the GGUF vocabulary: {e}"))?;
    let mut t = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁").map_err(|e| e.to_string())?;
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true) {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace.into());
    t.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let unspace = Replace::new("▁", " ").map_err(|e| e.to_string())?;
    t.with_decoder(Some(DecoderSequence::new(vec![
        unspace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::super::config::Metadata;
    use super::super::reader::parse;
    use super::super::test_writer::Writer;
    use super::*;

    fn build(w: &Writer) -> Result<GgufTokenizer, String> {
        let h = parse(&w.bytes()).unwrap();
        let meta: &Metadata = &h.metadata;
        from_metadata(&Meta(meta))
    }

    fn ids(t: &GgufTokenizer, text: &str) -> Vec<u32> {
        t.tokenizer.encode(text, true).unwrap().get_ids().to_vec()
    }

    /// A byte-level vocabulary: specials, single characters, then merged pieces.
    fn gpt2_writer(pre: &str) -> Writer {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "H",
            "e",
            "l",
            "o",
            "Ġ",
            "w",
            "r",
            "d",
            "1",
            "2",
            "3",
            "ll",
            "He",
            "Hell",
            "Hello",
            "Ġw",
            "or",
            "Ġwor",
            "Ġworl",
            "Ġworld",
            "12",
            "123",
            "Ġ1",
        ];
        let merges = [
            "l l", "H e", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2",
            "12 3", "Ġ 1",
        ];
        let mut types = vec![1; tokens.len()];
        types[..3].fill(3);
        let mut w = Writer::default();
        w.string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", pre)
            .strings("tokenizer.ggml.tokens", &tokens)
            .i32s("tokenizer.ggml.token_type", &types)
            .strings("tokenizer.ggml.merges", &merges)
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2);
        w
    }

    #[test]
    fn gpt2_bpe_merges_splits_digits_for_smollm_and_keeps_specials_whole() {
        let t = build(&gpt2_writer("smollm")).unwrap();
        assert_eq!(
            (t.bos_token.as_deref(), t.eos_token.as_deref()),
            (Some("<|im_start|>"), Some("<|im_end|>"))
        );
        assert_eq!(ids(&t, "Hello world"), vec![17, 22]);
        // smollm: digits one at a time.
        assert_eq!(ids(&t, "123"), vec![11, 12, 13]);
        assert_eq!(ids(&t, "<|im_start|>Hello<|im_end|>"), vec![1, 17, 2]);
        let text = t.tokenizer.decode(&[1, 17, 22, 10], false).unwrap();
        assert_eq!(text, "<|im_start|>Hello worldd");
        assert_eq!(t.tokenizer.decode(&[1, 17, 2], true).unwrap(), "Hello");
        // GPT-2's default split keeps numbers together.
        let t = build(&gpt2_writer("gpt2")).unwrap();
        assert_eq!(ids(&t, "123"), vec![24]);
        assert_eq!(ids(&t, " 1"), vec![25]);
    }

    #[test]
    fn add_bos_token_prepends_it() {
        let mut w = gpt2_writer("default");
        w.raw("tokenizer.ggml.add_bos_token", 7, &[1]);
        assert_eq!(ids(&build(&w).unwrap(), "Hello"), vec![1, 17]);
    }

    #[test]
    fn unknown_kinds_and_broken_lists_are_named() {
        assert!(build(&gpt2_writer("falcon")).err().unwrap().contains("falcon"));
        let mut w = Writer::default();
        w.string("tokenizer.ggml.model", "bert").strings("tokenizer.ggml.tokens", &["a"]);
        assert!(build(&w).err().unwrap().contains("bert"));
        let mut w = Writer::default();
        w.string("tokenizer.ggml.model", "gpt2")
            .strings("tokenizer.ggml.tokens", &["a", "b"])
            .strings("tokenizer.ggml.merges", &["ab"]);
        assert!(build(&w).err().unwrap().contains("\"ab\""));
        let mut w = gpt2_writer("gpt2");
        w.u32("tokenizer.ggml.unknown_token_id", 0).i32s("tokenizer.ggml.token_type2", &[1]);
        assert!(build(&w).is_ok());
    }

    #[test]
    fn sentencepiece_merges_by_score_with_byte_fallback() {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0x21>", "▁", "h", "i", "▁h", "hi", "▁hi", "▁t", "t",
        ];
        let types = [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1];
        // "▁hi" outranks "hi": "▁ h i" merges to "▁h" + "i" then "▁hi".
        let scores = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -9.0, -5.0, -6.0, -7.0];
        let mut w = Writer::default();
        w.string("tokenizer.ggml.model", "llama")
            .strings("tokenizer.ggml.tokens", &tokens)
            .i32s("tokenizer.ggml.token_type", &types)
            .f32s("tokenizer.ggml.scores", &scores)
            .u32("tokenizer.ggml.bos_token_id", 1)
            .u32("tokenizer.ggml.eos_token_id", 2);
        let t = build(&w).unwrap();
        // BOS by default; "!" and "\n" are not pieces: bytes.
        assert_eq!(ids(&t, "hi hi!\n"), vec![1, 10, 10, 4, 3]);
        assert_eq!(t.tokenizer.decode(&[1, 10, 10, 4, 3], true).unwrap(), "hi hi!\n");
        // Nothing for "x": unknown.
        assert_eq!(ids(&t, "x"), vec![1, 5, 0]);
    }
}
