//! Model quality from evidence: scores on public benchmarks
//! (`profile.benchmarks` in `models.yaml`, mapped to the router's tasks by
//! [`default_benchmark_tasks`] and `benchmark_tasks:`), and quality measured
//! on a labelled set (`profiles.yaml`, written by `smartllm profile run`).

use crate::raw::{RawMeasuredProfiles, RawProfile};
use crate::routing::task_names;
use crate::{Issues, ModelConfig, QualitySource, Task, MODELS_FILE, PROFILES_FILE};
use std::collections::BTreeMap;

/// The shipped mapping from public benchmarks to the tasks they measure
/// (benchmark names lower case, `-` and spaces as `_`). Scores are read as
/// shares from 0 to 1: accuracy, pass@1, or a win rate.
pub fn default_benchmark_tasks() -> BTreeMap<String, Vec<Task>> {
    use Task::*;
    let table: &[(&str, &[Task])] = &[
        // Code: pass@1 on unit-tested problems, resolved issues.
        ("humaneval", &[Code]),
        ("humaneval_plus", &[Code]),
        ("mbpp", &[Code]),
        ("livecodebench", &[Code]),
        ("bigcodebench", &[Code]),
        ("swe_bench_verified", &[Code]),
        ("aider_polyglot", &[Code]),
        // Mathematics: exact final answers.
        ("gsm8k", &[Math]),
        ("math", &[Math]),
        ("math_500", &[Math]),
        ("aime", &[Math]),
        ("aime_2024", &[Math]),
        ("aime_2025", &[Math]),
        ("mgsm", &[Math]),
        // Knowledge and reasoning: expert multiple choice, multi-step puzzles.
        ("gpqa", &[Reasoning]),
        ("gpqa_diamond", &[Reasoning]),
        ("mmlu", &[Reasoning]),
        ("mmlu_pro", &[Reasoning]),
        ("bbh", &[Reasoning]),
        ("musr", &[Reasoning]),
        ("arc_challenge", &[Reasoning]),
        ("hle", &[Reasoning]),
        // Following instructions and formats; reading for spans.
        ("ifeval", &[Extraction, Chat]),
        ("drop", &[Extraction]),
        ("squad", &[Extraction]),
        // Translation (chrF or COMET, as a share).
        ("wmt", &[Translation]),
        ("flores", &[Translation]),
        // Open-ended answers judged against a reference model (win rates).
        ("arena_hard", &[Chat, Creative, Summarisation]),
        ("alpacaeval", &[Chat, Creative]),
        ("alpacaeval_lc", &[Chat, Creative]),
        ("wildbench", &[Chat, Creative]),
    ];
    table
        .iter()
        .map(|(b, tasks)| (b.to_string(), tasks.to_vec()))
        .collect()
}

/// A benchmark's name as the mapping keys it: `GPQA-Diamond` is `gpqa_diamond`.
pub(super) fn benchmark_key(name: &str) -> String {
    name.trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c == '-' || c == ' ' { '_' } else { c })
        .collect()
}

/// The shipped mapping with `benchmark_tasks:` of `models.yaml` laid over it.
pub(super) fn benchmark_mapping(
    overrides: &BTreeMap<String, Vec<String>>,
    v: &mut Issues<'_>,
) -> BTreeMap<String, Vec<Task>> {
    let mut mapping = default_benchmark_tasks();
    for (name, tasks) in overrides {
        let at = format!("benchmark_tasks.{name}");
        if tasks.is_empty() {
            v.push(
                MODELS_FILE,
                at.clone(),
                "name at least one task the benchmark measures",
            );
        }
        let mut resolved = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            match Task::parse(t) {
                Some(t) if !resolved.contains(&t) => resolved.push(t),
                Some(_) => {}
                None => v.push(
                    MODELS_FILE,
                    format!("{at}[{i}]"),
                    format!("unknown task {t:?} (known: {})", task_names()),
                ),
            }
        }
        mapping.insert(benchmark_key(name), resolved);
    }
    mapping
}

/// A score that must be a share from 0 to 1; `Some(message)` when it is not.
fn share_problem(q: f64) -> Option<&'static str> {
    if (0.0..=1.0).contains(&q) {
        None
    } else if q > 1.0 && q <= 100.0 {
        Some("must be between 0 and 1 (a score of 65% is written 0.65)")
    } else {
        Some("must be between 0 and 1")
    }
}

/// Quality per task from `profile.quality` and `profile.benchmarks`, with
/// where each value came from: a task named in `quality` takes that value; else
/// the mean of the benchmarks mapped to it; else `quality.default`; else the
/// mean of all the model's benchmark scores (a model's overall level is a better
/// guess than a constant); else the built-in default.
pub(super) fn resolve_quality(
    at: &str,
    raw: &RawProfile,
    mapping: &BTreeMap<String, Vec<Task>>,
    quality: &mut [f64; 8],
    source: &mut [QualitySource; 8],
    v: &mut Issues<'_>,
) {
    let mut sums = [(0.0, 0u32); 8];
    let mut all = (0.0, 0u32);
    for (name, q) in &raw.benchmarks {
        let bat = format!("{at}.profile.benchmarks.{name}");
        if let Some(problem) = share_problem(*q) {
            v.push(MODELS_FILE, bat, problem);
            continue;
        }
        let Some(tasks) = mapping.get(&benchmark_key(name)) else {
            let known: Vec<&str> = mapping.keys().map(String::as_str).collect();
            v.push(
                MODELS_FILE,
                bat,
                format!(
                    "unknown benchmark {name:?}: map it to tasks under benchmark_tasks: in models.yaml (known: {})",
                    known.join(", ")
                ),
            );
            continue;
        };
        all = (all.0 + q, all.1 + 1);
        for t in tasks {
            let s = &mut sums[t.index()];
            *s = (s.0 + q, s.1 + 1);
        }
    }
    let fallback = match raw.quality.get("default") {
        Some(d) => Some(d.clamp(0.0, 1.0)),
        None if all.1 > 0 => Some(all.0 / f64::from(all.1)),
        None => None,
    };
    for t in Task::ALL {
        let i = t.index();
        if let Some(d) = fallback {
            quality[i] = d;
        }
        let (sum, n) = sums[i];
        if n > 0 {
            quality[i] = sum / f64::from(n);
            source[i] = QualitySource::Benchmarks;
        }
    }
    for (k, q) in &raw.quality {
        if let Some(problem) = share_problem(*q) {
            v.push(MODELS_FILE, format!("{at}.profile.quality.{k}"), problem);
        }
        if k == "default" {
            continue;
        }
        match Task::parse(k) {
            Some(t) => {
                quality[t.index()] = q.clamp(0.0, 1.0);
                source[t.index()] = QualitySource::Configured;
            }
            None => v.push(
                MODELS_FILE,
                format!("{at}.profile.quality.{k}"),
                format!("unknown task {k:?} (known: {}, default)", task_names()),
            ),
        }
    }
}

/// Measured quality from `profiles.yaml` replaces the profile's for the tasks
/// it names.
pub(super) fn apply_measured(
    models: &mut [ModelConfig],
    measured: RawMeasuredProfiles,
    v: &mut Issues<'_>,
) {
    for (name, m) in measured.models {
        let at = format!("models.{name}");
        let Some(model) = models.iter_mut().find(|x| x.name == name) else {
            let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            v.push(
                PROFILES_FILE,
                at,
                format!(
                    "unknown model {name:?} (models.yaml defines: {})",
                    known.join(", ")
                ),
            );
            continue;
        };
        for (k, q) in &m.quality {
            let kat = format!("{at}.quality.{k}");
            if let Some(problem) = share_problem(*q) {
                v.push(PROFILES_FILE, kat, problem);
                continue;
            }
            match Task::parse(k) {
                Some(t) => {
                    model.profile.quality[t.index()] = *q;
                    model.profile.quality_source[t.index()] = QualitySource::Measured;
                }
                None => v.push(
                    PROFILES_FILE,
                    kat,
                    format!("unknown task {k:?} (known: {})", task_names()),
                ),
            }
        }
        for k in m.answers.keys() {
            if Task::parse(k).is_none() {
                v.push(
                    PROFILES_FILE,
                    format!("{at}.answers.{k}"),
                    format!("unknown task {k:?} (known: {})", task_names()),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;

    const PROVIDERS_P: &str =
        "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n";

    fn load(models: &str, profiles: Option<&str>) -> Result<Config, ConfigError> {
        let mut files = vec![
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, PROVIDERS_P),
            (MODELS_FILE, models),
        ];
        if let Some(p) = profiles {
            files.push((PROFILES_FILE, p));
        }
        load_dir(write_dir(&files).path())
    }

    fn q(c: &Config, model: &str, t: Task) -> (f64, QualitySource) {
        let m = c.models.iter().find(|m| m.name == model).unwrap();
        (m.profile.quality(t), m.profile.quality_source[t.index()])
    }

    #[test]
    fn benchmarks_resolve_into_quality_per_task() {
        let models = "models:
  - name: a
    deployments: [ { provider: p } ]
    profile:
      benchmarks: { GPQA-Diamond: 0.6, mmlu_pro: 0.8, livecodebench: 0.41, ifeval: 0.88, math_500: 0.9 }
      quality: { code: 0.5 }
";
        let c = load(models, None).unwrap();
        // Reasoning: the mean of the two benchmarks mapped to it.
        let (r, src) = q(&c, "a", Task::Reasoning);
        assert!((r - 0.7).abs() < 1e-9, "{r}");
        assert_eq!(src, QualitySource::Benchmarks);
        assert_eq!(q(&c, "a", Task::Math), (0.9, QualitySource::Benchmarks));
        assert_eq!(
            q(&c, "a", Task::Extraction),
            (0.88, QualitySource::Benchmarks)
        );
        assert_eq!(q(&c, "a", Task::Chat), (0.88, QualitySource::Benchmarks));
        // A task named in quality wins over the benchmarks.
        assert_eq!(q(&c, "a", Task::Code), (0.5, QualitySource::Configured));
        // No benchmark maps to translation: the mean of all five scores.
        let (t, src) = q(&c, "a", Task::Translation);
        assert!((t - (0.6 + 0.8 + 0.41 + 0.88 + 0.9) / 5.0).abs() < 1e-9);
        assert_eq!(src, QualitySource::Default);
    }

    #[test]
    fn the_mapping_can_be_extended_and_overridden() {
        let models = "benchmark_tasks:
  house_eval: [translation, summarisation]
  gpqa: [math]
models:
  - name: a
    deployments: [ { provider: p } ]
    profile:
      benchmarks: { house_eval: 0.55, gpqa: 0.65 }
      quality: { default: 0.3 }
";
        let c = load(models, None).unwrap();
        assert_eq!(
            q(&c, "a", Task::Translation),
            (0.55, QualitySource::Benchmarks)
        );
        assert_eq!(
            q(&c, "a", Task::Summarisation),
            (0.55, QualitySource::Benchmarks)
        );
        assert_eq!(q(&c, "a", Task::Math), (0.65, QualitySource::Benchmarks));
        // gpqa no longer counts for reasoning: quality.default does.
        assert_eq!(q(&c, "a", Task::Reasoning), (0.3, QualitySource::Default));
    }

    #[test]
    fn malformed_benchmarks_are_rejected_with_key_path_and_line() {
        let models = "benchmark_tasks:
  house_eval: [cooking]
  empty: []
models:
  - name: a
    deployments: [ { provider: p } ]
    profile:
      benchmarks:
        gpqa: 65
        mystery_bench: 0.5
        mmlu: -0.1
";
        let text = load(models, None).unwrap_err().to_string();
        for want in [
            "models.yaml:2: benchmark_tasks.house_eval[0]: unknown task \"cooking\"",
            "models.yaml:3: benchmark_tasks.empty: name at least one task",
            "models.yaml:9: models[0].profile.benchmarks.gpqa: must be between 0 and 1 (a score of 65% is written 0.65)",
            "models.yaml:10: models[0].profile.benchmarks.mystery_bench: unknown benchmark \"mystery_bench\": map it to tasks under benchmark_tasks:",
            "models.yaml:11: models[0].profile.benchmarks.mmlu: must be between 0 and 1",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // Not a number: the parser names the key and line.
        let models = "models:\n  - name: a\n    deployments: [ { provider: p } ]\n    profile:\n      benchmarks:\n        gpqa: high\n";
        let err = load(models, None).unwrap_err();
        assert_eq!(err.issues[0].line, Some(6), "{err}");
        assert!(
            err.issues[0].path.contains("benchmarks.gpqa"),
            "{}",
            err.issues[0]
        );
    }

    #[test]
    fn measured_profiles_replace_the_tasks_they_name() {
        let models = "models:
  - name: a
    deployments: [ { provider: p } ]
    profile:
      quality: { math: 0.9, code: 0.8 }
  - name: b
    deployments: [ { provider: p } ]
";
        let profiles = "set: data/profile/set.jsonl
measured_at: \"2025-01-01T00:00:00Z\"
models:
  a:
    quality: { math: 0.35 }
    answers: { math: 40 }
";
        let c = load(models, Some(profiles)).unwrap();
        assert_eq!(q(&c, "a", Task::Math), (0.35, QualitySource::Measured));
        assert_eq!(q(&c, "a", Task::Code), (0.8, QualitySource::Configured));
        assert_eq!(q(&c, "b", Task::Math), (0.7, QualitySource::Default));
        let before = load(models, None).unwrap();
        assert_ne!(before.digest, c.digest, "a measurement is a config change");

        let bad = "models:\n  a:\n    quality: { math: 1.5, cooking: 0.2 }\n  ghost:\n    quality: { math: 0.5 }\n";
        let text = load(models, Some(bad)).unwrap_err().to_string();
        for want in [
            "profiles.yaml:3: models.a.quality.math: must be between 0 and 1",
            "profiles.yaml:3: models.a.quality.cooking: unknown task \"cooking\"",
            "profiles.yaml:4: models.ghost: unknown model \"ghost\" (models.yaml defines: a, b)",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        let err = load(models, Some("models:\n  a:\n    qualty: {}\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `qualty`"), "{err}");
    }
}
