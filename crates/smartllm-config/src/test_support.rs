//! Helpers shared by the unit tests: a throw-away config directory and the
//! smallest providers and models files that load.

use std::fs;

pub(crate) fn write_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

pub(crate) const PROVIDERS: &str =
    "providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:8000/v1\n";
pub(crate) const MODELS: &str = "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n";
