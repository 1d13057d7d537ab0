//! `smartllm keys`: virtual keys. `create` makes a random key, prints it once
//! and stores only its sha256 in the config directory's keys.yaml (checked
//! as a whole config before it is written, then swapped in atomically, so a
//! running gateway reloads a valid file or none). `hash` prints the sha256 of
//! a key read from standard input: a key never goes on a command line, where
//! shell history and `ps` would keep it.

use anyhow::{bail, Context};
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Random bytes in a key (192 bits).
const KEY_BYTES: usize = 24;
const KEY_PREFIX: &str = "sk-smartllm-";

/// Who a new key is for.
pub struct NewKey<'a> {
    pub name: &'a str,
    pub tenant: &'a str,
    pub app: &'a str,
    pub models: &'a [String],
}

/// The sha256 of `key`, as keys.yaml stores it.
pub fn sha256_hex(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

/// A new random key from the OS's CSPRNG.
fn random_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

/// `keys hash`: the sha256 of the key on standard input (one line).
pub fn hash_stdin() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_line(&mut s)
        .context("reading the key from standard input")?;
    let key = s.trim();
    if key.is_empty() {
        bail!("no key on standard input (smartllm keys hash < file, or type it and press Enter)");
    }
    Ok(sha256_hex(key))
}

/// `keys create`: add a new key to `dir`/keys.yaml; returns the key (shown
/// once, never stored).
pub fn create(dir: &Path, new: &NewKey<'_>) -> anyhow::Result<String> {
    // Read, edit and write under the directory's lock: two at once each
    // keep the other's key.
    let _lock = crate::config_write::lock(dir)?;
    let path = dir.join(smartllm_config::KEYS_FILE);
    // (A key list shared through a link: its own directory's lock too.)
    let _shared = crate::config_write::lock_linked(&path)?;
    let current = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // Names are how the ledger, logs and metrics tell keys apart.
    if let Ok(cfg) = smartllm_config::load_dir(dir) {
        if cfg.keys.keys.iter().any(|k| k.name == new.name) {
            bail!(
                "a key named '{}' already exists in {}",
                new.name,
                path.display()
            );
        }
    }
    let key = random_key()?;
    let text = with_key(&current, new, &sha256_hex(&key));
    check_with(dir, &text)
        .map_err(|e| anyhow::anyhow!("the new key would make the config invalid:\n{e}"))?;
    // Atomic swap, keeping the file's owner, group and mode (the service
    // user must still read it: packages install it root:smartllm 0640).
    crate::config_write::replace(&path, &text)?;
    Ok(key)
}

/// Remove the key named `name` from the directory's keys.yaml (every other
/// line, comments included, kept; the whole config checked before the file
/// is swapped in atomically): a running gateway refuses the key from its
/// next reload. Removing the last key leaves keys required.
pub fn revoke(dir: &Path, name: &str) -> anyhow::Result<()> {
    let _lock = crate::config_write::lock(dir)?;
    let path = dir.join(smartllm_config::KEYS_FILE);
    // (A key list shared through a link: its own directory's lock too.)
    let _shared = crate::config_write::lock_linked(&path)?;
    let current =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let Some(text) = without_key(&current, name) else {
        bail!("no key named '{name}' in {}", path.display());
    };
    if let Err(e) = check_issues(dir, &text)? {
        // A leaked key must not wait for a fix of another file: when the
        // directory was already invalid for reasons outside keys.yaml, the
        // key goes all the same (a running gateway applies keys.yaml on its
        // own while the other files are rejected).
        let in_keys = e
            .issues
            .iter()
            .any(|i| i.file.ends_with(smartllm_config::KEYS_FILE));
        if in_keys || check_issues(dir, &current)?.is_ok() {
            bail!("removing the key would make the config invalid:\n{e}");
        }
        eprintln!("warning: other files of {} have errors (a running gateway keeps its config from before them, and applies this keys.yaml on its own):\n{e}", dir.display());
    }
    crate::config_write::replace(&path, &text)?;
    Ok(())
}

/// The keys of the directory's config: name, tenant, app, models and the
/// start of each sha256 (the key itself is never stored).
pub fn list(dir: &Path) -> anyhow::Result<String> {
    let cfg = smartllm_config::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = format!(
        "{:<24} {:<16} {:<16} {:<14} models\n",
        "name", "tenant", "app", "sha256"
    );
    for k in &cfg.keys.keys {
        let models = if k.models.is_empty() {
            "(all)".to_string()
        } else {
            k.models.join(", ")
        };
        let rotating = if k.previous_sha256.is_some() {
            "  (rotating: the previous key still works)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<24} {:<16} {:<16} {:<14} {models}{rotating}\n",
            k.name,
            k.tenant,
            k.app,
            format!("{}…", &hex::encode(k.sha256)[..12]),
        ));
    }
    if cfg.keys.keys.is_empty() {
        out.push_str(if cfg.keys.require_key {
            "(no key: every request is refused)\n"
        } else {
            "(no key: the gateway admits every request without one)\n"
        });
    }
    Ok(out)
}

/// The directory's config with `keys_text` as its keys.yaml, if it loads.
fn check_with(dir: &Path, keys_text: &str) -> anyhow::Result<smartllm_config::Config> {
    check_issues(dir, keys_text)?.map_err(|e| anyhow::anyhow!("{e}"))
}

/// The directory's config with `keys_text` as its keys.yaml: an error
/// reading a file, or the config or its issues.
fn check_issues(
    dir: &Path,
    keys_text: &str,
) -> anyhow::Result<Result<smartllm_config::Config, smartllm_config::ConfigError>> {
    let mut texts: BTreeMap<&'static str, String> = BTreeMap::new();
    for file in smartllm_config::FILES {
        if file == smartllm_config::KEYS_FILE {
            continue;
        }
        match std::fs::read_to_string(dir.join(file)) {
            Ok(t) => {
                texts.insert(file, t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", dir.join(file).display()))
            }
        }
    }
    texts.insert(smartllm_config::KEYS_FILE, keys_text.to_string());
    Ok(smartllm_config::load_texts(dir, texts))
}

/// The `keys:` line of a keys.yaml's lines.
fn keys_line(lines: &[&str]) -> Option<usize> {
    lines.iter().position(|l| {
        let t = l.trim_end();
        t == "keys:"
            || t.starts_with("keys: ")
            || t.starts_with("keys:#")
            || t.starts_with("keys:[")
    })
}

/// The block-list items under `keys:` of `lines` (from, to: the item's
/// lines, without the comments and blank lines at its end), and the
/// `keys:` line.
fn key_items(lines: &[&str]) -> Option<(usize, Vec<(usize, usize)>)> {
    let k = keys_line(lines)?;
    let content = |l: &str| {
        let b = l.trim();
        !b.is_empty() && !b.starts_with('#')
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    // Items: from a "- " line to the next content line indented as much or less.
    let mut items = Vec::new();
    let mut j = k + 1;
    while j < lines.len() {
        if !content(lines[j]) {
            j += 1;
            continue;
        }
        if !lines[j].trim_start().starts_with('-') {
            break;
        }
        let at = indent(lines[j]);
        let mut end = j + 1;
        while end < lines.len() && !(content(lines[end]) && indent(lines[end]) <= at) {
            end += 1;
        }
        // Comments and blank lines at its end belong to what follows.
        let mut last = end;
        while last > j + 1 && !content(lines[last - 1]) {
            last -= 1;
        }
        items.push((j, last));
        j = end;
    }
    Some((k, items))
}

/// The item of `items` whose `name` is `name`, and what it says.
fn named_item(
    lines: &[&str],
    items: &[(usize, usize)],
    name: &str,
) -> Option<(usize, usize, serde_yaml::Value)> {
    items.iter().find_map(|&(from, to)| {
        let v = serde_yaml::from_str::<Vec<serde_yaml::Value>>(&lines[from..to].concat())
            .ok()?
            .into_iter()
            .next()?;
        (v.get("name").and_then(|n| n.as_str()) == Some(name)).then_some((from, to, v))
    })
}

/// `current` keys.yaml without the block-list item whose `name` is `name`
/// (None: no such item). An emptied list becomes `keys: []`, and a file
/// that does not say `require_key` then says it (true), so removing the
/// last key never opens the gateway.
fn without_key(current: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = current.split_inclusive('\n').collect();
    let (k, items) = key_items(&lines)?;
    let (from, to, _) = named_item(&lines, &items, name)?;
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        if (from..to).contains(&i) {
            continue;
        }
        if i == k && items.len() == 1 {
            if !says_require_key(current) {
                out.push_str(REQUIRE_KEY);
            }
            out.push_str("keys: []\n");
            continue;
        }
        out.push_str(l);
    }
    Some(out)
}

/// What `keys rotate` does to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// A new key; the old one is still accepted (`previous_sha256`) until
    /// the rotation is finished.
    Start,
    /// A new key; the old one is refused from the next reload.
    Now,
    /// The old key of a rotation under way is refused from the next reload.
    Finish,
}

/// `keys rotate`: a new key for the key named `name`, which keeps its
/// name, tenant, app, models, limits and every budget or limit that names
/// it; returns the new key (shown once; none for `Finish`). The key's item
/// in keys.yaml is written again (its own comments are not kept; the rest
/// of the file is), checked as a whole config and swapped in atomically.
pub fn rotate(dir: &Path, name: &str, how: Rotation) -> anyhow::Result<Option<String>> {
    let _lock = crate::config_write::lock(dir)?;
    let path = dir.join(smartllm_config::KEYS_FILE);
    let _shared = crate::config_write::lock_linked(&path)?;
    let current =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = current.split_inclusive('\n').collect();
    let Some((from, to, item)) =
        key_items(&lines).and_then(|(_, items)| named_item(&lines, &items, name))
    else {
        bail!(
            "no key named '{name}' in {} (as a list item under keys:)",
            path.display()
        );
    };
    let serde_yaml::Value::Mapping(mut item) = item else {
        bail!(
            "the key named '{name}' in {} is not a mapping",
            path.display()
        );
    };
    let previous = serde_yaml::Value::from("previous_sha256");
    let under_way = item.contains_key(&previous);
    let key = match how {
        Rotation::Finish => {
            if !under_way {
                bail!("no rotation of '{name}' is under way (its item has no previous_sha256)");
            }
            item.remove(&previous);
            None
        }
        Rotation::Start | Rotation::Now => {
            if under_way && how == Rotation::Start {
                bail!(
                    "a rotation of '{name}' is under way: finish it first (smartllm keys rotate {name} --finish), or replace the key at once (--now)"
                );
            }
            let key = random_key()?;
            let old = item
                .insert("sha256".into(), sha256_hex(&key).into())
                .unwrap_or(serde_yaml::Value::Null);
            item.remove(&previous);
            if how == Rotation::Start {
                item.insert(previous, old);
            }
            Some(key)
        }
    };
    let body = serde_yaml::to_string(&item).context("writing the key's item")?;
    let pad = &lines[from][..lines[from].len() - lines[from].trim_start().len()];
    let mut text = String::new();
    for l in &lines[..from] {
        text.push_str(l);
    }
    for (i, l) in body.lines().enumerate() {
        text.push_str(pad);
        text.push_str(if i == 0 { "- " } else { "  " });
        text.push_str(l);
        text.push('\n');
    }
    for l in &lines[to..] {
        text.push_str(l);
    }
    let before = check_with(dir, &current)
        .ok()
        .and_then(|c| named_key(&c, name));
    let after = check_with(dir, &text)
        .map_err(|e| anyhow::anyhow!("the rotated key would make the config invalid:\n{e}"))?;
    // The entry is written again from what YAML read: refuse if anything
    // but its hashes reads differently now (an unquoted `tenant: 1.50`
    // written back as 1.5 would move the key to another tenant).
    fn same(
        k: &smartllm_config::VirtualKey,
    ) -> (&str, &str, &str, &[String], smartllm_config::Limits) {
        (&k.name, &k.tenant, &k.app, &k.models, k.limits)
    }
    match (&before, named_key(&after, name)) {
        (Some(b), Some(a)) if same(b) == same(&a) => {}
        _ => bail!(
            "rotating '{name}' would change more than its key (its entry in {} reads differently when written again): quote its values (tenant: \"1.50\") or edit the sha256 by hand",
            path.display()
        ),
    }
    crate::config_write::replace(&path, &text)?;
    Ok(key)
}

fn named_key(cfg: &smartllm_config::Config, name: &str) -> Option<smartllm_config::VirtualKey> {
    cfg.keys.keys.iter().find(|k| k.name == name).cloned()
}

/// `current` keys.yaml with an entry for `new` (whose key hashes to `sha`)
/// first under `keys:`, in the file's own list indentation; comments and the
/// rest of the file are kept as they are.
fn with_key(current: &str, new: &NewKey<'_>, sha: &str) -> String {
    let models = new
        .models
        .iter()
        .map(|m| serde_json::to_string(m).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ");
    let entry = |indent: &str| {
        let pad = format!("{indent}  ");
        format!(
            "{indent}- name: {}\n{pad}sha256: {sha}\n{pad}tenant: {}\n{pad}app: {}\n{pad}models: [{models}]\n",
            yaml_str(new.name),
            yaml_str(new.tenant),
            yaml_str(new.app),
        )
    };
    let lines: Vec<&str> = current.split_inclusive('\n').collect();
    let keys_line = lines.iter().position(|l| {
        let t = l.trim_end();
        t == "keys:"
            || t.starts_with("keys: ")
            || t.starts_with("keys:#")
            || t.starts_with("keys:[")
    });
    let Some(i) = keys_line else {
        let mut out = current.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        if !says_require_key(current) {
            out.push_str(REQUIRE_KEY);
        }
        out.push_str("keys:\n");
        out.push_str(&entry("  "));
        return out;
    };
    let head = lines[i].trim_end();
    let value = head
        .trim_start_matches("keys:")
        .split('#')
        .next()
        .unwrap_or("")
        .trim();
    let mut out = String::new();
    for l in &lines[..i] {
        out.push_str(l);
    }
    if !says_require_key(current) {
        out.push_str(REQUIRE_KEY);
    }
    if value == "[]" {
        // `keys: []` becomes a block list.
        out.push_str("keys:\n");
    } else {
        out.push_str(lines[i]);
        if !lines[i].ends_with('\n') {
            out.push('\n');
        }
    }
    // Items are indented like the first existing one (YAML allows column 0).
    let indent = lines[i + 1..]
        .iter()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter(|l| l.trim_start().starts_with("- "))
        .map_or("  ".to_string(), |l| {
            l[..l.len() - l.trim_start().len()].to_string()
        });
    out.push_str(&entry(&indent));
    for l in &lines[i + 1..] {
        out.push_str(l);
    }
    out
}

/// Said, not inferred from the key list, in a file `keys create` writes:
/// removing its last key later must not open the gateway.
const REQUIRE_KEY: &str = "require_key: true\n";

/// The file says `require_key` (true or false) already.
fn says_require_key(text: &str) -> bool {
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .ok()
        .is_some_and(|v| v.get("require_key").is_some())
}

/// A YAML scalar that stays a string whatever it holds.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key<'a>(models: &'a [String]) -> NewKey<'a> {
        NewKey {
            name: "web",
            tenant: "acme",
            app: "shop",
            models,
        }
    }

    /// A rotation keeps the key's item but its hashes: the old one as
    /// `previous_sha256` until it is finished; the rest of the file as it
    /// was; a second rotation under way is refused, `--now` is not.
    #[test]
    fn a_rotation_keeps_the_key_and_the_old_hash_until_finished() {
        let path = std::env::temp_dir().join(format!("smartllm-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        impl Dir {
            fn path(&self) -> &Path {
                &self.0
            }
        }
        let dir = Dir(path);
        for (file, text) in [
            (smartllm_config::MAIN_FILE, "demo:\n  mode: off\n"),
            (
                smartllm_config::PROVIDERS_FILE,
                "providers:\n  mock:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n",
            ),
            (
                smartllm_config::MODELS_FILE,
                "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
            ),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let old = "a".repeat(64);
        let keys = format!("# our keys\nrequire_key: true\nkeys:\n  # the shop\n  - name: web\n    sha256: {old}\n    tenant: acme\n    models: [small]\n    limits: {{ requests_per_minute: 5 }}\n  - {{ name: other, sha256: {}, tenant: beta }}\nbudgets:\n  - {{ scope: key, name: web, daily_usd: 1 }}\n", "b".repeat(64));
        std::fs::write(dir.path().join(smartllm_config::KEYS_FILE), &keys).unwrap();
        let load = || smartllm_config::load_dir(dir.path()).unwrap();
        let new = rotate(dir.path(), "web", Rotation::Start).unwrap().unwrap();
        let cfg = load();
        let web = cfg.keys.keys.iter().find(|k| k.name == "web").unwrap();
        assert_eq!(hex::encode(web.sha256), sha256_hex(&new));
        assert_eq!(web.previous_sha256.map(hex::encode), Some(old.clone()));
        assert_eq!(
            (web.tenant.as_str(), web.models.clone()),
            ("acme", vec!["small".to_string()])
        );
        assert_eq!(web.limits.requests_per_minute, Some(5));
        let text = std::fs::read_to_string(dir.path().join(smartllm_config::KEYS_FILE)).unwrap();
        assert!(
            text.starts_with("# our keys\nrequire_key: true\nkeys:\n  # the shop\n  - name: web\n"),
            "{text}"
        );
        assert!(
            text.contains("  - { name: other,")
                && text.contains("budgets:\n  - { scope: key, name: web"),
            "{text}"
        );
        assert!(list(dir.path()).unwrap().contains("(rotating"));
        // One at a time.
        let e = rotate(dir.path(), "web", Rotation::Start)
            .unwrap_err()
            .to_string();
        assert!(e.contains("under way"), "{e}");
        assert!(rotate(dir.path(), "web", Rotation::Finish)
            .unwrap()
            .is_none());
        let web = load()
            .keys
            .keys
            .into_iter()
            .find(|k| k.name == "web")
            .unwrap();
        assert_eq!(
            (hex::encode(web.sha256), web.previous_sha256),
            (sha256_hex(&new), None)
        );
        let e = rotate(dir.path(), "web", Rotation::Finish)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no rotation"), "{e}");
        // At once: no overlap; a flow-style item too.
        let now = rotate(dir.path(), "other", Rotation::Now).unwrap().unwrap();
        let other = load()
            .keys
            .keys
            .into_iter()
            .find(|k| k.name == "other")
            .unwrap();
        assert_eq!(
            (hex::encode(other.sha256), other.previous_sha256),
            (sha256_hex(&now), None)
        );
        assert!(rotate(dir.path(), "ghost", Rotation::Now).is_err());
        // An entry that YAML would write back otherwise is refused, the file
        // left as it was.
        let keys = format!(
            "keys:\n  - name: odd\n    sha256: {}\n    tenant: 1.50\n",
            "c".repeat(64)
        );
        std::fs::write(dir.path().join(smartllm_config::KEYS_FILE), &keys).unwrap();
        let e = rotate(dir.path(), "odd", Rotation::Now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reads differently"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(smartllm_config::KEYS_FILE)).unwrap(),
            keys
        );
    }

    #[test]
    fn an_empty_list_becomes_a_block_with_the_new_key() {
        let text = "# keys\nrequire_key: true\nkeys: []   # none yet\nbudgets: []\n";
        let out = with_key(text, &new_key(&[]), "ab");
        assert_eq!(
            out,
            "# keys\nrequire_key: true\nkeys:\n  - name: \"web\"\n    sha256: ab\n    tenant: \"acme\"\n    app: \"shop\"\n    models: []\nbudgets: []\n"
        );
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(v["keys"][0]["tenant"], "acme");
    }

    #[test]
    fn existing_keys_and_their_indentation_are_kept() {
        let models = vec!["gpt-4o-mini".to_string()];
        for text in [
            "keys:\n  - name: a\n    sha256: x\n",
            "keys:\n- name: a\n  sha256: x\n",
        ] {
            let out = with_key(text, &new_key(&models), "ab");
            let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
            let keys = v["keys"].as_sequence().unwrap();
            assert_eq!(keys.len(), 2, "{out}");
            assert_eq!(keys[0]["name"], "web");
            assert_eq!(keys[0]["models"][0], "gpt-4o-mini");
            assert_eq!(keys[1]["name"], "a");
        }
        // No keys section at all: one is added.
        let out = with_key("require_key: true", &new_key(&[]), "ab");
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(v["keys"][0]["sha256"], "ab");
        assert_eq!(out.matches("require_key").count(), 1, "{out}");
        // A file that does not say `require_key` is made to say it:
        // deleting its last key later keeps the gateway closed.
        for text in ["", "keys: []\n", "keys:\n  - name: a\n    sha256: x\n"] {
            let out = with_key(text, &new_key(&[]), "ab");
            let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
            assert_eq!(v["require_key"], true, "{out}");
            assert_eq!(v["keys"][0]["sha256"], "ab");
        }
        // One that says it, however quoted, is left as it says.
        for text in [
            "require_key: false\nkeys: []\n",
            "\"require_key\": true\nkeys: []\n",
        ] {
            let out = with_key(text, &new_key(&[]), "ab");
            assert_eq!(out.matches("require_key").count(), 1, "{out}");
            assert!(
                serde_yaml::from_str::<serde_yaml::Value>(&out).is_ok(),
                "{out}"
            );
        }
    }

    #[test]
    fn a_revoked_key_leaves_the_rest_of_the_file_as_it_was() {
        let text = "# the team's keys\nrequire_key: true\nkeys:\n  # web shop\n  - name: web\n    sha256: aa\n    tenant: acme\n\n  - { name: \"batch\", sha256: bb, tenant: acme }\n  - name: webhooks\n    sha256: cc\n    limits:\n      requests_per_minute: 5\nbudgets:\n  - { scope: tenant, name: acme, daily_usd: 5 }\n";
        let out = without_key(text, "web").unwrap();
        assert_eq!(
            out,
            "# the team's keys\nrequire_key: true\nkeys:\n  # web shop\n\n  - { name: \"batch\", sha256: bb, tenant: acme }\n  - name: webhooks\n    sha256: cc\n    limits:\n      requests_per_minute: 5\nbudgets:\n  - { scope: tenant, name: acme, daily_usd: 5 }\n"
        );
        let out = without_key(&out, "batch").unwrap();
        let out = without_key(&out, "webhooks").unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(v["keys"].as_sequence().map(Vec::len), Some(0), "{out}");
        assert_eq!(v["budgets"][0]["daily_usd"], 5, "{out}");
        assert_eq!(out.matches("require_key").count(), 1, "{out}");
        // A name that is not there (a prefix of one included): None.
        assert!(without_key(text, "we").is_none());
        assert!(without_key("keys: []\n", "web").is_none());
        // The last key of a file that does not say `require_key`: it now
        // says it, so the gateway stays closed.
        let out = without_key("keys:\n- name: a\n  sha256: x\n", "a").unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(
            (
                v["require_key"].as_bool(),
                v["keys"].as_sequence().map(Vec::len)
            ),
            (Some(true), Some(0)),
            "{out}"
        );
    }

    #[test]
    fn keys_are_random_and_hash_like_keys_yaml_expects() {
        let (a, b) = (random_key().unwrap(), random_key().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 2 * KEY_BYTES);
        assert_eq!(
            sha256_hex("sk-smartllm-demo"),
            "241225ddd2c375055fc3494c538ecf20525fbfd1adb00bf3f0ad30e8b13fcdf8"
        );
    }
}
