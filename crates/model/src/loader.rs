//! Resolving a model argument (`synthetic:NAME`, a Hugging Face folder or a GGUF file) into its
//! config, tokenizer, chat template and weight source, then loading it onto a backend
//! with a progress bar.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::Backend;
use crate::chat::ChatTemplate;
use crate::config::{ModelConfig, read_config_json};
use crate::error::{ModelError, Result};
use crate::fp8::{Fp8Scheme, QuantizeFp8, ScaleGranularity};
use crate::gguf::GgufFile;
use crate::model::LlamaModel;
use crate::synthetic::{self, SyntheticWeights};
use crate::tokenizer::Tokenizer;
use crate::weights::{SafetensorsSource, WeightSource};

/// Everything about a model except its weights on a backend.
pub struct ModelSource {
    /// The name clients use (`synthetic:tiny`, or the folder's name).
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub weights: Box<dyn WeightSource>,
    /// FP8 weights: the checkpoint's scheme, or `--quantization fp8`'s (`quantize_fp8`).
    pub quantization: Option<Fp8Scheme>,
}

impl ModelSource {
    /// `synthetic:NAME`, a Hugging Face model folder or a `.gguf` file.
    pub fn open(spec: &str) -> Result<Self> {
        if let Some(name) = spec.strip_prefix("synthetic:") {
            return Ok(Self {
                name: spec.to_string(),
                config: synthetic::config(name)?,
                tokenizer: Tokenizer::Bytes,
                chat_template: ChatTemplate::plain(),
                weights: Box::new(SyntheticWeights),
                quantization: None,
            });
        }
        let path = PathBuf::from(spec);
        if path.is_file() {
            return Self::open_gguf(&path);
        }
        if !path.is_dir() {
            return Err(ModelError::bad_file(
                &path,
                "is neither a folder nor a file (expected a Hugging Face model folder, a \
                 .gguf file or synthetic:NAME)",
            ));
        }
        Self::open_dir(&path)
    }

    /// A GGUF file: config, tokenizer and chat template from its metadata.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        let (tokenizer, chat_template) = file.tokenizer()?;
        check_vocab(&tokenizer, &config)?;
        let name = path
            .file_stem()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let weights = Box::new(file.into_weights(&config));
        Ok(Self { name, config, tokenizer, chat_template, weights, quantization: None })
    }

    fn open_dir(dir: &Path) -> Result<Self> {
        let json = read_config_json(dir)?;
        let config = ModelConfig::from_dir_json(dir, &json)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        check_vocab(&tokenizer, &config)?;
        let chat_template = ChatTemplate::from_dir(dir)?.unwrap_or_else(ChatTemplate::plain);
        let weights = Box::new(SafetensorsSource::open(dir)?);
        let quantization = crate::fp8::parse_quantization_config(&json)
            .map_err(|e| ModelError::bad_file(dir.join("config.json"), e))?;
        if let Some(q) = &quantization {
            tracing::info!(
                scheme = %q.describe(),
                "FP8 checkpoint: weights are dequantized at load (FP8 GEMMs are not used yet)"
            );
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self { name, config, tokenizer, chat_template, weights, quantization })
    }

    /// `--quantization fp8`: the linear projections' weights quantized to FP8 per output
    /// channel at load (`fp8::QuantizeFp8`). A checkpoint already in FP8 is refused
    /// (its own scales are the ones to use).
    pub fn quantize_fp8(self) -> Result<Self> {
        if let Some(q) = &self.quantization {
            return Err(ModelError::Config(format!(
                "--quantization fp8: the checkpoint is already quantized ({})",
                q.describe()
            )));
        }
        Ok(Self {
            weights: Box::new(QuantizeFp8 { inner: self.weights }),
            quantization: Some(Fp8Scheme {
                format: "quantized at load".into(),
                weights: ScaleGranularity::Channel,
                static_activations: false,
            }),
            ..self
        })
    }

    /// Loads the weights onto `backend`, showing a progress bar on a terminal.
    pub fn load<B: Backend>(&self, backend: B) -> Result<LlamaModel<B>> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:30}] {pos}/{len} tensors {elapsed}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(self.name.clone());
        tracing::info!(model = %self.name, params = self.config.num_params(), backend = %backend.name(), source = %self.weights.describe(), "loading");
        let started = std::time::Instant::now();
        let timed = TimedSource { inner: self.weights.as_ref(), nanos: AtomicU64::new(0) };
        let model = LlamaModel::load(self.config.clone(), backend, &timed, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        let source_secs = timed.nanos.load(Ordering::Relaxed) as f64 * 1e-9;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            secs = format!("{secs:.1}"),
            source_secs = format!("{source_secs:.1}"),
            other_secs = format!("{:.1}", secs - source_secs),
            "weights loaded (source: reading or generating them; other: packing and copying to the backend)"
        );
        Ok(model)
    }
}

/// A weight source that adds up the time spent in it, so the load log can tell reading
/// (or generating) weights apart from packing and uploading them.
struct TimedSource<'a> {
    inner: &'a dyn WeightSource,
    nanos: AtomicU64,
}

impl WeightSource for TimedSource<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<crate::tensor::HostTensor> {
        let t = std::time::Instant::now();
        let out = self.inner.tensor(name, shape);
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A tokenizer may not make ids past the model's embedding table.
fn check_vocab(tokenizer: &Tokenizer, config: &ModelConfig) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::Config(format!(
            "the tokenizer has {} tokens but the model only {}",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_folders_name_the_problem() {
        let err = ModelSource::open("/nonexistent/model").err().unwrap().to_string();
        assert!(err.contains("neither a folder nor a file"), "{err}");
        let dir = std::env::temp_dir().join(format!("rs-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelSource::open(dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), "{not json").unwrap();
        let err = ModelSource::open(dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(err.contains("config.json") && err.contains("key must be a string"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = ModelSource::open("synthetic:nope").err().unwrap().to_string();
        assert!(err.contains("synthetic:tiny"), "{err}");
    }
}
