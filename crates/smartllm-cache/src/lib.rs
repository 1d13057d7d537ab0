//! The semantic cache. Lookups go L1 (exact key, in memory, bounded) ->
//! RocksDB exact key -> embed the last user turn -> FAISS top-k -> verify
//! (namespace, cosine >= threshold, TTL, version, precision guard). RocksDB is
//! the source of truth (entries, vectors, exact keys); the FAISS index is
//! rebuilt from it at start. All blocking work (RocksDB, FAISS) runs on the
//! blocking pool, the model on the embedder's own threads.
//!
//! Where things are: `lookup` (the read path), `insert` (the write path),
//! `lifecycle` (open, flat -> IVF training, swap, persist, rebuild), `admin`
//! (purge, sweep, stats), `storage` (RocksDB and L1 plumbing they share);
//! `index` wraps FAISS, `entry` encodes (and seals) entries, `key` derives
//! cache keys, `guard` holds the precision guard and privacy exclusions.

mod admin;
pub mod entry;
pub mod guard;
pub mod index;
mod insert;
pub mod key;
mod lifecycle;
mod lookup;
mod storage;
#[cfg(test)]
mod test_support;

pub use admin::{CacheStats, Purge};
pub use entry::{Codec, CodecError, Entry, KeyFileError, Sealing};
pub use guard::{near_miss, Exclusions};
pub use index::{IndexError, VectorIndex};
pub use key::{chat_key, CacheKey};
pub use lifecycle::INDEX_FILE;
pub use lookup::{HitKind, Lookup};

use lifecycle::Op;
use lru::LruCache;
use smartllm_embed::Embedder;
use smartllm_store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};

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

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("store: {0}")]
    Store(#[from] rocksdb::Error),
    #[error("index: {0}")]
    Index(#[from] IndexError),
    #[error("embedding: {0}")]
    Embed(#[from] smartllm_embed::EmbedError),
    #[error("cache entry: {0}")]
    Codec(#[from] CodecError),
    #[error("cache task failed: {0}")]
    Task(String),
}

/// The gateway's one clock (entry times, expiry).
pub use smartllm_protocol::time::now_secs;

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
