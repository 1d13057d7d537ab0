//! Precision guard and privacy exclusions.
//!
//! Sentence embeddings put "How do I enable X?" and "How do I not enable X?", or
//! "Convert 5 miles" and "Convert 50 miles", very close together. A semantic hit
//! must therefore also agree on negation, on every number and on every named
//! entity; otherwise it is a near-miss and the upstream answers.

use regex::Regex;
use smartllm_config::Detector;
use std::collections::BTreeSet;
use std::sync::LazyLock;

const NEGATIONS: [&str; 14] = [
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "cannot",
    "can't", "don't", "doesn't", "isn't",
];

const NUMBER_WORDS: [&str; 21] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million",
    "billion",
];

/// Words that start sentences or questions: capitalised without being names.
const COMMON_CAPITALISED: [&str; 40] = [
    "i", "a", "an", "the", "what", "how", "why", "when", "where", "who", "which", "can", "could",
    "should", "would", "is", "are", "do", "does", "did", "please", "tell", "give", "write",
    "explain", "list", "show", "describe", "in", "on", "for", "to", "of", "and", "or", "my",
    "your", "it", "this", "that",
];

fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '.' || c == ','))
        .map(|w| w.trim_matches(|c: char| c == '.' || c == ',' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect()
}

fn negation_count(text: &str) -> usize {
    let lower = text.to_lowercase();
    words(&lower)
        .iter()
        .filter(|w| NEGATIONS.contains(w) || w.ends_with("n't"))
        .count()
}

fn numbers(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = words(&lower)
        .iter()
        .filter_map(|w| {
            if w.chars().any(|c| c.is_ascii_digit()) {
                Some(
                    w.chars()
                        .filter(|c| c.is_ascii_digit() || *c == '.')
                        .collect::<String>(),
                )
            } else if NUMBER_WORDS.contains(w) {
                Some((*w).to_string())
            } else {
                None
            }
        })
        .collect();
    out.sort();
    out
}

/// Capitalised words that are not sentence starters, lower-cased.
fn entities(text: &str) -> BTreeSet<String> {
    words(text)
        .iter()
        .filter(|w| w.chars().next().is_some_and(char::is_uppercase) && w.chars().count() > 1)
        .map(|w| w.to_lowercase())
        .filter(|w| !COMMON_CAPITALISED.contains(&w.as_str()))
        .collect()
}

/// Why two texts must not share an answer, if they must not.
pub fn near_miss(a: &str, b: &str) -> Option<&'static str> {
    if negation_count(a) % 2 != negation_count(b) % 2 {
        return Some("negation");
    }
    if numbers(a) != numbers(b) {
        return Some("numbers");
    }
    let (ea, eb) = (entities(a), entities(b));
    let (la, lb) = (a.to_lowercase(), b.to_lowercase());
    // Every name in one must appear (in any case) in the other.
    if ea.iter().any(|e| !words(&lb).contains(&e.as_str()))
        || eb.iter().any(|e| !words(&la).contains(&e.as_str()))
    {
        return Some("entities");
    }
    None
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b").expect("email regex")
});
/// International (+CC ...), (AAA) BBB-CCCC, or AAA-BBB-CCCC / AAA.BBB.CCCC.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}\b|\(\d{3}\)\s?\d{3}[\s.-]\d{4}\b|\b\d{3}[.-]\d{3}[.-]\d{4}\b")
        .expect("phone regex")
});
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:\d[ -]?){13,19}\b").expect("card regex"));
static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b")
        .expect("api key regex")
});

fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// Compiled exclusion rules: a prompt matching any is never cached.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    patterns: Vec<Regex>,
    detectors: Vec<Detector>,
}

impl Exclusions {
    pub fn new(patterns: &[String], detectors: &[Detector]) -> Result<Self, regex::Error> {
        Ok(Exclusions {
            patterns: patterns
                .iter()
                .map(|p| Regex::new(p))
                .collect::<Result<_, _>>()?,
            detectors: detectors.to_vec(),
        })
    }

    /// The name of the first rule the text trips, if any.
    pub fn matches(&self, text: &str) -> Option<&'static str> {
        if self.patterns.iter().any(|r| r.is_match(text)) {
            return Some("pattern");
        }
        // Most specific first, so the reported reason is the precise one.
        for d in [
            Detector::ApiKey,
            Detector::Card,
            Detector::Email,
            Detector::Phone,
        ]
        .iter()
        .filter(|d| self.detectors.contains(d))
        {
            let hit = match d {
                Detector::Email => EMAIL.is_match(text),
                Detector::Phone => PHONE.is_match(text),
                Detector::Card => CARD.find_iter(text).any(|m| luhn(m.as_str())),
                Detector::ApiKey => API_KEY.is_match(text),
            };
            if hit {
                return Some(match d {
                    Detector::Email => "email",
                    Detector::Phone => "phone",
                    Detector::Card => "card",
                    Detector::ApiKey => "api_key",
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::embedder;

    const MAX_SEQ: usize = 128;

    #[test]
    fn guard_catches_near_misses_and_lets_paraphrases_through() {
        assert_eq!(
            near_miss(
                "How do I enable dark mode?",
                "How do I not enable dark mode?"
            ),
            Some("negation")
        );
        assert_eq!(
            near_miss("Why can I log in?", "Why can't I log in?"),
            Some("negation")
        );
        assert_eq!(
            near_miss("Convert 5 miles to km", "Convert 50 miles to km"),
            Some("numbers")
        );
        assert_eq!(
            near_miss("What is two plus two?", "What is two plus three?"),
            Some("numbers")
        );
        assert_eq!(
            near_miss(
                "What is the capital of France?",
                "What is the capital of Spain?"
            ),
            Some("entities")
        );
        assert_eq!(
            near_miss(
                "How do I reset my password?",
                "What is the way to reset my password?"
            ),
            None
        );
        assert_eq!(
            near_miss(
                "What is the capital of France?",
                "Tell me the capital city of France"
            ),
            None
        );
        assert_eq!(
            near_miss(
                "Explain Python decorators",
                "explain python decorators please"
            ),
            None
        );
    }

    #[test]
    fn detectors() {
        let ex = Exclusions::new(
            &["(?i)confidential".into()],
            &[
                Detector::Email,
                Detector::Phone,
                Detector::Card,
                Detector::ApiKey,
            ],
        )
        .unwrap();
        assert_eq!(ex.matches("mail me at jane.doe@example.com"), Some("email"));
        assert_eq!(ex.matches("call +1 415-555-0134 now"), Some("phone"));
        assert_eq!(ex.matches("call (415) 555-0134"), Some("phone"));
        assert_eq!(ex.matches("call 415.555.0134"), Some("phone"));
        assert_eq!(ex.matches("the years 1990 2000 2010"), None);
        assert_eq!(ex.matches("my card is 4111 1111 1111 1111"), Some("card"));
        assert_eq!(
            ex.matches("order 1234 5678 9012 3456 7"),
            None,
            "not a Luhn number"
        );
        assert_eq!(
            ex.matches("key sk-abcdefghijklmnopqrstuvwx"),
            Some("api_key")
        );
        assert_eq!(ex.matches("this is CONFIDENTIAL"), Some("pattern"));
        assert_eq!(ex.matches("What is the capital of France?"), None);
    }

    /// The crate's directory as `cargo test` runs it (set at run time, so a
    /// test binary reused from a shared target dir built in another checkout
    /// reads this checkout's files).
    fn crate_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
    }

    #[test]
    fn labelled_pairs_precision_at_the_default_threshold() {
        let text = std::fs::read_to_string(crate_dir().join("testdata/pairs.tsv")).unwrap();
        let pairs = parse_pairs(&text).unwrap();
        assert!(pairs.len() >= 60);
        let emb = embedder(MAX_SEQ);
        let cosines: Vec<f32> = pairs
            .iter()
            .map(|(a, b, _)| {
                let v = emb.embed_blocking(vec![a.clone(), b.clone()]).unwrap();
                smartllm_embed::cosine(&v[0], &v[1])
            })
            .collect();
        let rows = evaluate(&pairs, &cosines, &default_thresholds());
        let at = |t: f32| {
            rows.iter()
                .find(|r| (r.threshold - t).abs() < 1e-6)
                .unwrap()
                .clone()
        };
        let d = at(0.95);
        assert!(
            d.precision >= 0.98,
            "precision {:.3} at 0.95: {d:?}",
            d.precision
        );
        assert!(d.recall > 0.2, "the cache must still hit: {d:?}");
        // The guard alone keeps every trap out, even at a loose threshold.
        assert!(at(0.80).precision >= 0.9, "{:?}", at(0.80));
    }
}

/// One row of a threshold sweep over labelled pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
    pub hit_rate: f64,
    pub true_positives: usize,
    pub false_positives: usize,
}

/// Parse `text_a<TAB>text_b<TAB>0|1` lines (`#` comments and blanks skipped).
pub fn parse_pairs(text: &str) -> Result<Vec<(String, String, bool)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let [a, b, label] = cols[..] else {
            return Err(format!(
                "line {}: expected text_a<TAB>text_b<TAB>is_duplicate",
                i + 1
            ));
        };
        let dup = match label.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            other => {
                return Err(format!(
                    "line {}: is_duplicate must be 0 or 1, got {other:?}",
                    i + 1
                ))
            }
        };
        out.push((a.to_string(), b.to_string(), dup));
    }
    Ok(out)
}

/// Precision, recall and hit rate of the cache's decision (cosine >= threshold
/// and no near-miss) for each threshold, given each pair's cosine similarity.
pub fn evaluate(
    pairs: &[(String, String, bool)],
    cosines: &[f32],
    thresholds: &[f32],
) -> Vec<EvalRow> {
    let guard_ok: Vec<bool> = pairs
        .iter()
        .map(|(a, b, _)| near_miss(a, b).is_none())
        .collect();
    let positives = pairs.iter().filter(|p| p.2).count().max(1);
    thresholds
        .iter()
        .map(|&t| {
            let (mut tp, mut fp) = (0, 0);
            for (i, (_, _, dup)) in pairs.iter().enumerate() {
                if cosines[i] >= t && guard_ok[i] {
                    if *dup {
                        tp += 1;
                    } else {
                        fp += 1;
                    }
                }
            }
            EvalRow {
                threshold: t,
                precision: if tp + fp == 0 {
                    1.0
                } else {
                    tp as f64 / (tp + fp) as f64
                },
                recall: tp as f64 / positives as f64,
                hit_rate: (tp + fp) as f64 / pairs.len().max(1) as f64,
                true_positives: tp,
                false_positives: fp,
            }
        })
        .collect()
}

/// 0.80, 0.81, ... 0.99
pub fn default_thresholds() -> Vec<f32> {
    (80..=99).map(|t| t as f32 / 100.0).collect()
}
