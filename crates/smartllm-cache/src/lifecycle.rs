//! The FAISS index lifecycle. At open: re-key entries stored before ids
//! carried namespace tags, drop the stored vectors when another embedder
//! made them, then load the persisted IVF index when it is current, else
//! rebuild a flat one from RocksDB (the source of truth). Then,
//! once the index outgrows its kind, train an IVF index on a background
//! thread while lookups go on, replay the writes made meanwhile, swap it in
//! and persist it. Also the explicit rebuild and the IVF threshold reload.

use crate::ids::{self, Tagger};
use crate::index::SharedIndex;
use crate::metric_names as m;
use crate::storage::NEXT_ID;
use crate::{CacheError, Codec, Scores, Sealing, SemanticCache, VectorIndex};
use lru::LruCache;
use metrics::{counter, gauge};
use rocksdb::WriteBatch;
use smartllm_embed::Embedder;
use smartllm_store::{Store, CF_ENTRIES, CF_META, CF_VECTORS};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The persist marker: the index file holds every stored vector whose
/// sequence number is below it. (Files saved before ids carried tags have
/// the older `ivf_next_id` marker only, and are rebuilt.)
const IVF_MARKER: &[u8] = b"ivf_next_seq";
/// With the marker: the file holds no vector numbered from this on; those
/// from the marker up to it it may hold or not (`SharedIndex::frozen`).
/// Files saved without it are taken to hold none from the marker on.
const IVF_SAVED_TO: &[u8] = b"ivf_saved_to_seq";
pub const INDEX_FILE: &str = "cache.ivf";
/// The meta key marking every stored vector sealed with the key that seals
/// it, bound to its id (`vectors_sealed`, the mark of releases that sealed
/// them unbound, is removed: such a store gets the whole pass again).
const VECTORS_SEALED: &[u8] = b"vectors_sealed_bound";
const VECTORS_SEALED_UNBOUND: &[u8] = b"vectors_sealed";
/// The IVF training's niceness: below the embedder's (+10), so on a busy
/// machine the training waits rather than any request.
pub const IVF_BUILD_NICE: i32 = 19;
/// The meta key holding the fingerprint of the embedder that made the
/// stored vectors ([`Embedder::fingerprint`]).
const EMBEDDER_KEY: &[u8] = b"embedder_fingerprint";
/// A store that recorded no fingerprint: entries (with vectors) read to
/// choose from, and how many of them (the longest texts) are embedded again
/// to tell whether this embedder made their vectors.
const CHECK_READ: usize = 256;
const CHECK_EMBEDDED: usize = 16;
/// The cosine a vector keeps to the same text embedded again by the same
/// model and window (threads, device and batching move it by rounding
/// only); another model's, or another window's on a long text, is far
/// below.
const SAME_EMBEDDER_COSINE: f32 = 0.98;
/// Stored questions embedded again per model call when their vectors are
/// sealed at open.
const EMBED_AGAIN_BATCH: usize = 64;
/// Vectors deleted per RocksDB batch when they are dropped.
const DROP_BATCH: usize = 4096;

/// The fewest training rows a build's sample is thinned at (see
/// `train_ivf_from_store`): 25 MB of 384-dimension vectors.
const MIN_SAMPLE_CAP: usize = 16_384;
/// How long after a failed rebuild from RocksDB the next one may start.
const REBUILD_RETRY_MS: u64 = 60_000;

/// Stored vectors: (ids, row-major vectors).
type Vectors = (Vec<u64>, Vec<f32>);

impl SemanticCache {
    /// Open the cache over the store: drop the stored vectors when another
    /// embedder made them (by `embedder`'s fingerprint, kept in the store),
    /// load the persisted IVF index from `index_dir` when it is current,
    /// else rebuild from RocksDB (and train an IVF index in the background
    /// when there are `ivf_threshold` vectors).
    /// Blocking: call before the server starts or from `spawn_blocking`.
    pub fn open(
        store: Arc<Store>,
        embedder: Arc<Embedder>,
        codec: Codec,
        l1_entries: usize,
        ivf_threshold: usize,
        index_dir: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, CacheError> {
        Self::open_with_pq(
            store,
            embedder,
            codec,
            l1_entries,
            ivf_threshold,
            crate::PQ_THRESHOLD,
            index_dir,
        )
    }

    /// [`open`](Self::open), with the number of vectors from which an IVF
    /// build uses product quantisation (`cache.pq_threshold`).
    pub fn open_with_pq(
        store: Arc<Store>,
        embedder: Arc<Embedder>,
        codec: Codec,
        l1_entries: usize,
        ivf_threshold: usize,
        pq_threshold: usize,
        index_dir: Option<&std::path::Path>,
    ) -> Result<Arc<Self>, CacheError> {
        let dim = embedder.info().dim;
        let fingerprint = embedder.fingerprint();
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
            pq_threshold: AtomicUsize::new(pq_threshold.max(1)),
            trained_for: AtomicUsize::new(0),
            index_path: index_dir.map(|d| d.join(INDEX_FILE)),
            building: Arc::new(AtomicUsize::new(0)),
            flat_rebuild_max: AtomicUsize::new(flat_rebuild_max()),
            rebuild_retry_at: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            rebuild_merged: Arc::new(AtomicBool::new(false)),
            unreadable_kept: std::sync::atomic::AtomicU64::new(0),
            foreign_key: AtomicBool::new(false),
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
        cache.seal_stored_vectors()?;
        cache.check_embedder(&fingerprint)?;
        if !cache.load_persisted()? {
            cache.rebuild_index()?;
        }
        cache.maybe_upgrade();
        // From the start (the sweep counts them): an alert on it has a
        // series to read.
        gauge!(m::UNREADABLE).set(cache.unreadable_kept.load(Ordering::Relaxed) as f64);
        Ok(cache)
    }

    /// Change the IVF threshold (config reload). Takes no lock.
    pub fn set_ivf_threshold(self: &Arc<Self>, n: usize) {
        self.ivf_threshold.store(n.max(1), Ordering::Relaxed);
        self.maybe_upgrade();
    }

    /// Vectors from which an IVF build encodes them with product
    /// quantisation instead of 8-bit scalars (config; takes effect at the
    /// next build, which comes when the cache has grown 4x). Takes no lock.
    pub fn set_pq_threshold(&self, n: usize) {
        self.pq_threshold.store(n.max(1), Ordering::Relaxed);
    }

    /// Whether a background index build is running.
    pub fn building(&self) -> bool {
        self.building.load(Ordering::SeqCst) > 0
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
        let saved = self.index.frozen(|index, seqs| {
            if !index.is_ivf() {
                return Ok(false);
            }
            // With a key, sealed: the file never holds the index in the clear.
            if self.codec.encrypted() {
                crate::sealed_file::write(index, &self.codec, path)?;
            } else {
                index.write_ivf(path)?;
            }
            let mut batch = WriteBatch::default();
            batch.put_cf(self.cf(CF_META), IVF_MARKER, seqs.start.to_be_bytes());
            batch.put_cf(self.cf(CF_META), IVF_SAVED_TO, seqs.end.to_be_bytes());
            self.db().write(batch)?;
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
    /// truth). Up to [`FLAT_REBUILD_MAX`](crate::FLAT_REBUILD_MAX) stored
    /// vectors: flat at once (re-trained as IVF in the background when
    /// large enough). Above: an IVF index trained from RocksDB in the
    /// background, the current index serving until it is swapped in.
    pub fn rebuild(self: &Arc<Self>) -> Result<Rebuilt, CacheError> {
        let rebuilt = self.rebuild_index()?;
        self.maybe_upgrade();
        Ok(rebuilt)
    }

    /// The largest sequence number stored (entries and vectors), read from
    /// the last id of each namespace tag in use: two seeks a tag, not a scan.
    fn max_stored_seq(&self) -> Result<u64, CacheError> {
        let id_of = |k: &[u8]| <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes);
        let mut max = 0;
        for cf in [CF_ENTRIES, CF_VECTORS] {
            let mut it = self.db().raw_iterator_cf(self.cf(cf));
            it.seek_to_first();
            while let Some(k) = it.key() {
                let Some(id) = id_of(k) else {
                    it.next();
                    continue;
                };
                let end = ids::range(ids::tag(id)).end;
                if end <= id {
                    // Beyond the tagged ranges (never written): counted as is.
                    max = max.max(ids::seq(id));
                    it.next();
                    continue;
                }
                it.seek_for_prev((end - 1).to_be_bytes());
                if let Some(last) = it.key().and_then(id_of) {
                    max = max.max(ids::seq(last));
                }
                it.seek(end.to_be_bytes());
            }
            it.status()?;
        }
        Ok(max)
    }

    /// RocksDB's estimate of the stored vectors (no scan).
    fn stored_vectors_estimate(&self) -> usize {
        self.db()
            .property_int_value_cf(self.cf(CF_VECTORS), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0) as usize
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
    /// largest sequence number seen and how many were skipped (of another
    /// size, or with values the index refuses).
    fn stored_vectors(&self, from_seq: u64) -> Result<(Vectors, usize, u64, usize), CacheError> {
        let (mut ids, mut data) = (Vec::new(), Vec::new());
        let mut below = 0usize;
        let (max_seq, skipped) = self.each_stored_vector(|id, vec| {
            if ids::seq(id) < from_seq {
                below += 1;
            } else {
                ids.push(id);
                data.extend_from_slice(vec);
            }
        })?;
        Ok(((ids, data), below, max_seq, skipped))
    }

    /// Call `f` with each usable stored vector (one pass over RocksDB, one
    /// vector in memory at a time); returns the largest sequence number
    /// seen and how many were skipped (of another size, or with values the
    /// index refuses: stored before vectors were checked).
    fn each_stored_vector(
        &self,
        mut f: impl FnMut(u64, &[f32]),
    ) -> Result<(u64, usize), CacheError> {
        let dim = self.index.dim();
        let (mut max_seq, mut skipped) = (0u64, 0usize);
        let mut it = self.db().raw_iterator_cf(self.cf(CF_VECTORS));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Ok(id) = <[u8; 8]>::try_from(k).map(u64::from_be_bytes) else {
                skipped += 1;
                it.next();
                continue;
            };
            max_seq = max_seq.max(ids::seq(id));
            let vec = self
                .unseal_vector(v, id)
                .map(|(x, _)| x)
                .filter(|x| x.len() == dim && crate::index::usable(x));
            match vec {
                Some(vec) => f(id, &vec),
                None => skipped += 1,
            }
            it.next();
        }
        it.status()?;
        Ok((max_seq, skipped))
    }

    /// An IVF index of every stored vector, built in two passes over
    /// RocksDB so the vectors never all sit in memory (ten million of 384
    /// dimensions are 15 GB): an even spread of them to train on
    /// ([`EvenSample`]), then every vector added in batches. The lists and the
    /// encoding ([`ivf_encoding`](crate::index::ivf_encoding)) follow how
    /// many are read; `expected` (the live index's size, or RocksDB's
    /// estimate in a rebuild) only sizes the first allocation. With the
    /// largest sequence number among the stored vectors; None when nothing
    /// is stored.
    pub(crate) fn train_ivf_from_store(
        &self,
        expected: usize,
    ) -> Result<Option<(VectorIndex, u64)>, CacheError> {
        use crate::index::{ivf_encoding, nlist_for, nprobe_for};
        let dim = self.index.dim();
        let mut sample = EvenSample::new(dim, expected);
        let (max_seq, _) = self.each_stored_vector(|_, v| sample.push(v))?;
        let seen = sample.seen;
        let sample = sample.rows;
        if seen == 0 {
            return Ok(None);
        }
        let encoding = ivf_encoding(seen, dim, self.pq_threshold.load(Ordering::Relaxed));
        // PQ's codebooks (256 centroids a sub-vector) want thousands of
        // training vectors (FAISS asks for 39 a centroid, ~10,000, and
        // `cache.pq_threshold` is at least that); with under 8 a centroid, SQ8.
        let encoding = if encoding != "SQ8" && sample.len() / dim < 256 * 8 {
            "SQ8".to_string()
        } else {
            encoding
        };
        // Sized by what was found, never more lists than training vectors.
        let nlist = nlist_for(seen).min(sample.len() / dim).max(1);
        let mut index =
            VectorIndex::train_ivf_sample(dim, &sample, nlist, &encoding, nprobe_for(nlist))?;
        drop(sample);
        const BATCH: usize = 65_536;
        let (mut ids, mut data) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH * dim));
        let mut failed = None;
        self.each_stored_vector(|id, v| {
            if failed.is_some() {
                return;
            }
            ids.push(id);
            data.extend_from_slice(v);
            if ids.len() == BATCH {
                if let Err(e) = index.add_batch(&ids, &data) {
                    failed = Some(e);
                }
                ids.clear();
                data.clear();
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        index.add_batch(&ids, &data)?;
        Ok(Some((index, max_seq)))
    }

    /// Never hand out a sequence number at or below one stored.
    fn restore_next_seq(&self, max_seq: u64) -> Result<(), CacheError> {
        let stored = self.stored_u64(NEXT_ID)?.unwrap_or(1);
        self.index.raise_next_seq(stored.max(max_seq + 1));
        Ok(())
    }

    /// With a key, re-seal in place, bound to their ids, the vectors sealed
    /// bound with an old key; replace the vectors an earlier release left
    /// (in the clear, or sealed unbound) beside an entry sealed with a key
    /// of ours by its question embedded again, so no vector bytes anyone
    /// could have put there are ever bound; remove the rest (beside an
    /// entry in the clear or none, or sealed with a key that is not here).
    /// Without a key, nothing. At open, before anything else uses the
    /// store. Returns how many changed.
    ///
    /// A pass leaves a mark sealed with the current key: later starts with
    /// the same key decrypt nothing and only look for vectors in the clear
    /// or unbound; a start without a key removes it, as a rotation
    /// outdates it. When the embedder does not answer, the earlier forms
    /// stay (never used) and the next start tries again.
    fn seal_stored_vectors(&self) -> Result<usize, CacheError> {
        let meta = self.cf(CF_META);
        self.db().delete_cf(meta, VECTORS_SEALED_UNBOUND)?;
        if !self.codec.encrypted() {
            // A store sealed before (its mark is here) opened without a key:
            // most likely the key setting went missing. What it cannot read
            // is kept, as under a wrong key, until a sweep finds none left
            // (`settle_foreign`) or a purge removes it.
            let marked = self.db().get_cf(meta, VECTORS_SEALED)?.is_some();
            self.foreign_key.store(marked, Ordering::Relaxed);
            return Ok(0);
        }
        // Marked done with this key: only the earlier forms (a release that
        // stored them so, run on this store since) are looked for, which
        // takes no decryption.
        let mark = self.db().get_cf(meta, VECTORS_SEALED)?;
        let opened = mark.map(|m| self.codec.unseal(&m).map(|(_, sealing)| sealing));
        let done = matches!(opened, Some(Ok(Sealing::Current)));
        // A mark no configured key opens: the store was last opened with
        // another key, and this key file is most likely the wrong one.
        // Nothing no key opens is removed then (the right key back, it all
        // serves again), and the mark is left as it is.
        let foreign = matches!(opened, Some(Err(_)));
        self.foreign_key.store(foreign, Ordering::Relaxed);
        let vectors = self.cf(CF_VECTORS);
        let (mut n, mut batch) = (0usize, WriteBatch::default());
        // Earlier forms beside a sealed entry: (id, the entry's question).
        let mut again: Vec<(u64, String)> = Vec::new();
        // Vectors of another embedder are all dropped next
        // (`check_embedder`): none is embedded again for nothing.
        let doomed = self
            .db()
            .get_cf(meta, EMBEDDER_KEY)?
            .is_some_and(|f| f != self.embedder.fingerprint().as_bytes());
        let (mut embedded, mut failed) = (0usize, 0usize);
        // Sealed with a key that is not configured here (or corrupt).
        let mut unreadable = 0usize;
        for item in self.db().iterator_cf(vectors, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            // (A vector in the clear is a multiple of 4 bytes long, and its
            // first byte may be anything.)
            let bound = !v.len().is_multiple_of(4) && crate::entry::is_bound(&v);
            if done && bound {
                continue;
            }
            let Ok(id) = <[u8; 8]>::try_from(&k[..]).map(u64::from_be_bytes) else {
                // No entry's id: nothing reads it.
                batch.delete_cf(vectors, &k);
                n += 1;
                continue;
            };
            let keep = match self.unseal_vector_as_found(&v, id) {
                Some((_, Sealing::Current)) if bound => continue,
                Some((vector, Sealing::Old)) if bound => Some(vector),
                // An earlier form (in the clear, or sealed unbound, with
                // any key): its bytes are not trusted; beside an entry
                // sealed with a key of ours, the entry's question is
                // embedded again. An entry in the clear is refused and
                // removed: its vector goes now.
                Some(_) => {
                    let entry = self.db().get_cf(self.cf(CF_ENTRIES), &k)?;
                    match entry.and_then(|e| self.codec.open(&e).ok()) {
                        // (An entry under another id than its own is never
                        // served for this one's vector.)
                        Some((e, _)) if e.id == id && !doomed => {
                            again.push((id, e.query));
                            if again.len() == EMBED_AGAIN_BATCH {
                                self.embed_again(&again, &mut batch, &mut embedded, &mut failed)?;
                                again.clear();
                            }
                            continue;
                        }
                        _ => None,
                    }
                }
                // Sealed with a key that is not configured here, or bound
                // elsewhere: nobody can read it here. Under a foreign key
                // (above) it is kept as it is: a wrong key file must not
                // cost the cache. Otherwise (a dropped key, corruption) it
                // goes.
                None => {
                    unreadable += 1;
                    if foreign {
                        continue;
                    }
                    None
                }
            };
            match keep {
                Some(vector) => batch.put_cf(vectors, &k, self.seal_vector(&vector, id)?),
                None => batch.delete_cf(vectors, &k),
            }
            n += 1;
            if n % DROP_BATCH == 0 {
                self.db().write(std::mem::take(&mut batch))?;
            }
        }
        self.embed_again(&again, &mut batch, &mut embedded, &mut failed)?;
        n += embedded;
        if failed > 0 {
            tracing::warn!(failed, "could not embed some stored cache questions again to seal their vectors; those entries serve by their exact key, and the next start tries again");
        }
        // (Earlier forms are looked for at every start, mark or not.) Under
        // a foreign key the mark stays the right key's.
        if !foreign {
            batch.put_cf(
                meta,
                VECTORS_SEALED,
                self.codec.seal(VECTORS_SEALED.to_vec())?,
            );
        }
        self.db().write(batch)?;
        if foreign {
            // Loud: with a wrong key file, this is the whole cache unseen.
            tracing::warn!(
                vectors = unreadable,
                "this cache was last opened with a key that neither cache.encryption_key_file nor encryption_old_key_files holds: what no configured key opens is kept but not served; if the key file is wrong, restore it (or list the old key in encryption_old_key_files) and restart; any `smartllm cache purge` removes what no key opens"
            );
        } else if unreadable > 0 {
            tracing::warn!(
                vectors = unreadable,
                "cache vectors that no configured key opens (a dropped key, or corrupt) were removed, and entries no key opens are removed when read"
            );
        }
        // (Under a foreign key the unreadable are kept, not counted in `n`.)
        let changed = if foreign { n } else { n - unreadable };
        if changed > 0 {
            tracing::info!(
                vectors = changed,
                embedded_again = embedded,
                "cache vectors stored in the clear, unbound or with an old key were sealed with the current key, bound to their ids (those in the clear or unbound replaced by their entries' questions embedded again; removed beside an entry in the clear or none)"
            );
        }
        Ok(n)
    }

    /// Under a foreign key (see `seal_stored_vectors`), once a sweep finds
    /// nothing left that no configured key opens (a purge removed it, or
    /// it expired away): the store is this key's now, so its mark is
    /// written again (removed without a key), and what no key opens is
    /// removed again from then on.
    pub(crate) fn settle_foreign(&self) -> Result<(), CacheError> {
        if !self.foreign_key.load(Ordering::Relaxed) {
            return Ok(());
        }
        let meta = self.cf(CF_META);
        if self.codec.encrypted() {
            self.db().put_cf(
                meta,
                VECTORS_SEALED,
                self.codec.seal(VECTORS_SEALED.to_vec())?,
            )?;
        } else {
            self.db().delete_cf(meta, VECTORS_SEALED)?;
        }
        self.foreign_key.store(false, Ordering::Relaxed);
        tracing::info!("no cache entry is left that no configured key opens: the store is marked as this key's");
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
        let read = if self.codec.encrypted() {
            crate::sealed_file::read(&self.codec, &path, dim).map(|(index, old_key)| {
                // Sealed with an old key: saved again with the current one.
                if old_key {
                    self.dirty.store(true, Ordering::Relaxed);
                }
                index
            })
        } else {
            VectorIndex::read_ivf(&path, dim)
        };
        let mut index = match read {
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
        let saved_to = self.stored_u64(IVF_SAVED_TO)?.unwrap_or(marker);
        let ((ids, data), below, max_seq, _) = self.stored_vectors(marker)?;
        // The stored vectors from the marker on are added below; those
        // numbered before `saved_to` may be in the file already (applied
        // before an earlier number was, or taken by a build's snapshot
        // before their add): out first, so none is there twice.
        let unsure: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| ids::seq(*id) < saved_to)
            .collect();
        if let Err(e) = index.remove(&unsure) {
            tracing::error!(error = %e, "the cache index file is unusable; rebuilding it from RocksDB (no entry is lost)");
            return Ok(false);
        }
        // What is left must be exactly the stored vectors below the marker
        // (anything removed since it was written makes it stale).
        if below != index.len() {
            tracing::warn!(
                file = index.len(),
                stored = below,
                "the cache index file is out of date; rebuilding from RocksDB"
            );
            return Ok(false);
        }
        index.add_batch(&ids, &data)?;
        // Every number below `saved_to` was handed out before the save.
        self.restore_next_seq(max_seq.max(marker.max(saved_to).saturating_sub(1)))?;
        self.trained_for
            .store(index.len().max(1), Ordering::Relaxed);
        let n = index.len();
        self.index.reset(index);
        gauge!(m::INDEX_VECTORS).set(n as f64);
        tracing::info!(vectors = n, added_since_saved = ids.len(), path = %path.display(), "cache IVF index loaded");
        Ok(true)
    }

    /// Vectors compare only with vectors of the same model read through the
    /// same window. When the embedder changed since the stored ones were
    /// made (another model file or tokenizer, `embedder.max_seq_len`, the
    /// dimension), they and the saved index are dropped: the entries stay,
    /// served by their exact key, and the index starts empty. Then the
    /// current fingerprint is recorded.
    ///
    /// A store that recorded none (written before fingerprints were) keeps
    /// its vectors only when this embedder makes them again
    /// ([`SemanticCache::vectors_are_ours`]); otherwise they are dropped too.
    /// When that cannot be told (the embedder failed to answer), nothing is
    /// dropped or recorded: the next start checks again.
    fn check_embedder(&self, fingerprint: &str) -> Result<(), CacheError> {
        let stored = self.db().get_cf(self.cf(CF_META), EMBEDDER_KEY)?;
        if stored.as_deref() == Some(fingerprint.as_bytes()) {
            return Ok(());
        }
        let why = match stored {
            Some(_) => Some("the embedding model, its tokenizer, embedder.max_seq_len, the dimension or embedder.device (cuda runs an int8 model's fp32 twin) changed since they were stored"),
            None => match self.vectors_are_ours()? {
                Some(true) => None,
                Some(false) => Some("they were stored before the cache recorded its embedder, and this embedder does not make them again"),
                None => return Ok(()),
            },
        };
        if let Some(why) = why {
            let dropped = self.drop_vectors()?;
            if dropped > 0 {
                tracing::warn!(
                    dropped,
                    reason = why,
                    "stored cache vectors dropped, as vectors of another embedder cannot be compared with this one's; the entries are still served by their exact key"
                );
            }
        }
        self.db()
            .put_cf(self.cf(CF_META), EMBEDDER_KEY, fingerprint.as_bytes())?;
        Ok(())
    }

    /// Embed the questions of `chunk` (id, question) again and put their
    /// vectors, sealed bound to their ids, in `batch`, which is written.
    /// Counts those done and, when the embedder fails, those left as they
    /// were; logs progress every 10,000.
    fn embed_again(
        &self,
        chunk: &[(u64, String)],
        batch: &mut WriteBatch,
        embedded: &mut usize,
        failed: &mut usize,
    ) -> Result<(), CacheError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let texts = chunk
            .iter()
            .map(|(_, q)| crate::key::embedding_text(q))
            .collect();
        match self.embedder.embed_blocking(texts) {
            Ok(fresh) if fresh.len() == chunk.len() => {
                let vectors = self.cf(CF_VECTORS);
                for ((id, _), vector) in chunk.iter().zip(fresh) {
                    batch.put_cf(vectors, id.to_be_bytes(), self.seal_vector(&vector, *id)?);
                }
                let before = *embedded;
                *embedded += chunk.len();
                if before / 10_000 != *embedded / 10_000 {
                    tracing::info!(
                        embedded = *embedded,
                        "sealing an earlier release's cache vectors: stored questions embedded again"
                    );
                }
            }
            _ => *failed += chunk.len(),
        }
        self.db().write(std::mem::take(batch))?;
        Ok(())
    }

    /// Whether this embedder made the stored vectors: of the first entries
    /// with a vector, the longest texts (on which a change of window shows)
    /// are embedded again and must come out as stored. True when there is
    /// no vector; false when no stored vector has a readable entry; None
    /// when the embedder did not answer (a passing failure must not cost
    /// the whole semantic cache).
    fn vectors_are_ours(&self) -> Result<Option<bool>, CacheError> {
        let dim = self.index.dim();
        let (mut any, mut read) = (false, Vec::new());
        let mut it = self.db().raw_iterator_cf(self.cf(CF_VECTORS));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            any = true;
            if read.len() == CHECK_READ {
                break;
            }
            let vector = <[u8; 8]>::try_from(k)
                .ok()
                .and_then(|id| self.unseal_vector(v, u64::from_be_bytes(id)))
                .map(|(x, _)| x)
                .filter(|x| x.len() == dim && crate::index::usable(x));
            if let Some(vector) = vector {
                let entry = self
                    .db()
                    .get_cf(self.cf(CF_ENTRIES), k)?
                    .and_then(|b| self.codec.open(&b).ok())
                    .map(|(e, _)| e);
                if let Some(e) = entry {
                    read.push((e.query, vector));
                }
            }
            it.next();
        }
        it.status()?;
        if !any {
            return Ok(Some(true));
        }
        read.sort_by_key(|(query, _)| std::cmp::Reverse(query.len()));
        read.truncate(CHECK_EMBEDDED);
        if read.is_empty() {
            return Ok(Some(false));
        }
        let texts = read
            .iter()
            .map(|(query, _)| crate::key::embedding_text(query))
            .collect();
        let again = match self.embedder.embed_blocking(texts) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "could not embed stored cache questions again to check which embedder made their vectors; kept, and checked again at the next start");
                return Ok(None);
            }
        };
        let same = |(stored, now): (&Vec<f32>, &Vec<f32>)| {
            smartllm_embed::cosine(stored, now) >= SAME_EMBEDDER_COSINE
        };
        Ok(Some(
            again.len() == read.len() && read.iter().map(|(_, v)| v).zip(&again).all(same),
        ))
    }

    /// Delete every stored vector and the saved index file (blocking; at
    /// open, before anything else uses the store). Returns how many.
    fn drop_vectors(&self) -> Result<usize, CacheError> {
        // First: a file left behind would be checked against no vector.
        if let Some(p) = &self.index_path {
            let _ = std::fs::remove_file(p);
        }
        let vectors = self.cf(CF_VECTORS);
        let (mut n, mut batch) = (0usize, WriteBatch::default());
        // The highest number among them: the next id is raised past it, as
        // the vectors would have (a store of an earlier release may hold
        // ids above its persisted counter).
        let mut max_seq = 0;
        for item in self.db().iterator_cf(vectors, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(id) = <[u8; 8]>::try_from(&k[..]) {
                max_seq = max_seq.max(crate::ids::seq(u64::from_be_bytes(id)));
            }
            batch.delete_cf(vectors, k);
            n += 1;
            if n % DROP_BATCH == 0 {
                self.db().write(std::mem::take(&mut batch))?;
            }
        }
        let next = self.stored_u64(NEXT_ID)?.unwrap_or(1).max(max_seq + 1);
        batch.put_cf(self.cf(CF_META), NEXT_ID, next.to_be_bytes());
        self.db().write(batch)?;
        Ok(n)
    }

    /// Start a background IVF build when the index outgrew its kind (its
    /// training at nice [`IVF_BUILD_NICE`]). Takes no lock (async callers).
    pub(crate) fn maybe_upgrade(self: &Arc<Self>) {
        let n = self.index.len();
        let trained = self.trained_for.load(Ordering::Relaxed);
        let threshold = self.ivf_threshold.load(Ordering::Relaxed);
        let pq = self.pq_threshold.load(Ordering::Relaxed);
        let retry_at = self.rebuild_retry_at.load(Ordering::Relaxed);
        if retry_at != 0 && crate::now_ms() >= retry_at {
            // A rebuild from RocksDB failed: the index holds only what came
            // since, so the stored vectors are read again.
            if self
                .building
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.rebuild_retry_at.store(0, Ordering::Relaxed);
                self.spawn_build(Some(self.stored_vectors_estimate()));
            }
            return;
        }
        let due = if trained == 0 {
            n >= threshold
        } else {
            // Re-trained as the cache grows 4x, and as soon as it holds
            // `pq_threshold` vectors on 8-bit codes (not at the next 4x).
            n >= trained * 4 || (trained < pq && n >= pq && self.index.scores() == Scores::Close)
        };
        if !due
            || self
                .building
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        self.spawn_build(None);
    }

    /// Run [`build_ivf`](Self::build_ivf) on a thread of its own, counted
    /// in `building` (the caller has counted it).
    fn spawn_build(self: &Arc<Self>, expected: Option<usize>) {
        let this = self.clone();
        let count = self.building.clone();
        let (merged, retry_at) = (self.rebuild_merged.clone(), self.rebuild_retry_at.clone());
        let spawned = std::thread::Builder::new()
            .name("smartllm-ivf".into())
            .spawn(move || {
                // This thread keeps its priority: it takes the locks lookups
                // wait on (see `build_ivf`); only the training is lowered.
                let built = this.build_ivf(expected);
                this.build_ended(expected.is_some(), built);
                // Release the cache (and the store) before saying the build is over.
                drop(this);
                count.fetch_sub(1, Ordering::SeqCst);
                // A rebuild asked for after `build_ended` looked, while this
                // build still counted: it runs at the next insert.
                if merged.swap(false, Ordering::SeqCst) {
                    retry_at.store(crate::now_ms(), Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            self.build_ended(
                expected.is_some(),
                Err(CacheError::Task(
                    "no thread for the IVF cache index build".into(),
                )),
            );
            self.building.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// After a background build: a failed rebuild from RocksDB (`rebuild`,
    /// or an ordinary build a rebuild was taken as) is tried again a
    /// minute on, at the next insert after it.
    fn build_ended(&self, rebuild: bool, built: Result<(), CacheError>) {
        // A rebuild taken as this build is done, or is retried below.
        let merged = self.rebuild_merged.swap(false, Ordering::SeqCst);
        if let Err(e) = built {
            if rebuild || merged {
                let at = crate::now_ms() + REBUILD_RETRY_MS;
                self.rebuild_retry_at.store(at, Ordering::Relaxed);
                tracing::error!(error = %e, "rebuilding the cache index from RocksDB failed; the index holds only entries stored since, and the rebuild is tried again in a minute");
            } else {
                tracing::error!(error = %e, "building the IVF cache index failed; the current index stays");
            }
        }
    }

    /// Train an IVF index from RocksDB while lookups go on, replay the writes
    /// made meanwhile, swap it in, persist it.
    ///
    /// Only the training runs at low priority, on a thread of its own.
    /// Starting the build, the swap and the save take the index's write lock
    /// (or wait for it), and a writer waiting on it holds up every new
    /// reader: on a thread the scheduler starves (a busy machine at nice
    /// 19), that would stall every lookup. They run here, at the caller's
    /// priority. (A thread cannot take back the priority it gave up without
    /// privileges, hence the second thread.)
    ///
    /// `expected`: about how many vectors are stored, when the live index
    /// does not hold them all (a rebuild from scratch); else its size.
    fn build_ivf(&self, expected: Option<usize>) -> Result<(), CacheError> {
        let started = Instant::now();
        // Every change applied from here on is logged for the replay.
        let token = self.index.begin_build();
        let expected = expected.unwrap_or_else(|| self.index.len());
        let trained = at_low_priority(|| self.train_ivf_from_store(expected));
        let fresh = match trained {
            Ok(Some((f, max_seq))) => {
                // The stored count (`NEXT_ID`) is written with every vector;
                // this only guards against a store that lost it.
                self.index.raise_next_seq(max_seq + 1);
                f
            }
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
        let scores = fresh.scores();
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
            codes = ?scores,
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
    /// the scan are replayed on it); or, past
    /// [`FLAT_REBUILD_MAX`](crate::FLAT_REBUILD_MAX) of them, an IVF index
    /// trained from RocksDB in the background.
    fn rebuild_index(self: &Arc<Self>) -> Result<Rebuilt, CacheError> {
        if let Some(p) = &self.index_path {
            let _ = std::fs::remove_file(p);
        }
        self.trained_for.store(0, Ordering::Relaxed);
        let about = self.stored_vectors_estimate();
        if about > self.flat_rebuild_max.load(Ordering::Relaxed) {
            // No new entry may take a sequence number stored already (a
            // store of an older release may hold some past `NEXT_ID`).
            self.restore_next_seq(self.max_stored_seq()?)?;
            // A build under way reads RocksDB too: it is this rebuild.
            if self
                .building
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.spawn_build(Some(about));
            } else {
                // Should that build fail, this rebuild is retried.
                self.rebuild_merged.store(true, Ordering::SeqCst);
            }
            tracing::info!(
                about,
                "cache index: training an IVF index from RocksDB in the background"
            );
            return Ok(Rebuilt::InBackground { about });
        }
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
            return Ok(Rebuilt::Now(n));
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
        Ok(Rebuilt::Now(n))
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: the flat-rebuild limit of caches opened on this thread.
    static FLAT_REBUILD_MAX_HERE: std::cell::Cell<usize> =
        const { std::cell::Cell::new(crate::FLAT_REBUILD_MAX) };
}

fn flat_rebuild_max() -> usize {
    #[cfg(test)]
    return FLAT_REBUILD_MAX_HERE.with(|c| c.get());
    #[cfg(not(test))]
    crate::FLAT_REBUILD_MAX
}

/// The vectors an IVF build trains on: an even spread (every `stride`-th)
/// of those read so far, of 0.75 to 1.5 times what the lists for that many
/// want ([`TRAIN_PER_LIST`](crate::index::TRAIN_PER_LIST) a list: 48 to 96),
/// or all of them while they are fewer than 1.5 times that (under about
/// 147,000 vectors) or than [`MIN_SAMPLE_CAP`]. Past that cap, every other
/// row is dropped and the stride doubled. It follows what is read, not a
/// guess of the count, which may be far off either way (RocksDB's
/// estimate, in a rebuild): too low a guess would train many lists on a few
/// vectors each.
struct EvenSample {
    dim: usize,
    stride: usize,
    seen: usize,
    rows: Vec<f32>,
}

impl EvenSample {
    /// `expected` only sizes the first allocation.
    fn new(dim: usize, expected: usize) -> Self {
        EvenSample {
            dim,
            stride: 1,
            seen: 0,
            rows: Vec::with_capacity(MIN_SAMPLE_CAP.min(expected.max(1)) * dim),
        }
    }

    fn cap_at(seen: usize) -> usize {
        use crate::index::{nlist_for, TRAIN_PER_LIST};
        (3 * nlist_for(seen.max(1)) * TRAIN_PER_LIST / 2).max(MIN_SAMPLE_CAP)
    }

    fn push(&mut self, v: &[f32]) {
        if self.seen.is_multiple_of(self.stride) {
            self.rows.extend_from_slice(v);
            if self.rows.len() / self.dim >= Self::cap_at(self.seen + 1) {
                self.rows = self
                    .rows
                    .chunks_exact(self.dim)
                    .step_by(2)
                    .flatten()
                    .copied()
                    .collect();
                self.stride *= 2;
            }
        }
        self.seen += 1;
    }
}

/// What [`SemanticCache::rebuild`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuilt {
    /// A flat index of this many vectors is in use.
    Now(usize),
    /// An IVF index of about this many vectors is being trained from
    /// RocksDB; the current index serves until it is swapped in
    /// ([`SemanticCache::building`]).
    InBackground { about: usize },
}

/// Run `f` on a thread of its own at nice [`IVF_BUILD_NICE`] (FAISS's
/// OpenMP team, which that thread starts, inherits it) and wait for it. The
/// caller keeps its priority.
fn at_low_priority<T: Send>(
    f: impl FnOnce() -> Result<T, CacheError> + Send,
) -> Result<T, CacheError> {
    std::thread::scope(|s| {
        let trainer = std::thread::Builder::new()
            .name("smartllm-ivf-tr".into())
            .spawn_scoped(s, || {
                // Yields to requests and to the embedder: lowest priority.
                smartllm_embed::lower_priority(IVF_BUILD_NICE);
                f()
            })
            .map_err(|e| CacheError::Task(format!("cannot start the IVF training thread: {e}")))?;
        match trainer.join() {
            Ok(result) => result,
            Err(_) => Err(CacheError::Task("the IVF training thread panicked".into())),
        }
    })
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
        let p = policy();
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

    /// Past the flat-rebuild limit, a cache whose index file is gone opens
    /// without loading its vectors: an IVF index is trained from RocksDB
    /// in the background, entries stored meanwhile are replayed onto it,
    /// new ones never reuse a stored sequence number, and nothing is lost.
    /// `rebuild` (the admin endpoint) does the same, the old index serving
    /// until the swap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_rebuild_trains_from_the_store_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy();
        let question = |i: usize| {
            format!(
                "Background rebuild question {i} about item {}",
                i * 7919 % 1000
            )
        };
        let n = 600;
        {
            let cache = open(dir.path(), &emb, 300);
            for i in 0..n {
                let answer = format!("{{\"a\":{i}}}");
                cache
                    .insert(key(&question(i)), None, answer, &p, "auto", "m")
                    .await
                    .unwrap();
            }
            wait_ivf(&cache);
            flush(&cache);
        }
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        {
            // A stored counter behind the stored ids (an older release's
            // store): new entries still never take a stored number.
            let store = Store::open(dir.path()).unwrap();
            let db = store.db();
            db.put_cf(db.cf_handle(CF_META).unwrap(), NEXT_ID, 1u64.to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        FLAT_REBUILD_MAX_HERE.with(|c| c.set(100));
        let cache = open(dir.path(), &emb, 300);
        FLAT_REBUILD_MAX_HERE.with(|c| c.set(crate::FLAT_REBUILD_MAX));
        assert_eq!(cache.flat_rebuild_max.load(Ordering::Relaxed), 100);
        // Stored while the build may still run: replayed onto the new index.
        cache
            .insert(
                key("stored during the rebuild"),
                None,
                "{}".into(),
                &p,
                "auto",
                "m",
            )
            .await
            .unwrap();
        wait_ivf(&cache);
        assert_eq!(cache.stats().index_vectors, n + 1, "{:?}", cache.stats());
        assert_eq!(
            vectors_stored(&cache),
            n + 1,
            "a stored sequence number was reused"
        );
        let hit = |q: String| {
            let cache = cache.clone();
            let p = p.clone();
            async move {
                matches!(
                    cache.lookup(&key(&q), &p, 8).await.unwrap(),
                    Lookup::Hit { .. }
                )
            }
        };
        assert!(hit("stored during the rebuild".into()).await);
        for i in (0..n).step_by(53) {
            assert!(hit(question(i)).await, "entry {i} lost");
        }
        // The admin rebuild: the old index serves until the new one is in.
        match cache.rebuild().unwrap() {
            Rebuilt::InBackground { about } => assert!(about > 100, "{about}"),
            now => panic!("rebuilt flat: {now:?}"),
        }
        // Asked again meanwhile: the build under way is the rebuild.
        assert!(matches!(
            cache.rebuild().unwrap(),
            Rebuilt::InBackground { .. }
        ));
        assert!(cache.building.load(Ordering::SeqCst) <= 1);
        assert!(hit(question(7)).await);
        wait_ivf(&cache);
        assert!(!cache.building());
        assert_eq!(cache.stats().index_vectors, n + 1);
        assert!(hit(question(8)).await);
        // Under the limit: flat at once.
        cache.flat_rebuild_max.store(usize::MAX, Ordering::Relaxed);
        cache.set_ivf_threshold(usize::MAX);
        assert_eq!(cache.rebuild().unwrap(), Rebuilt::Now(n + 1));
        assert_eq!(cache.stats().index_kind, "flat");
    }

    /// With a key, a stored vector is sealed bound to its entry's id and a
    /// sent one to its entry's exact key: moved to another id, or paired
    /// with another entry, it is not used (it would point one question at
    /// another's answer). An earlier release's unbound form is not used at
    /// runtime, and is sealed bound when the cache opens; one moved to
    /// another id is removed then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_vectors_are_bound_to_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy();
        let key_file = dir.path().join("k.key");
        std::fs::write(&key_file, "c3".repeat(32)).unwrap();
        let keyed = || {
            let store = Store::open(dir.path()).unwrap();
            let codec = Codec::from_key_file(&key_file).unwrap();
            SemanticCache::open(store, emb.clone(), codec, 10, 300, Some(dir.path())).unwrap()
        };
        let (a, b) = (
            key("How do I reset my password?"),
            key("What is the capital of France?"),
        );
        let para = key("What is the way to reset my password?");
        let c = key("Which river flows through Vienna?");
        let (ida, idb, idc, vc);
        {
            let cache = keyed();
            let sa = cache
                .insert(a.clone(), None, "{\"a\":1}".into(), &p, "auto", "m")
                .await
                .unwrap();
            let sb = cache
                .insert(b.clone(), None, "{\"b\":1}".into(), &p, "auto", "m")
                .await
                .unwrap();
            let sc = cache
                .insert(c.clone(), None, "{\"c\":1}".into(), &p, "auto", "m")
                .await
                .unwrap();
            (ida, idb, idc) = (sa.id, sb.id, sc.id);
            vc = sc.embedding.clone().unwrap();
            // a's vector written in the clear under c's id: refused at
            // runtime, and never bound as found (c's question is embedded
            // again at open).
            let plain = crate::storage::vec_to_bytes(sa.embedding.as_ref().unwrap());
            assert!(cache.unseal_vector(&plain, idc).is_none());
            cache
                .db()
                .put_cf(cache.cf(CF_VECTORS), idc.to_be_bytes(), plain)
                .unwrap();
            assert!(cache.open_vector(&sa.sealed_vector, &a.exact).is_ok());
            assert!(cache.open_vector(&sa.sealed_vector, &b.exact).is_err());
            assert!(cache.open_vector(&sb.sealed_vector, &a.exact).is_err());
            let vectors = cache.cf(CF_VECTORS);
            let va = cache
                .db()
                .get_cf(vectors, ida.to_be_bytes())
                .unwrap()
                .unwrap();
            assert!(cache.unseal_vector(&va, ida).is_some());
            assert!(cache.unseal_vector(&va, idb).is_none());
            // a's vector moved under b's id: b's entry is not found by it.
            cache.db().put_cf(vectors, idb.to_be_bytes(), &va).unwrap();
            cache.set_ivf_threshold(usize::MAX);
            assert_eq!(cache.rebuild().unwrap(), Rebuilt::Now(1));
            match cache.lookup(&para, &p, 8).await.unwrap() {
                Lookup::Hit { entry, .. } => assert_eq!(entry.response, "{\"a\":1}"),
                miss => panic!("{miss:?}"),
            }
            // An entry moved under another id is not served for that id's
            // vector: b's entry under a's id.
            let entries = cache.cf(CF_ENTRIES);
            let get = |id: u64| {
                cache
                    .db()
                    .get_cf(entries, id.to_be_bytes())
                    .unwrap()
                    .unwrap()
            };
            let (ea, eb) = (get(ida), get(idb));
            cache.db().put_cf(entries, ida.to_be_bytes(), &eb).unwrap();
            assert!(matches!(
                cache.lookup(&para, &p, 8).await.unwrap(),
                Lookup::Miss { .. }
            ));
            cache.db().put_cf(entries, ida.to_be_bytes(), &ea).unwrap();
            // An earlier release's form: unbound, refused at runtime.
            let unbound = cache
                .codec
                .seal(crate::storage::vec_to_bytes(&sa.embedding.unwrap()))
                .unwrap();
            assert!(cache.unseal_vector(&unbound, ida).is_none());
            cache
                .db()
                .put_cf(vectors, ida.to_be_bytes(), &unbound)
                .unwrap();
            // As that release left its store: its own mark, not this one's.
            let meta = cache.cf(CF_META);
            cache.db().delete_cf(meta, VECTORS_SEALED).unwrap();
            let old_mark = cache.codec.seal(VECTORS_SEALED_UNBOUND.to_vec()).unwrap();
            cache
                .db()
                .put_cf(meta, VECTORS_SEALED_UNBOUND, old_mark)
                .unwrap();
            flush(&cache);
        }
        let cache = keyed();
        let vectors = cache.cf(CF_VECTORS);
        let va = cache
            .db()
            .get_cf(vectors, ida.to_be_bytes())
            .unwrap()
            .unwrap();
        assert!(
            cache.unseal_vector(&va, ida).is_some(),
            "sealed bound at open"
        );
        // The moved one opens nowhere under the store's own key: removed.
        assert!(
            cache
                .db()
                .get_cf(vectors, idb.to_be_bytes())
                .unwrap()
                .is_none(),
            "the moved one is removed"
        );
        let at_c = cache
            .db()
            .get_cf(vectors, idc.to_be_bytes())
            .unwrap()
            .unwrap();
        let at_c = cache.unseal_vector(&at_c, idc).unwrap().0;
        assert!(
            smartllm_embed::cosine(&at_c, &vc) > 0.99,
            "c's own question embedded again, not the bytes found"
        );
        assert_eq!(cache.stats().index_vectors, 2);
        match cache.lookup(&para, &p, 8).await.unwrap() {
            Lookup::Hit { entry, .. } => assert_eq!(entry.response, "{\"a\":1}"),
            miss => panic!("{miss:?}"),
        }
    }

    /// The training sample follows what is read: an even spread of 0.75 to
    /// 1.5 times what the lists for that many want, whatever the guess of
    /// the count (a low RocksDB estimate used to cap it at MIN_SAMPLE_CAP
    /// rows, four per list at a million vectors).
    #[test]
    fn the_training_sample_follows_what_is_read() {
        use crate::index::{nlist_for, TRAIN_PER_LIST};
        for n in [10usize, 20_000, 400_000, 1_000_000] {
            let mut sampled = Vec::new();
            for expected in [1usize, n, 100_000_000] {
                let mut s = EvenSample::new(2, expected);
                for i in 0..n {
                    s.push(&[i as f32, 0.0]);
                }
                assert_eq!(s.seen, n);
                let rows: Vec<f32> = s.rows.chunks_exact(2).map(|r| r[0]).collect();
                // Every stride-th vector, from the first.
                for (k, first) in rows.iter().enumerate() {
                    assert_eq!(*first as usize, k * s.stride, "n {n}");
                }
                let want = nlist_for(n) * TRAIN_PER_LIST;
                if n < EvenSample::cap_at(n) {
                    assert_eq!(rows.len(), n);
                } else {
                    assert!(
                        rows.len() * 100 >= want * 70 && rows.len() * 2 <= want * 3,
                        "n {n}: {} rows for {want} wanted",
                        rows.len()
                    );
                }
                sampled.push(rows);
            }
            assert!(sampled.windows(2).all(|w| w[0] == w[1]), "n {n}");
        }
    }

    /// A rebuild asked for while an ordinary build runs is taken as that
    /// build; should it fail, the rebuild is retried as its own would be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_taken_as_a_failing_build_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let cache = open(dir.path(), &emb, 1_000);
        let p = policy();
        cache
            .insert(key("stored before"), None, "{}".into(), &p, "auto", "m")
            .await
            .unwrap();
        let fail = || Err(CacheError::Task("injected".into()));
        // An ordinary build failing on its own: the index stays, no retry.
        cache.build_ended(false, fail());
        assert_eq!(cache.rebuild_retry_at.load(Ordering::Relaxed), 0);
        // A build under way; a rebuild large enough to go to the background.
        cache.building.store(1, Ordering::SeqCst);
        cache.flat_rebuild_max.store(0, Ordering::Relaxed);
        assert!(matches!(
            cache.rebuild().unwrap(),
            Rebuilt::InBackground { .. }
        ));
        assert_eq!(cache.building.load(Ordering::SeqCst), 1, "no second build");
        cache.build_ended(false, fail());
        assert_ne!(
            cache.rebuild_retry_at.load(Ordering::Relaxed),
            0,
            "the merged rebuild is retried"
        );
        assert!(!cache.rebuild_merged.load(Ordering::SeqCst));
        // Merged into one that succeeds: nothing more to do.
        cache.rebuild_retry_at.store(0, Ordering::Relaxed);
        cache.rebuild().unwrap();
        cache.build_ended(false, Ok(()));
        assert_eq!(cache.rebuild_retry_at.load(Ordering::Relaxed), 0);
        assert!(!cache.rebuild_merged.load(Ordering::SeqCst));
        cache.building.store(0, Ordering::SeqCst);
    }

    fn policy() -> CachePolicy {
        CachePolicy {
            enabled: true,
            semantic: true,
            similarity_threshold: 0.9,
            ttl: Duration::from_secs(3600),
            version: 1,
            max_temperature: 1.0,
            verifier: None,
        }
    }

    fn open(
        dir: &std::path::Path,
        emb: &Arc<Embedder>,
        ivf_threshold: usize,
    ) -> Arc<SemanticCache> {
        let store = Store::open(dir).unwrap();
        SemanticCache::open(
            store,
            emb.clone(),
            Codec::plain(),
            10,
            ivf_threshold,
            Some(dir),
        )
        .unwrap()
    }

    fn flush(cache: &SemanticCache) {
        cache.store.flush().unwrap();
    }

    fn fingerprint(cache: &SemanticCache) -> Option<Vec<u8>> {
        cache.db().get_cf(cache.cf(CF_META), EMBEDDER_KEY).unwrap()
    }

    fn fingerprint_of_mark(cache: &SemanticCache) -> Option<Vec<u8>> {
        cache
            .db()
            .get_cf(cache.cf(CF_META), VECTORS_SEALED)
            .unwrap()
    }

    fn vectors_stored(cache: &SemanticCache) -> usize {
        cache
            .db()
            .iterator_cf(cache.cf(CF_VECTORS), rocksdb::IteratorMode::Start)
            .count()
    }

    /// The highest sequence number among the stored vectors (store closed).
    fn keys_of_vectors_before_open(dir: &std::path::Path) -> u64 {
        let store = smartllm_store::Store::open(dir).unwrap();
        let db = store.db();
        let cf = db.cf_handle(CF_VECTORS).unwrap();
        db.iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|kv| {
                let (k, _) = kv.unwrap();
                crate::ids::seq(u64::from_be_bytes(k[..].try_into().unwrap()))
            })
            .max()
            .unwrap()
    }

    /// Vectors another embedder made (another model, tokenizer or window:
    /// another fingerprint) are dropped at open; the entries are still
    /// served by their exact key. A store that recorded no fingerprint keeps
    /// the vectors this embedder makes again, and drops others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vectors_of_another_embedder_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let ours = Some(emb.fingerprint().into_bytes());
        let p = policy();
        let asked = key("How do I reset my password?");
        let para = key("What is the way to reset my password?");
        let is_hit = |l: &Lookup| matches!(l, Lookup::Hit { .. });
        {
            let cache = open(dir.path(), &emb, 100_000);
            assert_eq!(fingerprint(&cache), ours);
            cache
                .insert(asked.clone(), None, "{}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert!(is_hit(&cache.lookup(&para, &p, 8).await.unwrap()));
            // As a store written before fingerprints were.
            cache
                .db()
                .delete_cf(cache.cf(CF_META), EMBEDDER_KEY)
                .unwrap();
            flush(&cache);
        }
        {
            // This embedder makes them again: kept.
            let cache = open(dir.path(), &emb, 100_000);
            assert_eq!(cache.stats().index_vectors, 1);
            assert_eq!(fingerprint(&cache), ours);
            assert!(is_hit(&cache.lookup(&para, &p, 8).await.unwrap()));
            // No fingerprint, and a vector this embedder does not make.
            let stored = cache
                .insert(asked.clone(), None, "{}".into(), &p, "auto", "m")
                .await
                .unwrap();
            let mut other = vec![0f32; smartllm_embed::DIM];
            other[7] = 1.0;
            let db = cache.db();
            db.put_cf(
                cache.cf(CF_VECTORS),
                stored.id.to_be_bytes(),
                crate::storage::vec_to_bytes(&other),
            )
            .unwrap();
            db.delete_cf(cache.cf(CF_META), EMBEDDER_KEY).unwrap();
            flush(&cache);
        }
        {
            let cache = open(dir.path(), &emb, 100_000);
            assert_eq!(
                (cache.stats().index_vectors, vectors_stored(&cache)),
                (0, 0)
            );
            assert_eq!(fingerprint(&cache), ours);
            // A vector again; then another embedder's fingerprint.
            cache
                .insert(asked.clone(), None, "{}".into(), &p, "auto", "m")
                .await
                .unwrap();
            assert_eq!(vectors_stored(&cache), 1);
            cache
                .db()
                .put_cf(
                    cache.cf(CF_META),
                    EMBEDDER_KEY,
                    b"model=0;tok=0;seq=8;dim=384",
                )
                .unwrap();
            // A counter behind a stored number (as an earlier release could
            // leave it): dropping the vectors must not let it go back.
            cache
                .db()
                .put_cf(cache.cf(CF_META), NEXT_ID, 1u64.to_be_bytes())
                .unwrap();
            flush(&cache);
        }
        let highest = keys_of_vectors_before_open(dir.path());
        let cache = open(dir.path(), &emb, 100_000);
        assert_eq!(
            (cache.stats().index_vectors, vectors_stored(&cache)),
            (0, 0)
        );
        assert!(
            cache.stored_u64(NEXT_ID).unwrap().unwrap() > highest,
            "the next id went back"
        );
        assert_eq!(fingerprint(&cache), ours);
        // Served by its exact key; no paraphrase meets it.
        match cache.lookup(&asked, &p, 8).await.unwrap() {
            Lookup::Hit { kind, .. } => assert_eq!(kind, crate::HitKind::Exact),
            miss => panic!("the entry went with its vector: {miss:?}"),
        }
        assert!(!is_hit(&cache.lookup(&para, &p, 8).await.unwrap()));
    }

    /// With an encryption key no vector is at rest in the clear: vectors are
    /// stored (and handed to the fleet) sealed, and the IVF index is saved
    /// sealed and loaded from there. A store of an earlier release (sealed
    /// entries; vectors and a saved index in the clear) has its vectors
    /// sealed and its index file replaced at open; a vector in the clear
    /// without a sealed entry is removed. A key rotation re-seals them;
    /// vectors no key here opens are removed. Paraphrases hit throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vectors_and_the_index_are_sealed_at_rest_with_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let p = policy();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        std::fs::write(&a, "a1".repeat(32)).unwrap();
        std::fs::write(&b, "b2".repeat(32)).unwrap();
        let file = dir.path().join(INDEX_FILE);
        let with = |codec: Codec, ivf: usize| {
            let store = Store::open(dir.path()).unwrap();
            SemanticCache::open(store, emb.clone(), codec, 10, ivf, Some(dir.path())).unwrap()
        };
        let asked = key("How do I reset my password?");
        let para = key("What is the way to reset my password?");
        let paraphrase_hits = |cache: Arc<SemanticCache>| {
            let (para, p) = (para.clone(), p.clone());
            async move {
                match cache.lookup(&para, &p, 8).await.unwrap() {
                    Lookup::Hit { kind, .. } => kind == crate::HitKind::Semantic,
                    _ => false,
                }
            }
        };
        let filler = |i: usize| key(&format!("Filler question {i} about topic {}", i * 31 % 97));
        // Every stored vector, as stored.
        let stored_bytes = |cache: &SemanticCache| -> Vec<(Vec<u8>, Vec<u8>)> {
            cache
                .db()
                .iterator_cf(cache.cf(CF_VECTORS), rocksdb::IteratorMode::Start)
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (k.to_vec(), v.to_vec())
                })
                .collect()
        };
        let sealed = |v: &[u8]| !v.len().is_multiple_of(4);
        let index_sealed = || {
            std::fs::read(&file).unwrap().starts_with(b"SLMIVF01")
                && VectorIndex::read_ivf(&file, smartllm_embed::DIM).is_err()
        };
        {
            let cache = with(Codec::from_key_file(&a).unwrap(), 300);
            let stored = cache
                .insert(asked.clone(), None, "{}".into(), &p, "auto", "m")
                .await
                .unwrap();
            let v = stored.embedding.clone().unwrap();
            assert!(sealed(&stored.sealed_vector));
            assert_eq!(
                cache
                    .open_vector(&stored.sealed_vector, &asked.exact)
                    .unwrap(),
                v
            );
            assert!(Codec::plain().unseal(&stored.sealed_vector).is_err());
            // One in the clear (from a peer) is refused.
            assert!(cache
                .open_vector(&crate::storage::vec_to_bytes(&v), &asked.exact)
                .is_err());
            for i in 0..300 {
                cache
                    .insert(filler(i), None, "{}".into(), &p, "auto", "m")
                    .await
                    .unwrap();
            }
            wait_ivf(&cache);
            assert!(paraphrase_hits(cache.clone()).await);
            assert!(index_sealed(), "the IVF index is saved sealed");
            let bytes = stored_bytes(&cache);
            assert_eq!(bytes.len(), 301);
            assert!(
                bytes.iter().all(|(_, v)| sealed(v)),
                "a vector in the clear"
            );
            flush(&cache);
        }
        {
            // Loaded from the sealed file.
            let cache = with(Codec::from_key_file(&a).unwrap(), 300);
            assert_eq!(cache.stats().index_kind, "ivf-sq8");
            assert_eq!(cache.stats().index_vectors, 301);
            assert!(paraphrase_hits(cache.clone()).await);
            // As an earlier release left it: the vectors and the index file
            // in the clear, and a vector in the clear without an entry.
            let vectors = cache.cf(CF_VECTORS);
            let mut first = None;
            for (k, v) in stored_bytes(&cache) {
                let id = u64::from_be_bytes(k[..].try_into().unwrap());
                let clear = crate::storage::vec_to_bytes(&cache.unseal_vector(&v, id).unwrap().0);
                first.get_or_insert((k.clone(), clear.clone()));
                cache.db().put_cf(vectors, k, clear).unwrap();
            }
            let (k, clear) = first.unwrap();
            let id = u64::from_be_bytes(k[..].try_into().unwrap());
            let orphan = crate::ids::compose(crate::ids::tag(id), 999_999);
            cache
                .db()
                .put_cf(vectors, orphan.to_be_bytes(), &clear)
                .unwrap();
            cache
                .index
                .frozen(|index, _| index.write_ivf(&file))
                .unwrap();
            // (An earlier release leaves the mark of this key in place.)
            assert!(fingerprint_of_mark(&cache).is_some());
            assert!(!index_sealed());
            flush(&cache);
        }
        {
            // Key A over it: the vectors sealed, the orphan gone, the clear
            // file replaced (rebuilt from RocksDB, then saved sealed).
            let cache = with(Codec::from_key_file(&a).unwrap(), 300);
            let bytes = stored_bytes(&cache);
            assert_eq!(bytes.len(), 301, "the orphan is gone");
            assert!(
                bytes.iter().all(|(_, v)| sealed(v)),
                "a vector in the clear"
            );
            assert_eq!(cache.stats().index_vectors, 301);
            assert!(paraphrase_hits(cache.clone()).await);
            wait_ivf(&cache);
            assert!(index_sealed(), "saved sealed again");
            flush(&cache);
        }
        {
            // Rotation: B current, A old. The index file opens with A, and
            // is saved again with B; the hit re-seals its entry with B.
            let codec = Codec::from_key_files(&b, std::slice::from_ref(&a)).unwrap();
            let cache = with(codec, 300);
            assert_eq!(cache.stats().index_kind, "ivf-sq8");
            assert_eq!(cache.stats().index_vectors, 301);
            assert!(paraphrase_hits(cache.clone()).await);
            assert!(cache.persist().unwrap(), "saved again with the new key");
            flush(&cache);
        }
        {
            let cache = with(Codec::from_key_file(&b).unwrap(), 300);
            assert_eq!(cache.stats().index_kind, "ivf-sq8", "the file opens with B");
            assert_eq!(cache.stats().index_vectors, 301, "re-sealed with B");
            assert!(paraphrase_hits(cache.clone()).await);
            flush(&cache);
        }
        // A key that opens none of them (a wrong key file): not loaded,
        // and kept; with the right key back, all of them serve again.
        {
            let cache = with(Codec::from_key_file(&a).unwrap(), 300);
            assert_eq!(
                (cache.stats().index_vectors, vectors_stored(&cache)),
                (0, 301)
            );
            assert!(fingerprint_of_mark(&cache).is_some());
            flush(&cache);
        }
        {
            let cache = with(Codec::from_key_file(&b).unwrap(), 300);
            assert_eq!(cache.stats().index_vectors, 301, "the right key back");
            assert!(paraphrase_hits(cache.clone()).await);
            // (The wrong key's start dropped the saved index: trained again.)
            wait_ivf(&cache);
            flush(&cache);
        }
        // Opened without a key (the setting gone missing): the mark stays,
        // and what no key opens is kept, as under a wrong key.
        let cache = with(Codec::plain(), 300);
        assert!(fingerprint_of_mark(&cache).is_some());
        assert!(cache.foreign_key.load(Ordering::Relaxed));
        assert_eq!(vectors_stored(&cache), 301);
    }

    /// A file saved while an earlier insert was still under way (its number
    /// handed out, its vector not in yet) holds a later vector past its
    /// marker: the next start uses it all the same, every vector once.
    #[test]
    fn a_file_saved_with_an_insert_under_way_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let emb = embedder(MAX_SEQ);
        let mut rng = fastrand::Rng::with_seed(11);
        let mut write = |cache: &Arc<SemanticCache>, i: usize| {
            let v: Vec<f32> = (0..smartllm_embed::DIM).map(|_| rng.f32() - 0.5).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            let k = key(&format!("question {i}"));
            let entry = crate::test_support::entry_for(&k);
            let v = v.into_iter().map(|x| x / n).collect();
            cache.write(entry, Some(v), k.exact).unwrap();
        };
        {
            let cache = open(dir.path(), &emb, 300);
            for i in 0..300 {
                write(&cache, i);
            }
            cache.maybe_upgrade();
            wait_ivf(&cache);
            let under_way = cache.index.allocate(1);
            write(&cache, 300);
            assert!(cache.persist().unwrap());
            cache.index.release(under_way);
            flush(&cache);
        }
        // A threshold no rebuild reaches: an IVF index here is the file's.
        let cache = open(dir.path(), &emb, 1_000_000);
        assert_eq!(
            cache.stats().index_kind,
            "ivf-sq8",
            "the saved file was not used"
        );
        assert_eq!(cache.stats().index_vectors, 301);
    }

    /// The IVF training runs at low priority on a thread of its own; the
    /// thread that takes the index's locks (to start the build, swap it in
    /// and save it) keeps its priority.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_training_runs_at_low_priority() {
        // This thread's niceness: field 19 of its stat, the 17th after the
        // command name (which may hold spaces) and its closing parenthesis.
        fn nice() -> i64 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            after.split_whitespace().nth(16).unwrap().parse().unwrap()
        }
        std::thread::spawn(|| {
            let before = nice();
            let training = at_low_priority(|| Ok(nice())).unwrap();
            assert_eq!(training, i64::from(IVF_BUILD_NICE));
            assert_eq!(nice(), before);
        })
        .join()
        .unwrap();
    }
}
