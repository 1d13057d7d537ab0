//! Task classifier: k nearest labelled examples (cosine over normalised
//! sentence embeddings), weighted by similarity, each task's votes divided by
//! its number of examples (a task with many examples would otherwise win
//! every close call). The examples ship in `conf/` (task<TAB>prompt) and are
//! embedded once per load; `data/router/tasks/` says where they come from and
//! how the rule was chosen.

use smartllm_config::Task;

pub struct TaskClassifier {
    dim: usize,
    /// Row-major, one normalised vector per example.
    vectors: Vec<f32>,
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
        for e in &embeddings {
            if e.len() != dim {
                return Err(ClassifierError::DimensionMismatch);
            }
            let n = e.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            vectors.extend(e.iter().map(|x| x / n));
        }
        let mut counts = [0u32; 8];
        for t in &labels {
            counts[t.index()] += 1;
        }
        Ok(TaskClassifier {
            dim,
            vectors,
            labels,
            counts,
            k: k.max(1),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The most likely task and the share of the neighbours' weight it got.
    pub fn classify(&self, embedding: &[f32]) -> (Task, f32) {
        if self.is_empty() || embedding.len() != self.dim {
            return (Task::Chat, 0.0);
        }
        // Top k by similarity, kept in a small sorted array (k <= 64).
        let mut top: Vec<(f32, Task)> = Vec::with_capacity(self.k + 1);
        for (row, label) in self.vectors.chunks_exact(self.dim).zip(&self.labels) {
            let s: f32 = row.iter().zip(embedding).map(|(a, b)| a * b).sum();
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
        let (best, w) = votes
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, w)| (Task::ALL[i], *w))
            .unwrap_or((Task::Chat, 0.0));
        (best, if total > 0.0 { w / total } else { 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
