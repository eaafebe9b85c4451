//! `fetch` against a mock Hugging Face Hub: a local HTTP server answering the calls the
//! `hf-hub` crate makes (`GET /api/models/{repo}/revision/{rev}` for the file list,
//! `GET /{repo}/resolve/{rev}/{file}` with a `Range` header, answered 206 with
//! `x-repo-commit`, `etag` and `Content-Range`), serving the tiny-llama parity fixture.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request as the mock saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

struct MockHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    files: Arc<BTreeMap<String, Vec<u8>>>,
}

/// The etag of a file's content (the Hub's is its SHA-256 for LFS files).
fn etag(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

impl MockHub {
    /// Serves `files` as repo `org/tiny` at every revision, with an extra GGUF file.
    fn start(files: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(files);
        let (log, served) = (seen.clone(), files.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let (mut range, mut auth) = (None, None);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    match k.to_ascii_lowercase().as_str() {
                        "range" => range = Some(v.trim().to_string()),
                        "authorization" => auth = Some(v.trim().to_string()),
                        _ => {}
                    }
                }
                log.lock().unwrap().push(Seen { path: path.clone(), range: range.clone(), auth });
                let response = answer(&served, &path, range.as_deref());
                stream.write_all(&response).unwrap();
            }
        });
        Self { endpoint, seen, files }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn answer(files: &BTreeMap<String, Vec<u8>>, path: &str, range: Option<&str>) -> Vec<u8> {
    let head = |status: &str, headers: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {len}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    if let Some(rest) = path.strip_prefix("/api/models/org/tiny/revision/") {
        let _revision = rest;
        let siblings: Vec<serde_json::Value> =
            files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
        let mut out = head("200 OK", "Content-Type: application/json\r\n", body.len());
        out.extend(body.as_bytes());
        return out;
    }
    let file = path.strip_prefix("/org/tiny/resolve/").and_then(|r| r.split_once('/')).map(|x| x.1);
    let Some(data) = file.and_then(|f| files.get(f)) else {
        return head("404 Not Found", "", 0);
    };
    let (start, end) =
        match range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
            Some((s, e)) => {
                let s: usize = s.parse().unwrap();
                let e: usize = if e.is_empty() { data.len() - 1 } else { e.parse().unwrap() };
                (s, e.min(data.len() - 1))
            }
            None => (0, data.len() - 1),
        };
    let headers = format!(
        "x-repo-commit: {COMMIT}\r\netag: \"{}\"\r\nContent-Range: bytes {start}-{end}/{}\r\n",
        etag(data),
        data.len()
    );
    let mut out = head("206 Partial Content", &headers, end + 1 - start);
    out.extend(&data[start..=end]);
    out
}

fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-llama");
    let mut files = BTreeMap::new();
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.insert(name.to_string(), std::fs::read(dir.join(name)).unwrap());
    }
    files.insert("gguf/tiny.Q8_0.gguf".into(), b"GGUF not really".to_vec());
    files
}

fn config(hub: &MockHub, cache: &std::path::Path) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: Some(hub.endpoint.clone()),
        token: Some("hf_secret".into()),
        progress: false,
    }
}

fn temp_cache(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rs-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn downloads_a_checkpoint_into_the_standard_cache_then_reuses_it() {
    let hub = MockHub::start(fixture_files());
    let cache = temp_cache("checkpoint");
    let model = HubModel::parse("org/tiny").unwrap();
    let dir = fetch(&model, &config(&hub, &cache)).unwrap();
    // The layout other tools use: models--org--tiny/snapshots/<commit>/.
    assert_eq!(dir, cache.join("models--org--tiny/snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        hub.files["model.safetensors"]
    );
    let source = radix_model::ModelSource::open(dir.to_str().unwrap()).unwrap();
    assert_eq!(source.config.num_layers, 2);
    let seen = hub.seen();
    assert!(seen.iter().all(|s| s.auth.as_deref() == Some("Bearer hf_secret")), "{seen:?}");
    assert!(seen.iter().any(|s| s.path == "/api/models/org/tiny/revision/main"));
    assert!(!seen.iter().any(|s| s.path.ends_with(".gguf")), "only the checkpoint's files");

    // Cached: no request at all.
    let again = fetch(&model, &config(&hub, &cache)).unwrap();
    assert_eq!((again, hub.seen().len()), (dir, seen.len()));
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn an_interrupted_download_resumes_from_its_part_file() {
    let hub = MockHub::start(fixture_files());
    let cache = temp_cache("resume");
    let weights = &hub.files["model.safetensors"];
    let half = weights.len() / 2;
    let blobs = cache.join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.part", etag(weights))), &weights[..half]).unwrap();
    let dir = fetch(&HubModel::parse("org/tiny@v1").unwrap(), &config(&hub, &cache)).unwrap();
    assert_eq!(&std::fs::read(dir.join("model.safetensors")).unwrap(), weights);
    let ranges: Vec<Option<String>> = hub
        .seen()
        .into_iter()
        .filter(|s| s.path == "/org/tiny/resolve/v1/model.safetensors")
        .map(|s| s.range)
        .collect();
    assert_eq!(ranges, vec![Some("bytes=0-0".into()), Some(format!("bytes={half}-"))]);
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_named_gguf_file_is_fetched_alone_and_missing_files_are_named() {
    let hub = MockHub::start(fixture_files());
    let cache = temp_cache("gguf");
    let path =
        fetch(&HubModel::parse("org/tiny/gguf/tiny.Q8_0.gguf").unwrap(), &config(&hub, &cache))
            .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"GGUF not really");
    assert!(path.ends_with("gguf/tiny.Q8_0.gguf"));
    assert_eq!(hub.seen().len(), 2, "the metadata probe and the download");
    let err =
        fetch(&HubModel::parse("org/tiny/none.gguf").unwrap(), &config(&hub, &cache)).unwrap_err();
    assert!(format!("{err:#}").contains("none.gguf"), "{err:#}");
    let err = fetch(&HubModel::parse("org/other").unwrap(), &config(&hub, &cache)).unwrap_err();
    assert!(format!("{err:#}").contains("org/other@main"), "{err:#}");
    std::fs::remove_dir_all(&cache).unwrap();
}
