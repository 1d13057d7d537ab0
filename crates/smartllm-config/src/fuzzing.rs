//! Entry point shared by the config-loader fuzz target (`fuzz/`) and the
//! regression test that replays every input it ever crashed on.

use crate::{load_texts, FILES};
use std::collections::BTreeMap;
use std::path::Path;

/// The input is the config directory's files, separated by 0xff bytes, in
/// the order of `FILES`. Loading must never panic; a rejected config names at
/// least one issue, and every line it cites exists in the file it names.
pub fn config_loader(data: &[u8]) {
    let mut texts = BTreeMap::new();
    for (name, part) in FILES.iter().zip(data.split(|b| *b == 0xff)) {
        texts.insert(*name, String::from_utf8_lossy(part).into_owned());
    }
    if !texts.contains_key(FILES[0]) {
        texts.insert(FILES[0], String::new());
    }
    let dir = Path::new("/nonexistent/smartllm-fuzz");
    match load_texts(dir, texts.clone()) {
        Ok(a) => {
            let b = load_texts(dir, texts).expect("the same texts load twice");
            assert_eq!(a.digest, b.digest, "loading is deterministic");
        }
        Err(e) => {
            assert!(!e.issues.is_empty(), "a rejection names its issues");
            for issue in &e.issues {
                let Some(line) = issue.line else { continue };
                let Some(name) = issue.file.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Some(text) = texts.get(name) {
                    assert!(
                        line >= 1 && line <= text.lines().count() + 1,
                        "{issue} cites a line outside {name} ({} lines)",
                        text.lines().count()
                    );
                }
            }
        }
    }
}
