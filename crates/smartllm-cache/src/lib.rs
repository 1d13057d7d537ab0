//! The semantic cache. Lookups go L1 (exact key, in memory, bounded) ->
//! RocksDB exact key -> embed the last user turn -> FAISS top-k -> verify
//! (namespace, cosine >= threshold, TTL, version, precision guard). RocksDB is
//! the source of truth (entries, vectors, exact keys); the FAISS index is
//! rebuilt from it at start. All blocking work (RocksDB, FAISS) runs on the
//! blocking pool, the model on the embedder's own threads.

pub mod entry;
pub mod guard;
pub mod index;
pub mod key;

pub use entry::{Codec, Entry};
pub use guard::{near_miss, Exclusions};
pub use index::{IndexError, VectorIndex};
pub use key::{chat_key, CacheKey};

use lru::LruCache;
use metrics::{counter, gauge, histogram};
use rocksdb::{IteratorMode, WriteBatch};
use smartllm_config::CachePolicy;
use smartllm_embed::Embedder;
use smartllm_store::{Store, CF_ENTRIES, CF_EXACT, CF_META, CF_VECTORS};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub mod metric_names {
    pub const LOOKUPS: &str = "smartllm_cache_lookups_total";
    pub const SIMILARITY: &str = "smartllm_cache_similarity";
    pub const SEARCH_SECONDS: &str = "smartllm_cache_search_seconds";
    pub const EMBED_SECONDS: &str = "smartllm_cache_embed_seconds";
    pub const INDEX_VECTORS: &str = "smartllm_cache_index_vectors";
    pub const INDEX_REBUILDS: &str = "smartllm_cache_index_rebuilds_total";
    pub const INSERTS: &str = "smartllm_cache_inserts_total";
    pub const REMOVED: &str = "smartllm_cache_removed_total";
    pub const BYTES: &str = "smartllm_cache_bytes";
}
use metric_names as m;

const NEXT_ID: &[u8] = b"next_id";
/// `next_id` when the IVF index file was written: it holds every entry below.
const IVF_NEXT_ID: &[u8] = b"ivf_next_id";
pub const INDEX_FILE: &str = "cache.ivf";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("index: {0}")]
    Index(#[from] IndexError),
    #[error("embedding: {0}")]
    Embed(#[from] smartllm_embed::EmbedError),
    #[error("cache task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    Exact,
    Semantic,
}

impl HitKind {
    pub fn header(self) -> &'static str {
        match self {
            HitKind::Exact => "hit-exact",
            HitKind::Semantic => "hit-semantic",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Lookup {
    Hit {
        entry: Arc<Entry>,
        kind: HitKind,
        similarity: f32,
    },
    Miss {
        embedding: Option<Vec<f32>>,
        best_similarity: Option<f32>,
        rejected: Option<&'static str>,
    },
}

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    All,
    Namespace(String),
    Route(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStats {
    pub index_vectors: usize,
    pub index_kind: &'static str,
    pub ivf_nlist: Option<usize>,
    pub ivf_nprobe: Option<usize>,
    pub index_building: bool,
    pub l1_entries: usize,
    pub next_id: u64,
    pub encrypted: bool,
    pub live_data_bytes: u64,
    pub estimated_entries: u64,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A change to the live index made while a new one is being built.
enum Op {
    Add(u64, Vec<f32>),
    Remove(Vec<u64>),
}

pub struct SemanticCache {
    store: Arc<Store>,
    embedder: Arc<Embedder>,
    codec: Codec,
    index: RwLock<VectorIndex>,
    l1: Mutex<LruCache<[u8; 32], Arc<Entry>>>,
    next_id: AtomicU64,
    /// Vectors at which the flat index is replaced by a trained IVF one.
    ivf_threshold: AtomicUsize,
    /// Size the current IVF index was trained for (0 = flat).
    trained_for: AtomicUsize,
    index_path: Option<PathBuf>,
    building: Arc<AtomicBool>,
    /// Some while a build runs: writes to the live index are replayed on the new one.
    pending: Mutex<Option<Vec<Op>>>,
    dirty: AtomicBool,
    /// Bumped by purge-all and full rebuilds: a build that started before is void.
    generation: AtomicU64,
}

fn valid(e: &Entry, policy: &CachePolicy, now: u64) -> bool {
    !e.expired(now) && e.version == policy.version
}

fn vec_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_vec(b: &[u8]) -> Option<Vec<f32>> {
    if b.len() % 4 != 0 {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
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
    fn maybe_upgrade(self: &Arc<Self>) {
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

    /// Whether a background index build is running.
    pub fn building(&self) -> bool {
        self.building.load(Ordering::SeqCst)
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

    fn log_op(&self, op: Op) {
        if let Ok(mut p) = self.pending.lock() {
            if let Some(ops) = p.as_mut() {
                ops.push(op);
            }
        }
    }

    fn db(&self) -> &rocksdb::DB {
        self.store.db()
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db()
            .cf_handle(name)
            .expect("the store creates every column family")
    }

    /// Rebuild the FAISS index from the vectors in RocksDB (the source of
    /// truth): flat at once; a large one is then re-trained as IVF in the
    /// background.
    pub fn rebuild(self: &Arc<Self>) -> Result<usize, CacheError> {
        let n = self.rebuild_index()?;
        self.maybe_upgrade();
        Ok(n)
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

    fn load(&self, id: u64) -> Result<Option<Entry>, CacheError> {
        let Some(bytes) = self.db().get_cf(self.cf(CF_ENTRIES), id.to_be_bytes())? else {
            return Ok(None);
        };
        match self.codec.decode(&bytes) {
            Ok(e) => Ok(Some(e)),
            Err(err) => {
                // Never serve what cannot be read: drop it.
                tracing::warn!(id, error = %err, "dropping unreadable cache entry");
                counter!(m::REMOVED, "reason" => "unreadable").increment(1);
                self.remove_ids(&[(id, None)])?;
                Ok(None)
            }
        }
    }

    fn load_exact(&self, exact: &[u8; 32]) -> Result<Option<Entry>, CacheError> {
        let Some(id) = self.db().get_cf(self.cf(CF_EXACT), exact)? else {
            return Ok(None);
        };
        let Ok(id) = <[u8; 8]>::try_from(&id[..]) else {
            return Ok(None);
        };
        self.load(u64::from_be_bytes(id))
    }

    /// Delete entries (and their vectors, exact keys and L1 copies).
    fn remove_ids(&self, ids: &[(u64, Option<String>)]) -> Result<(), CacheError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (id, exact) in ids {
            batch.delete_cf(self.cf(CF_ENTRIES), id.to_be_bytes());
            batch.delete_cf(self.cf(CF_VECTORS), id.to_be_bytes());
            if let Some(ex) = exact.as_ref().and_then(|h| hex::decode(h).ok()) {
                // Only if it still points at this entry.
                if self.db().get_cf(self.cf(CF_EXACT), &ex)?.as_deref()
                    == Some(&id.to_be_bytes()[..])
                {
                    batch.delete_cf(self.cf(CF_EXACT), &ex);
                }
                if let (Ok(k), Ok(mut l1)) = (<[u8; 32]>::try_from(&ex[..]), self.l1.lock()) {
                    l1.pop(&k);
                }
            }
        }
        self.db().write(batch)?;
        let just_ids: Vec<u64> = ids.iter().map(|(i, _)| *i).collect();
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        index.remove(&just_ids)?;
        self.log_op(Op::Remove(just_ids));
        self.dirty.store(true, Ordering::Relaxed);
        gauge!(m::INDEX_VECTORS).set(index.len() as f64);
        Ok(())
    }

    fn l1_get(&self, exact: &[u8; 32]) -> Option<Arc<Entry>> {
        self.l1.lock().ok()?.get(exact).cloned()
    }

    fn l1_put(&self, exact: [u8; 32], e: Arc<Entry>) {
        if let Ok(mut l1) = self.l1.lock() {
            l1.put(exact, e);
        }
    }

    /// Look a request up. `semantic` false limits it to exact matches.
    pub async fn lookup(
        self: &Arc<Self>,
        key: &CacheKey,
        policy: &CachePolicy,
        top_k: usize,
    ) -> Result<Lookup, CacheError> {
        let now = now_secs();
        if let Some(e) = self.l1_get(&key.exact) {
            if valid(&e, policy, now) {
                counter!(m::LOOKUPS, "result" => "hit_exact").increment(1);
                return Ok(Lookup::Hit {
                    entry: e,
                    kind: HitKind::Exact,
                    similarity: 1.0,
                });
            }
        }
        let this = self.clone();
        let exact = key.exact;
        let stored = tokio::task::spawn_blocking(move || this.load_exact(&exact))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        if let Some(e) = stored {
            if valid(&e, policy, now) && e.namespace == key.namespace_hex() {
                let e = Arc::new(e);
                self.l1_put(key.exact, e.clone());
                counter!(m::LOOKUPS, "result" => "hit_exact").increment(1);
                return Ok(Lookup::Hit {
                    entry: e,
                    kind: HitKind::Exact,
                    similarity: 1.0,
                });
            }
        }
        if !policy.semantic {
            counter!(m::LOOKUPS, "result" => "miss").increment(1);
            return Ok(Lookup::Miss {
                embedding: None,
                best_similarity: None,
                rejected: None,
            });
        }
        let t = Instant::now();
        let embedding = self
            .embedder
            .embed(vec![key.query.clone()])
            .await?
            .pop()
            .unwrap_or_default();
        histogram!(m::EMBED_SECONDS).record(t.elapsed().as_secs_f64());

        let this = self.clone();
        let (ns, query, threshold, version) = (
            key.namespace_hex(),
            key.query.clone(),
            policy.similarity_threshold,
            policy.version,
        );
        let probe = embedding.clone();
        let found = tokio::task::spawn_blocking(move || {
            this.search_verify(&probe, &ns, &query, threshold, version, top_k, now)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        match found {
            Verified::Hit(e, sim) => {
                histogram!(m::SIMILARITY).record(sim as f64);
                counter!(m::LOOKUPS, "result" => "hit_semantic").increment(1);
                Ok(Lookup::Hit {
                    entry: Arc::new(e),
                    kind: HitKind::Semantic,
                    similarity: sim,
                })
            }
            Verified::Miss { best, rejected } => {
                if let Some(b) = best {
                    histogram!(m::SIMILARITY).record(b as f64);
                }
                let result = if rejected.is_some() {
                    "miss_guard"
                } else {
                    "miss"
                };
                counter!(m::LOOKUPS, "result" => result).increment(1);
                Ok(Lookup::Miss {
                    embedding: Some(embedding),
                    best_similarity: best,
                    rejected,
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn search_verify(
        &self,
        embedding: &[f32],
        namespace: &str,
        query: &str,
        threshold: f32,
        version: u32,
        top_k: usize,
        now: u64,
    ) -> Result<Verified, CacheError> {
        let t = Instant::now();
        let hits = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .search(embedding, top_k)?;
        histogram!(m::SEARCH_SECONDS).record(t.elapsed().as_secs_f64());
        let mut best = None;
        let mut rejected = None;
        for (id, sim) in hits {
            let Some(e) = self.load(id)? else { continue };
            if e.namespace != namespace {
                continue;
            }
            if best.is_none() {
                best = Some(sim);
            }
            if sim < threshold {
                break;
            }
            if e.expired(now) || e.version != version {
                continue;
            }
            if let Some(why) = near_miss(query, &e.query) {
                rejected = Some(why);
                continue;
            }
            return Ok(Verified::Hit(e, sim));
        }
        Ok(Verified::Miss { best, rejected })
    }

    /// Store an answer. Runs off the request path (spawn it).
    #[allow(clippy::too_many_arguments)]
    pub async fn insert(
        self: &Arc<Self>,
        key: CacheKey,
        embedding: Option<Vec<f32>>,
        response: String,
        policy: &CachePolicy,
        route: &str,
        model: &str,
    ) -> Result<u64, CacheError> {
        let embedding = match embedding {
            Some(e) => Some(e),
            None if policy.semantic => self.embedder.embed(vec![key.query.clone()]).await?.pop(),
            None => None,
        };
        let now = now_secs();
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::SeqCst),
            namespace: key.namespace_hex(),
            exact: hex::encode(key.exact),
            query: key.query.clone(),
            response,
            route: route.to_string(),
            model: model.to_string(),
            created_at: now,
            expires_at: now + policy.ttl.as_secs(),
            version: policy.version,
        };
        let this = self.clone();
        let id = tokio::task::spawn_blocking(move || this.write(entry, embedding, key.exact))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))??;
        self.maybe_upgrade();
        Ok(id)
    }

    fn write(
        &self,
        entry: Entry,
        embedding: Option<Vec<f32>>,
        exact: [u8; 32],
    ) -> Result<u64, CacheError> {
        let id = entry.id;
        let previous = self
            .db()
            .get_cf(self.cf(CF_EXACT), exact)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes);
        let mut batch = WriteBatch::default();
        let encoded = self.codec.encode(&entry);
        batch.put_cf(self.cf(CF_ENTRIES), id.to_be_bytes(), &encoded);
        if let Some(v) = &embedding {
            batch.put_cf(self.cf(CF_VECTORS), id.to_be_bytes(), vec_to_bytes(v));
        }
        batch.put_cf(self.cf(CF_EXACT), exact, id.to_be_bytes());
        batch.put_cf(self.cf(CF_META), NEXT_ID, (id + 1).to_be_bytes());
        if let Some(old) = previous {
            batch.delete_cf(self.cf(CF_ENTRIES), old.to_be_bytes());
            batch.delete_cf(self.cf(CF_VECTORS), old.to_be_bytes());
        }
        self.db().write(batch)?;
        {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = previous {
                index.remove(&[old])?;
                self.log_op(Op::Remove(vec![old]));
            }
            if let Some(v) = &embedding {
                index.add(id, v)?;
                self.log_op(Op::Add(id, v.clone()));
            }
            self.dirty.store(true, Ordering::Relaxed);
            gauge!(m::INDEX_VECTORS).set(index.len() as f64);
        }
        self.l1_put(exact, Arc::new(entry));
        counter!(m::INSERTS).increment(1);
        Ok(id)
    }

    /// Remove entries matching `what`; returns how many.
    pub fn purge(&self, what: &Purge) -> Result<u64, CacheError> {
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
            if let Ok(mut l1) = self.l1.lock() {
                l1.clear();
            }
            {
                let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
                *index = VectorIndex::new_flat(self.embedder.info().dim)?;
                // A build in flight started from the old contents: void it.
                self.generation.fetch_add(1, Ordering::SeqCst);
            }
            self.trained_for.store(0, Ordering::Relaxed);
            if let Some(p) = &self.index_path {
                let _ = std::fs::remove_file(p);
            }
            gauge!(m::INDEX_VECTORS).set(0.0);
            counter!(m::REMOVED, "reason" => "purge").increment(n);
            return Ok(n);
        }
        let n = self.remove_where(|e| match what {
            Purge::Namespace(ns) => &e.namespace == ns,
            Purge::Route(r) => &e.route == r || &e.model == r,
            Purge::All => true,
        })?;
        counter!(m::REMOVED, "reason" => "purge").increment(n);
        Ok(n)
    }

    /// Remove expired entries and those `stale` says are outdated (version bumps).
    pub fn sweep(&self, stale: impl Fn(&Entry) -> bool) -> Result<u64, CacheError> {
        let now = now_secs();
        let n = self.remove_where(|e| e.expired(now) || stale(e))?;
        counter!(m::REMOVED, "reason" => "expired").increment(n);
        gauge!(m::BYTES).set(self.store.info().live_data_bytes as f64);
        Ok(n)
    }

    fn remove_where(&self, pred: impl Fn(&Entry) -> bool) -> Result<u64, CacheError> {
        let mut doomed = Vec::new();
        for item in self
            .db()
            .iterator_cf(self.cf(CF_ENTRIES), IteratorMode::Start)
        {
            let (k, v) = item?;
            let Ok(id) = <[u8; 8]>::try_from(&k[..]).map(u64::from_be_bytes) else {
                continue;
            };
            match self.codec.decode(&v) {
                Ok(e) if pred(&e) => doomed.push((id, Some(e.exact))),
                Ok(_) => {}
                Err(_) => doomed.push((id, None)),
            }
        }
        let n = doomed.len() as u64;
        for chunk in doomed.chunks(1024) {
            self.remove_ids(chunk)?;
        }
        Ok(n)
    }

    pub fn stats(&self) -> CacheStats {
        let info = self.store.info();
        let estimated_entries = self
            .db()
            .property_int_value_cf(self.cf(CF_ENTRIES), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0);
        let (kind, params) = self
            .index
            .read()
            .map(|i| (if i.is_ivf() { "ivf-sq8" } else { "flat" }, i.ivf_params()))
            .unwrap_or(("flat", None));
        CacheStats {
            index_vectors: self.index.read().map(|i| i.len()).unwrap_or(0),
            index_kind: kind,
            ivf_nlist: params.map(|p| p.0),
            ivf_nprobe: params.map(|p| p.1),
            index_building: self.building.load(Ordering::SeqCst),
            l1_entries: self.l1.lock().map(|l| l.len()).unwrap_or(0),
            next_id: self.next_id.load(Ordering::SeqCst),
            encrypted: self.codec.encrypted(),
            live_data_bytes: info.live_data_bytes,
            estimated_entries,
        }
    }
}

enum Verified {
    Hit(Entry, f32),
    Miss {
        best: Option<f32>,
        rejected: Option<&'static str>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    const MAX_SEQ: usize = 128;

    fn embedder() -> Arc<Embedder> {
        Arc::new(
            Embedder::load(&smartllm_embed::local_assets(MAX_SEQ))
                .expect("embedding assets (run packaging/fetch-assets.sh; make test does)"),
        )
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            enabled: true,
            semantic: true,
            similarity_threshold: 0.9,
            ttl: Duration::from_secs(3600),
            version: 1,
            max_temperature: 1.0,
        }
    }

    fn key(tenant: &str, q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key(tenant, "m", body.as_object().unwrap()).unwrap()
    }

    fn is_hit(l: &Lookup) -> Option<HitKind> {
        match l {
            Lookup::Hit { kind, .. } => Some(*kind),
            Lookup::Miss { .. } => None,
        }
    }

    /// Property: across thousands of random tenants (adversarial names
    /// included), prompts, paraphrases and namespaces (model, system prompt,
    /// sampling parameters), a hit only ever returns an entry stored for the
    /// same tenant and namespace. The seed is printed; set
    /// SMARTLLM_PROPTEST_SEED to replay one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_hit_ever_crosses_a_tenant_or_namespace() {
        let seed = std::env::var("SMARTLLM_PROPTEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("isolation property seed {seed} (SMARTLLM_PROPTEST_SEED={seed} replays it)");
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder();
        let p = policy(); // threshold 0.9: looser than the default, so more candidates
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, emb.clone(), Codec::plain(), 256, 100_000, None).unwrap();

        let verbs = ["reset", "change", "recover", "update", "delete"];
        let objects = [
            "password",
            "email address",
            "account",
            "username",
            "API key",
            "billing address",
        ];
        let mut prompts = Vec::new();
        for v in verbs {
            for o in objects {
                prompts.push(format!("How do I {v} my {o}?"));
                prompts.push(format!("What is the way to {v} my {o}?"));
            }
        }
        let vectors = emb.embed(prompts.clone()).await.unwrap();
        // Tenant names that differ by a byte, by case, by a separator.
        let mut tenants: Vec<String> = [
            "acme",
            "acme ",
            "ACME",
            "acme/app",
            "acme:app",
            "acme\u{0}",
            "a",
            "",
            "ac",
            "me",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        while tenants.len() < 2_000 {
            let len = rng.usize(1..12);
            let t: String = (0..len)
                .map(|_| ['a', 'b', ':', '/', '-', 'é', '0', ' '][rng.usize(..8)])
                .collect();
            tenants.push(t);
        }
        let models = ["m1", "m2"];
        let systems = [None, Some("You are terse."), Some("You are verbose.")];
        let temps = [None, Some(0.0), Some(0.7)];
        let body = |prompt: &str, ns: (usize, usize, usize)| {
            let mut messages = Vec::new();
            if let Some(sys) = systems[ns.1] {
                messages.push(json!({"role": "system", "content": sys}));
            }
            messages.push(json!({"role": "user", "content": prompt}));
            let mut b = json!({"model": models[ns.0], "messages": messages});
            if let Some(t) = temps[ns.2] {
                b["temperature"] = json!(t);
            }
            b
        };
        let tag = |tenant: &str, ns: (usize, usize, usize)| format!("{tenant:?}|{ns:?}");
        let hot = 300; // the first 300 tenants store entries; all 2,000 look up
        let mut stored = std::collections::HashSet::new();
        for _ in 0..1_200 {
            let t = &tenants[rng.usize(..hot)];
            let ns = (rng.usize(..2), rng.usize(..3), rng.usize(..3));
            let i = rng.usize(..prompts.len());
            let b = body(&prompts[i], ns);
            let k = chat_key(t, models[ns.0], b.as_object().unwrap()).unwrap();
            let answer = json!({"tag": tag(t, ns)}).to_string();
            cache
                .insert(
                    k,
                    Some(vectors[i].clone()),
                    answer,
                    &p,
                    "auto",
                    models[ns.0],
                )
                .await
                .unwrap();
            stored.insert((t.clone(), ns, i));
        }
        let (mut own_hits, mut foreign_twins) = (0, 0);
        let entries: Vec<(String, (usize, usize, usize), usize)> = stored.iter().cloned().collect();
        for n in 0..2_000 {
            let (st, sns, si) = &entries[rng.usize(..entries.len())];
            // A quarter each: the owner re-asks (or paraphrases: prompts come
            // in pairs), another tenant asks the same, the owner asks in
            // another namespace, anyone asks anything.
            let (t, ns, i) = match n % 4 {
                0 => (st, *sns, si ^ rng.usize(..2)),
                1 => (&tenants[rng.usize(..tenants.len())], *sns, *si),
                2 => (st, (rng.usize(..2), rng.usize(..3), rng.usize(..3)), *si),
                _ => (
                    &tenants[rng.usize(..tenants.len())],
                    (rng.usize(..2), rng.usize(..3), rng.usize(..3)),
                    rng.usize(..prompts.len()),
                ),
            };
            let b = body(&prompts[i], ns);
            let k = chat_key(t, models[ns.0], b.as_object().unwrap()).unwrap();
            if stored
                .iter()
                .any(|(ot, ons, oi)| *oi == i && (ot != t || *ons != ns))
            {
                foreign_twins += 1; // the same question is stored elsewhere
            }
            if let Lookup::Hit { entry, .. } = cache.lookup(&k, &p, 8).await.unwrap() {
                let got: serde_json::Value = serde_json::from_str(&entry.response).unwrap();
                assert_eq!(
                    got["tag"].as_str().unwrap(),
                    tag(t, ns),
                    "seed {seed}: tenant {t:?} namespace {ns:?} asked {:?} and got another's entry",
                    prompts[i]
                );
                own_hits += 1;
            }
        }
        eprintln!("{own_hits} own hits, {foreign_twins} lookups whose question another tenant or namespace had stored, 0 leaks");
        // Not vacuous: own entries were found, and others' twins were there to leak.
        assert!(own_hits >= 200, "seed {seed}: only {own_hits} own hits");
        assert!(
            foreign_twins >= 1_000,
            "seed {seed}: {foreign_twins} foreign twins"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_inserts_isolation_purge_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder();
        let p = policy();
        {
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(
                store,
                emb.clone(),
                Codec::plain(),
                100,
                100_000,
                Some(dir.path()),
            )
            .unwrap();
            let k = key("t1", "How do I reset my password?");
            assert!(is_hit(&cache.lookup(&k, &p, 8).await.unwrap()).is_none());
            cache
                .insert(k.clone(), None, "{\"answer\":1}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(
                is_hit(&cache.lookup(&k, &p, 8).await.unwrap()),
                Some(HitKind::Exact)
            );
            let para = cache
                .lookup(&key("t1", "What is the way to reset my password?"), &p, 8)
                .await
                .unwrap();
            assert_eq!(is_hit(&para), Some(HitKind::Semantic), "{para:?}");
            // Near-miss (negation) and another tenant: misses.
            let neg = cache
                .lookup(&key("t1", "How do I not reset my password?"), &p, 8)
                .await
                .unwrap();
            assert!(is_hit(&neg).is_none(), "{neg:?}");
            assert!(is_hit(
                &cache
                    .lookup(&key("t2", "How do I reset my password?"), &p, 8)
                    .await
                    .unwrap()
            )
            .is_none());
            // A version bump invalidates.
            let v2 = CachePolicy {
                version: 2,
                ..p.clone()
            };
            assert!(is_hit(&cache.lookup(&k, &v2, 8).await.unwrap()).is_none());
            // Replacing an exact key keeps one entry.
            cache
                .insert(k.clone(), None, "{\"answer\":2}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(cache.stats().index_vectors, 1);
            let k2 = key("t1", "Explain the borrow checker in Rust");
            cache
                .insert(k2.clone(), None, "{\"answer\":3}".into(), &p, "other", "m")
                .await
                .unwrap();
            assert_eq!(cache.stats().index_vectors, 2);
            store_flush(&cache);
        }
        // Restart: the index is rebuilt from RocksDB and hits still work.
        let store = Store::open(dir.path()).unwrap();
        let cache = SemanticCache::open(
            store,
            emb.clone(),
            Codec::plain(),
            100,
            100_000,
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(cache.stats().index_vectors, 2);
        let hit = cache
            .lookup(&key("t1", "What is the way to reset my password?"), &p, 8)
            .await
            .unwrap();
        match hit {
            Lookup::Hit { entry, .. } => assert_eq!(entry.response, "{\"answer\":2}"),
            other => panic!("{other:?}"),
        }
        // Purge by route, then expiry via sweep, then everything.
        assert_eq!(cache.purge(&Purge::Route("other".into())).unwrap(), 1);
        assert!(is_hit(
            &cache
                .lookup(&key("t1", "Explain the borrow checker in Rust"), &p, 8)
                .await
                .unwrap()
        )
        .is_none());
        assert_eq!(cache.sweep(|e| e.version != 1).unwrap(), 0);
        assert_eq!(cache.sweep(|_| true).unwrap(), 1);
        assert_eq!(cache.stats().index_vectors, 0);
        let k = key("t9", "short lived");
        let short = CachePolicy {
            ttl: Duration::from_secs(1),
            ..p.clone()
        };
        cache
            .insert(k.clone(), None, "{}".into(), &short, "auto", "m")
            .await
            .unwrap();
        assert!(is_hit(&cache.lookup(&k, &short, 8).await.unwrap()).is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(
            is_hit(&cache.lookup(&k, &short, 8).await.unwrap()).is_none(),
            "expired entries are not served"
        );
        assert_eq!(cache.purge(&Purge::All).unwrap(), 1);
    }

    /// The crate's directory as `cargo test` runs it (set at run time, so a
    /// test binary reused from a shared target dir built in another checkout
    /// reads this checkout's files).
    fn crate_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
    }

    #[test]
    fn labelled_pairs_precision_at_the_default_threshold() {
        let text = std::fs::read_to_string(crate_dir().join("testdata/pairs.tsv")).unwrap();
        let pairs = guard::parse_pairs(&text).unwrap();
        assert!(pairs.len() >= 60);
        let emb = embedder();
        let cosines: Vec<f32> = pairs
            .iter()
            .map(|(a, b, _)| {
                let v = emb.embed_blocking(vec![a.clone(), b.clone()]).unwrap();
                smartllm_embed::cosine(&v[0], &v[1])
            })
            .collect();
        let rows = guard::evaluate(&pairs, &cosines, &guard::default_thresholds());
        let at = |t: f32| {
            rows.iter()
                .find(|r| (r.threshold - t).abs() < 1e-6)
                .unwrap()
                .clone()
        };
        let d = at(0.95);
        assert!(
            d.precision >= 0.98,
            "precision {:.3} at 0.95: {d:?}",
            d.precision
        );
        assert!(d.recall > 0.2, "the cache must still hit: {d:?}");
        // The guard alone keeps every trap out, even at a loose threshold.
        assert!(at(0.80).precision >= 0.9, "{:?}", at(0.80));
    }

    fn store_flush(cache: &SemanticCache) {
        cache.store.flush().unwrap();
    }
}

#[cfg(test)]
mod ivf_tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    const MAX_SEQ: usize = 64;

    fn embedder() -> Arc<Embedder> {
        Arc::new(
            Embedder::load(&smartllm_embed::local_assets(MAX_SEQ))
                .expect("embedding assets (run packaging/fetch-assets.sh; make test does)"),
        )
    }

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
        let emb = embedder();
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
