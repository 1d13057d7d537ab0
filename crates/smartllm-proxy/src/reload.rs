//! Hot reload: file watcher and SIGHUP raise the same request. A reload is a
//! fallible `prepare` (read, validate, resolve keys and addresses) followed by an
//! infallible swap; on any error the running config stays, the error is logged
//! and counted. Restart-only settings keep their running value and are reported.

use crate::runtime::Runtime;
use crate::{metrics, Shared};
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_at: Option<SystemTime>,
    pub restart_required: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied {
        version: u64,
        restart_required: Vec<String>,
        /// The config's sections that changed ([`smartllm_config::Config::changed_sections`]).
        changed: Vec<&'static str>,
        /// What the reload kept from opening the gateway ([`smartllm_config::Config::fail_closed`]).
        warnings: Vec<String>,
    },
    Unchanged,
}

/// Why a reload was rejected (the running config stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("config loader panicked: {0}")]
    LoaderPanicked(tokio::task::JoinError),
    #[error("{0}")]
    Config(smartllm_config::ConfigError),
    #[error("{0}")]
    Prepare(crate::runtime::PrepareError),
    #[error("no provider key can be read ({0}): the reload would answer every request from the demo mock LLM, so the running config stays in force; fix the keys, or restart to run in demo mode")]
    WouldDemo(String),
}

impl ReloadError {
    /// Whether the same files may load a moment later: an address that did
    /// not resolve, a key or token file being replaced, or a file the config
    /// names that cannot be read yet (a certificate certbot has not issued,
    /// a learned router not trained yet: its directory may not be watched,
    /// so only a retry would notice it arrive).
    pub fn passing(&self) -> bool {
        match self {
            ReloadError::Config(e) => {
                !e.issues.is_empty()
                    && e.issues
                        .iter()
                        .all(|i| i.message.starts_with("cannot read"))
            }
            _ => matches!(
                self,
                ReloadError::WouldDemo(_)
                    | ReloadError::Prepare(
                        crate::runtime::PrepareError::Deployments { .. }
                            | crate::runtime::PrepareError::AdminToken(_)
                    )
            ),
        }
    }
}

/// The first wait before a reload that failed for a passing reason is tried
/// again; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// When to try again after `result` (a reload of changed files that failed
/// for a passing reason), given the wait before it.
fn next_retry(
    result: &Result<ReloadOutcome, ReloadError>,
    last: Option<Duration>,
) -> Option<Duration> {
    match result {
        Err(e) if e.passing() => Some(last.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))),
        _ => None,
    }
}

/// Reload the config directory now.
pub async fn reload(shared: &Shared, trigger: &str) -> Result<ReloadOutcome, ReloadError> {
    let _guard = shared.reload_lock.lock().await;
    let dir = shared.config_dir.clone();
    let last_good = shared
        .config_texts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let loaded =
        tokio::task::spawn_blocking(move || smartllm_config::load_for_reload(&dir, last_good))
            .await
            .map_err(ReloadError::LoaderPanicked)?;
    let (loaded, texts, keys_only) = match loaded {
        Ok(smartllm_config::ReloadLoad::Whole(c, texts)) => (Ok(c), Some(texts), None),
        Ok(smartllm_config::ReloadLoad::KeysOnly {
            config,
            texts,
            rejected,
        }) => (Ok(config), Some(texts), Some(rejected)),
        Err(e) => (Err(e), None, None),
    };
    let result = match loaded {
        Err(e) => Err(ReloadError::Config(e)),
        Ok(new) => {
            let current = shared.runtime.load_full();
            if new.digest == current.config.digest {
                Ok(ReloadOutcome::Unchanged)
            } else {
                let mut restart = current.config.restart_only_changes(&new);
                // The shared cache and costs stay on the Redis and prefix
                // they started with: compared with those, not with the last
                // reload's (a change made and undone needs no restart).
                restart.retain(|c| !c.starts_with(smartllm_config::FLEET_SYNC_MOVED));
                if let Some(fs) = &shared.fleet_sync {
                    if !fs.started_on(&new.fleet) {
                        restart.push(format!(
                            "{}: the Redis they started with -> the new one",
                            smartllm_config::FLEET_SYNC_MOVED
                        ));
                    }
                }
                let changed = current.config.changed_sections(&new);
                let mut applied = current.config.with_restart_only_from(new);
                let mut warnings = current.config.fail_closed(&mut applied);
                warnings.extend(applied.keys.unmatched());
                warnings.extend(applied.unpriced_warnings());
                warnings.extend(applied.capability_warnings());
                warnings.extend(applied.budget_warnings());
                let version = current.version + 1;
                match Runtime::prepare(
                    applied,
                    version,
                    shared.components.embedder.clone(),
                    Some(current.router.clone()),
                )
                .await
                {
                    Ok(rt) if rt.demo_mode && !current.demo_mode => {
                        // A key file that vanished or cannot be read for a
                        // moment must not swap real answers for mock ones.
                        Err(ReloadError::WouldDemo(crate::runtime::unreadable_keys(
                            &rt.config,
                        )))
                    }
                    Ok(rt) => {
                        if let Some(c) = &shared.cache {
                            c.set_pq_threshold(rt.config.cache.pq_threshold);
                            c.set_ivf_threshold(rt.config.cache.ivf_threshold);
                        }
                        if rt.demo_mode != current.demo_mode {
                            tracing::warn!(
                                demo_mode = rt.demo_mode,
                                "demo mode changed with this reload"
                            );
                        }
                        crate::apply_metrics_config(&rt.config);
                        crate::tls::note_validity(&rt);
                        for listener in [crate::tls::Listener::Api, crate::tls::Listener::Admin] {
                            let fingerprint =
                                |r: &Runtime| listener.of(r).map(|t| t.fingerprint.clone());
                            if fingerprint(&rt) != fingerprint(&current) {
                                tracing::info!(
                                    trigger,
                                    listener = listener.setting(),
                                    sha256 = fingerprint(&rt).unwrap_or_default(),
                                    "TLS certificate reloaded: new handshakes get it, open connections keep theirs"
                                );
                            }
                        }
                        let budgets = rt.config.keys.budgets.clone();
                        if let Some(fleet) = &shared.fleet_sync {
                            for (name, version) in
                                version_bumps(&current.config.cache, &rt.config.cache)
                            {
                                fleet.publish(crate::fleet_sync::CacheEvent::Version {
                                    name,
                                    version,
                                });
                            }
                        }
                        // Budgets this reload adds read their spend back
                        // from the ledger before the config that enforces
                        // them runs (the old and new ones both tracked a
                        // moment), so none is enforced from zero.
                        let both: Vec<_> = current
                            .config
                            .keys
                            .budgets
                            .iter()
                            .chain(budgets.iter())
                            .cloned()
                            .collect();
                        let quotas = shared.quotas.clone();
                        if let Err(e) =
                            tokio::task::spawn_blocking(move || quotas.track_budgets(&both)).await
                        {
                            tracing::error!(error = %e, "tracking the reloaded budgets failed");
                        }
                        shared.runtime.store(Arc::new(rt));
                        // Spend is kept for the budgets of the running config
                        // only; new ones read theirs back from the ledger.
                        let quotas = shared.quotas.clone();
                        if let Err(e) =
                            tokio::task::spawn_blocking(move || quotas.track_budgets(&budgets))
                                .await
                        {
                            tracing::error!(error = %e, "tracking the reloaded budgets failed");
                        }
                        Ok(ReloadOutcome::Applied {
                            version,
                            restart_required: restart,
                            changed,
                            warnings,
                        })
                    }
                    Err(e) => Err(ReloadError::Prepare(e)),
                }
            }
        }
    };
    if result.is_ok() {
        *shared
            .config_texts
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = texts;
    }
    // keys.yaml applied on its own: the other files are still rejected,
    // and the reload says so (its error, the metric at 0).
    let result = match (result, keys_only) {
        (Ok(outcome), Some(rejected)) => {
            if let ReloadOutcome::Applied { version, .. } = &outcome {
                metrics::config_version(*version);
                tracing::warn!(trigger, version, "keys.yaml applied on its own: the other files of the config directory are rejected (below), and the rest of the running config stays");
            }
            Err(ReloadError::Config(rejected))
        }
        (result, _) => result,
    };
    let mut status = shared
        .reload_status
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    status.last_at = Some(SystemTime::now());
    match &result {
        Ok(ReloadOutcome::Applied {
            version,
            restart_required,
            changed,
            warnings,
        }) => {
            for w in warnings {
                tracing::warn!(trigger, version, "{w}");
            }
            metrics::config_reload("ok");
            metrics::config_version(*version);
            metrics::providers_known(shared.runtime.load().config.providers.keys());
            metrics::restart_pending(!restart_required.is_empty());
            // (A comment-only edit changes the files, no section.)
            let changed = if changed.is_empty() {
                "-".to_string()
            } else {
                changed.join(",")
            };
            if restart_required.is_empty() {
                tracing::info!(trigger, version, changed, "config reloaded");
            } else {
                tracing::warn!(trigger, version, changed, needs_restart = %restart_required.join("; "), "config reloaded; these changes take effect only after a restart");
            }
            status.last_result = Some(format!("applied version {version}"));
            status.last_error = None;
            status.restart_required = restart_required.clone();
            status.warnings = warnings.clone();
        }
        Ok(ReloadOutcome::Unchanged) => {
            metrics::config_reload("unchanged");
            if status.last_error.is_some() {
                // A rejected edit undone: the ERROR line before is not the
                // last word on the directory.
                tracing::info!(trigger, "config valid again (the rejected change was undone); the running config is unchanged");
            } else if trigger == "watch" {
                // A save that changed nothing (a touch, an editor's backup).
                tracing::debug!(trigger, "config unchanged");
            } else {
                // An operator asked (`systemctl reload`, the admin API):
                // the journal says it was read.
                tracing::info!(trigger, "config read again; nothing changed");
            }
            status.last_result = Some("unchanged".into());
            // The directory is valid again (e.g. a rejected edit undone).
            status.last_error = None;
        }
        Err(e) => {
            metrics::config_reload("error");
            tracing::error!(trigger, error = %e, "config reload rejected; the running config stays in force");
            status.last_result = Some("error".into());
            status.last_error = Some(e.to_string());
        }
    }
    result
}

/// Watches the config directory and SIGHUP; reloads on either.
pub struct ReloadService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let rt = self.shared.runtime.load_full();
        let watch = rt.config.reload.watch;
        let mut watched = rt.config.watched_files();
        // Where the config directory leads (a link swapped to another
        // release is watched there from then on).
        // The config directory's link target, and where its linked files
        // point: either changing means watching anew.
        let target = || {
            let dir = self.shared.config_dir.canonicalize().ok();
            let linked = smartllm_config::watch::linked_files(&self.shared.config_dir);
            (dir, linked)
        };
        let mut watched_target = target();
        let mut _watcher = if watch {
            self.watch(&watched, &tx)
        } else {
            None
        };
        drop(rt);
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGHUP handler");
                None
            }
        };
        // A change (or a SIGHUP) while the gateway was starting, after it
        // read its config, had no one to act on it: look once now. An
        // unchanged directory costs a digest.
        // A reload that failed for a passing reason (an address that did not
        // resolve) is tried again, later and later, until it applies, the
        // files change to something else, or they fail for good.
        let mut retry = next_retry(&reload(&self.shared, "start").await, None);
        let mut retry_at = retry.map(|d| tokio::time::Instant::now() + d);
        loop {
            let result = tokio::select! {
                Some(()) = rx.recv() => {
                    // Let an editor finish writing (and coalesce bursts of
                    // events), as long as the running config says.
                    let debounce = self.shared.runtime.load().config.reload.debounce;
                    tokio::time::sleep(debounce).await;
                    while rx.try_recv().is_ok() {}
                    reload(&self.shared, "watch").await
                }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    reload(&self.shared, "sighup").await
                }
                _ = async { match retry_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                    reload(&self.shared, "retry").await
                }
                _ = shutdown.changed() => break,
            };
            retry = next_retry(&result, retry);
            retry_at = retry.map(|d| tokio::time::Instant::now() + d);
            if let Some(d) = retry {
                tracing::info!(
                    in_secs = d.as_secs(),
                    "the rejected reload failed for a passing reason; it is tried again"
                );
            }
            // Watched files moved to another directory, or the config
            // directory's link to another one: watch that one instead.
            let now = self.shared.runtime.load().config.watched_files();
            let now_target = target();
            if watch && (now != watched || now_target != watched_target) {
                watched = now;
                watched_target = now_target;
                _watcher = None;
                _watcher = self.watch(&watched, &tx);
            }
        }
    }
}

impl ReloadService {
    /// Watch the config directory and the directories of the `files` it reads.
    fn watch(
        &self,
        files: &[std::path::PathBuf],
        tx: &mpsc::Sender<()>,
    ) -> Option<smartllm_config::watch::DirWatcher> {
        let dir = &self.shared.config_dir;
        match smartllm_config::watch::watch_dir_and(dir, files, tx.clone()) {
            Ok((w, failed)) => {
                for (d, e) in failed {
                    tracing::error!(error = %e, dir = %d.display(), "cannot watch the directory of a file the config reads (TLS, key or CA file, classifier examples, learned router); reload with SIGHUP after replacing it");
                }
                Some(w)
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
                None
            }
        }
    }
}

/// Cache policies whose version went up with a reload (`*`: the defaults).
fn version_bumps(
    old: &smartllm_config::CacheConfig,
    new: &smartllm_config::CacheConfig,
) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    if new.defaults.version > old.defaults.version {
        out.push(("*".to_string(), new.defaults.version));
    }
    for (name, p) in &new.routes {
        let before = old.routes.get(name).unwrap_or(&old.defaults).version;
        if p.version > before {
            out.push((name.clone(), p.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_failures_are_retried_later_and_later() {
        let passing: Result<ReloadOutcome, ReloadError> =
            Err(ReloadError::WouldDemo("keys.txt".into()));
        assert_eq!(next_retry(&passing, None), Some(RETRY_FIRST));
        assert_eq!(
            next_retry(&passing, Some(RETRY_FIRST)),
            Some(RETRY_FIRST * 2)
        );
        assert_eq!(next_retry(&passing, Some(RETRY_MAX)), Some(RETRY_MAX));
        // Applied, unchanged, or files that are wrong: no retry.
        assert_eq!(
            next_retry(&Ok(ReloadOutcome::Unchanged), Some(RETRY_FIRST)),
            None
        );
        let open = Err(ReloadError::Prepare(
            crate::runtime::PrepareError::AdminOpen("0.0.0.0:9090".parse().unwrap()),
        ));
        assert_eq!(next_retry(&open, None), None);
        // A file the config names that is not there yet: tried again; a
        // wrong value is not.
        let issue = |message: &str| smartllm_config::ConfigIssue {
            file: "smartllm.yaml".into(),
            path: "server.tls.cert_file".into(),
            line: Some(3),
            message: message.into(),
        };
        let unreadable = Err(ReloadError::Config(smartllm_config::ConfigError {
            issues: vec![issue(
                "cannot read /etc/le/live/new/fullchain.pem: No such file",
            )],
        }));
        assert_eq!(next_retry(&unreadable, None), Some(RETRY_FIRST));
        let wrong = Err(ReloadError::Config(smartllm_config::ConfigError {
            issues: vec![
                issue("cannot read /etc/le/live/new/fullchain.pem: No such file"),
                issue("must be greater than 0"),
            ],
        }));
        assert_eq!(next_retry(&wrong, None), None);
    }
}
