//! The FAISS index lifecycle. At open: re-key entries stored before ids
//! carried namespace tags, then load the persisted IVF index when it is
//! current, else rebuild a flat one from RocksDB (the source of truth). Then,
//! once the index outgrows its kind, train an IVF index on a background
//! thread while lookups go on, replay the writes made meanwhile, swap it in
//! and persist it. Also the explicit rebuild and the IVF threshold reload.

use crate::ids::{self, Tagger};
use crate::index::SharedIndex;
use crate::metric_names as m;
use crate::storage::{bytes_to_vec, NEXT_ID};
use crate::{CacheError, Codec, SemanticCache, VectorIndex};
use lru::LruCache;
use metrics::{counter, gauge};
use smartllm_embed::Embedder;
use smartllm_store::{Store, CF_META, CF_VECTORS};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The persist marker: the index file holds every stored vector whose
/// sequence number is below it, and no other. (Files saved before ids carried
/// tags have the older `ivf_next_id` marker only, and are rebuilt.)
const IVF_MARKER: &[u8] = b"ivf_next_seq";
pub const INDEX_FILE: &str = "cache.ivf";
/// The IVF build's niceness: below the embedder's (+10), so on a busy
/// machine the build waits rather than any request.
pub const IVF_BUILD_NICE: i32 = 19;

/// Stored vectors: (ids, row-major vectors).
type Vectors = (Vec<u64>, Vec<f32>);

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
        let meta = store
            .db()
            .cf_handle(CF_META)
            .expect("the store creates every column family");
        let tagger = Tagger::load_or_create(store.db(), meta)?;
        let cache = Arc::new(SemanticCache {
            store,
            embedder,
            codec,
            index: SharedIndex::new(VectorIndex::new_flat(dim)?),
            tagger,
            l1: Mutex::new(LruCache::new(
                NonZeroUsize::new(l1_entries.max(1)).expect("max(1)"),
            )),
            l1_len: AtomicUsize::new(0),
            l1_epoch: std::sync::atomic::AtomicU64::new(0),
            ivf_threshold: AtomicUsize::new(ivf_threshold.max(1)),
            trained_for: AtomicUsize::new(0),
            index_path: index_dir.map(|d| d.join(INDEX_FILE)),
            building: Arc::new(AtomicBool::new(false)),
            dirty: AtomicBool::new(false),
            verdicts: Mutex::new(LruCache::new(
                NonZeroUsize::new(crate::VERDICTS).expect("non-zero"),
            )),
            verdict_hasher: Default::default(),
            cached_states: Mutex::new(LruCache::new(
                NonZeroUsize::new(crate::KEPT_STATES).expect("non-zero"),
            )),
            purged: Mutex::new(Default::default()),
            purge_gate: Default::default(),
            exact_stripes: std::array::from_fn(|_| Default::default()),
        });
        cache.migrate_untagged()?;
        if !cache.load_persisted()? {
            cache.rebuild_index()?;
        }
        cache.maybe_upgrade();
        Ok(cache)
    }

    /// Change the IVF threshold (config reload). Takes no lock.
    pub fn set_ivf_threshold(self: &Arc<Self>, n: usize) {
        self.ivf_threshold.store(n.max(1), Ordering::Relaxed);
        self.maybe_upgrade();
    }

    /// Whether a background index build is running.
    pub fn building(&self) -> bool {
        self.building.load(Ordering::SeqCst)
    }

    /// Write the IVF index to disk if it changed (no-op for a flat index).
    /// Lookups go on meanwhile; changes wait in the index's queue.
    pub fn persist(&self) -> Result<bool, CacheError> {
        let Some(path) = &self.index_path else {
            return Ok(false);
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        let saved = self.index.frozen(|index, marker| {
            if !index.is_ivf() {
                return Ok(false);
            }
            index.write_ivf(path)?;
            self.db()
                .put_cf(self.cf(CF_META), IVF_MARKER, marker.to_be_bytes())?;
            tracing::debug!(vectors = index.len(), path = %path.display(), "cache IVF index saved");
            Ok(true)
        });
        if saved.is_err() {
            // Try again next time.
            self.dirty.store(true, Ordering::Relaxed);
        }
        saved
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

    /// One pass over the stored vectors: those whose sequence number is at
    /// least `from_seq` (with their vectors), how many are below it, the
    /// largest sequence number seen and how many were skipped (bad size).
    fn stored_vectors(&self, from_seq: u64) -> Result<(Vectors, usize, u64, usize), CacheError> {
        let dim = self.index.dim();
        let (mut ids, mut data) = (Vec::new(), Vec::new());
        let (mut below, mut max_seq, mut skipped) = (0usize, 0u64, 0usize);
        let mut it = self.db().raw_iterator_cf(self.cf(CF_VECTORS));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Ok(id) = <[u8; 8]>::try_from(k).map(u64::from_be_bytes) else {
                skipped += 1;
                it.next();
                continue;
            };
            if v.len() != dim * 4 {
                skipped += 1;
                it.next();
                continue;
            }
            let seq = ids::seq(id);
            max_seq = max_seq.max(seq);
            if seq < from_seq {
                below += 1;
            } else if let Some(vec) = bytes_to_vec(v) {
                ids.push(id);
                data.extend(vec);
            }
            it.next();
        }
        it.status()?;
        Ok(((ids, data), below, max_seq, skipped))
    }

    /// Never hand out a sequence number at or below one stored.
    fn restore_next_seq(&self, max_seq: u64) -> Result<(), CacheError> {
        let stored = self.stored_u64(NEXT_ID)?.unwrap_or(1);
        self.index.raise_next_seq(stored.max(max_seq + 1));
        Ok(())
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
        let dim = self.index.dim();
        let mut index = match VectorIndex::read_ivf(&path, dim) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "the cache index file is unusable; rebuilding it from RocksDB (no entry is lost)");
                let _ = std::fs::remove_file(&path);
                return Ok(false);
            }
        };
        let Some(marker) = self.stored_u64(IVF_MARKER)? else {
            tracing::warn!(path = %path.display(), "the cache index file has no sync marker (or predates namespace-tagged ids); rebuilding from RocksDB");
            return Ok(false);
        };
        // The file must hold exactly the stored vectors below its marker
        // (anything removed since it was written makes it stale).
        let ((ids, data), below, max_seq, _) = self.stored_vectors(marker)?;
        if below != index.len() {
            tracing::warn!(
                file = index.len(),
                stored = below,
                "the cache index file is out of date; rebuilding from RocksDB"
            );
            return Ok(false);
        }
        index.add_batch(&ids, &data)?;
        self.restore_next_seq(max_seq.max(marker.saturating_sub(1)))?;
        self.trained_for
            .store(index.len().max(1), Ordering::Relaxed);
        let n = index.len();
        self.index.reset(index);
        gauge!(m::INDEX_VECTORS).set(n as f64);
        tracing::info!(vectors = n, added_since_saved = ids.len(), path = %path.display(), "cache IVF index loaded");
        Ok(true)
    }

    /// Start a background IVF build (at nice [`IVF_BUILD_NICE`]) when the
    /// index outgrew its kind. Takes
    /// no lock (async callers).
    pub(crate) fn maybe_upgrade(self: &Arc<Self>) {
        let n = self.index.len();
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
            // Training (k-means on FAISS's OpenMP team, which inherits this)
            // yields to requests and to the embedder: lowest priority.
            smartllm_embed::lower_priority(IVF_BUILD_NICE);
            if let Err(e) = this.build_ivf() {
                tracing::error!(error = %e, "building the IVF cache index failed; the current index stays");
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
        // Every change applied from here on is logged for the replay.
        let token = self.index.begin_build();
        let trained = (|| {
            let ((ids, data), ..) = self.stored_vectors(0)?;
            if ids.is_empty() {
                return Ok(None);
            }
            Ok::<_, CacheError>(Some(VectorIndex::train_ivf(self.index.dim(), &data, &ids)?))
        })();
        let fresh = match trained {
            Ok(Some(f)) => f,
            Ok(None) => {
                self.index.abandon_build(token);
                return Ok(());
            }
            Err(e) => {
                self.index.abandon_build(token);
                return Err(e);
            }
        };
        let trained_ms = started.elapsed().as_millis() as u64;
        let (nlist, nprobe) = fresh.ivf_params().unwrap_or_default();
        let Some(replayed) = self.index.finish_build(token, fresh)? else {
            tracing::info!("cache purged or rebuilt during the IVF build; the build is discarded");
            return Ok(());
        };
        let n = self.index.len();
        self.trained_for.store(n.max(1), Ordering::Relaxed);
        gauge!(m::INDEX_VECTORS).set(n as f64);
        tracing::info!(
            vectors = n,
            nlist,
            nprobe,
            replayed,
            trained_ms,
            "cache IVF index built and swapped in"
        );
        counter!(m::INDEX_REBUILDS).increment(1);
        self.dirty.store(true, Ordering::Relaxed);
        self.persist()?;
        Ok(())
    }

    /// A flat index of every stored vector, swapped in (writes made during
    /// the scan are replayed on it).
    fn rebuild_index(&self) -> Result<usize, CacheError> {
        if let Some(p) = &self.index_path {
            let _ = std::fs::remove_file(p);
        }
        self.trained_for.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let token = self.index.begin_build();
        let built = (|| {
            let ((ids, data), _, max_seq, skipped) = self.stored_vectors(0)?;
            let mut fresh = VectorIndex::new_flat(self.index.dim())?;
            fresh.add_batch(&ids, &data)?;
            self.restore_next_seq(max_seq)?;
            Ok::<_, CacheError>((fresh, skipped))
        })();
        let (fresh, skipped) = match built {
            Ok(b) => b,
            Err(e) => {
                self.index.abandon_build(token);
                return Err(e);
            }
        };
        let n = fresh.len();
        if self.index.finish_build(token, fresh)?.is_none() {
            tracing::info!("a newer cache index build superseded this rebuild");
            return Ok(n);
        }
        let n = self.index.len();
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
    use crate::test_support::{embedder, wait_ivf};
    use crate::{chat_key, CacheKey, Lookup, Purge};
    use serde_json::json;
    use smartllm_config::CachePolicy;
    use std::time::Duration;
    const MAX_SEQ: usize = 64;

    fn key(q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key("t", "m", body.as_object().unwrap()).unwrap()
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
            verifier: None,
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
