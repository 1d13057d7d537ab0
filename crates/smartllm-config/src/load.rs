//! Loading a config directory: its file names, reading them, parsing each one
//! strictly (a serde error becomes a [`ConfigIssue`] with key path and line),
//! the digest of what was read, and [`Issues`], which collects and locates
//! the problems validation finds before `resolve` turns the raw files
//! into a [`Config`].

use crate::raw::{
    RawCacheFile, RawKeysFile, RawMain, RawMeasuredProfiles, RawModels, RawProviders, RawRoutes,
};
use crate::resolve::{resolve, RawFiles};
use crate::{locate, Config, ConfigError, ConfigIssue};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const MAIN_FILE: &str = "smartllm.yaml";
pub const PROVIDERS_FILE: &str = "providers.yaml";
pub const MODELS_FILE: &str = "models.yaml";
pub const ROUTES_FILE: &str = "routes.yaml";
pub const CACHE_FILE: &str = "cache.yaml";
pub const KEYS_FILE: &str = "keys.yaml";
/// Measured quality per model and task, written by `smartllm profile run`.
pub const PROFILES_FILE: &str = "profiles.yaml";
/// The files of a config directory, in load order. Only `smartllm.yaml` is required.
pub const FILES: [&str; 7] = [
    MAIN_FILE,
    PROVIDERS_FILE,
    MODELS_FILE,
    ROUTES_FILE,
    CACHE_FILE,
    KEYS_FILE,
    PROFILES_FILE,
];

/// What an operator should hear about a config directory's files: a YAML
/// file the gateway does not read (`keys.yml` for `keys.yaml`: its keys
/// and budgets would silently not apply), and no `keys.yaml` at all while
/// keys are not required (the gateway is then open to anyone).
pub fn layout_warnings(dir: &Path, require_key: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        let lower = name.to_ascii_lowercase();
        let Some(stem) = lower
            .strip_suffix(".yaml")
            .or_else(|| lower.strip_suffix(".yml"))
        else {
            continue;
        };
        if name.starts_with('.') || FILES.contains(&name.as_str()) {
            continue;
        }
        let meant = FILES
            .iter()
            .find(|f| f.strip_suffix(".yaml") == Some(stem))
            .map(|f| format!(": did you mean {f}?"))
            .unwrap_or_else(|| format!(" (the gateway reads {})", FILES.join(", ")));
        out.push(format!("{} is not read{meant}", dir.join(&name).display()));
    }
    if !require_key && !dir.join(KEYS_FILE).exists() {
        out.push(format!(
            "there is no {} in {}, so every request is admitted without a key and no budget applies",
            KEYS_FILE,
            dir.display()
        ));
    }
    out
}

/// Collects issues while validating, locating each key path in its file.
pub(crate) struct Issues<'a> {
    dir: &'a Path,
    texts: &'a BTreeMap<&'static str, String>,
    list: Vec<ConfigIssue>,
}

impl Issues<'_> {
    /// Whether an issue was already found at `path` or under it in `file`.
    pub(crate) fn has_issue_under(&self, file: &'static str, path: &str) -> bool {
        let file = self.dir.join(file);
        self.list.iter().any(|i| {
            i.file == file
                && i.path
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }

    pub(crate) fn push(
        &mut self,
        file: &'static str,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        let path = path.into();
        let line = self.texts.get(file).and_then(|t| locate(t, &path));
        self.list.push(ConfigIssue {
            file: self.dir.join(file),
            path,
            line,
            message: message.into(),
        });
    }
}

/// serde_yaml numbers lines the way YAML breaks them (CR, LF and CRLF); an
/// editor, `grep -n` and `sed -n Np` count LF. A lone CR (found by the config
/// fuzzer) made the two disagree, so convert: find where YAML's line starts and
/// count the LFs before it.
fn file_line(text: &str, yaml_line: usize) -> usize {
    let b = text.as_bytes();
    let (mut line, mut i) = (1, 0);
    while line < yaml_line && i < b.len() {
        match b[i] {
            b'\r' => {
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line += 1;
            }
            b'\n' => line += 1,
            _ => {}
        }
        i += 1;
    }
    b[..i].iter().filter(|c| **c == b'\n').count() + 1
}

/// The line of the second `KEY:` of `message`'s "`KEY` is defined twice"
/// (see `raw::unique_keys`): within the map serde_yaml points at (from its
/// line `map_line`, until a line indented less than its keys), at the first
/// one's indentation.
fn twice_line(text: &str, message: &str, map_line: Option<usize>) -> Option<usize> {
    let key = message.split('`').nth(1).filter(|_| {
        // (A map's key: ours; a setting's: serde's derive.)
        message.contains("is defined twice") || message.starts_with("duplicate field")
    })?;
    let start = map_line?.saturating_sub(1);
    let mut first_indent = None;
    for (i, l) in text.lines().enumerate().skip(start) {
        let body = l.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if first_indent.is_some_and(|f| l.len() - body.len() < f) {
            return None;
        }
        let named = [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                body.strip_prefix(k.as_str())
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
        if !named {
            continue;
        }
        let indent = l.len() - body.len();
        match first_indent {
            None => first_indent = Some(indent),
            Some(f) if f == indent => return Some(i + 1),
            Some(_) => {}
        }
    }
    None
}

fn parse_file<T: DeserializeOwned + Default>(
    dir: &Path,
    file: &'static str,
    text: Option<&String>,
    issues: &mut Vec<ConfigIssue>,
) -> Option<T> {
    let Some(text) = text else {
        return Some(T::default());
    };
    if text.trim().is_empty() {
        return Some(T::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .location()
                .map(|l| file_line(text, l.line()))
                .or_else(|| locate(text, &path));
            let mut message = inner.to_string();
            // serde_yaml appends " at line X column Y"; we print the line ourselves.
            if let Some(i) = message.find(" at line ") {
                message.truncate(i);
            }
            // It also starts with the key path, which the issue prints.
            if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
                message = rest.to_string();
            }
            // A key given twice: serde_yaml points at its map; the line is
            // the second one.
            let line = twice_line(text, &message, line).or(line);
            // A `[` or `{` never closed swallows the lines after it (a flow
            // collection runs on until its bracket), so the error names
            // what went missing there: say where the bracket opened.
            if let Some(open) = unclosed_bracket(text) {
                message.push_str(&format!(
                    " (line {open} opens a '[' or '{{' that is never closed: the lines after it are read as part of it)"
                ));
            }
            issues.push(ConfigIssue {
                file: dir.join(file),
                path: if path == "." { String::new() } else { path },
                line,
                message,
            });
            None
        }
    }
}

/// The first line (1-based) with a `[` or `{` that no later bracket closes,
/// outside quotes and comments: a likely typo when a file fails to load.
fn unclosed_bracket(text: &str) -> Option<usize> {
    let mut open: Vec<usize> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut quote = None;
        let mut prev = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '#') if prev.is_whitespace() => break,
                (None, '"' | '\'') => quote = Some(c),
                (None, '[' | '{') => open.push(n + 1),
                (None, ']' | '}') => {
                    open.pop();
                }
                _ => {}
            }
            prev = c;
        }
    }
    open.first().copied()
}

/// Parses the text of a `profiles.yaml` on its own (for `smartllm profile
/// run`, which merges a new measurement into the file); `load_dir` checks it
/// against the models.
pub fn parse_profiles_file(dir: &Path, text: &str) -> Result<RawMeasuredProfiles, ConfigError> {
    let mut issues = Vec::new();
    let text = text.to_string();
    match parse_file(dir, PROFILES_FILE, Some(&text), &mut issues) {
        Some(p) => Ok(p),
        None => Err(ConfigError { issues }),
    }
}

/// Read, parse and validate a config directory.
pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
    load_texts(dir, read_texts(dir)?)
}

/// The texts of a config directory's files (those that are there).
pub fn read_texts(dir: &Path) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let mut texts: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut issues = Vec::new();
    for file in FILES {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                texts.insert(file, t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file != MAIN_FILE => {}
            Err(e) => issues.push(ConfigIssue {
                file: path,
                path: String::new(),
                line: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if !issues.is_empty() {
        return Err(ConfigError { issues });
    }
    Ok(texts)
}

/// What a reload found: the directory as it is, or (`keys_only`) the last
/// good texts with only the new keys.yaml, while the other files are
/// rejected for `rejected`.
pub enum ReloadLoad {
    Whole(Config, BTreeMap<&'static str, String>),
    KeysOnly {
        config: Config,
        texts: BTreeMap<&'static str, String>,
        rejected: ConfigError,
    },
}

/// Load a config directory for a reload, against the texts of the last
/// config that loaded (`last_good`):
/// - providers.yaml, models.yaml or routes.yaml that had content and is
///   now empty or gone is an error (a truncated or interrupted write would
///   drop every model or route);
/// - when the directory is rejected but keys.yaml changed, keys.yaml alone
///   is tried with the other files as they last loaded, so revoking a key
///   never waits for another file's fix.
pub fn load_for_reload(
    dir: &Path,
    last_good: Option<BTreeMap<&'static str, String>>,
) -> Result<ReloadLoad, ConfigError> {
    let texts = read_texts(dir)?;
    let emptied: Vec<ConfigIssue> = last_good
        .iter()
        .flatten()
        // The files without which nothing is served (keys.yaml has its own
        // guard; cache.yaml or profiles.yaml removed is a way back to the
        // defaults).
        .filter(|(f, old)| {
            [PROVIDERS_FILE, MODELS_FILE, ROUTES_FILE].contains(*f)
                && !old.trim().is_empty()
                && texts.get(*f).is_none_or(|t| t.trim().is_empty())
        })
        .map(|(f, _)| ConfigIssue {
            file: dir.join(f),
            path: String::new(),
            line: None,
            message: "is empty or gone, where it held settings before (a truncated or interrupted write?): the running config stays; to remove everything in it, write its top-level key with an empty value (`routes: {}`, `models: []`)".into(),
        })
        .collect();
    let whole = if emptied.is_empty() {
        load_texts(dir, texts.clone())
    } else {
        Err(ConfigError { issues: emptied })
    };
    let rejected = match whole {
        Ok(c) => return Ok(ReloadLoad::Whole(c, texts)),
        Err(e) => e,
    };
    let Some(mut last) = last_good else {
        return Err(rejected);
    };
    if texts.get(KEYS_FILE) == last.get(KEYS_FILE) {
        return Err(rejected);
    }
    match texts.get(KEYS_FILE) {
        Some(k) => last.insert(KEYS_FILE, k.clone()),
        None => last.remove(KEYS_FILE),
    };
    match load_texts(dir, last.clone()) {
        Ok(config) => Ok(ReloadLoad::KeysOnly {
            config,
            texts: last,
            rejected,
        }),
        Err(_) => Err(rejected),
    }
}

/// Validates config files given as text (file name to contents), as
/// `load_dir` does after reading them; `dir` resolves relative paths. For
/// tools and the config fuzzer.
pub fn load_texts(
    dir: &Path,
    texts: BTreeMap<&'static str, String>,
) -> Result<Config, ConfigError> {
    let mut issues = Vec::new();
    let main: Option<RawMain> = parse_file(dir, MAIN_FILE, texts.get(MAIN_FILE), &mut issues);
    let providers: Option<RawProviders> =
        parse_file(dir, PROVIDERS_FILE, texts.get(PROVIDERS_FILE), &mut issues);
    let models: Option<RawModels> =
        parse_file(dir, MODELS_FILE, texts.get(MODELS_FILE), &mut issues);
    let routes: Option<RawRoutes> =
        parse_file(dir, ROUTES_FILE, texts.get(ROUTES_FILE), &mut issues);
    let cache: Option<RawCacheFile> =
        parse_file(dir, CACHE_FILE, texts.get(CACHE_FILE), &mut issues);
    let keys: Option<RawKeysFile> = parse_file(dir, KEYS_FILE, texts.get(KEYS_FILE), &mut issues);
    let measured: Option<RawMeasuredProfiles> =
        parse_file(dir, PROFILES_FILE, texts.get(PROFILES_FILE), &mut issues);
    let (
        Some(main),
        Some(providers),
        Some(models),
        Some(routes),
        Some(cache),
        Some(keys),
        Some(measured),
    ) = (main, providers, models, routes, cache, keys, measured)
    else {
        return Err(ConfigError { issues });
    };

    let mut hasher = Sha256::new();
    for (name, text) in &texts {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    let digest = hex::encode(&hasher.finalize()[..8]);

    let mut v = Issues {
        dir,
        texts: &texts,
        list: issues,
    };
    let config = resolve(
        dir,
        digest,
        RawFiles {
            main,
            providers,
            models,
            routes,
            cache,
            keys,
            measured,
        },
        &mut v,
    );
    if v.list.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { issues: v.list })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    /// A mode written is held to; a guessed one only when it says
    /// embedding (`bge-m3` is guessed chat, and must still embed).
    #[test]
    fn models_serve_their_kind_by_name() {
        use crate::ModelMode::{Chat, Embedding};
        let models = "models:\n  - name: small\n    deployments: [ { provider: mock } ]\n  - name: bge-m3\n    deployments: [ { provider: mock } ]\n  - name: text-embedding-3-small\n    deployments: [ { provider: mock } ]\n  - name: strict-chat\n    mode: chat\n    deployments: [ { provider: mock } ]\n  - name: e5\n    mode: embedding\n    deployments: [ { provider: mock } ]\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
        ]);
        let cfg = load_dir(dir.path()).unwrap();
        let serves = |m: &str, want| cfg.model(m).unwrap().serves(want);
        assert!(serves("small", Chat) && serves("small", Embedding));
        assert!(serves("bge-m3", Embedding));
        assert!(
            !serves("text-embedding-3-small", Chat) && serves("text-embedding-3-small", Embedding)
        );
        assert!(serves("strict-chat", Chat) && !serves("strict-chat", Embedding));
        assert!(!serves("e5", Chat) && serves("e5", Embedding));
    }

    /// A reload against the last good texts: a file emptied is an error,
    /// and with another file broken a changed keys.yaml loads on its own.
    #[test]
    fn a_reload_refuses_emptied_files_and_applies_keys_on_their_own() {
        let keys = |k: &str| {
            format!(
                "require_key: true\nkeys:\n  - name: {k}\n    tenant: t\n    sha256: {}\n",
                "ab".repeat(32)
            )
        };
        let routes = "routes:\n  auto:\n    model: small\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
            (ROUTES_FILE, routes),
            (KEYS_FILE, &keys("a")),
        ]);
        let good = read_texts(dir.path()).unwrap();
        let write = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        write(ROUTES_FILE, "");
        let err = match load_for_reload(dir.path(), Some(good.clone())) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("an emptied routes.yaml loaded"),
        };
        assert!(err.contains("routes.yaml: is empty or gone"), "{err}");
        // Meant: an empty value.
        write(ROUTES_FILE, "routes: {}\n");
        match load_for_reload(dir.path(), Some(good.clone())) {
            Ok(ReloadLoad::Whole(..)) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("not whole"),
        }
        write(ROUTES_FILE, routes);
        // models.yaml broken: the same keys are no reason to load anything...
        write(
            MODELS_FILE,
            &MODELS.replace("provider: mock", "provider: mocq"),
        );
        assert!(load_for_reload(dir.path(), Some(good.clone())).is_err());
        // ...new ones load on their own, over the other files as they were.
        write(KEYS_FILE, &keys("b"));
        match load_for_reload(dir.path(), Some(good.clone())) {
            Ok(ReloadLoad::KeysOnly {
                config, rejected, ..
            }) => {
                assert_eq!(config.keys.keys[0].name, "b");
                assert!(config.model("small").is_some());
                assert!(rejected.to_string().contains("mocq"), "{rejected}");
            }
            _ => panic!("keys.yaml did not load on its own"),
        }
        // Without a baseline (no reload yet): rejected as a whole.
        assert!(load_for_reload(dir.path(), None).is_err());
    }

    /// A bracket left open swallows the lines after it: the error says
    /// where it opened, whatever serde then missed.
    #[test]
    fn an_unclosed_bracket_is_named_by_its_line() {
        let models = "models:\n  - name: small\n    pricing: [unclosed\n    deployments:\n      - provider: mock\n";
        let dir = write_dir(&[
            (MAIN_FILE, ""),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
        ]);
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 3 opens a '[' or '{' that is never closed"),
            "{err}"
        );
        assert_eq!(unclosed_bracket("a: [1, 2]\nb: {c: d}\n"), None);
        assert_eq!(unclosed_bracket("a: \"[\" # [\nb: [x\n"), Some(2));
    }

    #[test]
    fn files_the_gateway_does_not_read_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "smartllm.yaml",
            "keys.yml",
            "notes.yaml",
            ".keys.yaml.tmp",
            "tasks.tsv",
        ] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let w = layout_warnings(dir.path(), false);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].ends_with("keys.yml is not read: did you mean keys.yaml?"),
            "{w:?}"
        );
        assert!(
            w[1].contains(
                "notes.yaml is not read (the gateway reads smartllm.yaml, providers.yaml"
            ),
            "{w:?}"
        );
        assert!(w[2].starts_with("there is no keys.yaml in "), "{w:?}");
        std::fs::rename(dir.path().join("keys.yml"), dir.path().join("keys.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("notes.yaml")).unwrap();
        assert!(layout_warnings(dir.path(), false).is_empty());
        std::fs::remove_file(dir.path().join("keys.yaml")).unwrap();
        // Keys required (the fail-closed reload keeps them so): not open.
        assert!(layout_warnings(dir.path(), true).is_empty());
    }

    #[test]
    fn loads_minimal_dir_with_defaults() {
        let dir = write_dir(&[
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, MODELS),
        ]);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 32 << 20);
        assert_eq!(c.models[0].deployments[0].upstream_model, "mock-small");
        assert_eq!(c.providers["mock"].base_url.path, "/v1");
        assert!(c.resolve_model("small").is_some());
        assert!(c.resolve_model("nope").is_none());
    }

    #[test]
    fn unknown_key_names_file_path_and_line() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  listen: 127.0.0.1:1\n  lisen: 127.0.0.1:2\n",
        )]);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.issues.len(), 1);
        let i = &err.issues[0];
        assert!(i.file.ends_with(MAIN_FILE));
        assert_eq!(i.line, Some(3));
        assert!(i.path.starts_with("server"), "{i}");
        assert!(i.message.contains("unknown field `lisen`"), "{i}");
    }

    #[test]
    fn wrong_type_is_reported_with_path() {
        let dir = write_dir(&[(MAIN_FILE, "server:\n  threads: many\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        let i = &err.issues[0];
        assert_eq!(i.path, "server.threads");
        assert_eq!(i.line, Some(2));
    }

    #[test]
    fn lines_are_counted_as_editors_count_them_even_with_a_lone_cr() {
        assert_eq!(file_line("a\nb\nc\n", 3), 3);
        assert_eq!(file_line("a\r\nb\r\nc", 3), 3);
        // YAML's line 3 starts after "b\r", which is still the file's line 2.
        assert_eq!(file_line("a\nb\rc: [\n", 3), 2);
        // CR CR LF: two YAML line breaks, one LF.
        let dir = write_dir(&[(MAIN_FILE, "# a\r\r\nserver:\n  threads: many\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        assert_eq!(err.issues[0].line, Some(3), "{err}");
    }

    /// A key given twice in a map (two `providers: mock` blocks) would
    /// silently keep the last one: it is an error naming the key and line.
    #[test]
    fn a_key_defined_twice_is_an_error_at_its_line() {
        let twice = format!("{PROVIDERS}  mock:\n    base_url: http://127.0.0.1:9/v1\n");
        let dir = write_dir(&[
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, &twice),
            (MODELS_FILE, MODELS),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let i = &err.issues[0];
        assert!(i.file.ends_with(PROVIDERS_FILE), "{i}");
        assert!(i.message.contains("`mock` is defined twice"), "{i}");
        assert_eq!(i.line, Some(twice.lines().count() - 1), "{i}");
        // The same key in two maps is fine; twice in the second map is
        // found there, not in the first.
        let models = "models:\n  - name: a\n    profile:\n      quality:\n        code: 0.8\n    deployments:\n      - provider: mock\n  - name: b\n    profile:\n      quality:\n        code: 0.7\n        math: 0.5\n        code: 0.9\n    deployments:\n      - provider: mock\n";
        let dir = write_dir(&[
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, PROVIDERS),
            (MODELS_FILE, models),
        ]);
        let err = load_dir(dir.path()).unwrap_err();
        let i = &err.issues[0];
        assert!(i.message.contains("`code` is defined twice"), "{i}");
        assert_eq!(i.line, Some(13), "{i}");
        // A setting given twice: its second line, not its section's.
        let main = "data_dir: /tmp/x\nserver:\n  threads: 2\n  # the API\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:3\n  listen: 127.0.0.1:2\nmetrics: {}\n";
        let dir = write_dir(&[(MAIN_FILE, main)]);
        let err = load_dir(dir.path()).unwrap_err();
        let i = &err.issues[0];
        assert!(i.message.contains("duplicate field `listen`"), "{i}");
        assert_eq!(i.line, Some(7), "{i}");
    }

    #[test]
    fn syntax_error_has_line() {
        let dir = write_dir(&[(MAIN_FILE, "server:\n  listen: [\n")]);
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.issues[0].line.is_some(), "{err}");
    }
}
