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
use std::sync::atomic::{AtomicU64, Ordering};
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

pub struct SemanticCache {
    store: Arc<Store>,
    embedder: Arc<Embedder>,
    codec: Codec,
    index: RwLock<VectorIndex>,
    l1: Mutex<LruCache<[u8; 32], Arc<Entry>>>,
    next_id: AtomicU64,
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
    /// Open the cache over the store and rebuild the vector index from it.
    /// Blocking: call before the server starts or from `spawn_blocking`.
    pub fn open(
        store: Arc<Store>,
        embedder: Arc<Embedder>,
        codec: Codec,
        l1_entries: usize,
    ) -> Result<Arc<Self>, CacheError> {
        let dim = embedder.info().dim;
        let cache = SemanticCache {
            store,
            embedder,
            codec,
            index: RwLock::new(VectorIndex::new_flat(dim)?),
            l1: Mutex::new(LruCache::new(
                NonZeroUsize::new(l1_entries.max(1)).expect("max(1)"),
            )),
            next_id: AtomicU64::new(1),
        };
        cache.rebuild_index()?;
        Ok(Arc::new(cache))
    }

    fn db(&self) -> &rocksdb::DB {
        self.store.db()
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db()
            .cf_handle(name)
            .expect("the store creates every column family")
    }

    /// Rebuild the FAISS index from the vectors in RocksDB (the source of truth).
    pub fn rebuild_index(&self) -> Result<usize, CacheError> {
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
        tokio::task::spawn_blocking(move || this.write(entry, embedding, key.exact))
            .await
            .map_err(|e| CacheError::Task(e.to_string()))?
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
            }
            if let Some(v) = &embedding {
                index.add(id, v)?;
            }
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
            *self.index.write().unwrap_or_else(|p| p.into_inner()) =
                VectorIndex::new_flat(self.embedder.info().dim)?;
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
        CacheStats {
            index_vectors: self.index.read().map(|i| i.len()).unwrap_or(0),
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
    use smartllm_config::{Device, EmbedderConfig};
    use std::path::PathBuf;
    use std::time::Duration;

    fn embedder() -> Arc<Embedder> {
        let dir = std::env::var("SMARTLLM_ASSETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/smartllm-assets")
            });
        let cfg = EmbedderConfig {
            model: dir.join("model.onnx"),
            tokenizer: dir.join("tokenizer.json"),
            onnxruntime: dir.join("libonnxruntime.so.1.31.1"),
            threads: 1,
            max_seq_len: 128,
            device: Device::Cpu,
        };
        Arc::new(
            Embedder::load(&cfg)
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_inserts_isolation_purge_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder();
        let p = policy();
        {
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(store, emb.clone(), Codec::plain(), 100).unwrap();
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
        let cache = SemanticCache::open(store, emb.clone(), Codec::plain(), 100).unwrap();
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

    #[test]
    fn labelled_pairs_precision_at_the_default_threshold() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/pairs.tsv"))
                .unwrap();
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
