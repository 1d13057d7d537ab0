//! The learned router: one ridge regression per model from the prompt
//! embedding to the quality score that model earned on labelled prompts.
//! Trained offline (`smartllm train-router`), stored as JSON, hot-reloaded.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const FORMAT: &str = "smartllm-learned-router-v1";

/// The dimension of the prompt embeddings the gateway computes
/// (`smartllm_embed::DIM`; the `smartllm` crate asserts they agree): a
/// learned router of another dimension could never predict.
pub const EMBEDDING_DIM: usize = 384;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Linear {
    pub weights: Vec<f32>,
    pub bias: f32,
    /// Training samples and root mean squared error on them.
    pub samples: usize,
    pub train_rmse: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LearnedRouter {
    pub format: String,
    /// The embedding model the vectors come from.
    pub embedder: String,
    pub dim: usize,
    pub lambda: f64,
    pub models: BTreeMap<String, Linear>,
}

/// Why a learned router cannot be trained.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    #[error("no samples")]
    NoSamples,
    #[error("lambda {0} is not a finite number above 0")]
    Lambda(f64),
    #[error("embeddings differ in dimension")]
    DimensionMismatch,
    #[error("score {score} of model {model} is not between 0 and 1")]
    ScoreOutOfRange { model: String, score: f64 },
    #[error("model {model} has only {samples} samples (8 or more needed)")]
    TooFewSamples { model: String, samples: usize },
    #[error("model {model}: the system is singular")]
    Singular { model: String },
    #[error("model {model}: the fit has a weight or bias that is not finite")]
    NotFinite { model: String },
}

/// Why a learned router file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LearnedError {
    #[error("not a learned router file: {0}")]
    Json(serde_json::Error),
    #[error("format {found:?} is not {:?}", FORMAT)]
    Format { found: String },
    #[error("model {model}: {weights} weights for dimension {dim}")]
    Weights {
        model: String,
        weights: usize,
        dim: usize,
    },
    #[error("dimension {dim} is not {want}, the dimension of the prompt embeddings it would be given (train it again with `smartllm train-router`)")]
    Dimension { dim: usize, want: usize },
    #[error("model {model}: a weight or the bias is not a finite number")]
    NotFinite { model: String },
}

/// One labelled sample: the prompt's embedding, a model and its score (0-1).
pub struct Sample<'a> {
    pub embedding: &'a [f32],
    pub model: &'a str,
    pub score: f64,
}

impl LearnedRouter {
    /// Fit every model's regression: (XᵀX + λI) w = Xᵀy with an unregularised bias.
    pub fn train(
        samples: &[Sample<'_>],
        lambda: f64,
        embedder: &str,
    ) -> Result<LearnedRouter, TrainError> {
        if !lambda.is_finite() || lambda <= 0.0 {
            return Err(TrainError::Lambda(lambda));
        }
        let dim = samples
            .first()
            .map(|s| s.embedding.len())
            .ok_or(TrainError::NoSamples)?;
        let mut by_model: BTreeMap<&str, Vec<&Sample<'_>>> = BTreeMap::new();
        for s in samples {
            if s.embedding.len() != dim {
                return Err(TrainError::DimensionMismatch);
            }
            if !(0.0..=1.0).contains(&s.score) {
                return Err(TrainError::ScoreOutOfRange {
                    model: s.model.to_string(),
                    score: s.score,
                });
            }
            by_model.entry(s.model).or_default().push(s);
        }
        let mut models = BTreeMap::new();
        for (model, rows) in by_model {
            if rows.len() < 8 {
                return Err(TrainError::TooFewSamples {
                    model: model.to_string(),
                    samples: rows.len(),
                });
            }
            let n = dim + 1;
            let mut a = vec![0f64; n * n];
            let mut b = vec![0f64; n];
            let mut x = vec![0f64; n];
            for r in &rows {
                for (xi, e) in x.iter_mut().zip(r.embedding) {
                    *xi = *e as f64;
                }
                x[dim] = 1.0;
                for i in 0..n {
                    let xi = x[i];
                    b[i] += xi * r.score;
                    let row = &mut a[i * n..(i + 1) * n];
                    for (j, aij) in row.iter_mut().enumerate().skip(i) {
                        *aij += xi * x[j];
                    }
                }
            }
            for i in 0..n {
                for j in 0..i {
                    a[i * n + j] = a[j * n + i];
                }
                if i < dim {
                    a[i * n + i] += lambda;
                } else {
                    a[i * n + i] += 1e-9;
                }
            }
            let w = cholesky_solve(&mut a, &b, n).ok_or_else(|| TrainError::Singular {
                model: model.to_string(),
            })?;
            let lin = Linear {
                weights: w[..dim].iter().map(|v| *v as f32).collect(),
                bias: w[dim] as f32,
                samples: rows.len(),
                train_rmse: 0.0,
            };
            // Written as JSON, a non-finite value would be `null`: a file
            // that never loads.
            if !lin.is_finite() {
                return Err(TrainError::NotFinite {
                    model: model.to_string(),
                });
            }
            let mse = rows
                .iter()
                .map(|r| (lin.predict(r.embedding) - r.score).powi(2))
                .sum::<f64>()
                / rows.len() as f64;
            models.insert(
                model.to_string(),
                Linear {
                    train_rmse: mse.sqrt(),
                    ..lin
                },
            );
        }
        Ok(LearnedRouter {
            format: FORMAT.into(),
            embedder: embedder.into(),
            dim,
            lambda,
            models,
        })
    }

    /// A router file for the gateway's prompt embeddings ([`EMBEDDING_DIM`]).
    pub fn from_json(bytes: &[u8]) -> Result<LearnedRouter, LearnedError> {
        Self::from_json_with_dim(bytes, EMBEDDING_DIM)
    }

    /// A router file for embeddings of dimension `want`, every weight and
    /// bias a finite number.
    pub fn from_json_with_dim(bytes: &[u8], want: usize) -> Result<LearnedRouter, LearnedError> {
        let r: LearnedRouter = serde_json::from_slice(bytes).map_err(LearnedError::Json)?;
        if r.format != FORMAT {
            return Err(LearnedError::Format { found: r.format });
        }
        if r.dim != want {
            return Err(LearnedError::Dimension { dim: r.dim, want });
        }
        for (m, l) in &r.models {
            if l.weights.len() != r.dim {
                return Err(LearnedError::Weights {
                    model: m.clone(),
                    weights: l.weights.len(),
                    dim: r.dim,
                });
            }
            // A number beyond f32's range (1e39) reads as infinity.
            if !l.is_finite() {
                return Err(LearnedError::NotFinite { model: m.clone() });
            }
        }
        Ok(r)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Predicted quality (clamped to 0-1) of `model` on a prompt, if it was trained.
    pub fn predict(&self, model: &str, embedding: &[f32]) -> Option<f64> {
        let l = self.models.get(model)?;
        (embedding.len() == self.dim).then(|| l.predict(embedding).clamp(0.0, 1.0))
    }
}

impl Linear {
    fn is_finite(&self) -> bool {
        self.bias.is_finite() && self.weights.iter().all(|w| w.is_finite())
    }

    fn predict(&self, e: &[f32]) -> f64 {
        self.weights
            .iter()
            .zip(e)
            .map(|(w, x)| (*w as f64) * (*x as f64))
            .sum::<f64>()
            + self.bias as f64
    }
}

/// Solve A x = b for symmetric positive definite A (row-major, overwritten).
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        // A NaN pivot (from a NaN or infinite input) fails too.
        if d.is_nan() || d <= 0.0 {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / d;
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * y[k];
        }
        y[i] = s / a[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= a[k * n + i] * x[k];
        }
        x[i] = s / a[i * n + i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_linear_quality_function_and_round_trips() {
        // Model "strong" scores high everywhere, "weak" only where x0 is small.
        let pts: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                let t = i as f32 / 200.0;
                vec![t, 1.0 - t, (i % 7) as f32 / 7.0]
            })
            .collect();
        let mut samples = Vec::new();
        for p in &pts {
            samples.push(Sample {
                embedding: p,
                model: "strong",
                score: 0.9,
            });
            samples.push(Sample {
                embedding: p,
                model: "weak",
                score: (0.9 - 0.8 * p[0] as f64).clamp(0.0, 1.0),
            });
        }
        let r = LearnedRouter::train(&samples, 1e-3, "test").unwrap();
        let easy = [0.05, 0.95, 0.0];
        let hard = [0.95, 0.05, 0.0];
        assert!((r.predict("weak", &easy).unwrap() - 0.86).abs() < 0.02);
        assert!((r.predict("weak", &hard).unwrap() - 0.14).abs() < 0.02);
        assert!((r.predict("strong", &hard).unwrap() - 0.9).abs() < 0.01);
        assert!(r.predict("other", &hard).is_none());
        let back = LearnedRouter::from_json_with_dim(r.to_json().as_bytes(), 3).unwrap();
        assert_eq!(back.predict("weak", &easy), r.predict("weak", &easy));
        assert!(LearnedRouter::from_json(b"{}").is_err());
        // Not for the gateway's embeddings: refused, not a router that never predicts.
        assert!(matches!(
            LearnedRouter::from_json(r.to_json().as_bytes()),
            Err(LearnedError::Dimension {
                dim: 3,
                want: EMBEDDING_DIM
            })
        ));
    }

    fn samples_of(pts: &[Vec<f32>]) -> Vec<Sample<'_>> {
        pts.iter()
            .enumerate()
            .map(|(i, p)| Sample {
                embedding: p,
                model: "m",
                score: (i % 5) as f64 / 5.0,
            })
            .collect()
    }

    /// NaN, infinite, zero and negative lambdas are refused before fitting.
    #[test]
    fn lambda_must_be_finite_and_positive() {
        let pts: Vec<Vec<f32>> = (0..20).map(|i| vec![i as f32 / 20.0, 1.0]).collect();
        let samples = samples_of(&pts);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -1.0] {
            match LearnedRouter::train(&samples, bad, "test") {
                Err(TrainError::Lambda(_)) => {}
                other => panic!("lambda {bad}: {other:?}"),
            }
        }
        let r = LearnedRouter::train(&samples, 0.5, "test").unwrap();
        assert!(r.models["m"].is_finite());
    }

    /// A NaN pivot is not positive: the solve fails instead of returning NaNs.
    #[test]
    fn cholesky_refuses_a_nan_pivot() {
        let mut a = vec![f64::NAN, 0.0, 0.0, 1.0];
        assert!(cholesky_solve(&mut a, &[1.0, 1.0], 2).is_none());
        let mut a = vec![4.0, 0.0, 0.0, 1.0];
        assert_eq!(cholesky_solve(&mut a, &[2.0, 3.0], 2), Some(vec![0.5, 3.0]));
    }

    /// Weights beyond f32's range (infinite once read) are refused.
    #[test]
    fn non_finite_weights_are_refused() {
        let file = |w: &str, b: &str| {
            format!(
                r#"{{"format":"{FORMAT}","embedder":"t","dim":2,"lambda":1.0,"models":{{"m":{{"weights":[{w}],"bias":{b},"samples":8,"train_rmse":0.1}}}}}}"#
            )
        };
        assert!(LearnedRouter::from_json_with_dim(file("0.5, -0.25", "0.1").as_bytes(), 2).is_ok());
        for (w, b) in [("1e39, 0.0", "0.1"), ("0.5, 0.5", "-1e39")] {
            assert!(
                matches!(
                    LearnedRouter::from_json_with_dim(file(w, b).as_bytes(), 2),
                    Err(LearnedError::NotFinite { .. })
                ),
                "{w} / {b}"
            );
        }
    }
}
