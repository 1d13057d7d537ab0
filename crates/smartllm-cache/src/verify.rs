//! The verifier: a second opinion on a would-be semantic hit.
//!
//! The embedder's cosine says two prompts are *about* the same thing; it
//! cannot tell "the highest number of flights" from "the fewest", or a
//! reworded question from a different question on the same subject. The
//! verifier looks at the pair token by token: each token of one prompt (the
//! model's last hidden state, the same run that makes the embedding) is
//! matched to its closest token in the other, and a small gradient-boosted
//! model over how well the two align (the worst-matched tokens, the share
//! of poorly matched ones, the mean) and the cosine scores the pair from 0
//! (a different question) to 1 (the same question).
//!
//! It runs only on candidates that already passed the cosine threshold and
//! the precision guard (the would-be hits), on the blocking pool, with the
//! two texts' token states from the embedder's threads. The model is a
//! JSON file compiled in per embedding model (`verifier-l3.json` for the
//! default paraphrase-MiniLM-L3-v2, `verifier.json` for all-MiniLM-L6-v2),
//! trained by
//! `data/cache-eval/train_verifier.py` on the yardstick's training and
//! tuning pairs only (never the held-out split).

use serde::Deserialize;
use std::sync::OnceLock;

/// The features, in the model's order.
pub const FEATURES: [&str; N] = [
    "cosine",
    "mean_alignment",
    "worst_alignment",
    "second_worst_alignment",
    "fourth_worst_alignment",
    "share_below_0_6",
    "share_below_0_8",
    // The worst-matched token of each text, against each other: a word
    // swapped in place ("highest" / "fewest") sits at the same place and
    // resembles its replacement; a rewording does neither.
    "worst_pair_similarity",
    "worst_pair_offset",
    // Poorly matched tokens (< 0.6) on the side with fewer and with more.
    "unmatched_fewer_side",
    "unmatched_more_side",
    // Share of the first text's tokens whose best match comes after the
    // previous token's (the word order kept).
    "order_kept",
    "length_ratio",
];

/// Number of features.
pub const N: usize = 13;

#[derive(Debug, Deserialize)]
struct Node {
    /// Leaf: the value added to the score.
    #[serde(default)]
    value: f64,
    /// Split: feature index, threshold (`x <= t` goes left), children.
    #[serde(default)]
    feature: usize,
    #[serde(default)]
    threshold: f64,
    #[serde(default)]
    left: usize,
    #[serde(default)]
    right: usize,
    leaf: bool,
}

/// A trained verifier: gradient-boosted trees over [`FEATURES`].
#[derive(Debug, Deserialize)]
pub struct Verifier {
    features: Vec<String>,
    baseline: f64,
    trees: Vec<Vec<Node>>,
    /// How and on what it was trained (shown by `cache eval`).
    #[serde(default)]
    pub about: String,
}

impl Verifier {
    /// Parse and check a model file's text.
    pub fn from_json(text: &str) -> Result<Verifier, String> {
        let v: Verifier = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if v.features != FEATURES {
            return Err(format!(
                "the model's features {:?} are not {FEATURES:?}",
                v.features
            ));
        }
        for (i, tree) in v.trees.iter().enumerate() {
            for n in tree {
                let bad = if n.leaf {
                    !n.value.is_finite()
                } else {
                    n.feature >= FEATURES.len()
                        || n.left >= tree.len()
                        || n.right >= tree.len()
                        || !n.threshold.is_finite()
                };
                if bad {
                    return Err(format!("tree {i} has a malformed node"));
                }
            }
        }
        Ok(v)
    }

    /// The model shipped in the binary for the default embedding model
    /// (paraphrase-MiniLM-L3-v2).
    pub fn shipped() -> &'static Verifier {
        static SHIPPED: OnceLock<Verifier> = OnceLock::new();
        SHIPPED.get_or_init(|| {
            Verifier::from_json(include_str!("verifier-l3.json"))
                .expect("the shipped verifier-l3.json is checked by a unit test")
        })
    }

    /// The model shipped for all-MiniLM-L6-v2 (`model.onnx`,
    /// `model.int8.onnx`), trained the same way on that model's token
    /// states.
    pub fn shipped_l6() -> &'static Verifier {
        static SHIPPED: OnceLock<Verifier> = OnceLock::new();
        SHIPPED.get_or_init(|| {
            Verifier::from_json(include_str!("verifier.json"))
                .expect("the shipped verifier.json is checked by a unit test")
        })
    }

    /// The verifier trained on the token states of the model file at
    /// `model`: the fetched all-MiniLM-L6-v2 files (`model.onnx`,
    /// `model.int8.onnx`) have theirs; any other file is judged with the
    /// default model's (paraphrase-MiniLM-L3-v2, `paraphrase-l3*.onnx`).
    pub fn for_model(model: &std::path::Path) -> &'static Verifier {
        let name = model.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "model.onnx" || name == "model.int8.onnx" {
            Verifier::shipped_l6()
        } else {
            Verifier::shipped()
        }
    }

    /// The probability that the pair asks the same thing, 0..1.
    pub fn score(&self, f: &[f32; N]) -> f32 {
        let mut raw = self.baseline;
        for tree in &self.trees {
            let mut i = 0;
            // Children come after their parent: at most tree.len() steps.
            for _ in 0..tree.len() {
                let n = &tree[i];
                if n.leaf {
                    raw += n.value;
                    break;
                }
                i = if f64::from(f[n.feature]) <= n.threshold {
                    n.left
                } else {
                    n.right
                };
            }
        }
        (1.0 / (1.0 + (-raw).exp())) as f32
    }

    /// Score a pair from its cosine and both texts' token states.
    pub fn score_pair(&self, cosine: f32, a: &[f32], b: &[f32], dim: usize) -> f32 {
        self.score(&features(cosine, a, b, dim))
    }
}

/// Dot product in eight lanes (the compiler vectorises it; a plain
/// iterator sum must keep its order and does not).
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (xs, ys) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (a, b) in xs.zip(ys) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rows of `states` (`dim` values each) without the first and last
/// (`[CLS]`, `[SEP]`), each scaled to unit length.
fn inner_rows(states: &[f32], dim: usize) -> Vec<f32> {
    let n = states.len() / dim;
    if n <= 2 {
        return Vec::new();
    }
    let mut out = states[dim..(n - 1) * dim].to_vec();
    for row in out.chunks_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

/// The verifier's features of a pair (see [`FEATURES`]): `a` and `b` are
/// the texts' token states as the embedder returns them.
pub fn features(cosine: f32, a: &[f32], b: &[f32], dim: usize) -> [f32; N] {
    let (ra, rb) = (inner_rows(a, dim), inner_rows(b, dim));
    let (na, nb) = (ra.len() / dim, rb.len() / dim);
    if na == 0 || nb == 0 {
        let mut f = [0.0; N];
        f[0] = cosine;
        return f;
    }
    // Best match of each token in the other text, both ways.
    let mut sim = vec![0f32; na * nb];
    let mut best_a = vec![f32::MIN; na];
    let mut arg_a = vec![0usize; na];
    let mut best_b = vec![f32::MIN; nb];
    for (i, x) in ra.chunks(dim).enumerate() {
        for (j, y) in rb.chunks(dim).enumerate() {
            let s = dot(x, y);
            sim[i * nb + j] = s;
            if s > best_a[i] {
                best_a[i] = s;
                arg_a[i] = j;
            }
            best_b[j] = best_b[j].max(s);
        }
    }
    // First minimum, as numpy's argmin.
    let argmin = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::MAX),
                |(bi, bv), (i, &x)| if x < bv { (i, x) } else { (bi, bv) },
            )
            .0
    };
    let (wi, wj) = (argmin(&best_a), argmin(&best_b));
    let unmatched = |v: &[f32]| v.iter().filter(|&&x| x < 0.6).count() as f32;
    let (ua, ub) = (unmatched(&best_a), unmatched(&best_b));
    let order_kept = if na > 1 {
        arg_a.windows(2).filter(|w| w[1] >= w[0]).count() as f32 / (na - 1) as f32
    } else {
        1.0
    };
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let mean_alignment = (mean(&best_a) + mean(&best_b)) / 2.0;
    let mut all: Vec<f32> = best_a.iter().chain(&best_b).copied().collect();
    all.sort_by(f32::total_cmp);
    let nth = |k: usize| all[k.min(all.len() - 1)];
    let share = |t: f32| all.iter().filter(|&&x| x < t).count() as f32 / all.len() as f32;
    [
        cosine,
        mean_alignment,
        nth(0),
        nth(1),
        nth(3),
        share(0.6),
        share(0.8),
        sim[wi * nb + wj],
        (wi as f32 / na as f32 - wj as f32 / nb as f32).abs(),
        ua.min(ub),
        ua.max(ub),
        order_kept,
        na.min(nb) as f32 / na.max(nb) as f32,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32], dim: usize) -> Vec<f32> {
        let mut r = v.to_vec();
        r.resize(dim, 0.0);
        r
    }

    #[test]
    fn dot_products_in_lanes_match_the_plain_sum() {
        let x: Vec<f32> = (0..389).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..389).map(|i| (i as f32 * 0.11).cos()).collect();
        let plain: f32 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
        assert!((dot(&x, &y) - plain).abs() < 1e-4);
        assert_eq!(
            dot(&x[..5], &y[..5]),
            x[..5].iter().zip(&y[..5]).map(|(p, q)| p * q).sum::<f32>()
        );
    }

    #[test]
    fn the_shipped_models_load_and_are_picked_by_model_file() {
        for v in [Verifier::shipped(), Verifier::shipped_l6()] {
            assert!(!v.trees.is_empty());
            assert!(!v.about.is_empty());
        }
        assert!(!std::ptr::eq(Verifier::shipped(), Verifier::shipped_l6()));
        let dir = std::path::Path::new("/usr/share/smartllm");
        for (file, l6) in [
            ("model.onnx", true),
            ("model.int8.onnx", true),
            ("paraphrase-l3.int8.onnx", false),
            ("paraphrase-l3.onnx", false),
            ("mine.onnx", false),
        ] {
            let want = if l6 {
                Verifier::shipped_l6()
            } else {
                Verifier::shipped()
            };
            assert!(
                std::ptr::eq(Verifier::for_model(&dir.join(file)), want),
                "{file}"
            );
        }
    }

    #[test]
    fn features_align_tokens_both_ways() {
        let dim = 4;
        let cls = row(&[9.0, 9.0, 9.0, 9.0], dim);
        let x = row(&[1.0], dim);
        let y = row(&[0.0, 1.0], dim);
        let z = row(&[0.0, 0.0, 2.0], dim);
        // a = [CLS] x y [SEP], b = [CLS] x z [SEP]: x matches (1.0), y and z
        // are orthogonal to everything in the other text (0.0).
        let a: Vec<f32> = [&cls[..], &x, &y, &cls].concat();
        let b: Vec<f32> = [&cls[..], &x, &z, &cls].concat();
        let f = features(0.9, &a, &b, dim);
        assert_eq!(f[0], 0.9);
        assert!((f[1] - 0.5).abs() < 1e-6, "{f:?}");
        assert_eq!((f[2], f[3], f[4]), (0.0, 0.0, 1.0));
        assert!((f[5] - 0.5).abs() < 1e-6 && (f[6] - 0.5).abs() < 1e-6);
        // y and z, both second, both unmatched, swapped in place.
        assert_eq!(&f[7..], &[0.0, 0.0, 1.0, 1.0, 1.0, 1.0], "{f:?}");
        // The same text: everything aligns.
        let same = features(1.0, &a, &a, dim);
        assert_eq!(&same[1..7], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&same[9..], &[0.0, 0.0, 1.0, 1.0]);
        // The same tokens in the opposite order: the order is not kept.
        let reversed: Vec<f32> = [&cls[..], &y, &x, &cls].concat();
        assert_eq!(features(1.0, &a, &reversed, dim)[11], 0.0);
        // Texts with no inner tokens: only the cosine.
        let empty = features(0.7, &[cls.clone(), cls.clone()].concat(), &a, dim);
        assert_eq!(empty[0], 0.7);
        assert!(empty[1..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn trees_add_up_and_bad_models_are_refused() {
        let json = format!(
            r#"{{"features": {}, "baseline": -1.0, "about": "test",
            "trees": [[{{"leaf": false, "feature": 0, "threshold": 0.5, "left": 1, "right": 2}},
                       {{"leaf": true, "value": -2.0}}, {{"leaf": true, "value": 3.0}}]]}}"#,
            serde_json::to_string(&FEATURES).unwrap()
        );
        let v = Verifier::from_json(&json).unwrap();
        let (mut low, mut high) = ([0.0; N], [0.0; N]);
        (low[0], high[0]) = (0.4, 0.6);
        let (low, high) = (v.score(&low), v.score(&high));
        assert!((low - 1.0 / (1.0 + 3f32.exp())).abs() < 1e-6);
        assert!((high - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
        let bad = json.replace("\"right\": 2", "\"right\": 7");
        assert!(Verifier::from_json(&bad).unwrap_err().contains("malformed"));
        let wrong = json.replace("\"cosine\",", "\"cos\",");
        assert!(Verifier::from_json(&wrong)
            .unwrap_err()
            .contains("features"));
    }
}
