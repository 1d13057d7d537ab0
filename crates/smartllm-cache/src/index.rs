//! FAISS inner-product indexes (inner product over unit vectors = cosine) with
//! caller-chosen 64-bit ids: exact (flat) while small, IVF with 8-bit scalar
//! quantisation once trained. The flat index searches under a shared borrow;
//! the IVF one through a mutex (FAISS parallelises a single IVF query itself).

use faiss::index::autotune::ParameterSpace;
use faiss::index::flat::FlatIndexImpl;
use faiss::index::id_map::IdMap;
use faiss::index::IndexImpl;
use faiss::selector::IdSelector;
use faiss::{index_factory, ConcurrentIndex, Idx, Index, MetricType};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index has {want}")]
    Dimension { got: usize, want: usize },
    #[error("faiss: {0}")]
    Faiss(#[from] faiss::error::Error),
    #[error("index file {path}: {message}")]
    File { path: String, message: String },
}

enum Kind {
    Flat(IdMap<FlatIndexImpl>),
    Ivf {
        index: Mutex<IndexImpl>,
        nlist: usize,
        nprobe: usize,
    },
}

pub struct VectorIndex {
    dim: usize,
    kind: Kind,
    len: usize,
}

fn idx(id: u64) -> Idx {
    Idx::new(id & (i64::MAX as u64))
}

/// IVF lists for `n` vectors: about 4·√n, at least 16.
pub fn nlist_for(n: usize) -> usize {
    ((4.0 * (n as f64).sqrt()) as usize).max(16)
}

/// Lists probed per query: enough for near-exact recall on unit vectors.
pub fn nprobe_for(nlist: usize) -> usize {
    (nlist / 8).clamp(8, 128).min(nlist)
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
        let mut index = index_factory(
            dim as u32,
            format!("IVF{nlist},SQ8"),
            MetricType::InnerProduct,
        )?;
        index.train(vectors)?;
        let faiss_ids: Vec<Idx> = ids.iter().map(|&i| idx(i)).collect();
        index.add_with_ids(vectors, &faiss_ids)?;
        let nprobe = nprobe_for(nlist);
        ParameterSpace::new()?.set_index_parameter(&index, "nprobe", nprobe as u32)?;
        Ok(VectorIndex {
            dim,
            kind: Kind::Ivf {
                index: Mutex::new(index),
                nlist,
                nprobe,
            },
            len: ids.len(),
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
        let nlist = nlist_for(len.max(1));
        let nprobe = nprobe_for(nlist);
        ParameterSpace::new()?
            .set_index_parameter(&index, "nprobe", nprobe as u32)
            .map_err(|e| file_err(format!("is not an IVF index ({e})")))?;
        Ok(VectorIndex {
            dim,
            kind: Kind::Ivf {
                index: Mutex::new(index),
                nlist,
                nprobe,
            },
            len,
        })
    }

    /// Persist an IVF index atomically (write to a temporary file, then rename).
    pub fn write_ivf(&self, path: &Path) -> Result<bool, IndexError> {
        let Kind::Ivf { index, .. } = &self.kind else {
            return Ok(false);
        };
        let tmp = path.with_extension("tmp");
        let file_err = |message: String| IndexError::File {
            path: path.display().to_string(),
            message,
        };
        {
            let guard = index.lock().unwrap_or_else(|p| p.into_inner());
            faiss::write_index(
                &*guard,
                tmp.to_str()
                    .ok_or_else(|| file_err("path is not UTF-8".into()))?,
            )?;
        }
        std::fs::rename(&tmp, path).map_err(|e| file_err(e.to_string()))?;
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

    /// (nlist, nprobe) of an IVF index.
    pub fn ivf_params(&self) -> Option<(usize, usize)> {
        match &self.kind {
            Kind::Ivf { nlist, nprobe, .. } => Some((*nlist, *nprobe)),
            Kind::Flat(_) => None,
        }
    }

    pub fn add(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dim {
            return Err(IndexError::Dimension {
                got: vector.len(),
                want: self.dim,
            });
        }
        match &mut self.kind {
            Kind::Flat(i) => i.add_with_ids(vector, &[idx(id)])?,
            Kind::Ivf { index, .. } => index
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .add_with_ids(vector, &[idx(id)])?,
        }
        self.len += 1;
        Ok(())
    }

    /// Remove ids (absent ones are ignored); returns how many were removed.
    pub fn remove(&mut self, ids: &[u64]) -> Result<usize, IndexError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Idx> = ids.iter().map(|&i| idx(i)).collect();
        let sel = IdSelector::batch(&ids)?;
        let n = match &mut self.kind {
            Kind::Flat(i) => i.remove_ids(&sel)?,
            Kind::Ivf { index, .. } => index
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .remove_ids(&sel)?,
        };
        self.len = self.len.saturating_sub(n);
        Ok(n)
    }

    /// The `k` nearest ids with their inner products, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>, IndexError> {
        if query.len() != self.dim {
            return Err(IndexError::Dimension {
                got: query.len(),
                want: self.dim,
            });
        }
        if self.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let res = match &self.kind {
            Kind::Flat(i) => ConcurrentIndex::search(i, query, k)?,
            Kind::Ivf { index, .. } => index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .search(query, k)?,
        };
        Ok(res
            .labels
            .iter()
            .zip(res.distances)
            .filter_map(|(l, d)| l.get().map(|id| (id, d)))
            .collect())
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
}
