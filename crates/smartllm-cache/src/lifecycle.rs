//! The FAISS index lifecycle. At open: load the persisted IVF index when it
//! is current, else rebuild a flat one from RocksDB (the source of truth).
//! Then, once the index outgrows its kind, train an IVF index on a background
//! thread while lookups go on, replay the writes made meanwhile, swap it in
//! and persist it. Also the explicit rebuild and the IVF threshold reload.

use crate::metric_names as m;
use crate::storage::{bytes_to_vec, NEXT_ID};
use crate::{CacheError, Codec, SemanticCache, VectorIndex};
use lru::LruCache;
use metrics::{counter, gauge};
use rocksdb::IteratorMode;
use smartllm_embed::Embedder;
use smartllm_store::{Store, CF_META, CF_VECTORS};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// `next_id` when the IVF index file was written: it holds every entry below.
const IVF_NEXT_ID: &[u8] = b"ivf_next_id";
pub const INDEX_FILE: &str = "cache.ivf";

/// A change to the live index made while a new one is being built.
pub(crate) enum Op {
    Add(u64, Vec<f32>),
    Remove(Vec<u64>),
}

impl SemanticCache {
    /// Open the cache over the store: load the persisted IVF index from
    /// `index_dir` when it is current, else rebuild from RocksDB (and train an
    /// IVF index in the background when there are `ivf_threshold` vectors).
    /// Blocking: call before the server starts or from `spawn_blocking`.
    pub fn open(
        store: Arc<Store>,
        embedder: Arc<Embedder>,
        codec: Codec,
        l1_entries: usize,
        ivf_threshold: usize,
        index_dir: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, CacheError> {
        let dim = embedder.info().dim;
        let cache = Arc::new(SemanticCache {
            store,
            embedder,
            codec,
            index: RwLock::new(VectorIndex::new_flat(dim)?),
            l1: Mutex::new(LruCache::new(
                NonZeroUsize::new(l1_entries.max(1)).expect("max(1)"),
            )),
            next_id: AtomicU64::new(1),
            ivf_threshold: AtomicUsize::new(ivf_threshold.max(1)),
            trained_for: AtomicUsize::new(0),
            index_path: index_dir.map(|d| d.join(INDEX_FILE)),
            building: Arc::new(AtomicBool::new(false)),
            pending: Mutex::new(None),
            dirty: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        });
        if !cache.load_persisted()? {
            cache.rebuild_index()?;
        }
        cache.maybe_upgrade();
        Ok(cache)
    }

    /// Change the IVF threshold (config reload).
    pub fn set_ivf_threshold(self: &Arc<Self>, n: usize) {
        self.ivf_threshold.store(n.max(1), Ordering::Relaxed);
        self.maybe_upgrade();
    }

    /// Whether a background index build is running.
    pub fn building(&self) -> bool {
        self.building.load(Ordering::SeqCst)
    }

    /// Write the IVF index to disk if it changed (no-op for a flat index).
    pub fn persist(&self) -> Result<bool, CacheError> {
        let Some(path) = &self.index_path else {
            return Ok(false);
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        // Hold the read lock: no write lands between the marker and the file.
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        if !index.is_ivf() {
            return Ok(false);
        }
        let next = self.next_id.load(Ordering::SeqCst);
        index.write_ivf(path)?;
        self.db()
            .put_cf(self.cf(CF_META), IVF_NEXT_ID, next.to_be_bytes())?;
        tracing::debug!(vectors = index.len(), path = %path.display(), "cache IVF index saved");
        Ok(true)
    }

    /// Rebuild the FAISS index from the vectors in RocksDB (the source of
    /// truth): flat at once; a large one is then re-trained as IVF in the
    /// background.
    pub fn rebuild(self: &Arc<Self>) -> Result<usize, CacheError> {
        let n = self.rebuild_index()?;
        self.maybe_upgrade();
        Ok(n)
    }

    fn stored_u64(&self, key: &[u8]) -> Result<Option<u64>, CacheError> {
        Ok(self
            .db()
            .get_cf(self.cf(CF_META), key)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes))
    }

    /// Every stored vector from `min_id` on: (ids, row-major vectors, largest id).
    fn stored_vectors(&self, min_id: u64) -> Result<(Vec<u64>, Vec<f32>, u64), CacheError> {
        let dim = self.embedder.info().dim;
        let (mut ids, mut data, mut max_id) = (Vec::new(), Vec::new(), 0u64);
        let start = min_id.to_be_bytes();
        let mode = IteratorMode::From(&start, rocksdb::Direction::Forward);
        for item in self.db().iterator_cf(self.cf(CF_VECTORS), mode) {
            let (k, v) = item?;
            let (Ok(id_bytes), Some(vec)) = (<[u8; 8]>::try_from(&k[..]), bytes_to_vec(&v)) else {
                continue;
            };
            if vec.len() != dim {
                continue;
            }
            let id = u64::from_be_bytes(id_bytes);
            ids.push(id);
            data.extend(vec);
            max_id = max_id.max(id);
        }
        Ok((ids, data, max_id))
    }

    /// Use the persisted IVF index if it is readable and current. Returns
    /// false (after saying why) when the index must be rebuilt instead.
    fn load_persisted(&self) -> Result<bool, CacheError> {
        let Some(path) = self.index_path.clone() else {
            return Ok(false);
        };
        if !path.exists() {
            return Ok(false);
        }
        let dim = self.embedder.info().dim;
        let mut index = match VectorIndex::read_ivf(&path, dim) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "the cache index file is unusable; rebuilding it from RocksDB (no entry is lost)");
                let _ = std::fs::remove_file(&path);
                return Ok(false);
            }
        };
        let Some(ivf_next) = self.stored_u64(IVF_NEXT_ID)? else {
            tracing::warn!(path = %path.display(), "the cache index file has no sync marker; rebuilding from RocksDB");
            return Ok(false);
        };
        // The file must hold exactly the stored vectors below its marker
        // (anything removed since it was written makes it stale).
        let mut below = 0usize;
        let mut raw = self.db().raw_iterator_cf(self.cf(CF_VECTORS));
        raw.seek_to_first();
        while let Some(k) = raw.key() {
            if <[u8; 8]>::try_from(k)
                .map(u64::from_be_bytes)
                .is_ok_and(|id| id < ivf_next)
            {
                below += 1;
            } else {
                break;
            }
            raw.next();
        }
        raw.status()?;
        if below != index.len() {
            tracing::warn!(
                file = index.len(),
                stored = below,
                "the cache index file is out of date; rebuilding from RocksDB"
            );
            return Ok(false);
        }
        let (ids, data, max_id) = self.stored_vectors(ivf_next)?;
        for (i, id) in ids.iter().enumerate() {
            index.add(*id, &data[i * dim..(i + 1) * dim])?;
        }
        let next = self
            .stored_u64(NEXT_ID)?
            .unwrap_or(1)
            .max(max_id + 1)
            .max(ivf_next);
        self.next_id.store(next, Ordering::SeqCst);
        self.trained_for
            .store(index.len().max(1), Ordering::Relaxed);
        let n = index.len();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        gauge!(m::INDEX_VECTORS).set(n as f64);
        tracing::info!(vectors = n, added_since_saved = ids.len(), path = %path.display(), "cache IVF index loaded");
        Ok(true)
    }

    /// Start a background IVF build when the index outgrew its kind.
    pub(crate) fn maybe_upgrade(self: &Arc<Self>) {
        let n = self.index.read().map(|i| i.len()).unwrap_or(0);
        let trained = self.trained_for.load(Ordering::Relaxed);
        let threshold = self.ivf_threshold.load(Ordering::Relaxed);
        let due = if trained == 0 {
            n >= threshold
        } else {
            n >= trained * 4
        };
        if !due || self.building.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        let flag = self.building.clone();
        let spawned = std::thread::Builder::new().name("smartllm-ivf".into()).spawn(move || {
            if let Err(e) = this.build_ivf() {
                tracing::error!(error = %e, "building the IVF cache index failed; the current index stays");
                if let Ok(mut p) = this.pending.lock() {
                    *p = None;
                }
            }
            // Release the cache (and the store) before saying the build is over.
            drop(this);
            flag.store(false, Ordering::SeqCst);
        });
        if spawned.is_err() {
            self.building.store(false, Ordering::SeqCst);
        }
    }

    /// Train an IVF index from RocksDB while lookups go on, replay the writes
    /// made meanwhile, swap it in, persist it.
    fn build_ivf(&self) -> Result<(), CacheError> {
        let started = Instant::now();
        let generation;
        {
            // Under the write lock: every write from here on is also logged.
            let _guard = self.index.write().unwrap_or_else(|p| p.into_inner());
            generation = self.generation.load(Ordering::SeqCst);
            *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        }
        let (ids, data, _) = self.stored_vectors(0)?;
        if ids.is_empty() {
            *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(());
        }
        let dim = self.embedder.info().dim;
        let mut fresh = VectorIndex::train_ivf(dim, &data, &ids)?;
        drop(data);
        let trained_ms = started.elapsed().as_millis() as u64;
        {
            let mut live = self.index.write().unwrap_or_else(|p| p.into_inner());
            let ops = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            if self.generation.load(Ordering::SeqCst) != generation {
                tracing::info!(
                    "cache purged or rebuilt during the IVF build; the build is discarded"
                );
                return Ok(());
            }
            let replayed = ops.len();
            for op in ops {
                match op {
                    Op::Add(id, v) => {
                        // The snapshot may already hold it: never twice.
                        fresh.remove(&[id])?;
                        fresh.add(id, &v)?;
                    }
                    Op::Remove(ids) => {
                        fresh.remove(&ids)?;
                    }
                }
            }
            *live = fresh;
            self.trained_for.store(live.len().max(1), Ordering::Relaxed);
            gauge!(m::INDEX_VECTORS).set(live.len() as f64);
            let (nlist, nprobe) = live.ivf_params().unwrap_or_default();
            tracing::info!(
                vectors = live.len(),
                nlist,
                nprobe,
                replayed,
                trained_ms,
                "cache IVF index built and swapped in"
            );
        }
        counter!(m::INDEX_REBUILDS).increment(1);
        self.dirty.store(true, Ordering::Relaxed);
        self.persist()?;
        Ok(())
    }

    pub(crate) fn log_op(&self, op: Op) {
        if let Ok(mut p) = self.pending.lock() {
            if let Some(ops) = p.as_mut() {
                ops.push(op);
            }
        }
    }

    fn rebuild_index(&self) -> Result<usize, CacheError> {
        if let Some(p) = &self.index_path {
            let _ = std::fs::remove_file(p);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.trained_for.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let dim = self.embedder.info().dim;
        let mut fresh = VectorIndex::new_flat(dim)?;
        let mut max_id = 0u64;
        let mut skipped = 0usize;
        for item in self
            .db()
            .iterator_cf(self.cf(CF_VECTORS), IteratorMode::Start)
        {
            let (k, v) = item?;
            let (Ok(id_bytes), Some(vec)) = (<[u8; 8]>::try_from(&k[..]), bytes_to_vec(&v)) else {
                skipped += 1;
                continue;
            };
            let id = u64::from_be_bytes(id_bytes);
            if vec.len() != dim {
                skipped += 1;
                continue;
            }
            fresh.add(id, &vec)?;
            max_id = max_id.max(id);
        }
        let stored_next = self
            .db()
            .get_cf(self.cf(CF_META), NEXT_ID)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        self.next_id
            .store(stored_next.max(max_id + 1), Ordering::SeqCst);
        let n = fresh.len();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        counter!(m::INDEX_REBUILDS).increment(1);
        gauge!(m::INDEX_VECTORS).set(n as f64);
        tracing::info!(
            vectors = n,
            skipped,
            ms = started.elapsed().as_millis() as u64,
            "cache index rebuilt from RocksDB"
        );
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::embedder;
    use crate::{chat_key, CacheKey, Lookup, Purge};
    use serde_json::json;
    use smartllm_config::CachePolicy;
    use std::time::Duration;
    const MAX_SEQ: usize = 64;

    fn key(q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key("t", "m", body.as_object().unwrap()).unwrap()
    }

    fn wait_ivf(cache: &SemanticCache) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while (cache.building() || cache.stats().index_kind != "ivf-sq8")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(cache.stats().index_kind, "ivf-sq8", "{:?}", cache.stats());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flat_becomes_ivf_without_losing_entries_persists_and_survives_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = CachePolicy {
            enabled: true,
            semantic: true,
            similarity_threshold: 0.9,
            ttl: Duration::from_secs(3600),
            version: 1,
            max_temperature: 1.0,
        };
        let topics = [
            "rust",
            "python",
            "databases",
            "networking",
            "cooking",
            "gardening",
            "astronomy",
            "history",
        ];
        let question = |i: usize| {
            format!(
                "Question number {i} about {} and topic {}",
                topics[i % 8],
                i * 7919 % 1000
            )
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(
                store.clone(),
                emb.clone(),
                Codec::plain(),
                10,
                300,
                Some(dir.path()),
            )
            .unwrap();
            // Fill past the threshold; keep inserting while the IVF build runs.
            for i in 0..400 {
                cache
                    .insert(
                        key(&question(i)),
                        None,
                        format!("{{\"a\":{i}}}"),
                        &p,
                        "auto",
                        "m",
                    )
                    .await
                    .unwrap();
            }
            wait_ivf(&cache);
            let s = cache.stats();
            assert_eq!(s.index_vectors, 400, "{s:?}");
            // Every entry is still found, by its own text (exact L1 is tiny: most go semantic).
            for i in (0..400).step_by(37) {
                match cache.lookup(&key(&question(i)), &p, 8).await.unwrap() {
                    Lookup::Hit { entry, .. } => {
                        assert_eq!(entry.response, format!("{{\"a\":{i}}}"))
                    }
                    miss => panic!("entry {i} lost: {miss:?}"),
                }
            }
            assert!(dir.path().join(INDEX_FILE).exists());
            cache
                .insert(
                    key("one more after saving"),
                    None,
                    "{}".into(),
                    &p,
                    "auto",
                    "m",
                )
                .await
                .unwrap();
            cache.persist().unwrap();
            cache
                .insert(
                    key("and one after the last save"),
                    None,
                    "{}".into(),
                    &p,
                    "auto",
                    "m",
                )
                .await
                .unwrap();
            store.flush().unwrap();
        }
        {
            // Reload: the saved IVF plus what came after it.
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(
                store.clone(),
                emb.clone(),
                Codec::plain(),
                10,
                300,
                Some(dir.path()),
            )
            .unwrap();
            assert_eq!(cache.stats().index_kind, "ivf-sq8");
            assert_eq!(cache.stats().index_vectors, 402);
            assert!(matches!(
                cache
                    .lookup(&key("and one after the last save"), &p, 8)
                    .await
                    .unwrap(),
                Lookup::Hit { .. }
            ));
            store.flush().unwrap();
        }
        // A corrupt file: rebuilt from RocksDB, nothing lost.
        std::fs::write(dir.path().join(INDEX_FILE), b"not a faiss index").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, emb, Codec::plain(), 10, 300, Some(dir.path())).unwrap();
        assert_eq!(cache.stats().index_vectors, 402);
        assert!(matches!(
            cache.lookup(&key(&question(123)), &p, 8).await.unwrap(),
            Lookup::Hit { .. }
        ));
        wait_ivf(&cache);
        assert_eq!(cache.purge(&Purge::All).unwrap(), 402);
        assert_eq!(cache.stats().index_kind, "flat");
        assert!(!dir.path().join(INDEX_FILE).exists());
    }
}
