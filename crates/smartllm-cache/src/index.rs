//! FAISS inner-product indexes (inner product over unit vectors = cosine)
//! with caller-chosen 63-bit ids: exact (flat) while small, IVF with 8-bit
//! scalar quantisation once trained ([`VectorIndex`]); and the live index the
//! cache shares between threads ([`SharedIndex`]).
//!
//! # Searching within a namespace
//! Entry ids carry their namespace's tag in their top bits (`crate::ids`), so
//! a namespace's entries form one id range. [`VectorIndex::search_in`] hands
//! FAISS an `IDSelectorRange` for it: the top k are the best of that range, and
//! other namespaces' entries, however many and however close, never take their
//! places.
//!
//! # Concurrency
//! FAISS CPU indexes may be searched from many threads at once (search is
//! `const`), but not while anything adds or removes. [`SharedIndex`]:
//! - **Searches** load the current index (an `Arc` from an `ArcSwap`) and take
//!   the read side of its `RwLock`: they run concurrently with each other, with
//!   persisting, and with training (which fills a separate index). No mutex
//!   serialises them (each passes its own search parameters).
//! - **Adds and removes** are queued; whichever thread finds the writer token
//!   free applies everything queued, coalesced into one `add_with_ids` and one
//!   `remove_ids` (each removal scans the index: batching keeps that to one
//!   scan), under the write side, held that long only. A thread that finds the
//!   token taken leaves its work to the holder, who drains the queue before
//!   letting go: no insert or purge waits for a persist. A removed id is
//!   harmless until its removal lands: its RocksDB entry is already gone, and
//!   verification skips it.
//! - **Exclusive sections** hold the token, so nothing changes the index while
//!   searches go on: persisting (`write_index` is `const`), and swapping in a
//!   rebuilt or newly trained index (an `ArcSwap` store: searches under way
//!   finish on the old one, which is freed after the last). A build logs every
//!   change applied after it took its RocksDB snapshot, and replays them on the
//!   new index just before the swap; the latest build to start wins.
//! - **Where**: every lock here is taken on blocking threads only
//!   (`spawn_blocking`, the builder thread, open); async code reads the atomic
//!   counters (`len`) and the lock-free `ArcSwap` (`ivf_params`).
//! - **Persist markers**: sequence numbers are handed out here and count as in
//!   flight until their vector is applied (or given up); a saved file holds
//!   every vector whose sequence number is below its marker, may hold some
//!   from the marker up to the next number not yet handed out (vectors
//!   applied out of order, or taken by a build's snapshot before their add),
//!   and holds none past that ([`SharedIndex::frozen`]).
//! - **Vectors** with a value that is not finite, or all zeros, are refused
//!   ([`check_vector`]): their scores would be NaN, and a NaN is never below
//!   a threshold (`sim < threshold` is false), so it would pass as a hit.

use crate::ids;
use arc_swap::ArcSwap;
use faiss::index::autotune::ParameterSpace;
use faiss::index::flat::FlatIndexImpl;
use faiss::index::id_map::IdMap;
use faiss::index::{IndexImpl, NativeIndex};
use faiss::selector::IdSelector;
use faiss::{index_factory, Idx, Index, MetricType};
use faiss_sys::{FaissIDSelector, FaissIndex, FaissSearchParameters};
use std::collections::{BTreeSet, HashSet};
use std::ffi::CStr;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, TryLockError};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index has {want}")]
    Dimension { got: usize, want: usize },
    #[error("faiss: {0}")]
    Faiss(#[from] faiss::error::Error),
    #[error("faiss: {0}")]
    Native(String),
    #[error("index file {path}: {message}")]
    File { path: String, message: String },
    #[error("vector has a value that is not finite, or is all zeros")]
    Unusable,
}

enum Kind {
    Flat(IdMap<FlatIndexImpl>),
    Ivf {
        index: IndexImpl,
        nlist: usize,
        nprobe: usize,
        scores: Scores,
    },
}

/// How far an index's scores are from the cosine of the stored vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    /// Flat: the inner product of the vectors themselves.
    Exact,
    /// IVF-SQ8: from a byte per dimension, within about 0.01.
    Close,
    /// IVF-PQ: from a few bytes per vector (48 for 384 dimensions), off by
    /// up to several hundredths and out of order among close neighbours;
    /// every candidate is scored again on its stored vector.
    Coarse,
}

/// The IVF encoding for an index of `n` vectors of `dim` dimensions:
/// 8-bit scalar codes (a byte per dimension) below `pq_threshold`, product
/// quantisation with a byte per 8 dimensions from there (7x less memory and
/// about half the search time at 1M-10M vectors, at coarser scores:
/// bench/README, "Vector index at scale"). A dimension no multiple of 8
/// keeps SQ8. `np`: no polysemous training (FAISS's default for a factory
/// PQ; it reorders codes for Hamming-distance filtering, which no search
/// here uses, and made a PQ build ~50x slower on 3,000 vectors).
pub fn ivf_encoding(n: usize, dim: usize, pq_threshold: usize) -> String {
    if n >= pq_threshold && dim >= 8 && dim.is_multiple_of(8) {
        format!("PQ{}np", dim / 8)
    } else {
        "SQ8".to_string()
    }
}

/// Codes per vector in bytes below which an IVF index's scores are
/// [`Scores::Coarse`] (SQ8 keeps `dim` bytes; PQ `dim / 8`).
fn scores_of(index: &IndexImpl, dim: usize) -> Scores {
    match ivf_code_bytes(index) {
        Some(bytes) if bytes >= dim => Scores::Close,
        // Fewer bytes, or unknown: every candidate is scored again.
        _ => Scores::Coarse,
    }
}

pub struct VectorIndex {
    dim: usize,
    kind: Kind,
    len: usize,
}

fn idx(id: u64) -> Idx {
    Idx::new(id & (i64::MAX as u64))
}

/// Whether `v` can be scored: every value finite and not all zeros (a NaN
/// or an infinity makes every inner product with it NaN; a zero vector has
/// no direction).
pub(crate) fn usable(v: &[f32]) -> bool {
    // A NaN or an infinity makes the sum so; a huge finite value that
    // overflows it is no unit vector either.
    let norm2: f32 = v.iter().map(|x| x * x).sum();
    norm2.is_finite() && norm2 > 0.0
}

/// A vector the index may hold: `dim` values, [`usable`].
pub(crate) fn check_vector(v: &[f32], dim: usize) -> Result<(), IndexError> {
    if v.len() != dim {
        return Err(IndexError::Dimension {
            got: v.len(),
            want: dim,
        });
    }
    if !usable(v) {
        return Err(IndexError::Unusable);
    }
    Ok(())
}

/// Vectors per IVF list that the k-means training sees at most.
pub const TRAIN_PER_LIST: usize = 64;

/// IVF lists for `n` vectors: about 4·√n, at least 16, and no more than
/// [`FAISS_MIN_POINTS_PER_LIST`] vectors each can train.
pub fn nlist_for(n: usize) -> usize {
    ((4.0 * (n as f64).sqrt()) as usize)
        .max(16)
        .min((n / FAISS_MIN_POINTS_PER_LIST).max(1))
}

/// Training vectors a list that FAISS's k-means asks for: with fewer it
/// prints a warning of its own on stderr (a line of plain text in the
/// middle of the JSON log), and its lists come out thin. So no list goes
/// without them (below about 24,000 vectors, fewer lists than 4 sqrt(n)).
pub const FAISS_MIN_POINTS_PER_LIST: usize = 39;

/// Lists probed per query: enough for near-exact recall on unit vectors.
pub fn nprobe_for(nlist: usize) -> usize {
    (nlist / 8).clamp(8, 128).min(nlist)
}

/// The message of the last FAISS C API failure on this thread.
#[allow(unsafe_code)]
fn check(rc: std::os::raw::c_int) -> Result<(), IndexError> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: after a failed call the C API keeps the exception's message in
    // a thread-local string, valid until the next call on this thread.
    let msg = unsafe {
        let p = faiss_sys::faiss_get_last_error();
        if p.is_null() {
            format!("error {rc}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(IndexError::Native(msg))
}

/// Search parameters owned for one call (they do not own their selector).
struct Params(*mut FaissSearchParameters);

impl Params {
    /// IVF parameters when `nprobe` is given, plain ones otherwise; `sel` may be null.
    #[allow(unsafe_code)]
    fn new(sel: *mut FaissIDSelector, nprobe: Option<usize>) -> Result<Self, IndexError> {
        let mut p = std::ptr::null_mut();
        // SAFETY: the constructors write a fresh object's pointer into `p`;
        // `sel` is null or a live selector that outlives these parameters.
        let rc = unsafe {
            match nprobe {
                Some(n) => faiss_sys::faiss_SearchParametersIVF_new_with(&mut p, sel, n, 0),
                None => faiss_sys::faiss_SearchParameters_new(&mut p, sel),
            }
        };
        check(rc)?;
        Ok(Params(p))
    }
}

impl Drop for Params {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: created above and freed once; the destructor is virtual (IVF
        // parameters included) and leaves the selector alone.
        unsafe { faiss_sys::faiss_SearchParameters_free(self.0) }
    }
}

/// One query against a native index, limited to `range` when given.
#[allow(unsafe_code)]
fn search_native(
    index: *const FaissIndex,
    nprobe: Option<usize>,
    query: &[f32],
    k: usize,
    range: Option<Range<u64>>,
) -> Result<Vec<(u64, f32)>, IndexError> {
    let selector = match range {
        Some(r) => Some(IdSelector::range(
            idx(r.start),
            idx(r.end.min(i64::MAX as u64)),
        )?),
        None => None,
    };
    let sel = selector
        .as_ref()
        .map_or(std::ptr::null_mut(), |s| s.inner_ptr());
    let params = Params::new(sel, nprobe)?;
    let mut distances = vec![0f32; k];
    let mut labels = vec![-1i64; k];
    // SAFETY: `index` is a live index borrowed shared for the whole call (the
    // caller holds the read side of its lock: nothing mutates it); FAISS CPU
    // search is const and thread-safe. The parameters (and the ID-map's
    // selector translation, which writes to them) are this call's own. The
    // buffers hold k results for one query of the index's dimension.
    let rc = unsafe {
        faiss_sys::faiss_Index_search_with_params(
            index,
            1,
            query.as_ptr(),
            k as faiss_sys::idx_t,
            params.0,
            distances.as_mut_ptr(),
            labels.as_mut_ptr(),
        )
    };
    check(rc)?;
    drop(params);
    drop(selector);
    Ok(labels
        .into_iter()
        .zip(distances)
        .filter(|(l, _)| *l >= 0)
        .map(|(l, d)| (l as u64, d))
        .collect())
}

/// The lists of an IVF index, read from the index itself.
#[allow(unsafe_code)]
fn ivf_nlist(index: &IndexImpl) -> Option<usize> {
    // SAFETY: the cast is a dynamic_cast (null when not an IVF index); nlist
    // reads a field of the live index we borrow.
    unsafe {
        let ivf = faiss_sys::faiss_IndexIVF_cast(index.inner_ptr());
        (!ivf.is_null()).then(|| faiss_sys::faiss_IndexIVF_nlist(ivf))
    }
}

/// Bytes of one vector's code in an index (for IVF: the list number's
/// bytes and the code), read from the index itself.
#[allow(unsafe_code)]
fn ivf_code_bytes(index: &IndexImpl) -> Option<usize> {
    let mut size = 0usize;
    // SAFETY: `index` is a live FAISS index we borrow; the call writes one
    // usize to `size`.
    let rc = unsafe { faiss_sys::faiss_Index_sa_code_size(index.inner_ptr(), &mut size) };
    (rc == 0).then_some(size)
}

impl VectorIndex {
    /// An exact (flat) inner-product index of `dim`-dimensional vectors.
    pub fn new_flat(dim: usize) -> Result<Self, IndexError> {
        let flat = FlatIndexImpl::new_ip(dim as u32)?;
        Ok(VectorIndex {
            dim,
            kind: Kind::Flat(IdMap::new(flat)?),
            len: 0,
        })
    }

    /// Train an IVF-SQ8 index on `vectors` (row-major, `ids.len()` rows) and add them.
    pub fn train_ivf(dim: usize, vectors: &[f32], ids: &[u64]) -> Result<Self, IndexError> {
        if vectors.len() != ids.len() * dim {
            return Err(IndexError::Dimension {
                got: vectors.len(),
                want: ids.len() * dim,
            });
        }
        let nlist = nlist_for(ids.len());
        // k-means on an even spread of at most TRAIN_PER_LIST vectors a list:
        // at 1M vectors a third of the build time of training on all of them,
        // with the same recall (bench/README, "Vector index at scale").
        let rows = ids.len();
        let want = (nlist * TRAIN_PER_LIST).min(rows);
        let sample: std::borrow::Cow<'_, [f32]> = if want < rows {
            let mut sample = Vec::with_capacity(want * dim);
            for k in 0..want {
                let r = k * rows / want;
                sample.extend_from_slice(&vectors[r * dim..(r + 1) * dim]);
            }
            sample.into()
        } else {
            vectors.into()
        };
        let mut index = Self::train_ivf_sample(dim, &sample, nlist, "SQ8", nprobe_for(nlist))?;
        index.add_batch(ids, vectors)?;
        Ok(index)
    }

    /// An empty IVF index of `nlist` lists and the FAISS `encoding` (`SQ8`,
    /// `PQ48`, ...), trained on `sample` (row-major): for indexes too large
    /// to train on all their vectors, which are then added in batches
    /// ([`Self::add_batch`]). `nprobe` lists are searched per query.
    pub fn train_ivf_sample(
        dim: usize,
        sample: &[f32],
        nlist: usize,
        encoding: &str,
        nprobe: usize,
    ) -> Result<Self, IndexError> {
        if sample.is_empty() || !sample.len().is_multiple_of(dim) {
            return Err(IndexError::Dimension {
                got: sample.len(),
                want: dim,
            });
        }
        let mut index = index_factory(
            dim as u32,
            format!("IVF{nlist},{encoding}"),
            MetricType::InnerProduct,
        )?;
        index.train(sample)?;
        let nprobe = nprobe.clamp(1, nlist);
        ParameterSpace::new()?.set_index_parameter(&index, "nprobe", nprobe as u32)?;
        let scores = scores_of(&index, dim);
        Ok(VectorIndex {
            dim,
            kind: Kind::Ivf {
                index,
                nlist,
                nprobe,
                scores,
            },
            len: 0,
        })
    }

    /// Load a persisted IVF index.
    pub fn read_ivf(path: &Path, dim: usize) -> Result<Self, IndexError> {
        let file_err = |message: String| IndexError::File {
            path: path.display().to_string(),
            message,
        };
        let p = path
            .to_str()
            .ok_or_else(|| file_err("path is not UTF-8".into()))?;
        let index = faiss::read_index(p).map_err(|e| file_err(format!("cannot be read ({e})")))?;
        if index.d() as usize != dim {
            return Err(file_err(format!(
                "has {} dimensions, the model has {dim}",
                index.d()
            )));
        }
        if !index.is_trained() {
            return Err(file_err("is not trained".into()));
        }
        let len = index.ntotal() as usize;
        let nlist = ivf_nlist(&index).ok_or_else(|| file_err("is not an IVF index".into()))?;
        let nprobe = nprobe_for(nlist);
        ParameterSpace::new()?
            .set_index_parameter(&index, "nprobe", nprobe as u32)
            .map_err(|e| file_err(format!("is not an IVF index ({e})")))?;
        let scores = scores_of(&index, dim);
        Ok(VectorIndex {
            dim,
            kind: Kind::Ivf {
                index,
                nlist,
                nprobe,
                scores,
            },
            len,
        })
    }

    /// Persist an IVF index atomically (write to a temporary file, then
    /// rename). Reads the index only: searches may run meanwhile.
    pub fn write_ivf(&self, path: &Path) -> Result<bool, IndexError> {
        let Kind::Ivf { index, .. } = &self.kind else {
            return Ok(false);
        };
        let tmp = path.with_extension("tmp");
        let file_err = |message: String| IndexError::File {
            path: path.display().to_string(),
            message,
        };
        faiss::write_index(
            index,
            tmp.to_str()
                .ok_or_else(|| file_err("path is not UTF-8".into()))?,
        )?;
        std::fs::rename(&tmp, path).map_err(|e| file_err(e.to_string()))?;
        Ok(true)
    }

    /// Write an IVF index to `path` as it is, with no temporary file (for a
    /// file the caller owns: the sealed index's in-memory one). False for a
    /// flat index.
    pub fn write_ivf_to(&self, path: &Path) -> Result<bool, IndexError> {
        let Kind::Ivf { index, .. } = &self.kind else {
            return Ok(false);
        };
        let p = path.to_str().ok_or_else(|| IndexError::File {
            path: path.display().to_string(),
            message: "path is not UTF-8".into(),
        })?;
        faiss::write_index(index, p)?;
        Ok(true)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_ivf(&self) -> bool {
        matches!(self.kind, Kind::Ivf { .. })
    }

    /// How close its scores are to the cosine.
    pub fn scores(&self) -> Scores {
        match &self.kind {
            Kind::Ivf { scores, .. } => *scores,
            Kind::Flat(_) => Scores::Exact,
        }
    }

    /// (nlist, nprobe) of an IVF index.
    pub fn ivf_params(&self) -> Option<(usize, usize)> {
        match &self.kind {
            Kind::Ivf { nlist, nprobe, .. } => Some((*nlist, *nprobe)),
            Kind::Flat(_) => None,
        }
    }

    pub fn add(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError> {
        self.add_batch(&[id], vector)
    }

    /// Add `ids.len()` vectors (row-major) in one call.
    pub fn add_batch(&mut self, ids: &[u64], vectors: &[f32]) -> Result<(), IndexError> {
        if vectors.len() != ids.len() * self.dim {
            return Err(IndexError::Dimension {
                got: vectors.len() / ids.len().max(1),
                want: self.dim,
            });
        }
        if ids.is_empty() {
            return Ok(());
        }
        let ids_: Vec<Idx> = ids.iter().map(|&i| idx(i)).collect();
        match &mut self.kind {
            Kind::Flat(i) => i.add_with_ids(vectors, &ids_)?,
            Kind::Ivf { index, .. } => index.add_with_ids(vectors, &ids_)?,
        }
        self.len += ids.len();
        Ok(())
    }

    /// Remove ids (absent ones are ignored) in one pass over the index;
    /// returns how many were removed.
    pub fn remove(&mut self, ids: &[u64]) -> Result<usize, IndexError> {
        if ids.is_empty() || self.len == 0 {
            return Ok(0);
        }
        let ids: Vec<Idx> = ids.iter().map(|&i| idx(i)).collect();
        let sel = IdSelector::batch(&ids)?;
        let n = match &mut self.kind {
            Kind::Flat(i) => i.remove_ids(&sel)?,
            Kind::Ivf { index, .. } => index.remove_ids(&sel)?,
        };
        self.len = self.len.saturating_sub(n);
        Ok(n)
    }

    /// The `k` nearest ids with their inner products, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, IndexError> {
        self.search_native(query, k, None)
    }

    /// The `k` nearest ids within `range` (a namespace's, `ids::range`).
    pub fn search_in(
        &self,
        query: &[f32],
        k: usize,
        range: Range<u64>,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        self.search_native(query, k, Some(range))
    }

    fn search_native(
        &self,
        query: &[f32],
        k: usize,
        range: Option<Range<u64>>,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        if query.len() != self.dim {
            return Err(IndexError::Dimension {
                got: query.len(),
                want: self.dim,
            });
        }
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let k = k.min(self.len);
        match &self.kind {
            Kind::Flat(i) => search_native(i.inner_ptr(), None, query, k, range),
            Kind::Ivf { index, nprobe, .. } => {
                search_native(index.inner_ptr(), Some(*nprobe), query, k, range)
            }
        }
    }
}

/// A change to the live index.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Add(u64, Vec<f32>),
    Remove(Vec<u64>),
}

/// The adds of `ops` that no removal in `ops` voids (row-major vectors), and
/// every removed id. Ids are never reused: an id both added and removed ends
/// removed, whichever came first (its entry is gone).
fn split(ops: &[Op]) -> (Vec<u64>, Vec<f32>, HashSet<u64>) {
    let removed: HashSet<u64> = ops
        .iter()
        .flat_map(|op| match op {
            Op::Remove(ids) => ids.as_slice(),
            Op::Add(..) => &[],
        })
        .copied()
        .collect();
    let (mut ids, mut data) = (Vec::new(), Vec::new());
    for op in ops {
        if let Op::Add(id, v) = op {
            if !removed.contains(id) {
                ids.push(*id);
                data.extend_from_slice(v);
            }
        }
    }
    (ids, data, removed)
}

/// Apply `ops` to the live index: one add, then one removal pass. Returns
/// whether the add succeeded, and the first error.
fn apply(index: &mut VectorIndex, ops: &[Op]) -> (bool, Result<(), IndexError>) {
    let (ids, data, removed) = split(ops);
    let added = index.add_batch(&ids, &data);
    let removed = index.remove(&removed.into_iter().collect::<Vec<_>>());
    (added.is_ok(), added.and(removed.map(|_| ())))
}

/// Replay `ops` on a freshly built index whose snapshot may already hold some
/// of them: every id they touch is removed first (one pass), so none is added
/// twice and none removed survives.
fn replay(index: &mut VectorIndex, ops: &[Op]) -> Result<(), IndexError> {
    let (ids, data, removed) = split(ops);
    let mut touched: Vec<u64> = removed.into_iter().collect();
    touched.extend_from_slice(&ids);
    index.remove(&touched)?;
    index.add_batch(&ids, &data)
}

/// The live index and what may be read of it without a lock.
struct Live {
    index: RwLock<VectorIndex>,
    ivf: Option<(usize, usize)>,
    scores: Scores,
}

impl Live {
    fn new(index: VectorIndex) -> Arc<Self> {
        Arc::new(Live {
            ivf: index.ivf_params(),
            scores: index.scores(),
            index: RwLock::new(index),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, VectorIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the writer token guards besides the right to change the index.
struct Writer {
    /// Bumped by every build start and reset: a build whose token is older is void.
    generation: u64,
    /// The changes applied since the current build took its snapshot.
    log: Option<Vec<Op>>,
}

/// The cache's live index: see the module doc for the concurrency model.
pub(crate) struct SharedIndex {
    dim: usize,
    live: ArcSwap<Live>,
    writer: Mutex<Writer>,
    queue: Mutex<Vec<Op>>,
    len: AtomicUsize,
    next_seq: AtomicU64,
    /// Sequence numbers handed out whose vector is not applied yet.
    in_flight: Mutex<BTreeSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer token, held by an exclusive section; on release, whatever was
/// queued meanwhile is applied.
pub(crate) struct Exclusive<'a> {
    shared: &'a SharedIndex,
    writer: Option<MutexGuard<'a, Writer>>,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.writer.take();
        if let Err(e) = self.shared.drain() {
            tracing::error!(error = %e, "applying queued cache index changes failed");
        }
    }
}

impl Exclusive<'_> {
    fn writer(&mut self) -> &mut Writer {
        self.writer.as_mut().expect("held until drop")
    }
}

impl SharedIndex {
    pub fn new(index: VectorIndex) -> Self {
        SharedIndex {
            dim: index.dim(),
            len: AtomicUsize::new(index.len()),
            live: ArcSwap::new(Live::new(index)),
            writer: Mutex::new(Writer {
                generation: 0,
                log: None,
            }),
            queue: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Vectors in the index (lock-free).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// (nlist, nprobe) when the index is IVF (lock-free).
    pub fn ivf_params(&self) -> Option<(usize, usize)> {
        self.live.load().ivf
    }

    /// How close the live index's scores are to the cosine (lock-free).
    pub fn scores(&self) -> Scores {
        self.live.load().scores
    }

    /// Search within `range` for `k(scores)` neighbours, with how close the
    /// scores of the index searched (the same snapshot: an index swapped
    /// in meanwhile cannot be taken for another kind). Blocking threads only.
    pub fn search_in_scored(
        &self,
        query: &[f32],
        k: impl FnOnce(Scores) -> usize,
        range: Range<u64>,
    ) -> Result<(Vec<(u64, f32)>, Scores), IndexError> {
        let live = self.live.load_full();
        let index = live.read();
        let scores = index.scores();
        Ok((index.search_in(query, k(scores), range)?, scores))
    }

    /// Search within `range` (tests).
    #[cfg(test)]
    pub fn search_in(
        &self,
        query: &[f32],
        k: usize,
        range: Range<u64>,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        Ok(self.search_in_scored(query, |_| k, range)?.0)
    }

    /// Search the whole index (tests: what a search across namespaces finds).
    #[cfg(test)]
    pub fn search_all(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        self.live.load_full().read().search(query, k).unwrap()
    }

    /// Hand out the next entry id in `tag`'s range; its sequence number is in
    /// flight until its `Op::Add` is applied or it is [`released`](Self::release).
    pub fn allocate(&self, tag: u32) -> u64 {
        let mut f = lock(&self.in_flight);
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        f.insert(seq);
        ids::compose(tag, seq)
    }

    /// No vector will come for `id` (a failed write, or an entry without one).
    pub fn release(&self, id: u64) {
        lock(&self.in_flight).remove(&ids::seq(id));
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// Make sure no sequence number below `n` is handed out again.
    pub fn raise_next_seq(&self, n: u64) {
        self.next_seq.fetch_max(n, Ordering::SeqCst);
    }

    /// Queue changes and apply them now unless another thread holds the
    /// writer token (it then applies them before letting go). Blocking
    /// threads only.
    pub fn submit(&self, ops: Vec<Op>) -> Result<(), IndexError> {
        let mut bad = None;
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| match op {
                // Of another size, or one no score can be computed from
                // (see `check_vector`): never in the index.
                Op::Add(id, v) => match check_vector(v, self.dim) {
                    Ok(()) => true,
                    Err(e) => {
                        self.release(*id);
                        bad = Some(e);
                        false
                    }
                },
                Op::Remove(ids) => !ids.is_empty(),
            })
            .collect();
        if !ops.is_empty() {
            lock(&self.queue).extend(ops);
            self.drain()?;
        }
        match bad {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Apply the queue unless another thread holds the token. Whoever lets go
    /// of the token looks at the queue again: nothing is left behind.
    fn drain(&self) -> Result<(), IndexError> {
        let mut result = Ok(());
        loop {
            let mut writer = match self.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::WouldBlock) => return result,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
            };
            if let Err(e) = self.apply_queued(&mut writer) {
                result = Err(e);
            }
            drop(writer);
            if lock(&self.queue).is_empty() {
                return result;
            }
        }
    }

    /// Under the token: apply what is queued to the live index, log it for a
    /// build under way, and clear its sequence numbers from flight once
    /// their vectors are in.
    fn apply_queued(&self, writer: &mut Writer) -> Result<(), IndexError> {
        let ops = std::mem::take(&mut *lock(&self.queue));
        if ops.is_empty() {
            return Ok(());
        }
        let live = self.live.load_full();
        let (added, result) = {
            let mut index = live.index.write().unwrap_or_else(|p| p.into_inner());
            let r = apply(&mut index, &ops);
            self.len.store(index.len(), Ordering::Relaxed);
            r
        };
        if added {
            let mut f = lock(&self.in_flight);
            for op in &ops {
                if let Op::Add(id, _) = op {
                    f.remove(&ids::seq(*id));
                }
            }
        }
        // A failed add leaves its numbers in flight: a file saved from now
        // on claims none of those vectors (they are stored in RocksDB but
        // not in the index), and the next start adds them from there.
        if let Some(log) = writer.log.as_mut() {
            log.extend(ops);
        }
        result
    }

    /// Take the writer token (waiting for it), after applying the queue.
    fn exclusive(&self) -> Exclusive<'_> {
        let mut writer = lock(&self.writer);
        if let Err(e) = self.apply_queued(&mut writer) {
            tracing::error!(error = %e, "applying queued cache index changes failed");
        }
        Exclusive {
            shared: self,
            writer: Some(writer),
        }
    }

    /// Run `f` on the live index while nothing changes it (searches go on),
    /// with the sequence numbers it is saved at, `seqs`: every stored vector
    /// whose number is below `seqs.start` (the smallest in flight) is in the
    /// index; those in `seqs` may be or not (applied before an earlier number
    /// was, a failed add, or taken by a build's snapshot before their add
    /// came); none from `seqs.end` (the next to be handed out) on is.
    pub fn frozen<R>(&self, f: impl FnOnce(&VectorIndex, Range<u64>) -> R) -> R {
        let _token = self.exclusive();
        let seqs = {
            // Under the lock `allocate` takes: no number is handed out
            // between the two reads.
            let in_flight = lock(&self.in_flight);
            let next = self.next_seq();
            in_flight.first().copied().unwrap_or(next)..next
        };
        let live = self.live.load_full();
        // Only holders of the token write-lock: holding the read side for
        // long keeps no search waiting.
        let index = live.read();
        f(&index, seqs)
    }

    /// A build takes its snapshot after this: from here on, every change
    /// applied is logged for it. Returns its token.
    pub fn begin_build(&self) -> u64 {
        let mut x = self.exclusive();
        let w = x.writer();
        w.generation += 1;
        w.log = Some(Vec::new());
        w.generation
    }

    /// Forget a failed build (its log), unless a newer one started.
    pub fn abandon_build(&self, token: u64) {
        let mut x = self.exclusive();
        let w = x.writer();
        if w.generation == token {
            w.log = None;
        }
    }

    /// Replay the changes logged since `token`'s snapshot on `fresh` and swap
    /// it in. Returns how many changes were replayed, or None (and drops
    /// `fresh`) when a newer build or a reset came after this one started.
    pub fn finish_build(
        &self,
        token: u64,
        mut fresh: VectorIndex,
    ) -> Result<Option<usize>, IndexError> {
        let mut x = self.exclusive();
        let w = x.writer();
        if w.generation != token {
            return Ok(None);
        }
        let ops = w.log.take().unwrap_or_default();
        replay(&mut fresh, &ops)?;
        self.len.store(fresh.len(), Ordering::Relaxed);
        self.live.store(Live::new(fresh));
        Ok(Some(ops.len()))
    }

    /// Replace the index outright (purge-all, open), voiding any build under way.
    pub fn reset(&self, fresh: VectorIndex) {
        let mut x = self.exclusive();
        let w = x.writer();
        w.generation += 1;
        w.log = None;
        self.len.store(fresh.len(), Ordering::Relaxed);
        self.live.store(Live::new(fresh));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn nearest_by_cosine_with_ids() {
        let mut idx = VectorIndex::new_flat(3).unwrap();
        idx.add(42, &unit(&[1.0, 0.0, 0.0])).unwrap();
        idx.add(7, &unit(&[0.0, 1.0, 0.0])).unwrap();
        idx.add(9, &unit(&[1.0, 1.0, 0.0])).unwrap();
        let hits = idx.search(&unit(&[0.9, 0.1, 0.0]), 2).unwrap();
        assert_eq!(hits[0].0, 42);
        assert_eq!(hits[1].0, 9);
        assert!(hits[0].1 > hits[1].1 && hits[0].1 <= 1.0001);
        assert_eq!(idx.len(), 3);
        assert!(idx.add(1, &[1.0]).is_err());
        assert!(VectorIndex::new_flat(3)
            .unwrap()
            .search(&[1.0, 0.0, 0.0], 3)
            .unwrap()
            .is_empty());
        assert_eq!(idx.remove(&[42, 1000]).unwrap(), 1);
        assert_eq!(idx.search(&unit(&[0.9, 0.1, 0.0]), 1).unwrap()[0].0, 9);
        assert_eq!(idx.len(), 2);
    }

    /// Deterministic pseudo-random unit vectors.
    fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
            out.extend(unit(&v));
        }
        out
    }

    /// Vectors no score can be computed from (a NaN scores NaN against
    /// anything) are refused, and their numbers leave flight.
    #[test]
    fn unusable_vectors_are_refused() {
        let shared = SharedIndex::new(VectorIndex::new_flat(3).unwrap());
        for bad in [
            vec![f32::NAN, 0.0, 1.0],
            vec![0.0; 3],
            vec![f32::INFINITY, 0.0, 0.0],
        ] {
            let id = shared.allocate(1);
            let refused = shared.submit(vec![Op::Add(id, bad)]);
            assert!(matches!(refused, Err(IndexError::Unusable)), "{refused:?}");
            assert!(lock(&shared.in_flight).is_empty());
        }
        let id = shared.allocate(1);
        let refused = shared.submit(vec![Op::Add(id, vec![1.0, 0.0])]);
        assert!(matches!(refused, Err(IndexError::Dimension { .. })));
        assert_eq!(shared.len(), 0);
        let id = shared.allocate(1);
        shared
            .submit(vec![Op::Add(id, unit(&[1.0, 2.0, 0.0]))])
            .unwrap();
        assert_eq!(shared.len(), 1);
        assert!(check_vector(&[0.0, 1e-3, 0.0], 3).is_ok());
    }

    /// A number whose add failed stays in flight: a file saved afterwards
    /// claims no vector from it on (their seqs start there), while the later
    /// vectors it holds are marked as maybe there.
    #[test]
    fn a_failed_add_keeps_its_number_in_flight() {
        let shared = SharedIndex::new(VectorIndex::new_flat(3).unwrap());
        let failed = shared.allocate(1);
        // Past `submit`'s checks, as a failure inside FAISS would be.
        lock(&shared.queue).push(Op::Add(failed, vec![1.0, 0.0]));
        assert!(shared.drain().is_err());
        let later = shared.allocate(1);
        shared
            .submit(vec![Op::Add(later, unit(&[0.0, 1.0, 0.0]))])
            .unwrap();
        shared.frozen(|index, seqs| {
            assert_eq!(index.len(), 1);
            assert_eq!(seqs.start, ids::seq(failed));
            assert!(seqs.contains(&ids::seq(later)));
            assert_eq!(seqs.end, shared.next_seq());
        });
    }

    #[test]
    fn ivf_trains_finds_persists_and_rejects_bad_files() {
        let (n, dim) = (2000, 32);
        let data = vectors(n, dim, 7);
        let ids: Vec<u64> = (1000..1000 + n as u64).collect();
        let mut ivf = VectorIndex::train_ivf(dim, &data, &ids).unwrap();
        assert!(ivf.is_ivf());
        assert_eq!(ivf.len(), n);
        let mut found = 0;
        for i in (0..n).step_by(50) {
            let q = &data[i * dim..(i + 1) * dim];
            if ivf.search(q, 1).unwrap().first().map(|h| h.0) == Some(ids[i]) {
                found += 1;
            }
        }
        assert!(found >= 38, "recall@1 {found}/40");
        ivf.add(5, &data[..dim]).unwrap();
        assert_eq!(ivf.remove(&[5, 1000]).unwrap(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.ivf");
        assert!(ivf.write_ivf(&path).unwrap());
        let back = VectorIndex::read_ivf(&path, dim).unwrap();
        assert_eq!(back.len(), n - 1);
        let q = &data[100 * dim..101 * dim];
        assert_eq!(back.search(q, 1).unwrap()[0].0, ids[100]);
        assert!(VectorIndex::read_ivf(&path, dim + 1).is_err());
        std::fs::write(&path, b"garbage").unwrap();
        let err = VectorIndex::read_ivf(&path, dim).err().unwrap().to_string();
        assert!(err.contains("cannot be read"), "{err}");
        assert!(!VectorIndex::new_flat(dim)
            .unwrap()
            .write_ivf(&path)
            .unwrap());
    }

    #[test]
    fn large_indexes_take_pq_codes_and_say_their_scores_are_coarse() {
        assert_eq!(ivf_encoding(999_999, 384, 1_000_000), "SQ8");
        assert_eq!(ivf_encoding(1_000_000, 384, 1_000_000), "PQ48np");
        assert_eq!(
            ivf_encoding(5_000_000, 100, 1_000_000),
            "SQ8",
            "100 is no multiple of 8"
        );
        assert_eq!(VectorIndex::new_flat(32).unwrap().scores(), Scores::Exact);
        let (n, dim) = (12_000, 32);
        let data = vectors(n, dim, 9);
        let ids: Vec<u64> = (1..=n as u64).collect();
        let sq8 = VectorIndex::train_ivf_sample(dim, &data, 64, "SQ8", 8).unwrap();
        assert_eq!(sq8.scores(), Scores::Close);
        let mut pq = VectorIndex::train_ivf_sample(dim, &data, 64, "PQ4np", 8).unwrap();
        assert_eq!(pq.scores(), Scores::Coarse);
        pq.add_batch(&ids, &data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.ivf");
        assert!(pq.write_ivf(&path).unwrap());
        let back = VectorIndex::read_ivf(&path, dim).unwrap();
        assert_eq!(back.scores(), Scores::Coarse, "read back from the file");
        assert_eq!(back.len(), n);
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn random(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
        unit((0..dim).map(|_| rng.f32() - 0.5).collect())
    }

    fn perturbed(rng: &mut fastrand::Rng, v: &[f32]) -> Vec<f32> {
        unit(v.iter().map(|x| x + 0.02 * (rng.f32() - 0.5)).collect())
    }

    /// Searchers run concurrently while one thread adds and removes, another
    /// trains an IVF index from a snapshot and swaps it in, and the index is
    /// persisted: every search sees only its namespace and finds its own
    /// entry, persisting stops no search (and queues a concurrent add rather
    /// than making it wait), and the index ends holding exactly what was
    /// stored.
    #[test]
    fn searches_run_concurrently_with_adds_removes_persists_and_a_swap() {
        let (dim, namespaces, questions, own_extra) = (32usize, 200u32, 20usize, 5usize);
        let mut rng = fastrand::Rng::with_seed(5);
        let qv: Vec<Vec<f32>> = (0..questions).map(|_| random(&mut rng, dim)).collect();
        let shared = SharedIndex::new(VectorIndex::new_flat(dim).unwrap());
        // The source of truth (RocksDB in the cache): written before submitting.
        let truth: Mutex<HashMap<u64, Vec<f32>>> = Mutex::new(HashMap::new());
        let mut own = HashMap::new();
        for tag in 1..=namespaces {
            let mut ops = Vec::new();
            for (q, v) in qv.iter().enumerate() {
                let id = shared.allocate(tag);
                own.insert((tag, q), id);
                ops.push(Op::Add(id, v.clone()));
            }
            for _ in 0..own_extra {
                let id = shared.allocate(tag);
                ops.push(Op::Add(id, random(&mut rng, dim)));
            }
            for op in &ops {
                if let Op::Add(id, v) = op {
                    lock(&truth).insert(*id, v.clone());
                }
            }
            shared.submit(ops).unwrap();
        }
        assert_eq!(shared.len(), namespaces as usize * (questions + own_extra));
        let stop = AtomicBool::new(false);
        let (searches, ivf_searches) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let swapped = AtomicBool::new(false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.ivf");
        let started = Instant::now();
        std::thread::scope(|s| {
            for seed in 0..6u64 {
                let (shared, own, stop, qv) = (&shared, &own, &stop, &qv);
                let (searches, ivf_searches) = (&searches, &ivf_searches);
                s.spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(100 + seed);
                    while !stop.load(Ordering::Relaxed) {
                        let (tag, q) = (rng.u32(1..=namespaces), rng.usize(..questions));
                        let ivf = shared.ivf_params().is_some();
                        let hits = shared
                            .search_in(&perturbed(&mut rng, &qv[q]), 4, ids::range(tag))
                            .unwrap();
                        assert!(hits.iter().all(|(id, _)| ids::tag(*id) == tag));
                        assert_eq!(hits.first().map(|h| h.0), Some(own[&(tag, q)]), "{tag}/{q}");
                        searches.fetch_add(1, Ordering::Relaxed);
                        ivf_searches.fetch_add(usize::from(ivf), Ordering::Relaxed);
                    }
                });
            }
            // The builder: snapshot after `begin_build`, train, replay, swap.
            let (shared_b, truth_b, swapped_b) = (&shared, &truth, &swapped);
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let token = shared_b.begin_build();
                let (ids, data): (Vec<u64>, Vec<Vec<f32>>) =
                    lock(truth_b).iter().map(|(i, v)| (*i, v.clone())).unzip();
                let fresh = VectorIndex::train_ivf(dim, &data.concat(), &ids).unwrap();
                assert!(shared_b.finish_build(token, fresh).unwrap().is_some());
                swapped_b.store(true, Ordering::SeqCst);
            });
            // The writer: churn in the searched namespaces, and persists.
            let mut rng = fastrand::Rng::with_seed(9);
            let mut previous: Vec<u64> = Vec::new();
            let mut round = 0;
            while round < 300 || !swapped.load(Ordering::SeqCst) {
                let mut ops = vec![Op::Remove(previous.clone())];
                let mut truth_now = lock(&truth);
                for id in &previous {
                    truth_now.remove(id);
                }
                previous.clear();
                for _ in 0..20 {
                    let id = shared.allocate(rng.u32(1..=namespaces + 50));
                    let v = random(&mut rng, dim);
                    truth_now.insert(id, v.clone());
                    previous.push(id);
                    ops.push(Op::Add(id, v));
                }
                drop(truth_now);
                shared.submit(ops).unwrap();
                if round % 50 == 0 {
                    shared.frozen(|index, _| index.write_ivf(&path).unwrap());
                }
                round += 1;
            }
            // Persisting stops no search; an add meanwhile is queued, not waited on.
            let late = random(&mut rng, dim);
            let late_id = shared.allocate(namespaces + 100);
            shared.frozen(|index, marker| {
                assert!(index.is_ivf() && index.write_ivf(&path).unwrap());
                let before = searches.load(Ordering::SeqCst);
                lock(&truth).insert(late_id, late.clone());
                shared.submit(vec![Op::Add(late_id, late.clone())]).unwrap();
                assert!(index
                    .search_in(&late, 1, ids::range(namespaces + 100))
                    .unwrap()
                    .is_empty());
                assert!(marker.start <= ids::seq(late_id) && ids::seq(late_id) < marker.end);
                let deadline = Instant::now() + Duration::from_secs(20);
                while searches.load(Ordering::SeqCst) < before + 200 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                assert!(
                    searches.load(Ordering::SeqCst) >= before + 200,
                    "searches stalled while the index was being persisted"
                );
            });
            let found = shared
                .search_in(&late, 1, ids::range(namespaces + 100))
                .unwrap();
            assert_eq!(found.first().map(|h| h.0), Some(late_id));
            std::thread::sleep(Duration::from_millis(50));
            stop.store(true, Ordering::Relaxed);
        });
        let truth = truth.into_inner().unwrap();
        assert!(shared.ivf_params().is_some());
        assert_eq!(shared.len(), truth.len(), "replayed exactly");
        assert!(lock(&shared.in_flight).is_empty());
        // Every stored vector is found in its own namespace (the SQ8 codes
        // of a vector are nearest to it).
        for (id, v) in &truth {
            let hits = shared.search_in(v, 1, ids::range(ids::tag(*id))).unwrap();
            let first = hits.first().map(|h| h.0).unwrap();
            assert!(first == *id || truth[&first] == *v, "{id}");
        }
        assert_eq!(
            VectorIndex::read_ivf(&path, dim).unwrap().len(),
            truth.len() - 1,
            "the late add was not in the file"
        );
        let (n, on_ivf) = (searches.into_inner(), ivf_searches.into_inner());
        eprintln!(
            "{n} searches ({on_ivf} on IVF) in {} ms",
            started.elapsed().as_millis()
        );
        assert!(on_ivf > 0 && n > on_ivf);
    }
}
