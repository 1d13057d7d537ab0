//! The request-time write path: `SemanticCache::insert` (embed when the
//! caller has no vector, then one RocksDB batch for the entry, its vector and
//! its exact key, replacing an earlier entry under the same key; then the
//! FAISS index and L1). The entry's id is its namespace's tag and the next
//! sequence number (`ids`). `apply_remote` stores an entry another gateway
//! of the fleet made (`fleet.share_cache`), under a local id.

use crate::index::Op;
use crate::metric_names as m;
use crate::storage::NEXT_ID;
use crate::{ids, now_ms, now_secs, CacheError, CacheKey, Entry, SemanticCache, EXACT_STRIPES};
use metrics::{counter, gauge};
use rocksdb::WriteBatch;
use smartllm_config::CachePolicy;
use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_META, CF_VECTORS};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An entry just stored: its local id, the entry as stored (sealed when the
/// cache has a key) and its vector, in the clear and as the fleet sends it
/// (sealed likewise, bound to the entry's exact key; empty without a
/// vector): the fleet replicates these forms.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: u64,
    pub sealed: Vec<u8>,
    pub embedding: Option<Vec<f32>>,
    pub sealed_vector: Vec<u8>,
    pub entry: Arc<Entry>,
}

/// What [`SemanticCache::store_entry`] wrote: the id of the entry it
/// replaced, the entry as stored and its vector as stored (empty without one).
type Written = (Option<u64>, Vec<u8>, Vec<u8>);

/// What became of an entry from another gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Stored,
    /// Already here, or something newer under the same key.
    Duplicate,
    Expired,
    /// Stored before a purge applied here that removes it.
    Purged,
}

impl SemanticCache {
    /// Store an answer. Runs off the request path (spawn it).
    pub async fn insert(
        self: &Arc<Self>,
        key: CacheKey,
        embedding: Option<Vec<f32>>,
        response: String,
        policy: &CachePolicy,
        route: &str,
        model: &str,
    ) -> Result<Stored, CacheError> {
        self.insert_asked_at(key, embedding, response, policy, route, model, now_ms())
            .await
    }

    /// [`SemanticCache::insert`] for an answer asked for at `asked_ms`
    /// (milliseconds): the entry dates from then, so a purge issued while
    /// the answer was being written removes it too (`CacheError::Purged`,
    /// here and on every gateway of the fleet), as it would have had it
    /// come sooner.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_asked_at(
        self: &Arc<Self>,
        key: CacheKey,
        embedding: Option<Vec<f32>>,
        response: String,
        policy: &CachePolicy,
        route: &str,
        model: &str,
        asked_ms: u64,
    ) -> Result<Stored, CacheError> {
        let embedding = match embedding {
            Some(e) => Some(e),
            None if policy.semantic => self
                .embedder
                .embed(vec![crate::key::embedding_text(&key.query)])
                .await?
                .pop(),
            None => None,
        };
        let created = (asked_ms / 1000).min(now_secs());
        let entry = Entry {
            id: 0, // given in `write`
            namespace: key.namespace_hex(),
            exact: hex::encode(key.exact),
            query: key.query.clone(),
            response,
            route: route.to_string(),
            model: model.to_string(),
            created_at: created,
            expires_at: created + policy.ttl.as_secs(),
            version: policy.version,
            asked_ms: Some(asked_ms),
            tenant: Some(key.tenant.clone()),
        };
        let this = self.clone();
        let stored = tokio::task::spawn_blocking(move || {
            // Checked right before the write (a purge may have come while
            // the answer was generated or embedded), and no purge runs
            // between the check and the write.
            let _gate = this.purge_gate.read().unwrap_or_else(|p| p.into_inner());
            if this.purged_after(&entry, asked_ms) {
                return Err(CacheError::Purged);
            }
            this.write(entry, embedding, key.exact)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        self.maybe_upgrade();
        Ok(stored)
    }

    /// Store an entry another gateway of the fleet stored (`sealed` as it
    /// made it: sealed with the fleet's shared key when the cache has one),
    /// unless it has expired or this cache holds the same or a newer answer
    /// under its exact key. Blocking (RocksDB).
    pub fn apply_remote(
        self: &Arc<Self>,
        sealed: &[u8],
        embedding: Option<Vec<f32>>,
    ) -> Result<Applied, CacheError> {
        // No purge runs between the check below and the write.
        let _gate = self.purge_gate.read().unwrap_or_else(|p| p.into_inner());
        let (entry, _) = self.codec.open(sealed)?;
        if entry.expired(now_secs()) {
            return Ok(Applied::Expired);
        }
        if self.purged_since(&entry) {
            return Ok(Applied::Purged);
        }
        let exact: [u8; 32] = hex::decode(&entry.exact)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| crate::CodecError::Corrupt("exact key".into()))?;
        if let Some(v) = &embedding {
            // A peer's vector is held to what a local one is: the index's
            // size, and values a score can be computed from (a NaN scores
            // NaN, which a threshold test would let through).
            crate::index::check_vector(v, self.index.dim())?;
        }
        {
            // The newer-answer check and the write under the key's lock: a
            // newer local answer cannot land between them and be replaced.
            let _key = self.exact_lock(&exact);
            let local = self
                .db()
                .get_cf(self.cf(CF_EXACT), exact)?
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .and_then(|id| self.db().get_cf(self.cf(CF_ENTRIES), id).ok().flatten())
                .and_then(|b| self.codec.decode(&b).ok());
            if local.is_some_and(|l| l.created_at >= entry.created_at) {
                return Ok(Applied::Duplicate);
            }
            self.write_locked(entry, embedding, exact)?;
        }
        self.maybe_upgrade();
        Ok(Applied::Stored)
    }

    /// One writer per exact key at a time (by stripe): two misses of the
    /// same question stored at once would each replace the entry before
    /// them and leave the other's behind, an orphan only the semantic search
    /// finds (and a refresh that leaves the old answer reachable). A
    /// removal takes the stripes of what it removes too.
    fn exact_lock(&self, exact: &[u8; 32]) -> std::sync::MutexGuard<'_, ()> {
        self.exact_stripes[exact[0] as usize % EXACT_STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Store the entry (blocking): it gets its id here.
    pub(crate) fn write(
        &self,
        entry: Entry,
        embedding: Option<Vec<f32>>,
        exact: [u8; 32],
    ) -> Result<Stored, CacheError> {
        let _key = self.exact_lock(&exact);
        self.write_locked(entry, embedding, exact)
    }

    /// [`SemanticCache::write`] with the key's lock held.
    fn write_locked(
        &self,
        mut entry: Entry,
        embedding: Option<Vec<f32>>,
        exact: [u8; 32],
    ) -> Result<Stored, CacheError> {
        if let Some(v) = &embedding {
            // Before anything is stored: a vector the index refuses must not
            // stay in RocksDB either (the next start would load it).
            crate::index::check_vector(v, self.index.dim())?;
        }
        let id = self.index.allocate(self.tagger.tag(&entry.namespace));
        entry.id = id;
        let (previous, sealed, sealed_vector) =
            match self.store_entry(&entry, embedding.as_deref(), exact) {
                Ok(p) => p,
                Err(e) => {
                    self.index.release(id);
                    return Err(e);
                }
            };
        let replaced = previous.is_some();
        let mut ops = Vec::with_capacity(2);
        if let Some(old) = previous {
            ops.push(Op::Remove(vec![old]));
        }
        match &embedding {
            Some(v) => ops.push(Op::Add(id, v.clone())),
            None => self.index.release(id),
        }
        // Replacing: the old vector leaves and the new one comes in one batch.
        self.index.submit(ops)?;
        self.dirty.store(true, Ordering::Relaxed);
        gauge!(m::INDEX_VECTORS).set(self.index.len() as f64);
        let entry = Arc::new(entry);
        if replaced {
            // A refresh: the old answer must leave L1 even when its lock is
            // busy (this is a blocking thread).
            self.l1_replace(exact, entry.clone());
        } else {
            // A new answer goes to L1 whatever else holds its lock (this is a
            // blocking thread): L1's size counts what is stored, and the
            // next ask of it is served from memory. Nothing can remove it
            // meanwhile: the key's lock (and, for an insert, the purge gate)
            // is held.
            self.l1_insert(exact, entry.clone());
        }
        counter!(m::INSERTS).increment(1);
        Ok(Stored {
            id,
            sealed,
            embedding,
            sealed_vector,
            entry,
        })
    }

    /// One RocksDB batch: the entry, its vector, its exact key (and the
    /// entry it replaces gone). Returns the replaced entry's id, the entry
    /// as stored and its vector as the fleet sends it (empty without one).
    fn store_entry(
        &self,
        entry: &Entry,
        embedding: Option<&[f32]>,
        exact: [u8; 32],
    ) -> Result<Written, CacheError> {
        let id = entry.id;
        let previous = self
            .db()
            .get_cf(self.cf(CF_EXACT), exact)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes);
        let mut batch = WriteBatch::default();
        let encoded = self.codec.encode(entry)?;
        batch.put_cf(self.cf(CF_ENTRIES), id.to_be_bytes(), &encoded);
        // Stored bound to its id; sent (the fleet) bound to its exact key.
        let sealed_vector = match embedding {
            Some(v) => {
                let stored = self.seal_vector(v, id)?;
                batch.put_cf(self.cf(CF_VECTORS), id.to_be_bytes(), &stored);
                self.seal_vector_to_send(v, &exact)?
            }
            None => Vec::new(),
        };
        batch.put_cf(self.cf(CF_EXACT), exact, id.to_be_bytes());
        if let Some(old) = previous {
            batch.delete_cf(self.cf(CF_ENTRIES), old.to_be_bytes());
            batch.delete_cf(self.cf(CF_VECTORS), old.to_be_bytes());
        }
        // The next sequence number only ever rises on disk: two inserts that
        // commit in the reverse order of their ids would otherwise leave it
        // at the lower one, and after a restart (the higher entry without a
        // vector to raise it) hand that id out again, overwriting an entry.
        // Writes take turns, each with the allocator's value at that moment,
        // which is past every id allocated before, its own included.
        static WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = WRITES.lock().unwrap_or_else(|p| p.into_inner());
        batch.put_cf(
            self.cf(CF_META),
            NEXT_ID,
            self.index.next_seq().max(ids::seq(id) + 1).to_be_bytes(),
        );
        self.db().write(batch)?;
        Ok((previous, encoded, sealed_vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::embedder;
    use crate::{chat_key, Codec, IndexError};
    use serde_json::json;
    use smartllm_store::Store;

    /// A vector with a NaN or an infinity, or all zeros (its scores would be
    /// NaN, or meaningless), is refused, from this gateway or from the
    /// fleet, and nothing of the entry is stored.
    #[test]
    fn entries_with_unusable_vectors_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache =
            SemanticCache::open(store, embedder(64), Codec::plain(), 16, 100_000, None).unwrap();
        let q = "What is the capital of Peru?";
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        let k = chat_key("t", "m", body.as_object().unwrap()).unwrap();
        let entry = crate::test_support::entry_for(&k);
        let dim = cache.index.dim();
        let mut nan = vec![0.0f32; dim];
        nan[0] = f32::NAN;
        let mut inf = vec![0.0f32; dim];
        inf[1] = f32::INFINITY;
        for bad in [nan, inf, vec![0.0f32; dim]] {
            let local = cache.write(entry.clone(), Some(bad.clone()), k.exact);
            assert!(
                matches!(local, Err(CacheError::Index(IndexError::Unusable))),
                "{local:?}"
            );
            let sealed = Codec::plain().encode(&entry).unwrap();
            let remote = cache.apply_remote(&sealed, Some(bad));
            assert!(
                matches!(remote, Err(CacheError::Index(IndexError::Unusable))),
                "{remote:?}"
            );
        }
        for cf in [CF_ENTRIES, CF_VECTORS, CF_EXACT] {
            let stored = cache
                .db()
                .iterator_cf(cache.cf(cf), rocksdb::IteratorMode::Start)
                .count();
            assert_eq!(stored, 0, "{cf}");
        }
        assert_eq!(cache.stats().index_vectors, 0);
    }
}
