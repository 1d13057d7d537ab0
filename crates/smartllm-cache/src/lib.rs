//! The semantic cache. Lookups go L1 (exact key, in memory, bounded) ->
//! RocksDB exact key -> embed the last user turn -> FAISS top-k within the
//! caller's namespace -> verify (namespace, cosine >= threshold, TTL, version,
//! precision guard). RocksDB is the source of truth (entries, vectors, exact
//! keys); the FAISS index is rebuilt from it at start. All blocking work
//! (RocksDB, FAISS) runs on the blocking pool, the model on the embedder's own
//! threads.
//!
//! Concurrency: lookups search the FAISS index concurrently (the read side of
//! a lock, taken on blocking threads); adds and removes are queued and applied
//! in batches by whichever thread holds the writer token; a trained or rebuilt
//! index is swapped in through an `ArcSwap`; persisting freezes the index
//! without stopping searches (details in `index`). Async code takes no lock
//! that can wait: the index is read through atomics there, and L1 through
//! `try_lock` (a busy L1 reads as a miss, and the RocksDB exact key answers).
//!
//! Where things are: `lookup` (the read path), `insert` (the write path),
//! `lifecycle` (open, flat -> IVF training, swap, persist, rebuild), `admin`
//! (purge, sweep, stats), `storage` (RocksDB and L1 plumbing they share);
//! `index` wraps FAISS, `ids` lays out entry ids (namespace tag + sequence),
//! `entry` encodes (and seals) entries, `key` derives cache keys, `guard`
//! holds the precision guard and privacy exclusions.

mod admin;
pub mod entry;
pub mod guard;
pub mod ids;
pub mod index;
mod insert;
pub mod key;
mod lifecycle;
mod lookup;
mod sealed_file;
mod storage;
#[cfg(test)]
mod test_support;
pub mod verify;

pub use admin::{CacheStats, Purge};
pub use entry::{Codec, CodecError, Entry, KeyFileError, Sealing};
pub use guard::{near_miss, same_wording, strip_fillers, Exclusions};
pub use index::{IndexError, Scores, VectorIndex};
pub use insert::{Applied, Stored};
pub use key::{api_chat_key, chat_key, embedding_text, exact_text, CacheKey};
pub use lifecycle::{Rebuilt, INDEX_FILE};
pub use lookup::{
    differing_parts_features, score_differing_parts, unread_tails_differ, HitKind, Lookup,
    LookupTimes, VERIFIER_MIN_COSINE,
};
pub use verify::Verifier;

use ids::Tagger;
use index::SharedIndex;
use lru::LruCache;
use smartllm_embed::Embedder;
use smartllm_store::Store;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

pub mod metric_names {
    pub const LOOKUPS: &str = "smartllm_cache_lookups_total";
    pub const SIMILARITY: &str = "smartllm_cache_similarity";
    /// Would-be semantic hits the verifier turned away, by result
    /// (`rejected`, `unavailable`).
    pub const VERIFIER: &str = "smartllm_cache_verifier_total";
    pub const SEARCH_SECONDS: &str = "smartllm_cache_search_seconds";
    pub const EMBED_SECONDS: &str = "smartllm_cache_embed_seconds";
    pub const INDEX_VECTORS: &str = "smartllm_cache_index_vectors";
    pub const INDEX_REBUILDS: &str = "smartllm_cache_index_rebuilds_total";
    pub const INSERTS: &str = "smartllm_cache_inserts_total";
    pub const REMOVED: &str = "smartllm_cache_removed_total";
    pub const BYTES: &str = "smartllm_cache_bytes";
    /// Entries no configured key opens, kept but never served.
    pub const UNREADABLE: &str = "smartllm_cache_unreadable_entries";
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
    /// The answer was asked for before a purge that covers it: not stored.
    #[error("purged while it was being answered")]
    Purged,
}

/// The gateway's one clock (entry times, expiry).
pub use smartllm_protocol::time::{now_ms, now_secs};

/// Stripes of the per-exact-key write lock.
pub(crate) const EXACT_STRIPES: usize = 64;

pub struct SemanticCache {
    store: Arc<Store>,
    embedder: Arc<Embedder>,
    codec: Codec,
    /// The FAISS index, its writer queue and the entry sequence counter.
    index: SharedIndex,
    tagger: Tagger,
    l1: Mutex<LruCache<[u8; 32], Arc<Entry>>>,
    /// Entries in L1, for stats without the lock.
    l1_len: AtomicUsize,
    /// Bumped (under the L1 lock) by every removal from L1: an entry read
    /// from RocksDB before a removal is not put back into L1 after it.
    l1_epoch: AtomicU64,
    /// Vectors at which the flat index is replaced by a trained IVF one.
    ivf_threshold: AtomicUsize,
    /// Vectors from which an IVF build uses product quantisation.
    pq_threshold: AtomicUsize,
    /// Size the current IVF index was trained for (0 = flat).
    trained_for: AtomicUsize,
    index_path: Option<PathBuf>,
    /// Background index builds running (a forced rebuild may overlap an
    /// upgrade under way; the later one wins the swap).
    building: Arc<AtomicUsize>,
    /// Stored vectors up to which a rebuild makes a flat index at once
    /// ([`FLAT_REBUILD_MAX`]; tests lower it).
    flat_rebuild_max: AtomicUsize,
    /// When a failed rebuild from RocksDB may be tried again (ms; 0: none).
    rebuild_retry_at: Arc<AtomicU64>,
    /// A rebuild was asked for while an ordinary build (which reads RocksDB
    /// too) was under way and taken as that build: should it fail, the
    /// rebuild is retried like one of its own.
    rebuild_merged: Arc<AtomicBool>,
    /// Entries sealed with a key that is not configured, as the last sweep
    /// counted them (kept, never served): said in the log when it changes.
    unreadable_kept: AtomicU64,
    /// The store was last opened with a key none of this gateway's opens
    /// (its mark says so): most likely this key file is the wrong one, so
    /// what no key opens is kept, not removed, until the right key is back
    /// (a purge still removes it).
    foreign_key: AtomicBool,
    dirty: AtomicBool,
    /// The verifier's recent scores by (query, cached query): a paraphrase
    /// asked again is judged without running the model (only `try_lock`ed:
    /// a busy lock is a miss).
    verdicts: Mutex<LruCache<u64, f32>>,
    verdict_hasher: std::collections::hash_map::RandomState,
    /// Token states of recently verified cached prompts, by text: a stored
    /// question that many paraphrases hit runs the model once for all.
    cached_states: Mutex<LruCache<u64, Arc<[f32]>>>,
    /// Purges applied here (local or from the fleet) and when: an entry the
    /// fleet sends later that one of them removed is not stored again.
    purged: Mutex<admin::Purged>,
    /// Taken to write by a purge while it is recorded (a purge of
    /// everything: until done) and to read by an insert (check, then
    /// write): an insert either wrote before the purge was recorded, and the
    /// purge's scan (which starts after) sees it, or checks after and finds
    /// the purge. None lands unseen by both (`admin`).
    purge_gate: std::sync::RwLock<()>,
    /// Serialise the writes of one exact key (see `insert::write`).
    exact_stripes: [std::sync::Mutex<()>; EXACT_STRIPES],
}

/// Vectors from which an IVF build uses product quantisation, by default
/// (`cache.pq_threshold`): at 1M vectors IVF-PQ48 takes 56 MiB against
/// IVF-SQ8's 377 MiB and searches in half the time (bench/README, "Vector
/// index at scale").
pub const PQ_THRESHOLD: usize = 1_000_000;

/// Stored vectors (RocksDB's estimate) up to which a rebuild from scratch
/// makes a flat index of them all at once, in memory and searched from the
/// first lookup (100,000 x 384 dimensions: 150 MB, a few ms a search).
/// Above, the vectors never all sit in memory: an IVF index is trained
/// straight from RocksDB in the background
/// ([`SemanticCache::train_ivf_from_store`]) while the cache serves exact
/// hits and the entries stored since, and is swapped in when done.
pub const FLAT_REBUILD_MAX: usize = 100_000;

/// Verifier scores kept for repeated pairs.
const VERDICTS: usize = 4096;
/// Cached prompts whose token states are kept (each at most
/// `MAX_KEPT_STATES` values, 48 tokens: 37 MB at most).
const KEPT_STATES: usize = 512;
const MAX_KEPT_STATES: usize = 48 * smartllm_embed::DIM;
