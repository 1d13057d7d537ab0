//! The cache's privacy exclusions on a prompt, against a baseline in the
//! same run: the detectors as they were before 2026-12-04 (Unicode-mode
//! regexes: `\b`, `\d` and `\s` over all of Unicode, on the text as sent).
//! The shipped detectors read the folded text (`privacy_folded`: NFKC,
//! every script's digits as ASCII, invisible characters dropped) with
//! ASCII-only classes, which keeps the regex engine on its DFA.
//!
//! cargo bench -p smartllm-bench --bench privacy_exclusions
//! (run it with `--workspace` builds around: a lone `-p` build of the cache
//! crate unifies features differently and rebuilds RocksDB.)

use criterion::Criterion;
use regex::Regex;
use smartllm_cache::Exclusions;
use smartllm_config::Detector;
use std::hint::black_box;
use std::time::Duration;

/// The detectors before: Unicode classes, on the text as sent (the Luhn
/// check on digit runs left out: it is the same in both).
struct Before(Vec<Regex>);

impl Before {
    fn new() -> Before {
        Before(
            [
                r"(?i)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b",
                r"\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}\b|\(\d{3}\)\s?\d{3}[\s.-]\d{4}\b|\b\d{3}[.-]\d{3}[.-]\d{4}\b",
                r"\d+(?:[ -]\d+)*",
                r"\b(?:sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b",
            ]
            .iter()
            .map(|p| Regex::new(p).expect("baseline regex"))
            .collect(),
        )
    }

    fn matches(&self, text: &str) -> bool {
        self.0.iter().any(|r| r.is_match(text))
    }
}

fn main() {
    let shipped = Exclusions::new(
        &[],
        &[
            Detector::Email,
            Detector::Phone,
            Detector::Card,
            Detector::ApiKey,
        ],
    )
    .expect("detectors");
    let before = Before::new();
    let texts = [
        (
            "English 2 KiB",
            "How do I configure the retry policy of the upstream client so that it backs off? "
                .repeat(25),
        ),
        (
            "English 100 KiB",
            "How do I configure the retry policy of the upstream client so that it backs off? "
                .repeat(1250),
        ),
        (
            "Japanese 2 KiB",
            "東京の人口は何人ですか？設定の再試行方針を教えてください。".repeat(24),
        ),
        (
            "Japanese 100 KiB",
            "東京の人口は何人ですか？設定の再試行方針を教えてください。".repeat(1200),
        ),
    ];
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, text) in &texts {
        assert_eq!(shipped.matches(text), None, "{name}");
        assert!(!before.matches(text), "{name}");
        c.bench_function(&format!("before: {name}"), |b| {
            b.iter(|| before.matches(black_box(text)))
        });
        c.bench_function(&format!("shipped: {name}"), |b| {
            b.iter(|| shipped.matches(black_box(text)))
        });
    }
    c.final_summary();
}
