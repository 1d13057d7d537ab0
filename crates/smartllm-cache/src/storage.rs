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

/// The associated data a stored vector is sealed with: its entry id.
fn stored_place(id: u64) -> Vec<u8> {
    let mut p = b"smartllm vector id ".to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p
}

/// The associated data a vector the fleet sends is sealed with: its
/// entry's exact key.
fn sent_place(exact: &[u8; 32]) -> Vec<u8> {
    let mut p = b"smartllm vector exact ".to_vec();
    p.extend_from_slice(exact);
    p
}

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
            .zip(ids)
            .map(|(r, id)| Ok(r?.and_then(|b| self.unseal_vector(&b, *id)).map(|(v, _)| v)))
            .collect()
    }

    /// A vector as it is stored in RocksDB under the entry id `id`: its
    /// f32s in the clear without a cache key; with one, sealed as an entry
    /// is (a sentence embedding gives much of its text away) and bound to
    /// that id, so a sealed vector moved to another id (pointing one
    /// question at another's answer) does not open. A sealed vector takes
    /// `4 x dim + 29` bytes, never a multiple of 4, so the two forms never
    /// read as each other.
    pub fn seal_vector(&self, v: &[f32], id: u64) -> Result<Vec<u8>, CacheError> {
        self.seal_vector_at(v, &stored_place(id))
    }

    /// A vector as the fleet's stream sends it: bound to its entry's exact
    /// key instead (ids are each gateway's own), so a vector paired with
    /// another entry in Redis does not open ([`SemanticCache::open_vector`]).
    pub fn seal_vector_to_send(&self, v: &[f32], exact: &[u8; 32]) -> Result<Vec<u8>, CacheError> {
        self.seal_vector_at(v, &sent_place(exact))
    }

    fn seal_vector_at(&self, v: &[f32], place: &[u8]) -> Result<Vec<u8>, CacheError> {
        let raw = vec_to_bytes(v);
        if !self.codec.encrypted() {
            return Ok(raw);
        }
        Ok(self.codec.seal_bound(raw, place)?)
    }

    /// The vector stored under `id`, and how it was sealed; `None` when it
    /// cannot be used: sealed with a key that is not here or for another
    /// id, or, at a keyed cache, in the clear or in an earlier release's
    /// unbound form (both converted, or removed, when the cache opens:
    /// [`SemanticCache::unseal_vector_as_found`]).
    pub(crate) fn unseal_vector(&self, b: &[u8], id: u64) -> Option<(Vec<f32>, Sealing)> {
        if b.len().is_multiple_of(4) {
            if self.codec.encrypted() {
                return None;
            }
            return bytes_to_vec(b).map(|v| (v, Sealing::Plain));
        }
        let (raw, sealing) = self.codec.unseal_bound(b, &stored_place(id)).ok()?;
        bytes_to_vec(&raw).map(|v| (v, sealing))
    }

    /// A stored vector however an earlier release may have left it: in
    /// the clear, sealed unbound, or bound to `id`. Only for the pass at
    /// open that converts them.
    pub(crate) fn unseal_vector_as_found(&self, b: &[u8], id: u64) -> Option<(Vec<f32>, Sealing)> {
        if b.len().is_multiple_of(4) {
            return bytes_to_vec(b).map(|v| (v, Sealing::Plain));
        }
        let (raw, sealing) = match self.codec.unseal_bound(b, &stored_place(id)) {
            // Unbound: re-sealed bound (reported as an old key's).
            Err(crate::CodecError::Unbound) => (self.codec.unseal(b).ok()?.0, Sealing::Old),
            other => other.ok()?,
        };
        bytes_to_vec(&raw).map(|v| (v, sealing))
    }

    /// A vector from another gateway (the bytes its
    /// [`SemanticCache::seal_vector_to_send`] made for the entry whose exact
    /// key is `exact`). With a key, one in the clear, one sealed for another
    /// entry and one in an earlier release's unbound form are refused:
    /// anyone who can write to the fleet's Redis could otherwise point a
    /// sealed answer at any question.
    pub fn open_vector(&self, b: &[u8], exact: &[u8; 32]) -> Result<Vec<f32>, CacheError> {
        let refused = |why: &str| {
            CacheError::Codec(crate::CodecError::Corrupt(format!("a fleet vector {why}")))
        };
        if b.len().is_multiple_of(4) {
            if self.codec.encrypted() {
                return Err(CacheError::Codec(crate::CodecError::Unsealed));
            }
            return bytes_to_vec(b).ok_or_else(|| refused("of no whole floats"));
        }
        let (raw, _) = self.codec.unseal_bound(b, &sent_place(exact))?;
        bytes_to_vec(&raw).ok_or_else(|| refused("of no whole floats"))
    }

    /// [`SemanticCache::open_vector`] for the entry `sealed_entry` (as the
    /// fleet sends it) names.
    pub fn open_vector_of(&self, sealed_entry: &[u8], b: &[u8]) -> Result<Vec<f32>, CacheError> {
        let (entry, _) = self.codec.open(sealed_entry)?;
        let exact: [u8; 32] = hex::decode(&entry.exact)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| crate::CodecError::Corrupt("exact key".into()))?;
        self.open_vector(b, &exact)
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
            // Sealed with a key that is not configured, under a foreign
            // key (a wrong key file must not cost the cache): never
            // served, kept; a purge removes it.
            Err(crate::CodecError::Decrypt) if self.foreign_key.load(Ordering::Relaxed) => Ok(None),
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

    /// Never skipped: a new entry (no other under `exact`) that its writer
    /// holds the key's lock of. Blocking threads only.
    pub(crate) fn l1_insert(&self, exact: [u8; 32], e: Arc<Entry>) {
        if !fits_l1(&e) {
            return;
        }
        let mut l1 = self.l1.lock().unwrap_or_else(|p| p.into_inner());
        l1.put(exact, e);
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
