//! What routing loads from files: the task classifier (its labelled examples,
//! embedded once) and the learned routers of `strategy: learned` routes.

use crate::classifier::{parse_examples, ClassifierError, ExamplesError, TaskClassifier};
use crate::learned::{LearnedError, LearnedRouter};
use sha2::{Digest, Sha256};
use smartllm_config::{Config, Strategy};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Embeds texts (the gateway's embedder).
pub type EmbedFn<'a> = dyn Fn(Vec<String>) -> Result<Vec<Vec<f32>>, EmbedFnError> + 'a;

/// Why an [`EmbedFn`] failed; its message is shown as is.
pub type EmbedFnError = Box<dyn std::error::Error + Send + Sync>;

/// Why the router's files cannot be loaded (the running router stays).
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("classifier examples {}: {error}", .path.display())]
    ReadExamples {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("classifier examples {}: {error}", .path.display())]
    Examples { path: PathBuf, error: ExamplesError },
    /// The embedder's message, unprefixed.
    #[error("{0}")]
    Embed(EmbedFnError),
    #[error("{0}")]
    Classifier(ClassifierError),
    #[error("routes.{route}.learned {}: {error}", .path.display())]
    ReadLearned {
        route: String,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("routes.{route}.learned {}: {error}", .path.display())]
    Learned {
        route: String,
        path: PathBuf,
        error: LearnedError,
    },
}

#[derive(Default)]
pub struct RouterAssets {
    pub classifier: Option<Arc<TaskClassifier>>,
    classifier_digest: Option<[u8; 32]>,
    /// By file path.
    pub learned: HashMap<PathBuf, Arc<LearnedRouter>>,
}

impl RouterAssets {
    /// Load the classifier and learned routers of `config`. An unchanged
    /// examples file reuses `previous`'s embeddings. Without `embed` the
    /// files are still read and checked (`smartllm check`), but no
    /// classifier is made.
    pub fn build(
        config: &Config,
        embed: Option<&EmbedFn<'_>>,
        previous: Option<&RouterAssets>,
    ) -> Result<RouterAssets, AssetError> {
        let mut out = RouterAssets::default();
        if let Some(path) = &config.classifier.examples {
            let bytes = std::fs::read(path).map_err(|error| AssetError::ReadExamples {
                path: path.clone(),
                error,
            })?;
            let mut h = Sha256::new();
            h.update(&bytes);
            h.update(config.classifier.k.to_le_bytes());
            let digest: [u8; 32] = h.finalize().into();
            match previous.filter(|p| p.classifier_digest == Some(digest)) {
                Some(p) => out.classifier = p.classifier.clone(),
                None => {
                    let text = String::from_utf8_lossy(&bytes);
                    let examples = parse_examples(&text).map_err(|error| AssetError::Examples {
                        path: path.clone(),
                        error,
                    })?;
                    if let Some(embed) = embed {
                        let (labels, texts): (Vec<_>, Vec<_>) = examples.into_iter().unzip();
                        let mut vectors = Vec::with_capacity(texts.len());
                        for chunk in texts.chunks(32) {
                            vectors.extend(embed(chunk.to_vec()).map_err(AssetError::Embed)?);
                        }
                        out.classifier = Some(Arc::new(
                            TaskClassifier::new(labels, vectors, config.classifier.k)
                                .map_err(AssetError::Classifier)?,
                        ));
                    }
                }
            }
            out.classifier_digest = Some(digest);
        }
        for r in config.routes.values() {
            if let Strategy::Learned(path) = &r.strategy {
                if out.learned.contains_key(path) {
                    continue;
                }
                let bytes = std::fs::read(path).map_err(|error| AssetError::ReadLearned {
                    route: r.name.clone(),
                    path: path.clone(),
                    error,
                })?;
                let l = LearnedRouter::from_json(&bytes).map_err(|error| AssetError::Learned {
                    route: r.name.clone(),
                    path: path.clone(),
                    error,
                })?;
                for c in &r.candidates {
                    if !l.models.contains_key(c) {
                        tracing::warn!(route = %r.name, model = %c, "the learned router was not trained on this candidate; its profile quality is used");
                    }
                }
                // Its weights read one model's embeddings: trained with
                // another (files name theirs; earlier ones said
                // "all-MiniLM-L6-v2 (FILE)"), its scores mean little.
                let model = config
                    .embedder
                    .model
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let trained = l
                    .embedder
                    .strip_prefix("all-MiniLM-L6-v2 (")
                    .and_then(|x| x.strip_suffix(')'))
                    .unwrap_or(&l.embedder);
                // The int8 and fp32 files of one model make alike vectors.
                let family = |f: &str| match f {
                    "model.onnx" | "model.int8.onnx" => "all-MiniLM-L6-v2".to_string(),
                    f if f.starts_with("paraphrase-l3") => "paraphrase-MiniLM-L3-v2".into(),
                    f => f.to_string(),
                };
                if family(trained) != family(&model) {
                    tracing::warn!(route = %r.name, trained_with = %l.embedder, embedder = %model, "the learned router was trained on another embedding model's vectors; retrain it (smartllm train-router)");
                }
                out.learned.insert(path.clone(), Arc::new(l));
            }
        }
        Ok(out)
    }

    pub fn learned_for(&self, strategy: &Strategy) -> Option<&LearnedRouter> {
        match strategy {
            Strategy::Learned(p) => self.learned.get(p).map(Arc::as_ref),
            _ => None,
        }
    }

    /// Whether a decision on this route uses the prompt embedding.
    pub fn wants_embedding(&self, strategy: &Strategy) -> bool {
        self.classifier.is_some() || self.learned_for(strategy).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learned::{TrainError, FORMAT};
    use smartllm_config::Task;

    /// The typed errors print exactly what the `String` errors did.
    #[test]
    fn error_messages_are_unchanged() {
        let path = PathBuf::from("/etc/smartllm/x y.tsv");
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let p = path.display();
        let cases: Vec<(String, String)> = vec![
            (
                AssetError::ReadExamples {
                    path: path.clone(),
                    error: io(),
                }
                .to_string(),
                format!("classifier examples {p}: {}", io()),
            ),
            (
                AssetError::Examples {
                    path: path.clone(),
                    error: ExamplesError::UnknownTask {
                        line: 3,
                        task: "x\"y".into(),
                    },
                }
                .to_string(),
                format!("classifier examples {p}: line 3: unknown task {:?}", "x\"y"),
            ),
            (
                ExamplesError::NoTab { line: 1 }.to_string(),
                "line 1: expected task<TAB>prompt".into(),
            ),
            (
                ExamplesError::EmptyPrompt { line: 2 }.to_string(),
                "line 2: empty prompt".into(),
            ),
            (
                ExamplesError::MissingTask { task: Task::Math }.to_string(),
                format!("no example for task {}: every task needs some", Task::Math),
            ),
            (
                AssetError::Embed("embedding classifier examples: boom".into()).to_string(),
                "embedding classifier examples: boom".into(),
            ),
            (
                AssetError::Classifier(ClassifierError::CountMismatch).to_string(),
                "labels and embeddings differ in number".into(),
            ),
            (
                ClassifierError::DimensionMismatch.to_string(),
                "embeddings differ in dimension".into(),
            ),
            (
                AssetError::ReadLearned {
                    route: "auto".into(),
                    path: path.clone(),
                    error: io(),
                }
                .to_string(),
                format!("routes.auto.learned {p}: {}", io()),
            ),
            (
                AssetError::Learned {
                    route: "auto".into(),
                    path: path.clone(),
                    error: LearnedError::Format { found: "v0".into() },
                }
                .to_string(),
                format!(
                    "routes.auto.learned {p}: format {:?} is not {FORMAT:?}",
                    "v0"
                ),
            ),
            (
                LearnedError::Weights {
                    model: "m".into(),
                    weights: 3,
                    dim: 4,
                }
                .to_string(),
                "model m: 3 weights for dimension 4".into(),
            ),
            (
                LearnedRouter::from_json(b"nope").unwrap_err().to_string(),
                format!(
                    "not a learned router file: {}",
                    serde_json::from_slice::<LearnedRouter>(b"nope").unwrap_err()
                ),
            ),
            (TrainError::NoSamples.to_string(), "no samples".into()),
            (
                TrainError::ScoreOutOfRange {
                    model: "m".into(),
                    score: 1.5,
                }
                .to_string(),
                format!("score {} of model {} is not between 0 and 1", 1.5, "m"),
            ),
            (
                TrainError::TooFewSamples {
                    model: "m".into(),
                    samples: 3,
                }
                .to_string(),
                "model m has only 3 samples (8 or more needed)".into(),
            ),
            (
                TrainError::Singular { model: "m".into() }.to_string(),
                "model m: the system is singular".into(),
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    /// Without an embedder (`smartllm check`) the examples and the learned
    /// routers are still parsed: a file the gateway would refuse is an error.
    #[test]
    fn files_are_checked_without_an_embedder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
        let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
        let examples = dir.path().join("tasks.tsv");
        let good: String = Task::ALL
            .iter()
            .map(|t| format!("{t}\tsome prompt\n"))
            .collect();
        std::fs::write(&examples, &good).unwrap();
        cfg.classifier.examples = Some(examples.clone());
        let a = RouterAssets::build(&cfg, None, None).unwrap();
        assert!(a.classifier.is_none());
        std::fs::write(&examples, "code\tx\nnot a line\n").unwrap();
        assert!(matches!(
            RouterAssets::build(&cfg, None, None),
            Err(AssetError::Examples {
                error: ExamplesError::NoTab { line: 2 },
                ..
            })
        ));
        std::fs::write(&examples, &good).unwrap();

        let learned = dir.path().join("learned.json");
        let mut r = smartllm_config::RouteConfig::fixed("auto", "m");
        r.candidates = vec!["m".into()];
        r.strategy = Strategy::Learned(learned.clone());
        cfg.routes.insert("auto".into(), r);
        let file = |dim: usize| {
            LearnedRouter {
                format: FORMAT.into(),
                embedder: "test".into(),
                dim,
                lambda: 1.0,
                models: [(
                    "m".to_string(),
                    crate::learned::Linear {
                        weights: vec![0.0; dim],
                        bias: 0.5,
                        samples: 8,
                        train_rmse: 0.1,
                    },
                )]
                .into(),
            }
            .to_json()
        };
        std::fs::write(&learned, file(crate::learned::EMBEDDING_DIM)).unwrap();
        let a = RouterAssets::build(&cfg, None, None).unwrap();
        assert!(a.learned.contains_key(&learned));
        std::fs::write(&learned, file(3)).unwrap();
        assert!(matches!(
            RouterAssets::build(&cfg, None, None),
            Err(AssetError::Learned {
                error: LearnedError::Dimension { dim: 3, .. },
                ..
            })
        ));
    }
}
