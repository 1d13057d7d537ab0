//! Entry ids. An id is `tag << SEQ_BITS | seq`: `seq` counts up across the
//! store (the `next_id` meta key), `tag` is 24 bits of a keyed hash of the
//! entry's namespace, never 0. A namespace's entries thus share one id range,
//! and the FAISS search is limited to it (`index::VectorIndex::search_in`):
//! however many other tenants store the same questions, they cannot crowd a
//! caller's own entries out of its top k. Ids stay below 2^63 (FAISS ids are
//! signed 64-bit).
//!
//! Two namespaces may share a tag (one range): verification compares the
//! namespaces themselves, so a collision costs room in the top k, never a
//! wrong answer. The hash key is random per store (kept in the meta column
//! family, stable across restarts), so nobody can choose a namespace to share
//! another one's range.
//!
//! Ids written before tags existed have tag 0 and sort first; `open` re-keys
//! them once ([`SemanticCache::migrate_untagged`]).

use crate::{CacheError, SemanticCache};
use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use rocksdb::{ColumnFamily, IteratorMode, WriteBatch, DB};
use sha2::{Digest, Sha256};
use smartllm_store::{CF_ENTRIES, CF_EXACT, CF_VECTORS};
use std::ops::Range;
use std::time::Instant;

/// Bits of the sequence number (5.5·10^11 entries).
pub const SEQ_BITS: u32 = 39;
/// Bits of the namespace tag.
pub const TAG_BITS: u32 = 24;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const TAG_MASK: u32 = (1 << TAG_BITS) - 1;

/// The meta key holding the tag hash key.
const TAG_KEY: &[u8] = b"id_tag_key";
/// Entries re-keyed per RocksDB batch by the migration.
const MIGRATE_BATCH: usize = 512;

pub fn compose(tag: u32, seq: u64) -> u64 {
    (u64::from(tag & TAG_MASK) << SEQ_BITS) | (seq & SEQ_MASK)
}

pub fn seq(id: u64) -> u64 {
    id & SEQ_MASK
}

pub fn tag(id: u64) -> u32 {
    ((id >> SEQ_BITS) as u32) & TAG_MASK
}

/// Written before ids carried a namespace tag.
pub fn is_untagged(id: u64) -> bool {
    id >> SEQ_BITS == 0
}

/// The ids of `tag` (for the top tag, all but the last: FAISS ranges are
/// signed and end-exclusive).
pub fn range(tag: u32) -> Range<u64> {
    let start = compose(tag, 0);
    start..(start + (1 << SEQ_BITS)).min(i64::MAX as u64)
}

/// Namespace -> tag, keyed per store.
pub struct Tagger {
    key: [u8; 32],
}

impl Tagger {
    /// The store's key, created (from the OS random source) on first use.
    pub fn load_or_create(db: &DB, meta: &ColumnFamily) -> Result<Self, rocksdb::Error> {
        if let Some(stored) = db.get_cf(meta, TAG_KEY)? {
            if let Ok(key) = <[u8; 32]>::try_from(&stored[..]) {
                return Ok(Tagger { key });
            }
        }
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        db.put_cf(meta, TAG_KEY, key)?;
        Ok(Tagger { key })
    }

    #[cfg(test)]
    pub fn with_key(key: [u8; 32]) -> Self {
        Tagger { key }
    }

    /// The tag of a namespace (its hex, as entries store it): 1..2^24.
    pub fn tag(&self, namespace: &str) -> u32 {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(namespace.as_bytes());
        let d = h.finalize();
        u32::from_be_bytes([0, d[0], d[1], d[2]]).max(1)
    }
}

fn key_id(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

impl SemanticCache {
    /// Whether a column family's first key is an untagged id (they sort first).
    fn starts_untagged(&self, cf: &'static str) -> Result<bool, CacheError> {
        let mut it = self.db().raw_iterator_cf(self.cf(cf));
        it.seek_to_first();
        let first = it.key().and_then(key_id);
        it.status()?;
        Ok(first.is_some_and(is_untagged))
    }

    /// Re-key the entries stored before ids carried namespace tags: each
    /// entry, its vector and its exact-key pointer move to the tagged id in one
    /// RocksDB batch (the sequence number stays, so ids remain unique and the
    /// counter needs no change). Entries that cannot be read (a missing key)
    /// stay where they are until they can be, or the sweep removes them;
    /// vectors left without an entry are deleted. A saved index file holds
    /// the old ids: it is removed. Runs at open, before anything else uses the
    /// store; costs one seek when there is nothing to do. Returns how many
    /// entries moved.
    pub(crate) fn migrate_untagged(&self) -> Result<usize, CacheError> {
        if !self.starts_untagged(CF_ENTRIES)? && !self.starts_untagged(CF_VECTORS)? {
            return Ok(0);
        }
        let started = Instant::now();
        let db = self.db();
        let (entries, vectors, exacts) =
            (self.cf(CF_ENTRIES), self.cf(CF_VECTORS), self.cf(CF_EXACT));
        let (mut moved, mut unreadable, mut orphans) = (0usize, 0usize, 0usize);
        let mut batch = WriteBatch::default();
        // The iterator reads a snapshot: the tagged keys written meanwhile
        // (which sort after every untagged one) are not met again.
        for item in db.iterator_cf(entries, IteratorMode::Start) {
            let (k, v) = item?;
            let Some(old) = key_id(&k) else { continue };
            if !is_untagged(old) {
                break;
            }
            let Ok((mut e, _)) = self.codec.open(&v) else {
                unreadable += 1;
                continue;
            };
            let new = compose(self.tagger.tag(&e.namespace), old);
            e.id = new;
            batch.put_cf(entries, new.to_be_bytes(), self.codec.encode(&e)?);
            batch.delete_cf(entries, old.to_be_bytes());
            if let Some(vector) = db.get_cf(vectors, old.to_be_bytes())? {
                // A sealed vector is bound to its id: sealed again for the
                // new one (in the clear or unreadable: moved as it is, the
                // pass at open decides).
                let bound = !vector.len().is_multiple_of(4) && crate::entry::is_bound(&vector);
                let vector = match self.unseal_vector_as_found(&vector, old) {
                    Some((v, _)) if bound => self.seal_vector(&v, new)?,
                    // Earlier forms are moved as found; the pass at open
                    // replaces them by their questions embedded again.
                    _ => vector,
                };
                batch.put_cf(vectors, new.to_be_bytes(), vector);
                batch.delete_cf(vectors, old.to_be_bytes());
            }
            if let Ok(exact) = hex::decode(&e.exact) {
                if db.get_cf(exacts, &exact)?.as_deref() == Some(&old.to_be_bytes()[..]) {
                    batch.put_cf(exacts, &exact, new.to_be_bytes());
                }
            }
            moved += 1;
            if moved % MIGRATE_BATCH == 0 {
                db.write(std::mem::take(&mut batch))?;
            }
        }
        db.write(std::mem::take(&mut batch))?;
        // Moved vectors are gone from this (later) snapshot: what is left
        // without an entry belongs to nothing.
        for item in db.iterator_cf(vectors, IteratorMode::Start) {
            let (k, _) = item?;
            let Some(old) = key_id(&k) else { continue };
            if !is_untagged(old) {
                break;
            }
            if db.get_cf(entries, &k)?.is_none() {
                batch.delete_cf(vectors, &k);
                orphans += 1;
            }
        }
        db.write(batch)?;
        if moved > 0 {
            if let Some(p) = &self.index_path {
                let _ = std::fs::remove_file(p);
            }
        }
        if moved + orphans > 0 {
            tracing::info!(
                moved,
                unreadable_left = unreadable,
                orphan_vectors_removed = orphans,
                ms = started.elapsed().as_millis() as u64,
                "cache entries re-keyed to namespace-tagged ids (once, after an upgrade)"
            );
        } else {
            tracing::debug!(
                unreadable_left = unreadable,
                "cache entries with untagged ids left: none readable"
            );
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let t = Tagger::with_key([7; 32]);
        let (a, b) = (t.tag("aa"), t.tag("ab"));
        assert!((1..=TAG_MASK).contains(&a) && (1..=TAG_MASK).contains(&b));
        assert_ne!(a, b);
        assert_ne!(Tagger::with_key([8; 32]).tag("aa"), a, "keyed");
        let id = compose(a, 12345);
        assert_eq!((tag(id), seq(id)), (a, 12345));
        assert!(range(a).contains(&id) && !range(b).contains(&id));
        assert!(!is_untagged(id) && is_untagged(12345));
        let top = compose(TAG_MASK, SEQ_MASK);
        assert!(top <= i64::MAX as u64);
        assert!(range(TAG_MASK).end <= i64::MAX as u64);
        assert!(range(TAG_MASK).contains(&compose(TAG_MASK, 7)));
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;
    use crate::storage::{vec_to_bytes, NEXT_ID};
    use crate::test_support::embedder;
    use crate::{chat_key, CacheKey, Codec, Entry, Lookup, VectorIndex, INDEX_FILE};
    use serde_json::json;
    use smartllm_config::CachePolicy;
    use smartllm_store::{Store, CF_META};
    use std::time::Duration;

    fn key(tenant: &str, q: &str) -> CacheKey {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": q}]});
        chat_key(tenant, "m", body.as_object().unwrap()).unwrap()
    }

    fn keys_of(store: &Store, cf: &'static str) -> Vec<u64> {
        let db = store.db();
        db.iterator_cf(db.cf_handle(cf).unwrap(), IteratorMode::Start)
            .map(|i| key_id(&i.unwrap().0).unwrap())
            .collect()
    }

    /// A store written before ids carried namespace tags (entries, vectors,
    /// exact keys, an IVF file with its old marker) opens with every entry
    /// found, exactly and semantically, under tagged ids; an unreadable entry
    /// stays for the sweep, an orphan vector goes, the old file is not used,
    /// and a second open has nothing to do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_with_untagged_ids_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(128);
        let p = CachePolicy {
            enabled: true,
            semantic: true,
            similarity_threshold: 0.9,
            ttl: Duration::from_secs(3600),
            version: 1,
            max_temperature: 1.0,
            verifier: None,
        };
        let questions = [
            "How do I reset my password?",
            "Explain the borrow checker in Rust",
            "What is the capital of France?",
        ];
        // As the cache embeds them (fillers off), so that opening the store
        // finds these vectors this embedder's own and keeps them.
        let vectors = emb
            .embed(
                questions
                    .iter()
                    .map(|q| crate::key::embedding_text(q))
                    .collect(),
            )
            .await
            .unwrap();
        let dim = vectors[0].len();
        let now = crate::now_secs();
        let written: Vec<(String, usize)> = ["t1", "t2"]
            .iter()
            .flat_map(|t| (0..questions.len()).map(move |q| (t.to_string(), q)))
            .collect();
        {
            // What the previous layout wrote: ids 1.. straight from the counter.
            let store = Store::open(dir.path()).unwrap();
            let db = store.db();
            let cf = |n| db.cf_handle(n).unwrap();
            for (i, (t, q)) in written.iter().enumerate() {
                let id = i as u64 + 1;
                let k = key(t, questions[*q]);
                let e = Entry {
                    id,
                    namespace: k.namespace_hex(),
                    exact: hex::encode(k.exact),
                    query: questions[*q].into(),
                    response: format!("{t}/{q}"),
                    route: "auto".into(),
                    model: "m".into(),
                    created_at: now,
                    expires_at: now + 3600,
                    version: 1,
                    asked_ms: None,
                    tenant: None,
                };
                db.put_cf(
                    cf(CF_ENTRIES),
                    id.to_be_bytes(),
                    Codec::plain().encode(&e).unwrap(),
                )
                .unwrap();
                db.put_cf(cf(CF_VECTORS), id.to_be_bytes(), vec_to_bytes(&vectors[*q]))
                    .unwrap();
                db.put_cf(cf(CF_EXACT), k.exact, id.to_be_bytes()).unwrap();
            }
            // An entry no codec opens (with its vector), and a vector alone.
            db.put_cf(cf(CF_ENTRIES), 50u64.to_be_bytes(), b"\x07corrupt")
                .unwrap();
            db.put_cf(
                cf(CF_VECTORS),
                50u64.to_be_bytes(),
                vec_to_bytes(&vectors[0]),
            )
            .unwrap();
            db.put_cf(
                cf(CF_VECTORS),
                60u64.to_be_bytes(),
                vec_to_bytes(&vectors[1]),
            )
            .unwrap();
            db.put_cf(cf(CF_META), NEXT_ID, 61u64.to_be_bytes())
                .unwrap();
            // A saved IVF index of the old ids, marked current the old way.
            let mut rng = fastrand::Rng::with_seed(1);
            let data: Vec<f32> = (0..40 * dim).map(|_| rng.f32() - 0.5).collect();
            let old_ids: Vec<u64> = (1..=40).collect();
            VectorIndex::train_ivf(dim, &data, &old_ids)
                .unwrap()
                .write_ivf(&dir.path().join(INDEX_FILE))
                .unwrap();
            db.put_cf(cf(CF_META), b"ivf_next_id", 61u64.to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        let open = || {
            let store = Store::open(dir.path()).unwrap();
            let cache = SemanticCache::open(
                store.clone(),
                emb.clone(),
                Codec::plain(),
                100,
                100_000,
                Some(dir.path()),
            )
            .unwrap();
            (store, cache)
        };
        let (store, cache) = open();
        assert!(
            !dir.path().join(INDEX_FILE).exists(),
            "the old file is gone"
        );
        assert_eq!(cache.stats().index_kind, "flat");
        // The six entries and the unreadable one's vector.
        assert_eq!(cache.stats().index_vectors, written.len() + 1);
        assert_eq!(
            keys_of(&store, CF_ENTRIES)
                .iter()
                .filter(|i| is_untagged(**i))
                .count(),
            1
        );
        assert_eq!(
            keys_of(&store, CF_VECTORS)
                .iter()
                .filter(|i| is_untagged(**i))
                .collect::<Vec<_>>(),
            [&50]
        );
        for (i, (t, q)) in written.iter().enumerate() {
            let k = key(t, questions[*q]);
            let e = cache
                .load_exact(&k.exact)
                .unwrap()
                .expect("exact key re-pointed");
            assert_eq!(e.response, format!("{t}/{q}"));
            assert_eq!(
                (seq(e.id), tag(e.id)),
                (i as u64 + 1, cache.tagger.tag(&k.namespace_hex()))
            );
            assert!(cache
                .db()
                .get_cf(cache.cf(CF_VECTORS), e.id.to_be_bytes())
                .unwrap()
                .is_some());
        }
        // Served: exactly, and by a paraphrase within each tenant's own namespace.
        for t in ["t1", "t2"] {
            match cache
                .lookup(&key(t, "What is the way to reset my password?"), &p, 8)
                .await
                .unwrap()
            {
                Lookup::Hit { entry, .. } => assert_eq!(entry.response, format!("{t}/0")),
                miss => panic!("{t}: {miss:?}"),
            }
            assert!(matches!(
                cache.lookup(&key(t, questions[2]), &p, 8).await.unwrap(),
                Lookup::Hit { .. }
            ));
        }
        // New entries continue the sequence.
        let id = cache
            .insert(
                key("t3", "A new question"),
                None,
                "{}".into(),
                &p,
                "auto",
                "m",
            )
            .await
            .unwrap()
            .id;
        assert!(seq(id) >= 61 && !is_untagged(id), "{id}");
        drop(cache);
        store.flush().unwrap();
        drop(store);

        // Nothing left to move; the unreadable entry is the sweep's.
        let (_store, cache) = open();
        assert_eq!(cache.migrate_untagged().unwrap(), 0);
        assert_eq!(cache.stats().index_vectors, written.len() + 2);
        assert_eq!(cache.sweep(|_| false).unwrap(), 1);
        assert_eq!(cache.stats().index_vectors, written.len() + 1);
        assert!(matches!(
            cache.lookup(&key("t2", questions[1]), &p, 8).await.unwrap(),
            Lookup::Hit { .. }
        ));
    }
}
