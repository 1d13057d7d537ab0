//! Storage plumbing shared by the other modules: the RocksDB column families,
//! reading an entry (by id or exact key), deleting entries everywhere they
//! live (RocksDB, the FAISS index, L1), the L1 map, and the byte encoding of
//! vectors.

use crate::entry::unsealed_exact;
use crate::index::Op;
use crate::metric_names as m;
use crate::{CacheError, Entry, Sealing, SemanticCache};
use metrics::{counter, gauge};
use rocksdb::WriteBatch;
use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_VECTORS};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The meta key holding the next entry sequence number (`ids::seq`).
pub(crate) const NEXT_ID: &[u8] = b"next_id";
/// Entries deleted per RocksDB batch.
const REMOVE_BATCH: usize = 1024;

pub(crate) fn vec_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn bytes_to_vec(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// The largest entry (question and answer) L1 keeps. L1 is bounded by
/// count (`cache.l1_entries`); without this, a workload of long prompts (a
/// RAG context of megabytes in the last turn) would hold gigabytes there.
/// Larger entries are answered from RocksDB by their exact key.
pub(crate) const L1_MAX_ENTRY_BYTES: usize = 64 * 1024;

fn fits_l1(e: &Entry) -> bool {
    e.query.len() + e.response.len() <= L1_MAX_ENTRY_BYTES
}

impl SemanticCache {
    pub(crate) fn db(&self) -> &rocksdb::DB {
        self.store.db()
    }

    pub(crate) fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db()
            .cf_handle(name)
            .expect("the store creates every column family")
    }

    /// The stored vectors of `ids`, in order, in one batched read.
    pub(crate) fn load_vectors(&self, ids: &[u64]) -> Result<Vec<Option<Vec<f32>>>, CacheError> {
        let cf = self.cf(CF_VECTORS);
        let keys: Vec<[u8; 8]> = ids.iter().map(|id| id.to_be_bytes()).collect();
        self.db()
            .batched_multi_get_cf(cf, &keys, false)
            .into_iter()
            .map(|r| Ok(r?.and_then(|b| self.unseal_vector(&b)).map(|(v, _)| v)))
            .collect()
    }

    /// A vector as it is stored (RocksDB) and sent (the fleet's stream): its
    /// f32s in the clear without a cache key; with one, sealed as an entry is
    /// (a sentence embedding gives much of its text away). A sealed vector
    /// takes `4 x dim + 29` bytes, never a multiple of 4, so the two forms
    /// never read as each other.
    pub fn seal_vector(&self, v: &[f32]) -> Result<Vec<u8>, CacheError> {
        let raw = vec_to_bytes(v);
        if !self.codec.encrypted() {
            return Ok(raw);
        }
        Ok(self.codec.seal(raw)?)
    }

    /// A vector [`SemanticCache::seal_vector`] made, and how it was stored;
    /// `None` when it cannot be read (sealed with a key that is not here).
    /// One in the clear is read whatever the codec: a keyed cache re-seals
    /// those it holds when it opens.
    pub(crate) fn unseal_vector(&self, b: &[u8]) -> Option<(Vec<f32>, Sealing)> {
        if b.len().is_multiple_of(4) {
            return bytes_to_vec(b).map(|v| (v, Sealing::Plain));
        }
        let (raw, sealing) = self.codec.unseal(b).ok()?;
        bytes_to_vec(&raw).map(|v| (v, sealing))
    }

    /// A vector from another gateway (the bytes its [`SemanticCache::seal_vector`]
    /// made). With a key, one in the clear is refused: anyone who can write
    /// to the fleet's Redis could otherwise point a sealed answer at any
    /// question.
    pub fn open_vector(&self, b: &[u8]) -> Result<Vec<f32>, CacheError> {
        match self.unseal_vector(b) {
            Some((_, crate::Sealing::Plain)) if self.codec.encrypted() => {
                Err(CacheError::Codec(crate::CodecError::Unsealed))
            }
            Some((v, _)) => Ok(v),
            None => Err(CacheError::Codec(crate::CodecError::Corrupt(
                "a vector that cannot be read with this cache's keys".into(),
            ))),
        }
    }

    pub(crate) fn load(&self, id: u64) -> Result<Option<Entry>, CacheError> {
        let Some(bytes) = self.db().get_cf(self.cf(CF_ENTRIES), id.to_be_bytes())? else {
            return Ok(None);
        };
        match self.codec.open(&bytes) {
            Ok((e, sealing)) => {
                if sealing == Sealing::Old {
                    // Best effort: the entry is served either way.
                    if let Err(err) = self.reseal(id, &e) {
                        tracing::warn!(id, error = %err, "re-sealing a cache entry with the current key failed");
                    }
                }
                Ok(Some(e))
            }
            Err(err) => {
                // Never serve what cannot be read, nor what a keyed cache
                // finds in the clear: drop it.
                tracing::warn!(id, error = %err, "dropping unreadable cache entry");
                counter!(m::REMOVED, "reason" => "unreadable").increment(1);
                self.remove_ids(&[(id, unsealed_exact(&bytes))])?;
                Ok(None)
            }
        }
    }

    /// Store again, sealed with the current key, an entry that was opened with
    /// an old one. The entry may be replaced or removed meanwhile, and every
    /// live entry is the one its exact key points at: so write it, then take
    /// it back if its exact key no longer points at it (whichever order the
    /// writes land in, a removed entry stays removed).
    pub(crate) fn reseal(&self, id: u64, entry: &Entry) -> Result<(), CacheError> {
        let Ok(exact) = hex::decode(&entry.exact) else {
            return Ok(());
        };
        let key = id.to_be_bytes();
        self.db()
            .put_cf(self.cf(CF_ENTRIES), key, self.codec.encode(entry)?)?;
        if self.db().get_cf(self.cf(CF_EXACT), &exact)?.as_deref() != Some(&key[..]) {
            self.db().delete_cf(self.cf(CF_ENTRIES), key)?;
        }
        Ok(())
    }

    pub(crate) fn load_exact(&self, exact: &[u8; 32]) -> Result<Option<Entry>, CacheError> {
        let Some(id) = self.db().get_cf(self.cf(CF_EXACT), exact)? else {
            return Ok(None);
        };
        let Ok(id) = <[u8; 8]>::try_from(&id[..]) else {
            return Ok(None);
        };
        self.load(u64::from_be_bytes(id))
    }

    /// Delete entries (and their vectors, exact keys and L1 copies): RocksDB
    /// in batches of `REMOVE_BATCH`, then one removal from the FAISS index
    /// (one pass over it, however many ids). Until that lands, searches may
    /// still return the ids: verification finds no entry and skips them.
    pub(crate) fn remove_ids(&self, ids: &[(u64, Option<String>)]) -> Result<(), CacheError> {
        if ids.is_empty() {
            return Ok(());
        }
        for chunk in ids.chunks(REMOVE_BATCH) {
            // The chunk's exact keys' write locks (ascending: one writer
            // holds one stripe, so no cycle): a refresh cannot replace an
            // entry between the check below and the batch, which would
            // delete the new entry's exact key and leave it an orphan.
            let decoded: Vec<Option<Vec<u8>>> = chunk
                .iter()
                .map(|(_, exact)| exact.as_ref().and_then(|h| hex::decode(h).ok()))
                .collect();
            let mut stripes: Vec<usize> = decoded
                .iter()
                .flatten()
                .filter_map(|ex| ex.first())
                .map(|b| *b as usize % crate::EXACT_STRIPES)
                .collect();
            stripes.sort_unstable();
            stripes.dedup();
            let _held: Vec<_> = stripes
                .iter()
                .map(|i| {
                    self.exact_stripes[*i]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                })
                .collect();
            let mut batch = WriteBatch::default();
            let mut l1_keys = Vec::with_capacity(chunk.len());
            for ((id, _), ex) in chunk.iter().zip(decoded) {
                batch.delete_cf(self.cf(CF_ENTRIES), id.to_be_bytes());
                batch.delete_cf(self.cf(CF_VECTORS), id.to_be_bytes());
                if let Some(ex) = ex {
                    // Only if it still points at this entry.
                    if self.db().get_cf(self.cf(CF_EXACT), &ex)?.as_deref()
                        == Some(&id.to_be_bytes()[..])
                    {
                        batch.delete_cf(self.cf(CF_EXACT), &ex);
                    }
                    if let Ok(k) = <[u8; 32]>::try_from(&ex[..]) {
                        l1_keys.push(k);
                    }
                }
            }
            self.db().write(batch)?;
            // After the write: a lookup that read the entry before it sees
            // the epoch move and does not put it back.
            for k in &l1_keys {
                self.l1_remove(k);
            }
        }
        self.index
            .submit(vec![Op::Remove(ids.iter().map(|(i, _)| *i).collect())])?;
        self.dirty.store(true, Ordering::Relaxed);
        gauge!(m::INDEX_VECTORS).set(self.index.len() as f64);
        Ok(())
    }

    /// L1 never makes a caller wait (async callers): busy reads as a miss.
    /// (Entries larger than [`L1_MAX_ENTRY_BYTES`] are never in it.)
    pub(crate) fn l1_get(&self, exact: &[u8; 32]) -> Option<Arc<Entry>> {
        self.l1.try_lock().ok()?.get(exact).cloned()
    }

    /// The L1 epoch to pass to [`Self::l1_put`]: read it before reading
    /// the entry from RocksDB.
    pub(crate) fn l1_epoch(&self) -> u64 {
        self.l1_epoch.load(Ordering::Acquire)
    }

    /// Best effort (async callers): when L1 is busy the entry is not kept
    /// there (the RocksDB exact key still answers), nor when an entry left
    /// L1 since `epoch` was read (a purge or sweep may have removed this
    /// one from RocksDB after it was read: it must not come back), nor when
    /// it is larger than [`L1_MAX_ENTRY_BYTES`].
    pub(crate) fn l1_put(&self, epoch: u64, exact: [u8; 32], e: Arc<Entry>) {
        if !fits_l1(&e) {
            return;
        }
        if let Ok(mut l1) = self.l1.try_lock() {
            if self.l1_epoch.load(Ordering::Acquire) != epoch {
                return;
            }
            l1.put(exact, e);
            self.l1_len.store(l1.len(), Ordering::Relaxed);
        }
    }

    /// Never skipped: the entry that replaced another under `exact` is the
    /// one L1 serves from now on. Blocking threads only.
    pub(crate) fn l1_replace(&self, exact: [u8; 32], e: Arc<Entry>) {
        let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
        // A lookup that read the old entry from RocksDB must not put it back.
        self.l1_epoch.fetch_add(1, Ordering::AcqRel);
        if fits_l1(&e) {
            l1.put(exact, e);
        } else {
            // Too large to keep in memory: at least the old one goes.
            l1.pop(&exact);
        }
        self.l1_len.store(l1.len(), Ordering::Relaxed);
    }

    /// Never skipped: a removed entry must not be served from L1. Blocking
    /// threads only.
    pub(crate) fn l1_remove(&self, exact: &[u8; 32]) {
        let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
        self.l1_epoch.fetch_add(1, Ordering::AcqRel);
        l1.pop(exact);
        self.l1_len.store(l1.len(), Ordering::Relaxed);
    }

    /// Blocking threads only.
    pub(crate) fn l1_clear(&self) {
        let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
        self.l1_epoch.fetch_add(1, Ordering::AcqRel);
        l1.clear();
        self.l1_len.store(0, Ordering::Relaxed);
    }
}
