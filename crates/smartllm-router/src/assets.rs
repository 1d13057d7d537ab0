//! What routing loads from files: the task classifier (its labelled examples,
//! embedded once) and the learned routers of `strategy: learned` routes.

use crate::classifier::{parse_examples, TaskClassifier};
use crate::learned::LearnedRouter;
use sha2::{Digest, Sha256};
use smartllm_config::{Config, Strategy};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Embeds texts (the gateway's embedder).
pub type EmbedFn<'a> = dyn Fn(Vec<String>) -> Result<Vec<Vec<f32>>, String> + 'a;

#[derive(Default)]
pub struct RouterAssets {
    pub classifier: Option<Arc<TaskClassifier>>,
    classifier_digest: Option<[u8; 32]>,
    /// By file path.
    pub learned: HashMap<PathBuf, Arc<LearnedRouter>>,
}

impl RouterAssets {
    /// Load the classifier and learned routers of `config`. An unchanged
    /// examples file reuses `previous`'s embeddings.
    pub fn build(
        config: &Config,
        embed: Option<&EmbedFn<'_>>,
        previous: Option<&RouterAssets>,
    ) -> Result<RouterAssets, String> {
        let mut out = RouterAssets::default();
        if let Some(path) = &config.classifier.examples {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("classifier examples {}: {e}", path.display()))?;
            let mut h = Sha256::new();
            h.update(&bytes);
            h.update(config.classifier.k.to_le_bytes());
            let digest: [u8; 32] = h.finalize().into();
            match previous.filter(|p| p.classifier_digest == Some(digest)) {
                Some(p) => out.classifier = p.classifier.clone(),
                None => {
                    if let Some(embed) = embed {
                        let text = String::from_utf8_lossy(&bytes);
                        let examples = parse_examples(&text)
                            .map_err(|e| format!("classifier examples {}: {e}", path.display()))?;
                        let (labels, texts): (Vec<_>, Vec<_>) = examples.into_iter().unzip();
                        let mut vectors = Vec::with_capacity(texts.len());
                        for chunk in texts.chunks(32) {
                            vectors.extend(embed(chunk.to_vec())?);
                        }
                        out.classifier = Some(Arc::new(TaskClassifier::new(
                            labels,
                            vectors,
                            config.classifier.k,
                        )?));
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
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("routes.{}.learned {}: {e}", r.name, path.display()))?;
                let l = LearnedRouter::from_json(&bytes)
                    .map_err(|e| format!("routes.{}.learned {}: {e}", r.name, path.display()))?;
                for c in &r.candidates {
                    if !l.models.contains_key(c) {
                        tracing::warn!(route = %r.name, model = %c, "the learned router was not trained on this candidate; its profile quality is used");
                    }
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
