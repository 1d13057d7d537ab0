//! File watching for hot reload: any change to one of the config files (including
//! editors' write-to-temp-then-rename) raises a reload request on a channel. The
//! receiver debounces and reloads; SIGHUP raises the same request.

use notify::{Event, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// A running watch (dropping it stops watching).
pub type DirWatcher = notify::RecommendedWatcher;

/// Names of files in the config directory whose change may change the config:
/// the config files, what routes refer to, and TLS certificates and keys.
fn relevant_name(n: &str) -> bool {
    crate::FILES.contains(&n)
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
/// keys): one in `dir` by its name, one elsewhere by any change at all in its
/// directory (a tool that manages certificates may swap them by renaming a
/// symlink there). A change that changes nothing the config reads is a reload
/// that finds the config unchanged. A directory that cannot be watched is
/// returned with its error (SIGHUP still reloads); only `dir` must be.
pub fn watch_dir_and(
    dir: &Path,
    files: &[PathBuf],
    tx: mpsc::Sender<()>,
) -> notify::Result<(notify::RecommendedWatcher, Vec<(PathBuf, notify::Error)>)> {
    let mut names: Vec<String> = Vec::new();
    let mut extra_dirs: Vec<PathBuf> = Vec::new();
    for f in files {
        let (Some(parent), Some(name)) = (f.parent(), f.file_name().and_then(|n| n.to_str()))
        else {
            continue;
        };
        if parent == dir {
            names.push(name.to_string());
        } else if !extra_dirs.iter().any(|d| d == parent) {
            extra_dirs.push(parent.to_path_buf());
        }
    }
    let watched_extra = extra_dirs.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.parent()
                .is_some_and(|d| watched_extra.iter().any(|e| e == d))
                || p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| relevant_name(n) || names.iter().any(|m| m == n))
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
