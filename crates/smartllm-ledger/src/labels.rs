//! Metric label values that name tenants, apps and keys: bounded, and
//! optionally hashed (`metrics:` in smartllm.yaml).
//!
//! Every other label (model, route, provider, deployment, status, ...) comes
//! from the config or a fixed list. These three come from who calls: on an
//! open gateway every distinct bearer token is a tenant. So each kind admits
//! at most `max_label_values` distinct values per process, first come; later
//! ones are all reported as [`OVERFLOW`] (their amounts still count, in that
//! one series). With `label_names: hashed` a name becomes the first 12 hex
//! digits of its sha256, so `/metrics` never spells a tenant, app or key name
//! (the ledger and the admin API, behind the admin token, still do).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The label value of every name beyond the cap.
pub const OVERFLOW: &str = "__overflow__";
/// Distinct values per label kind when the config says nothing.
pub const DEFAULT_MAX_VALUES: usize = 1000;

/// The kinds of label value that name a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    Tenant,
    App,
    Key,
}

/// The first 12 hex digits of the sha256 of `name`: stable across processes
/// and gateways (`printf %s NAME | sha256sum | cut -c1-12`).
pub fn hash_name(name: &str) -> String {
    let d = Sha256::digest(name.as_bytes());
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The admitted values of each kind (raw name -> label value) and the policy.
pub struct LabelPolicy {
    max: AtomicUsize,
    hashed: AtomicBool,
    seen: [Mutex<BTreeMap<String, String>>; 3],
}

impl Default for LabelPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl LabelPolicy {
    pub const fn new() -> LabelPolicy {
        LabelPolicy {
            max: AtomicUsize::new(DEFAULT_MAX_VALUES),
            hashed: AtomicBool::new(false),
            seen: [
                Mutex::new(BTreeMap::new()),
                Mutex::new(BTreeMap::new()),
                Mutex::new(BTreeMap::new()),
            ],
        }
    }

    /// Apply `metrics:` (at start and on reload). Values already admitted
    /// stay; a lower cap admits no new ones until below it. Switching
    /// between plain and hashed forgets what was admitted.
    pub fn configure(&self, max_values: usize, hashed: bool) {
        self.max.store(max_values.max(1), Ordering::Relaxed);
        if self.hashed.swap(hashed, Ordering::Relaxed) != hashed {
            for s in &self.seen {
                s.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
    }

    /// The label value for `name` of this kind.
    pub fn value(&self, kind: LabelKind, name: &str) -> String {
        let mut seen = self.seen[kind as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(v) = seen.get(name) {
            return v.clone();
        }
        if seen.len() >= self.max.load(Ordering::Relaxed) {
            return OVERFLOW.to_string();
        }
        let v = if self.hashed.load(Ordering::Relaxed) {
            hash_name(name)
        } else {
            name.to_string()
        };
        seen.insert(name.to_string(), v.clone());
        v
    }

    /// Values admitted so far, per kind.
    pub fn admitted(&self, kind: LabelKind) -> usize {
        self.seen[kind as usize]
            .lock()
            .map(|s| s.len())
            .unwrap_or(0)
    }
}

static POLICY: LabelPolicy = LabelPolicy::new();

/// Apply `metrics.max_label_values` and `metrics.label_names` process-wide.
pub fn configure(max_values: usize, hashed: bool) {
    POLICY.configure(max_values, hashed);
}

/// The process-wide label value for a tenant, app or key name.
pub fn value(kind: LabelKind, name: &str) -> String {
    POLICY.value(kind, name)
}

/// A budget id (`tenant:NAME`, `app:TENANT/APP`, `key:NAME`) as a label:
/// the scope stays, the name goes through [`value`].
pub fn budget(id: &str) -> String {
    let kind = match id.split_once(':') {
        Some(("tenant", n)) => Some((LabelKind::Tenant, n)),
        Some(("app", n)) => Some((LabelKind::App, n)),
        Some(("key", n)) => Some((LabelKind::Key, n)),
        _ => None,
    };
    match kind {
        Some((k, n)) => {
            let scope = &id[..id.len() - n.len() - 1];
            format!("{scope}:{}", value(k, n))
        }
        None => id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_beyond_the_cap_overflow_and_names_hash_stably() {
        let p = LabelPolicy::new();
        p.configure(3, false);
        for i in 0..10_000 {
            let v = p.value(LabelKind::Tenant, &format!("t{i}"));
            assert_eq!(
                v,
                if i < 3 {
                    format!("t{i}")
                } else {
                    OVERFLOW.into()
                }
            );
        }
        assert_eq!(p.admitted(LabelKind::Tenant), 3);
        // An admitted name keeps its value; other kinds have their own cap.
        assert_eq!(p.value(LabelKind::Tenant, "t1"), "t1");
        assert_eq!(p.value(LabelKind::App, "web"), "web");
        p.configure(3, true);
        let h = p.value(LabelKind::Tenant, "acme");
        assert_eq!(h, hash_name("acme"));
        assert_eq!(h.len(), 12);
        // sha256("acme")
        assert_eq!(h, "822b33ad87c1");
        assert_eq!(p.value(LabelKind::Tenant, "acme"), h);
        assert_ne!(p.value(LabelKind::Tenant, "beta"), h);
    }
}
