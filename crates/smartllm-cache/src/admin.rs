//! Operator and maintenance operations: purge (all, by namespace, tenant,
//! route or model), the sweep of expired and outdated-version entries, and stats.

use crate::entry::unsealed_exact;
use crate::metric_names as m;
use crate::{now_ms, now_secs, CacheError, Entry, Sealing, SemanticCache, VectorIndex};
use metrics::{counter, gauge};
use rocksdb::{IteratorMode, WriteBatch};
use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_VECTORS};
use std::sync::atomic::Ordering;

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Purge {
    All,
    Namespace(String),
    Route(String),
    /// Every entry stored for a tenant's requests (entries from releases
    /// that did not record the tenant are not covered).
    Tenant(String),
}

impl Purge {
    /// Does this purge remove `e`?
    pub fn covers(&self, e: &Entry) -> bool {
        match self {
            Purge::Namespace(ns) => &e.namespace == ns,
            Purge::Tenant(t) => e.tenant.as_ref() == Some(t),
            Purge::Route(r) => &e.route == r || &e.model == r,
            Purge::All => true,
        }
    }
}

/// Purge targets remembered against entries the fleet sends late.
const MAX_PURGES_KEPT: usize = 1024;

/// Purges applied here, by when they were issued (milliseconds).
#[derive(Debug, Default)]
pub(crate) struct Purged {
    /// The last purge of everything.
    all: u64,
    /// The last purge of each route, model or namespace.
    targets: std::collections::HashMap<Purge, u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub index_vectors: usize,
    pub index_kind: &'static str,
    pub ivf_nlist: Option<usize>,
    pub ivf_nprobe: Option<usize>,
    pub index_building: bool,
    pub l1_entries: usize,
    /// The next entry sequence number (`ids::seq`).
    pub next_id: u64,
    pub encrypted: bool,
    pub live_data_bytes: u64,
    pub estimated_entries: u64,
}

impl SemanticCache {
    /// Remove entries matching `what`; returns how many.
    pub fn purge(&self, what: &Purge) -> Result<u64, CacheError> {
        self.purge_at(what, now_ms())
    }

    /// [`SemanticCache::purge`], issued at `at_ms` (the time the fleet is
    /// told, however late its outbox sends it).
    pub fn purge_at(&self, what: &Purge, at_ms: u64) -> Result<u64, CacheError> {
        self.remember_and_remove(what, at_ms.min(now_ms()))
    }

    /// Record the purge (issued at `at`), then remove what it covers.
    ///
    /// A purge of a namespace or route holds the gate only while it is
    /// recorded, not through the scan (which reads and opens every entry:
    /// seconds at a million). Held through it, every insert would wait for
    /// it on a blocking thread, and enough of them would take the whole
    /// blocking pool and hold up lookups. No entry it covers survives all
    /// the same: an insert checks the recorded purges and writes under the
    /// read side of the gate, so either
    /// - it wrote before the purge was recorded: its RocksDB batch was
    ///   committed before the scan's iterator was made, so the scan sees the
    ///   entry and removes it (its index add was queued before the scan's
    ///   removal, which thus comes after it); or
    /// - it checks after: it finds the purge and stores nothing it covers
    ///   (`purged_after`).
    ///
    /// An answer asked for after the purge and written during the scan may
    /// be removed too: one cached answer lost, never a purged one served.
    ///
    /// Purging everything keeps the gate until done: it deletes the keys it
    /// read in one batch and then empties the index, so an insert landing in
    /// between would be left half stored, or in RocksDB without its vector in
    /// the index.
    fn remember_and_remove(&self, what: &Purge, at: u64) -> Result<u64, CacheError> {
        if *what == Purge::All {
            let _gate = self.purge_gate.write().unwrap_or_else(|p| p.into_inner());
            self.remember_purge(what, at);
            return self.remove(what);
        }
        {
            let _gate = self.purge_gate.write().unwrap_or_else(|p| p.into_inner());
            self.remember_purge(what, at);
        }
        self.remove(what)
    }

    fn remove(&self, what: &Purge) -> Result<u64, CacheError> {
        if *what == Purge::All {
            let mut n = 0u64;
            let mut batch = WriteBatch::default();
            for cf in [CF_ENTRIES, CF_VECTORS, CF_EXACT] {
                for item in self.db().iterator_cf(self.cf(cf), IteratorMode::Start) {
                    let (k, _) = item?;
                    if cf == CF_ENTRIES {
                        n += 1;
                    }
                    batch.delete_cf(self.cf(cf), k);
                }
            }
            self.db().write(batch)?;
            self.l1_clear();
            // A build in flight started from the old contents: void it.
            self.index.reset(VectorIndex::new_flat(self.index.dim())?);
            self.trained_for.store(0, Ordering::Relaxed);
            if let Some(p) = &self.index_path {
                let _ = std::fs::remove_file(p);
            }
            gauge!(m::INDEX_VECTORS).set(0.0);
            self.unreadable_kept.store(0, Ordering::Relaxed);
            gauge!(m::UNREADABLE).set(0.0);
            counter!(m::REMOVED, "reason" => "purge").increment(n);
            return Ok(n);
        }
        let (n, _, _) = self.remove_where(|e| what.covers(e), false)?;
        counter!(m::REMOVED, "reason" => "purge").increment(n);
        Ok(n)
    }

    /// Note a purge issued at `at` (see [`SemanticCache::purged_since`]):
    /// the newest time per target, and one time for "everything".
    fn remember_purge(&self, what: &Purge, at: u64) {
        let mut p = self.purged.lock().unwrap_or_else(|p| p.into_inner());
        if *what == Purge::All {
            p.all = p.all.max(at);
            return;
        }
        if p.targets.len() >= MAX_PURGES_KEPT && !p.targets.contains_key(what) {
            // The oldest target goes first.
            if let Some(oldest) = p
                .targets
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                p.targets.remove(&oldest);
            }
        }
        let t = p.targets.entry(what.clone()).or_default();
        *t = (*t).max(at);
    }

    /// Was `e` stored before a purge applied here that removes it? An entry
    /// the fleet sends after the purge (another gateway's backlog, or a
    /// stream this one had not read yet) is then not stored again; nor is
    /// one asked for before the purge and answered after it.
    pub(crate) fn purged_since(&self, e: &Entry) -> bool {
        self.purged_after(e, e.asked_at_ms())
    }

    /// Was `e`, asked for at `asked_ms`, asked before a purge applied here
    /// that removes it?
    pub(crate) fn purged_after(&self, e: &Entry, asked_ms: u64) -> bool {
        let p = self.purged.lock().unwrap_or_else(|p| p.into_inner());
        asked_ms < p.all
            || p.targets
                .iter()
                .any(|(what, at)| asked_ms < *at && what.covers(e))
    }

    /// Remember a purge of the fleet's record (issued at `at_ms`) without
    /// removing anything: entries loaded after it that it covers are not
    /// stored (see [`SemanticCache::purged_since`]).
    pub fn remember_fleet_purge(&self, what: &Purge, at_ms: u64) {
        self.remember_purge(what, at_ms.min(now_ms()));
    }

    /// A purge another gateway issued at `issued_ms` (its clock).
    pub fn purge_from_fleet(&self, what: &Purge, issued_ms: u64) -> Result<u64, CacheError> {
        self.remember_and_remove(what, issued_ms.min(now_ms()))
    }

    /// Empty the cache to load the fleet's snapshot in its place (which
    /// reflects every purge): nothing is remembered against its entries.
    pub fn clear_for_snapshot(&self) -> Result<u64, CacheError> {
        // No insert lands between the removal's reads and its batch.
        let _gate = self.purge_gate.write().unwrap_or_else(|p| p.into_inner());
        self.remove(&Purge::All)
    }

    /// Remove expired entries, those `stale` says are outdated (version
    /// bumps) and unreadable ones (entries stored in the clear included when
    /// there is a key); re-seal with the current key those sealed with an old
    /// one.
    pub fn sweep(&self, stale: impl Fn(&Entry) -> bool) -> Result<u64, CacheError> {
        let now = now_secs();
        let (n, resealed, kept) = self.remove_where(|e| e.expired(now) || stale(e), true)?;
        counter!(m::REMOVED, "reason" => "expired").increment(n);
        gauge!(m::UNREADABLE).set(kept as f64);
        if kept == 0 {
            self.settle_foreign()?;
        }
        if kept > 0 && self.unreadable_kept.swap(kept, Ordering::Relaxed) != kept {
            tracing::warn!(
                entries = kept,
                "cache entries that no configured key opens (cache.encryption_key_file, encryption_old_key_files) are kept but not served: if the key file is wrong, restore it and restart; any `smartllm cache purge` removes them"
            );
        }
        gauge!(m::BYTES).set(self.store.info().live_data_bytes as f64);
        if resealed > 0 {
            tracing::info!(
                resealed,
                "cache entries sealed with an old key (cache.encryption_old_key_files) were re-sealed with the current key"
            );
        }
        Ok(n)
    }

    /// Remove the entries `pred` picks and the unreadable ones (in the
    /// clear when there is a key, sealed with a key that is gone, or
    /// corrupt). With `reseal` (the sweep), re-seal those sealed with an
    /// old key, and under a foreign key (a wrong key file, see
    /// `seal_stored_vectors`) keep those no key opens. Returns (removed,
    /// re-sealed, kept unread).
    fn remove_where(
        &self,
        pred: impl Fn(&Entry) -> bool,
        reseal: bool,
    ) -> Result<(u64, u64, u64), CacheError> {
        let mut doomed = Vec::new();
        let (mut resealed, mut kept) = (0u64, 0u64);
        for item in self
            .db()
            .iterator_cf(self.cf(CF_ENTRIES), IteratorMode::Start)
        {
            let (k, v) = item?;
            let Ok(id) = <[u8; 8]>::try_from(&k[..]).map(u64::from_be_bytes) else {
                continue;
            };
            match self.codec.open(&v) {
                Ok((e, _)) if pred(&e) => doomed.push((id, Some(e.exact))),
                Ok((e, Sealing::Old)) if reseal => {
                    self.reseal(id, &e)?;
                    resealed += 1;
                }
                Ok(_) => {}
                // Under a foreign key the sweep keeps what no key opens;
                // a purge removes it: it cannot tell whose it is, and an
                // answer purged must not come back with the right key.
                Err(crate::CodecError::Decrypt)
                    if reseal && self.foreign_key.load(Ordering::Relaxed) =>
                {
                    kept += 1
                }
                Err(_) => doomed.push((id, unsealed_exact(&v))),
            }
        }
        let n = doomed.len() as u64;
        self.remove_ids(&doomed)?;
        Ok((n, resealed, kept))
    }

    /// The cache's sealing (its key, when `encryption_key_file` is set):
    /// other stores of prompts and answers seal with it too.
    pub fn codec(&self) -> &crate::Codec {
        &self.codec
    }

    pub fn stats(&self) -> CacheStats {
        let info = self.store.info();
        let estimated_entries = self
            .db()
            .property_int_value_cf(self.cf(CF_ENTRIES), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0);
        // Atomics only (the admin API calls this on an async thread).
        let params = self.index.ivf_params();
        CacheStats {
            index_vectors: self.index.len(),
            index_kind: match self.index.scores() {
                crate::Scores::Exact => "flat",
                crate::Scores::Close => "ivf-sq8",
                crate::Scores::Coarse => "ivf-pq",
            },
            ivf_nlist: params.map(|p| p.0),
            ivf_nprobe: params.map(|p| p.1),
            index_building: self.building(),
            l1_entries: self.l1_len.load(Ordering::Relaxed),
            next_id: self.index.next_seq(),
            encrypted: self.codec.encrypted(),
            live_data_bytes: info.live_data_bytes,
            estimated_entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::embedder;
    use crate::{chat_key, CacheKey, Codec, EXACT_STRIPES};
    use serde_json::json;
    use smartllm_store::Store;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn key(q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key("t", "m", body.as_object().unwrap()).unwrap()
    }

    fn entry(k: &CacheKey, route: &str) -> Entry {
        let now = now_secs();
        Entry {
            id: 0,
            namespace: k.namespace_hex(),
            exact: hex::encode(k.exact),
            query: k.query.clone(),
            response: "{}".into(),
            route: route.into(),
            model: "m".into(),
            created_at: now,
            expires_at: now + 3600,
            version: 1,
            asked_ms: Some(now_ms()),
            tenant: Some(k.tenant.clone()),
        }
    }

    /// A new entry is in L1 once stored, even when a lookup held L1's lock
    /// at that moment (it used to be left out: `l1_entries` then counted
    /// less than was stored, and the next ask read RocksDB).
    #[test]
    fn a_stored_entry_is_in_l1_even_when_its_lock_was_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, embedder(64), Codec::plain(), 16, 100_000, None).unwrap();
        let k = key("What is our refund policy?");
        let (held, release) = (mpsc::channel::<()>(), mpsc::channel::<()>());
        let c = cache.clone();
        let holder = std::thread::spawn(move || {
            let _l1 = c.l1.lock().unwrap();
            held.0.send(()).unwrap();
            release.1.recv().unwrap();
        });
        held.1.recv().unwrap();
        let c = cache.clone();
        let k2 = k.clone();
        let writer =
            std::thread::spawn(move || c.write(entry(&k2, "faq"), None, k2.exact).unwrap());
        // The writer has stored the entry (RocksDB first, L1 last) and now
        // wants L1's lock; then the holder lets go.
        assert!(
            (0..500).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                cache
                    .db()
                    .get_cf(cache.cf(CF_EXACT), k.exact)
                    .ok()
                    .flatten()
                    .is_some()
            }),
            "the writer never stored the entry"
        );
        std::thread::sleep(Duration::from_millis(50));
        release.0.send(()).unwrap();
        holder.join().unwrap();
        writer.join().unwrap();
        assert_eq!(cache.stats().l1_entries, 1);
        assert!(cache.l1_get(&k.exact).is_some());
    }

    /// A purge of a route holds no insert up while it scans the store (which
    /// takes seconds at a million entries): here its removal waits on a lock
    /// the test holds, after the purge was recorded, and an entry of another
    /// route is stored meanwhile. The purged entry goes all the same.
    #[test]
    fn a_purge_scan_holds_no_insert_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, embedder(64), Codec::plain(), 16, 100_000, None).unwrap();
        let stripe = |k: &CacheKey| k.exact[0] as usize % EXACT_STRIPES;
        let doomed = key("What is our refund policy?");
        cache
            .write(entry(&doomed, "faq"), None, doomed.exact)
            .unwrap();
        // Another question, under another stripe of the exact-key lock.
        let kept = (0..)
            .map(|i| key(&format!("Question number {i}")))
            .find(|k| stripe(k) != stripe(&doomed))
            .unwrap();
        let sealed = Codec::plain().encode(&entry(&kept, "support")).unwrap();
        let probe = entry(&doomed, "faq");
        std::thread::scope(|s| {
            // The purge's removal takes the doomed entry's stripe: held here.
            let held = cache.exact_stripes[stripe(&doomed)].lock().unwrap();
            let purge = s.spawn(|| cache.purge(&Purge::Route("faq".into())));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !cache.purged_after(&probe, 0) {
                assert!(Instant::now() < deadline, "the purge was never recorded");
                std::thread::sleep(Duration::from_millis(5));
            }
            // Recorded, and stuck in its removal: an insert goes through.
            let (tx, rx) = mpsc::channel();
            let (c, sealed) = (&cache, &sealed);
            s.spawn(move || tx.send(c.apply_remote(sealed, None)).unwrap());
            let stored = rx.recv_timeout(Duration::from_secs(5));
            drop(held);
            assert!(
                matches!(stored, Ok(Ok(crate::Applied::Stored))),
                "an insert waited for a purge's scan: {stored:?}"
            );
            assert_eq!(purge.join().unwrap().unwrap(), 1);
        });
        assert!(cache.load_exact(&doomed.exact).unwrap().is_none());
        assert!(cache.load_exact(&kept.exact).unwrap().is_some());
    }
}
