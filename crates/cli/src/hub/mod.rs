//! `--model ORG/NAME[@REVISION]` (a Hugging Face folder: config, tokenizer, safetensors)
//! or `--model ORG/NAME/FILE.gguf[@REVISION]` (one GGUF file) from the Hugging Face Hub,
//! through the `hf-hub` crate into the standard cache (`$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), which Python's `huggingface_hub` fills too: files already
//! there are used without a request. Downloads resume from their `.part` file and show
//! a progress bar. `HF_ENDPOINT` points at another hub (a mirror, or the tests' mock),
//! `HF_TOKEN` (else the cache's `token` file) authenticates.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

/// A model on the Hub.
#[derive(Debug, PartialEq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
    /// A GGUF file in the repo; `None`: the safetensors checkpoint.
    pub gguf: Option<String>,
}

impl HubModel {
    /// `ORG/NAME[/FILE.gguf][@REVISION]`, or `None` when `spec` does not look like one
    /// (names of letters, digits, `-`, `_` and `.`).
    pub fn parse(spec: &str) -> Option<Self> {
        let (path, revision) = match spec.rsplit_once('@') {
            Some((p, r)) if !r.is_empty() => (p, r.to_string()),
            Some(_) => return None,
            None => (spec, "main".to_string()),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let name_ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() < 2 || !name_ok(parts[0]) || !name_ok(parts[1]) {
            return None;
        }
        let gguf = match &parts[2..] {
            [] => None,
            file if file.iter().all(|p| name_ok(p)) && path.ends_with(".gguf") => {
                Some(file.join("/"))
            }
            _ => return None,
        };
        Some(Self { repo: format!("{}/{}", parts[0], parts[1]), revision, gguf })
    }
}

/// Where the Hub and its cache are, from the environment (read here, in the binary).
pub struct HubConfig {
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub progress: bool,
}

impl HubConfig {
    pub fn from_env() -> Self {
        let cache = Cache::from_env();
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or(cache.token());
        Self {
            cache_dir: cache.path().clone(),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
            token,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    fn api(&self) -> anyhow::Result<Api> {
        let mut b = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_token(self.token.clone())
            .with_progress(self.progress)
            .with_retries(3);
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/').to_string());
        }
        Ok(b.build()?)
    }
}

/// Files of a safetensors checkpoint folder that the loader reads when they exist.
const OPTIONAL: [&str; 3] =
    ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json"];

/// The local path of `model` (a snapshot folder, or the GGUF file), downloading what the
/// cache lacks.
pub fn fetch(model: &HubModel, cfg: &HubConfig) -> anyhow::Result<PathBuf> {
    let repo = Repo::with_revision(model.repo.clone(), RepoType::Model, model.revision.clone());
    let cached = Cache::new(cfg.cache_dir.clone()).repo(repo.clone());
    let api = cfg.api()?;
    let remote = api.repo(repo);
    let what = || format!("{}@{}", model.repo, model.revision);
    if let Some(file) = &model.gguf {
        if let Some(path) = cached.get(file) {
            return Ok(path);
        }
        return remote.download(file).with_context(|| format!("downloading {file} of {}", what()));
    }
    // Everything already cached for this revision: no request at all.
    if let Some(config) = cached.get("config.json")
        && let Some(dir) = config.parent()
        && checkpoint_complete(dir)
    {
        return Ok(dir.to_path_buf());
    }
    let info = remote.info().with_context(|| format!("asking the Hub about {}", what()))?;
    let listed = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    let mut files = vec!["config.json".to_string(), "tokenizer.json".to_string()];
    files.extend(OPTIONAL.iter().filter(|f| listed(f)).map(|f| f.to_string()));
    for f in &files[..2] {
        anyhow::ensure!(listed(f), "{} has no {f}", what());
    }
    let index = "model.safetensors.index.json";
    if listed(index) {
        let path = get(&remote, index, &what)?;
        files.extend(shards(&path)?);
    } else if listed("model.safetensors") {
        files.push("model.safetensors".into());
    } else {
        let ggufs: Vec<&str> = info
            .siblings
            .iter()
            .map(|s| s.rfilename.as_str())
            .filter(|f| f.ends_with(".gguf"))
            .collect();
        anyhow::bail!(
            "{} has no safetensors checkpoint{}",
            what(),
            if ggufs.is_empty() {
                String::new()
            } else {
                format!("; name one of its GGUF files, e.g. --model {}/{}", model.repo, ggufs[0])
            }
        );
    }
    let mut dir = None;
    for f in &files {
        let path = get(&remote, f, &what)?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.context("no files")
}

/// One file: from the cache when the revision's snapshot has it, else downloaded.
fn get(remote: &ApiRepo, file: &str, what: &dyn Fn() -> String) -> anyhow::Result<PathBuf> {
    remote.get(file).with_context(|| format!("downloading {file} of {}", what()))
}

/// The shard files an index lists.
fn shards(index: &Path) -> anyhow::Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)
        .with_context(|| format!("{} is not JSON", index.display()))?;
    let map = json["weight_map"]
        .as_object()
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> =
        map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Whether a snapshot folder holds a loadable checkpoint (config, tokenizer, weights).
fn checkpoint_complete(dir: &Path) -> bool {
    let has = |f: &str| dir.join(f).exists();
    if !has("tokenizer.json") {
        return false;
    }
    if has("model.safetensors") {
        return true;
    }
    match shards(&dir.join("model.safetensors.index.json")) {
        Ok(files) => !files.is_empty() && files.iter().all(|f| has(f)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod mock_hub;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_revision_and_gguf_file() {
        let m = |repo: &str, rev: &str, gguf: Option<&str>| HubModel {
            repo: repo.into(),
            revision: rev.into(),
            gguf: gguf.map(String::from),
        };
        assert_eq!(
            HubModel::parse("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(m("HuggingFaceTB/SmolLM2-135M-Instruct", "main", None))
        );
        assert_eq!(HubModel::parse("org/name@v1.0"), Some(m("org/name", "v1.0", None)));
        assert_eq!(
            HubModel::parse("org/name-GGUF/q/model.Q4_K_M.gguf@abc123"),
            Some(m("org/name-GGUF", "abc123", Some("q/model.Q4_K_M.gguf")))
        );
        for bad in [
            "name",
            "org/",
            "/abs/path",
            "./dir/x",
            "org/name@",
            "org/name/file.bin",
            "synthetic:tiny",
            "a/b c",
        ] {
            assert_eq!(HubModel::parse(bad), None, "{bad}");
        }
    }
}
