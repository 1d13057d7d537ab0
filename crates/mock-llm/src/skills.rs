//! Models of different skill, for testing `smartllm profile run` and the
//! routing it feeds: given the labelled set (`--skill-set`, the same JSONL file
//! the profiler sends) and a probability per model and task (`--skill
//! MODEL:TASK=P,...`), a question of the set asked of a skilled model is
//! answered with the gold answer with that probability, otherwise with a wrong
//! one. Which questions a model gets right is fixed by `--skill-seed`, the
//! model and the question: the same run gives the same answers.
//!
//! The mock finds the question by its text in the prompt (the longest
//! question of the set the last user message contains): nothing in the
//! request tells it the answer.

use anyhow::{bail, Context};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// One question of the labelled set, as far as the mock needs it.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    task: String,
    question: String,
    /// The gold answer: a number or word (`exact`), or the option's letter (`choice`).
    answer: String,
    /// Options of a multiple-choice question (empty for `exact`).
    choices: usize,
}

/// The set and each skilled model's probability of a right answer per task.
#[derive(Debug, Clone, Default)]
pub struct Skills {
    items: Vec<Item>,
    /// model -> task (or `default`) -> probability.
    models: BTreeMap<String, BTreeMap<String, f64>>,
    seed: u64,
}

impl Skills {
    /// `set`: the labelled JSONL file; `specs`: `MODEL:TASK=P[,TASK=P...]`.
    pub fn load(set: &Path, specs: &[String], seed: u64) -> anyhow::Result<Skills> {
        let text = std::fs::read_to_string(set)
            .with_context(|| format!("reading --skill-set {}", set.display()))?;
        let mut skills =
            Skills::parse_set(&text).with_context(|| format!("--skill-set {}", set.display()))?;
        skills.seed = seed;
        for spec in specs {
            let (model, tasks) = parse_spec(spec)?;
            skills.models.insert(model, tasks);
        }
        Ok(skills)
    }

    fn parse_set(text: &str) -> anyhow::Result<Skills> {
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).with_context(|| format!("line {}", i + 1))?;
            let field = |k: &str| -> anyhow::Result<String> {
                v.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("line {}: no string {k:?}", i + 1))
            };
            let choices = v
                .get("choices")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            items.push(Item {
                task: field("task")?,
                question: field("question")?,
                answer: field("answer")?,
                choices,
            });
        }
        if items.is_empty() {
            bail!("no questions");
        }
        Ok(Skills {
            items,
            ..Skills::default()
        })
    }

    /// The answer a skilled `model` gives to `prompt`, or `None` when the
    /// model has no skills or the prompt holds no question of the set.
    pub fn answer(&self, model: &str, prompt: &str) -> Option<String> {
        let skills = self.models.get(model)?;
        let item = self
            .items
            .iter()
            .filter(|i| prompt.contains(&i.question))
            .max_by_key(|i| i.question.len())?;
        let p = skills
            .get(&item.task)
            .or_else(|| skills.get("default"))
            .copied()
            .unwrap_or(0.0);
        let h = self.hash(model, &item.question);
        let draw = (h >> 11) as f64 / (1u64 << 53) as f64;
        let given = if draw < p {
            item.answer.clone()
        } else {
            wrong(item, h)
        };
        Some(format!(
            "{model} works through the question. Answer: {given}"
        ))
    }

    fn hash(&self, model: &str, question: &str) -> u64 {
        let mut d = Sha256::new();
        d.update(self.seed.to_le_bytes());
        d.update(model.as_bytes());
        d.update([0]);
        d.update(question.as_bytes());
        let out = d.finalize();
        u64::from_le_bytes(out[..8].try_into().unwrap_or([0; 8]))
    }
}

/// A wrong answer: another option's letter, or a different number.
fn wrong(item: &Item, h: u64) -> String {
    if item.choices > 1 {
        let letters = b"ABCDEFGHIJ";
        let right = letters
            .iter()
            .position(|l| item.answer.as_bytes() == [*l])
            .unwrap_or(0);
        let n = item.choices.min(letters.len());
        let other = (right + 1 + (h as usize % (n - 1))) % n;
        return (letters[other] as char).to_string();
    }
    match item.answer.parse::<i64>() {
        Ok(x) => (x + 1 + (h % 9) as i64).to_string(),
        Err(_) => format!("not {}", item.answer),
    }
}

/// `MODEL:TASK=P[,TASK=P...]`.
fn parse_spec(spec: &str) -> anyhow::Result<(String, BTreeMap<String, f64>)> {
    let bad = || format!("--skill {spec:?}: expected MODEL:TASK=P[,TASK=P...], P from 0 to 1");
    let (model, rest) = spec.rsplit_once(':').with_context(bad)?;
    let mut tasks = BTreeMap::new();
    for kv in rest.split(',') {
        let (task, p) = kv.split_once('=').with_context(bad)?;
        let p: f64 = p.trim().parse().ok().with_context(bad)?;
        if !(0.0..=1.0).contains(&p) || model.is_empty() {
            bail!(bad());
        }
        tasks.insert(task.trim().to_string(), p);
    }
    Ok((model.to_string(), tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET: &str = r#"{"id": "m1", "task": "math", "kind": "exact", "question": "What is 6 times 7?", "answer": "42"}
{"id": "c1", "task": "code", "kind": "choice", "question": "for i in range(3):\n    print(i)", "choices": ["a", "b", "c"], "answer": "B"}
"#;

    fn skills(specs: &[&str]) -> Skills {
        let mut s = Skills::parse_set(SET).unwrap();
        for spec in specs {
            let (m, t) = parse_spec(spec).unwrap();
            s.models.insert(m, t);
        }
        s
    }

    #[test]
    fn always_and_never_right() {
        let s = skills(&["sure:math=1,code=1", "lost:default=0"]);
        let prompt = "Question: What is 6 times 7?\nEnd with Answer: X";
        assert!(s.answer("sure", prompt).unwrap().ends_with("Answer: 42"));
        let wrong = s.answer("lost", prompt).unwrap();
        assert!(!wrong.ends_with("Answer: 42"), "{wrong}");
        let code = "What does this print?\nfor i in range(3):\n    print(i)\nA. a\nB. b\nC. c";
        assert!(s.answer("sure", code).unwrap().ends_with("Answer: B"));
        let other = s.answer("lost", code).unwrap();
        assert!(
            other.ends_with("Answer: A") || other.ends_with("Answer: C"),
            "{other}"
        );
        // No skills, or not a question of the set: the mock's usual answer.
        assert_eq!(s.answer("plain", prompt), None);
        assert_eq!(s.answer("sure", "hello"), None);
    }

    #[test]
    fn the_share_right_follows_the_probability_and_is_stable() {
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!(
                "{{\"task\": \"math\", \"question\": \"What is {i} plus 1000000?\", \"answer\": \"{}\"}}\n",
                i + 1_000_000
            ));
        }
        let mut s = Skills::parse_set(&text).unwrap();
        s.models
            .insert("m".into(), parse_spec("m:math=0.3").unwrap().1);
        let right = |s: &Skills| {
            (0..2000)
                .filter(|i| {
                    s.answer("m", &format!("What is {i} plus 1000000?"))
                        .unwrap()
                        .ends_with(&format!(": {}", i + 1_000_000))
                })
                .count()
        };
        let n = right(&s);
        assert!((540..=660).contains(&n), "{n} of 2000 at p=0.3");
        assert_eq!(n, right(&s), "the same answers every time");
        s.seed = 9;
        assert_ne!(n, right(&s), "another seed, other questions right");
    }

    #[test]
    fn bad_specs_and_sets_are_refused() {
        for spec in ["nomodel", "m:math", "m:math=x", "m:math=1.5", ":math=0.5"] {
            assert!(parse_spec(spec).is_err(), "{spec}");
        }
        assert_eq!(
            parse_spec("org/model:7b:math=0.5,code=0.25").unwrap(),
            (
                "org/model:7b".to_string(),
                BTreeMap::from([("code".to_string(), 0.25), ("math".to_string(), 0.5)])
            )
        );
        assert!(Skills::parse_set("").is_err());
        assert!(Skills::parse_set("{\"task\": \"math\"}\n").is_err());
    }
}
