//! Task classifier: k nearest labelled examples (cosine over normalised
//! sentence embeddings), weighted by similarity, each task's votes divided by
//! its number of examples (a task with many examples would otherwise win
//! every close call). The examples ship in `conf/` (task<TAB>prompt) and are
//! embedded once per load; `data/router/tasks/` says where they come from and
//! how the rule was chosen.

use smartllm_config::Task;

pub struct TaskClassifier {
    dim: usize,
    /// Row-major, one normalised vector per example, in int8 (a quarter of
    /// the memory: a thousand 768-value examples stay in a core's L2 cache,
    /// and the vote reads all of them on every request).
    vectors: Vec<i8>,
    /// Each row's scale: value = int8 x scale.
    scales: Vec<f32>,
    labels: Vec<Task>,
    /// Examples per task (indexed by [`Task::index`]).
    counts: [u32; 8],
    k: usize,
}

/// Why a classifier examples file cannot be used (lines count from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExamplesError {
    #[error("line {line}: expected task<TAB>prompt")]
    NoTab { line: usize },
    #[error("line {line}: unknown task {task:?}")]
    UnknownTask { line: usize, task: String },
    #[error("line {line}: empty prompt")]
    EmptyPrompt { line: usize },
    #[error("no example for task {task}: every task needs some")]
    MissingTask { task: Task },
}

/// Why a classifier cannot be built from labelled embeddings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifierError {
    #[error("labels and embeddings differ in number")]
    CountMismatch,
    #[error("embeddings differ in dimension")]
    DimensionMismatch,
}

/// Parse `task<TAB>prompt` lines (`#` comments and blank lines skipped).
pub fn parse_examples(text: &str) -> Result<Vec<(Task, String)>, ExamplesError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((task, prompt)) = line.split_once('\t') else {
            return Err(ExamplesError::NoTab { line: i + 1 });
        };
        let Some(t) = Task::parse(task) else {
            return Err(ExamplesError::UnknownTask {
                line: i + 1,
                task: task.to_string(),
            });
        };
        if prompt.trim().is_empty() {
            return Err(ExamplesError::EmptyPrompt { line: i + 1 });
        }
        out.push((t, prompt.trim().to_string()));
    }
    for t in Task::ALL {
        if !out.iter().any(|(x, _)| *x == t) {
            return Err(ExamplesError::MissingTask { task: t });
        }
    }
    Ok(out)
}

impl TaskClassifier {
    pub fn new(
        labels: Vec<Task>,
        embeddings: Vec<Vec<f32>>,
        k: usize,
    ) -> Result<TaskClassifier, ClassifierError> {
        if labels.len() != embeddings.len() {
            return Err(ClassifierError::CountMismatch);
        }
        let dim = embeddings.first().map_or(0, Vec::len);
        let mut vectors = Vec::with_capacity(dim * embeddings.len());
        let mut scales = Vec::with_capacity(embeddings.len());
        for e in &embeddings {
            if e.len() != dim {
                return Err(ClassifierError::DimensionMismatch);
            }
            let n = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            let unit: Vec<f32> = e.iter().map(|x| x / n).collect();
            scales.push(quantize(&unit, &mut vectors));
        }
        let mut counts = [0u32; 8];
        for t in &labels {
            counts[t.index()] += 1;
        }
        Ok(TaskClassifier {
            dim,
            vectors,
            scales,
            labels,
            counts,
            k: k.max(1),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The most likely task and the share of the neighbours' weight it got.
    ///
    /// `embedding` has the examples' dimension; or, for examples that are
    /// task vectors (`smartllm_embed::task_vector`: the whole text's view
    /// over sqrt(3), then the head view), half of it: a plain embedding, then
    /// compared with the examples' whole-text views only (a request whose
    /// task vector was not at hand).
    pub fn classify(&self, embedding: &[f32]) -> (Task, f32) {
        self.classify_among(embedding, &[])
    }

    /// [`classify`](Self::classify) where the prompt's words name some tasks
    /// (`named`, in priority order, each with whether it may be chosen
    /// without a vote; empty: none): the vote decides among those; when none
    /// of them got a vote, the first that may is taken, else the whole
    /// vote decides. Chosen by leave-one-collection-out on the training
    /// collections (data/router/tasks/keywords_vote.py): 55.4% for the vote
    /// alone, 60.6% with translation, summarisation, extraction and code
    /// words naming tasks. The confidence is the chosen task's share of all
    /// votes.
    pub fn classify_among(&self, embedding: &[f32], named: &[(Task, bool)]) -> (Task, f32) {
        self.classify_without(embedding, named, None)
    }

    /// [`classify_among`](Self::classify_among), where the examples of
    /// `without` take no part in the vote (the k nearest of the others
    /// vote): a prompt that cannot be that task (one in another language
    /// than English that names no language is no request for a
    /// translation, however near the English-only model puts it to the
    /// translation examples, which hold foreign text).
    pub fn classify_without(
        &self,
        embedding: &[f32],
        named: &[(Task, bool)],
        without: Option<Task>,
    ) -> (Task, f32) {
        let unvoted = || named.iter().find(|(_, may)| *may).map(|(t, _)| *t);
        let whole_only = embedding.len() * 2 == self.dim;
        if self.is_empty() || (embedding.len() != self.dim && !whole_only) {
            return (unvoted().unwrap_or(Task::Chat), 0.0);
        }
        let mut query = Vec::with_capacity(embedding.len());
        let scale = quantize(embedding, &mut query) * if whole_only { 3f32.sqrt() } else { 1.0 };
        // Top k by similarity, kept in a small sorted array (k <= 64).
        let mut top: Vec<(f32, Task)> = Vec::with_capacity(self.k + 1);
        let dot_i8 = dot_i8_for_this_cpu();
        let rows = self.vectors.chunks_exact(self.dim).zip(&self.scales);
        for ((row, row_scale), label) in rows.zip(&self.labels) {
            if Some(*label) == without {
                continue;
            }
            let s = scale * row_scale * dot_i8(&row[..query.len()], &query) as f32;
            if top.len() < self.k || s > top[top.len() - 1].0 {
                let at = top.partition_point(|(x, _)| *x >= s);
                top.insert(at, (s, *label));
                top.truncate(self.k);
            }
        }
        let mut votes = [0f32; 8];
        for (s, t) in &top {
            // Closer neighbours count more; unrelated ones barely.
            votes[t.index()] += (s.max(0.0)).powi(3);
        }
        // Per example of the task: chosen over raw votes by leave-one-source-
        // out validation on the training collections (data/router/tasks).
        for (v, n) in votes.iter_mut().zip(self.counts) {
            *v /= n.max(1) as f32;
        }
        let total: f32 = votes.iter().sum();
        let overall = || {
            votes
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, w)| (Task::ALL[i], *w))
                .unwrap_or((Task::Chat, 0.0))
        };
        // The first named task wins ties among the named.
        let among = named
            .iter()
            .fold(None, |best: Option<(Task, f32)>, (t, _)| {
                let w = votes[t.index()];
                match best {
                    Some((_, bw)) if w <= bw => best,
                    _ => Some((*t, w)),
                }
            });
        let (best, w) = match among {
            Some((t, w)) if w > 0.0 => (t, w),
            _ => match unvoted() {
                Some(t) => (t, 0.0),
                None => overall(),
            },
        };
        (best, if total > 0.0 { w / total } else { 0.0 })
    }
}

/// Append `v` in int8 (symmetric, scaled to its largest magnitude) to
/// `out`; returns the scale (value = int8 x scale).
fn quantize(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let scale = max / 127.0;
    out.extend(v.iter().map(|x| (x / scale).round() as i8));
    scale
}

/// The integer dot product for this CPU (chosen once per vote, not per
/// row): with AVX2 where the CPU has it (the default x86-64 target only has
/// SSE2, whose widening multiplies are slow), else the portable lanes.
fn dot_i8_for_this_cpu() -> fn(&[i8], &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            return dot_i8_vnni;
        }
        if has!("avx2") {
            return dot_i8_avx2;
        }
    }
    dot_i8_lanes
}

/// The dot product with AVX-512 VNNI: `vpdpbusd` multiplies unsigned by
/// signed bytes, so `y` is shifted to unsigned (`y + 128`, a flip of its
/// top bit) and `128 * sum(x)` (from a second `vpdpbusd` by ones) taken off.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn dot_i8_vnni(x: &[i8], y: &[i8]) -> i32 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run(x: &[i8], y: &[i8]) -> i32 {
        use std::arch::x86_64::*;
        let n = x.len().min(y.len());
        let full = n / 64 * 64;
        let flip = _mm512_set1_epi8(i8::MIN);
        let ones = _mm512_set1_epi8(1);
        let (mut xy, mut sx) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut i = 0;
        while i < full {
            // SAFETY (of the loads): i + 64 <= n, within both slices.
            let xv = unsafe { _mm512_loadu_si512(x.as_ptr().add(i).cast()) };
            let yv = unsafe { _mm512_loadu_si512(y.as_ptr().add(i).cast()) };
            xy = _mm512_dpbusd_epi32(xy, _mm512_xor_si512(yv, flip), xv);
            sx = _mm512_dpbusd_epi32(sx, ones, xv);
            i += 64;
        }
        let body = _mm512_reduce_add_epi32(xy) - 128 * _mm512_reduce_add_epi32(sx);
        body + dot_i8_lanes(&x[full..n], &y[full..n])
    }
    // SAFETY: only chosen after the CPU reported AVX-512 F, BW and VNNI;
    // `run` reads nothing past the shorter slice.
    unsafe { run(x, y) }
}

/// [`dot_i8_lanes`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn dot_i8_avx2(x: &[i8], y: &[i8]) -> i32 {
    #[target_feature(enable = "avx2")]
    unsafe fn run(x: &[i8], y: &[i8]) -> i32 {
        dot_i8_lanes(x, y)
    }
    // SAFETY: only called after `is_x86_feature_detected!("avx2")`; the
    // function touches nothing but its two slices.
    unsafe { run(x, y) }
}

/// Integer dot product in sixteen lanes (vectorised by the compiler).
#[inline(always)]
fn dot_i8_lanes(x: &[i8], y: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let (xs, ys) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: i32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(p, q)| i32::from(*p) * i32::from(*q))
        .sum();
    for (a, b) in xs.zip(ys) {
        for k in 0..16 {
            acc[k] += i32::from(a[k]) * i32::from(b[k]);
        }
    }
    acc.iter().sum::<i32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_similarities_are_the_float_ones_to_a_hundredth() {
        let v = |seed: f32| -> Vec<f32> {
            let x: Vec<f32> = (0..771).map(|i| (i as f32 * seed).sin()).collect();
            let n = x.iter().map(|a| a * a).sum::<f32>().sqrt();
            x.iter().map(|a| a / n).collect()
        };
        for (a, b) in [(0.37, 0.11), (0.5, 0.51), (1.3, 1.3)] {
            let (x, y) = (v(a), v(b));
            let exact: f32 = x.iter().zip(&y).map(|(p, q)| p * q).sum();
            let (mut qx, mut qy) = (Vec::new(), Vec::new());
            let s = quantize(&x, &mut qx) * quantize(&y, &mut qy);
            let dot_i8 = dot_i8_for_this_cpu();
            let approx = s * dot_i8(&qx, &qy) as f32;
            assert!((approx - exact).abs() < 0.01, "{approx} vs {exact}");
            assert_eq!(dot_i8(&qx, &qy), dot_i8_lanes(&qx, &qy));
            // Extremes and a tail that is not a whole vector.
            let ext: Vec<i8> = (0..771).map(|i| [i8::MIN + 1, 127, 0, -5][i % 4]).collect();
            assert_eq!(dot_i8(&ext, &qy), dot_i8_lanes(&ext, &qy));
            assert_eq!(dot_i8(&ext, &ext), dot_i8_lanes(&ext, &ext));
        }
    }

    #[test]
    fn nearest_examples_vote() {
        let c = TaskClassifier::new(
            vec![Task::Code, Task::Code, Task::Math, Task::Chat],
            vec![
                vec![1.0, 0.0, 0.0],
                vec![0.9, 0.1, 0.0],
                vec![0.0, 1.0, 0.0],
                vec![0.0, 0.0, 1.0],
            ],
            3,
        )
        .unwrap();
        let (t, conf) = c.classify(&[0.95, 0.05, 0.0]);
        assert_eq!(t, Task::Code);
        assert!(conf > 0.9);
        assert_eq!(c.classify(&[0.0, 0.2, 0.98]).0, Task::Chat);
    }

    /// Examples of the task left out take no place among the k nearest:
    /// the nearest of the others vote.
    #[test]
    fn a_task_left_out_takes_no_place_in_the_vote() {
        let labels = vec![Task::Translation, Task::Translation, Task::Chat, Task::Code];
        let vectors = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.99, 0.14, 0.0],
            vec![0.8, 0.6, 0.0],
            vec![0.0, 0.0, 1.0],
        ];
        let c = TaskClassifier::new(labels, vectors, 2).unwrap();
        let q = [1.0, 0.05, 0.0];
        assert_eq!(c.classify_among(&q, &[]).0, Task::Translation);
        let (t, conf) = c.classify_without(&q, &[], Some(Task::Translation));
        assert_eq!(t, Task::Chat);
        assert!(conf > 0.5, "{conf}");
    }

    #[test]
    fn named_tasks_narrow_the_vote() {
        let c = TaskClassifier::new(
            vec![Task::Code, Task::Math, Task::Summarisation, Task::Chat],
            vec![
                vec![1.0, 0.0, 0.0],
                vec![0.0, 1.0, 0.0],
                vec![0.6, 0.8, 0.0],
                vec![0.0, 0.0, 1.0],
            ],
            3,
        )
        .unwrap();
        let q = [0.1, 0.99, 0.0];
        assert_eq!(c.classify(&q).0, Task::Math);
        // Named tasks: the one with more votes among them wins.
        let (t, conf) = c.classify_among(&q, &[(Task::Code, false), (Task::Summarisation, false)]);
        assert_eq!(t, Task::Summarisation);
        assert!(conf > 0.0 && conf < 0.5, "{conf}");
        assert_eq!(c.classify_among(&q, &[(Task::Math, false)]).0, Task::Math);
        // None of the named ones got a vote: the first that may win so...
        assert_eq!(
            c.classify_among(&q, &[(Task::Translation, false), (Task::Extraction, true)]),
            (Task::Extraction, 0.0)
        );
        // ... else the whole vote.
        assert_eq!(
            c.classify_among(&q, &[(Task::Translation, false)]).0,
            Task::Math
        );
        // No examples: the first named that may win unvoted, else chat.
        let empty = TaskClassifier::new(vec![], vec![], 3).unwrap();
        assert_eq!(
            empty.classify_among(&q, &[(Task::Code, false), (Task::Extraction, true)]),
            (Task::Extraction, 0.0)
        );
        assert_eq!(
            empty.classify_among(&q, &[(Task::Code, false)]).0,
            Task::Chat
        );
    }

    #[test]
    fn task_vectors_vote_and_a_plain_embedding_uses_their_whole_view() {
        // 2-d "embeddings": examples are [whole / sqrt3 ; sqrt(2/3) head].
        let tv = |w: [f32; 2], h: [f32; 2]| {
            let (a, b) = (1.0 / 3f32.sqrt(), (2.0f32 / 3.0).sqrt());
            vec![w[0] * a, w[1] * a, h[0] * b, h[1] * b]
        };
        let c = TaskClassifier::new(
            vec![Task::Summarisation, Task::Math],
            vec![tv([1.0, 0.0], [0.0, 1.0]), tv([0.0, 1.0], [1.0, 0.0])],
            1,
        )
        .unwrap();
        // Its whole text is like the maths example, its head (the
        // instruction) like the summary's: the head weighs double.
        assert_eq!(
            c.classify(&tv([0.6, 0.8], [0.0, 1.0])).0,
            Task::Summarisation
        );
        // Without the head view, the whole-text view decides.
        assert_eq!(c.classify(&[0.6, 0.8]).0, Task::Math);
        assert_eq!(c.classify(&[0.8, 0.6]).0, Task::Summarisation);
        assert_eq!(
            c.classify(&[1.0, 0.0, 0.0]).1,
            0.0,
            "other dimensions do not vote"
        );
    }

    #[test]
    fn a_task_with_many_examples_does_not_win_by_numbers() {
        // Five code examples, one math example. A query nearer the math
        // example than the code ones is math, even though three of its k=3
        // neighbours' raw weight is code's.
        let mut labels = vec![Task::Code; 5];
        labels.push(Task::Math);
        let mut vecs: Vec<Vec<f32>> = (0..5).map(|i| vec![1.0, 0.1 * i as f32]).collect();
        vecs.push(vec![0.0, 1.0]);
        let c = TaskClassifier::new(labels, vecs, 3).unwrap();
        assert_eq!(c.classify(&[0.45, 0.9]).0, Task::Math);
        assert_eq!(c.classify(&[1.0, 0.05]).0, Task::Code);
    }

    #[test]
    fn examples_parse_with_clear_errors() {
        let ok: String = Task::ALL
            .iter()
            .map(|t| format!("{t}\tan example for {t}\n"))
            .collect();
        assert_eq!(
            parse_examples(&format!("# comment\n\n{ok}")).unwrap().len(),
            8
        );
        assert!(parse_examples("code no tab")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(parse_examples("poetry\tx")
            .unwrap_err()
            .to_string()
            .contains("unknown task"));
        assert!(parse_examples("code\tx")
            .unwrap_err()
            .to_string()
            .contains("every task"));
    }
}
