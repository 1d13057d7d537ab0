//! File watching for hot reload: any change to one of the config files (including
//! editors' write-to-temp-then-rename) raises a reload request on a channel. The
//! receiver debounces and reloads; SIGHUP raises the same request.

use notify::{Event, RecursiveMode, Watcher};
use std::path::Path;
use tokio::sync::mpsc;

/// Watch `dir`; every relevant change sends `()` on `tx` (coalesced: a pending
/// request is not duplicated). Keep the returned watcher alive to keep watching.
pub fn watch_dir(dir: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                crate::FILES.contains(&n)
                    || [".yaml", ".yml", ".tsv", ".json", ".jsonl"]
                        .iter()
                        .any(|ext| n.ends_with(ext))
            })
        });
        if relevant {
            // Full channel = a reload is already pending; that one will see this change.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
