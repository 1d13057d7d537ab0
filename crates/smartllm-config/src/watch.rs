//! File watching for hot reload: any change to one of the config files (including
//! editors' write-to-temp-then-rename) raises a reload request on a channel. The
//! receiver debounces and reloads; SIGHUP raises the same request.

use notify::{Event, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// A running watch (dropping it stops watching).
pub type DirWatcher = notify::RecommendedWatcher;

/// Names of files in the config directory whose change may change the config:
/// the config files, what routes refer to, TLS certificates and keys, and
/// Kubernetes' `..data` link (a ConfigMap or Secret volume is updated by
/// making a new `..<timestamp>` directory and renaming a `..data_tmp` link
/// over `..data`; the files themselves are links through it, so no event
/// names them).
fn relevant_name(n: &str) -> bool {
    n.starts_with("..")
        || crate::FILES.contains(&n)
        || [
            ".yaml", ".yml", ".tsv", ".json", ".jsonl", ".pem", ".crt", ".cer", ".key",
        ]
        .iter()
        .any(|ext| n.ends_with(ext))
}

/// Watch `dir`; every relevant change sends `()` on `tx` (coalesced: a pending
/// request is not duplicated). Keep the returned watcher alive to keep watching.
pub fn watch_dir(dir: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    watch_dir_and(dir, &[], tx).map(|(w, _)| w)
}

/// [`watch_dir`], and the `files` the config refers to (TLS certificates and
/// keys, provider key and CA files, the admin token), each by its name in
/// its directory, in `dir` or elsewhere (a tool that manages certificates
/// swaps them by renaming a new file or link over the name; a Kubernetes
/// Secret volume by swapping its `..data` link, which counts too). Other
/// changes in those directories (`/etc`, say) are not reloads. A change that
/// changes nothing the config reads is a reload that finds the config
/// unchanged. A directory that cannot be watched is returned with its error
/// (SIGHUP still reloads); only `dir` must be.
/// Where the config files of `dir` that are symbolic links point (sorted):
/// watched there too. The reload service watches anew when they change (a
/// `keys.yaml` made a link, or pointed elsewhere, after the start).
pub fn linked_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml"))
            })
        })
        .filter_map(|e| e.path().canonicalize().ok())
        .collect();
    out.sort();
    out
}

pub fn watch_dir_and(
    dir: &Path,
    files: &[PathBuf],
    tx: mpsc::Sender<()>,
) -> notify::Result<(notify::RecommendedWatcher, Vec<(PathBuf, notify::Error)>)> {
    // Compared and watched as the filesystem resolves them: a file named
    // through another spelling of the config directory (`conf/` and
    // `/srv/conf/`) is a name in it, not a second directory whose events
    // the watcher might report under either spelling.
    let canonical = |d: &Path| d.canonicalize().unwrap_or_else(|_| d.to_path_buf());
    // A config directory that is a link (`ln -sfn releases/v2 /etc/smartllm`
    // swaps it by renaming a new link over the name): its name is watched in
    // the link's directory, as a referenced file's is.
    let link = std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.file_type().is_symlink())
        .then(|| dir.to_path_buf());
    let dir = canonical(dir);
    let dir = dir.as_path();
    // A config file that is a link (one `keys.yaml` shared by a fleet's
    // directories): the file it points to is watched where it lies, so a
    // `keys revoke` through another directory reaches this gateway too.
    let linked = linked_files(dir);
    let mut names: Vec<String> = Vec::new();
    // Other directories, with the names watched in each.
    let mut extra: Vec<(PathBuf, Vec<String>)> = Vec::new();
    for f in files.iter().chain(link.as_ref()).chain(linked.iter()) {
        let (Some(parent), Some(name)) = (f.parent(), f.file_name().and_then(|n| n.to_str()))
        else {
            continue;
        };
        let parent = canonical(parent);
        let parent = parent.as_path();
        if parent == dir {
            names.push(name.to_string());
        } else if let Some((_, n)) = extra.iter_mut().find(|(d, _)| d == parent) {
            n.push(name.to_string());
        } else {
            extra.push((parent.to_path_buf(), vec![name.to_string()]));
        }
    }
    let extra_dirs: Vec<PathBuf> = extra.iter().map(|(d, _)| d.clone()).collect();
    let config_dir = dir.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        let event = match res {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "the config directory's watcher failed; SIGHUP and POST /admin/reload still reload");
                return;
            }
        };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let (Some(parent), Some(n)) = (p.parent(), p.file_name().and_then(|n| n.to_str()))
            else {
                return false;
            };
            if parent == config_dir {
                relevant_name(n) || names.iter().any(|m| m == n)
            } else {
                extra.iter().any(|(d, watched)| {
                    d == parent && (n.starts_with("..") || watched.iter().any(|m| m == n))
                })
            }
        });
        if relevant {
            // Full channel = a reload is already pending; that one will see this change.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let mut failed = Vec::new();
    for d in extra_dirs {
        if let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive) {
            failed.push((d, e));
        }
    }
    Ok((watcher, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What the kubelet does to a ConfigMap volume on an update.
    #[tokio::test]
    async fn a_kubernetes_configmap_update_raises_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let v1 = d.join("..2026_12_01_10_00_00.1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("smartllm.yaml"), "data_dir: /tmp/a\n").unwrap();
        std::os::unix::fs::symlink("..2026_12_01_10_00_00.1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/smartllm.yaml", d.join("smartllm.yaml")).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch_dir(d, tx).unwrap();
        // Update: a new timestamped directory, a temporary link to it renamed
        // over ..data, the old directory removed.
        let v2 = d.join("..2026_12_01_10_05_00.2");
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v2.join("smartllm.yaml"), "data_dir: /tmp/b\n").unwrap();
        std::os::unix::fs::symlink("..2026_12_01_10_05_00.2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.ok().flatten(), Some(()), "no reload was raised");
        assert_eq!(
            std::fs::read_to_string(d.join("smartllm.yaml")).unwrap(),
            "data_dir: /tmp/b\n"
        );
    }

    /// A key file elsewhere is watched by its name: its change reloads,
    /// other files in its directory do not.
    #[tokio::test]
    async fn a_file_elsewhere_is_watched_by_its_name() {
        let (conf, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let key = other.path().join("provider.key");
        std::fs::write(&key, "k1").unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let (_w, failed) = watch_dir_and(conf.path(), std::slice::from_ref(&key), tx).unwrap();
        assert!(failed.is_empty());
        std::fs::write(other.path().join("unrelated.log"), "x").unwrap();
        let got = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(got.is_err(), "an unrelated file raised a reload");
        let tmp = other.path().join(".provider.key.tmp");
        std::fs::write(&tmp, "k2").unwrap();
        std::fs::rename(&tmp, &key).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(
            got.ok().flatten(),
            Some(()),
            "the key's change raised no reload"
        );
    }

    /// A config file that is a link to another directory (a key list
    /// shared by a fleet's config directories): a change where it lies
    /// (the CLI renames a new file over it there) reloads.
    #[tokio::test]
    async fn a_linked_config_file_is_watched_where_it_lies() {
        let (conf, shared) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let keys = shared.path().join("keys.yaml");
        std::fs::write(&keys, "keys: []\n").unwrap();
        std::os::unix::fs::symlink(&keys, conf.path().join("keys.yaml")).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let (_w, failed) = watch_dir_and(conf.path(), &[], tx).unwrap();
        assert!(failed.is_empty());
        let tmp = shared.path().join(".keys.yaml.1.new");
        std::fs::write(&tmp, "keys: []\nrequire_key: true\n").unwrap();
        std::fs::rename(&tmp, &keys).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(
            got.ok().flatten(),
            Some(()),
            "the shared file's change raised no reload"
        );
    }

    /// A release-style swap of a linked config directory
    /// (`ln -sfn releases/v2 conf`: a new link renamed over the name).
    #[tokio::test]
    async fn swapping_a_linked_config_directory_raises_a_reload() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for v in ["v1", "v2"] {
            std::fs::create_dir_all(r.join(v)).unwrap();
            std::fs::write(r.join(v).join("smartllm.yaml"), format!("# {v}\n")).unwrap();
        }
        std::os::unix::fs::symlink("v1", r.join("conf")).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let (_w, failed) = watch_dir_and(&r.join("conf"), &[], tx).unwrap();
        assert!(failed.is_empty());
        std::os::unix::fs::symlink("v2", r.join("conf.tmp")).unwrap();
        std::fs::rename(r.join("conf.tmp"), r.join("conf")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.ok().flatten(), Some(()), "the swap raised no reload");
        // The swap may raise more than one event (the link's creation and
        // its rename): let them all arrive, then drop them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while rx.try_recv().is_ok() {}
        // Other names beside the link are not reloads.
        std::fs::write(r.join("notes.txt"), "x").unwrap();
        let got = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(got.is_err(), "an unrelated file raised a reload");
    }

    #[test]
    fn unrelated_files_are_not_relevant() {
        assert!(relevant_name("..data"));
        assert!(relevant_name("smartllm.yaml"));
        assert!(relevant_name("tasks.tsv"));
        assert!(!relevant_name(".smartllm.yaml.swp"));
        assert!(!relevant_name("README"));
    }
}
