//! A checkpoint split into shards with `model.safetensors.index.json` loads the same
//! weights as the single file: the tiny-llama fixture, re-saved as two shards, gives
//! identical logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use radix_model::{Backend, CpuBackend, KvPoolSpec, ModelSource, Step};
use safetensors::SafeTensors;

fn logits(dir: &Path) -> Vec<f32> {
    let source = ModelSource::open(dir.to_str().unwrap()).unwrap();
    let cfg = source.config.clone();
    let mut model = source.load(CpuBackend::new()).unwrap();
    model.backend.init_kv(&cfg, &KvPoolSpec { num_pages: 8, page_size: 16, sparse: None }).unwrap();
    let positions: Vec<i32> = (0..5).collect();
    let step = Step {
        tokens: vec![315, 272, 261, 275, 290],
        positions: positions.clone(),
        slots: positions,
        qo_indptr: vec![0, 5],
        kv_indptr: vec![0, 1],
        kv_indices: vec![0],
        kv_last_page_len: vec![5],
        logit_rows: vec![4],
        kv_keep: vec![],
    };
    model.forward_logits(&step).unwrap()
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let single = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let sharded = std::env::temp_dir().join(format!("rs-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(single.join(f), sharded.join(f)).unwrap();
    }
    let bytes = std::fs::read(single.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = HashMap::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &sharded.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();

    assert_eq!(logits(&sharded), logits(&single));
    std::fs::remove_dir_all(&sharded).unwrap();
}
