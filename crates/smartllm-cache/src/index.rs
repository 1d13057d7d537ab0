//! A FAISS inner-product index with caller-chosen 64-bit ids.

use faiss::index::flat::FlatIndexImpl;
use faiss::index::id_map::IdMap;
use faiss::selector::IdSelector;
use faiss::{ConcurrentIndex, Idx, Index};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index has {want}")]
    Dimension { got: usize, want: usize },
    #[error("faiss: {0}")]
    Faiss(#[from] faiss::error::Error),
}

pub struct VectorIndex {
    dim: usize,
    inner: IdMap<FlatIndexImpl>,
}

impl VectorIndex {
    /// An exact (flat) inner-product index of `dim`-dimensional vectors.
    pub fn new_flat(dim: usize) -> Result<Self, IndexError> {
        let flat = FlatIndexImpl::new_ip(dim as u32)?;
        Ok(VectorIndex {
            dim,
            inner: IdMap::new(flat)?,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.inner.ntotal() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn add(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dim {
            return Err(IndexError::Dimension {
                got: vector.len(),
                want: self.dim,
            });
        }
        self.inner
            .add_with_ids(vector, &[Idx::new(id & (i64::MAX as u64))])?;
        Ok(())
    }

    /// Remove ids (absent ones are ignored); returns how many were removed.
    pub fn remove(&mut self, ids: &[u64]) -> Result<usize, IndexError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Idx> = ids
            .iter()
            .map(|&i| Idx::new(i & (i64::MAX as u64)))
            .collect();
        Ok(self.inner.remove_ids(&IdSelector::batch(&ids)?)?)
    }

    /// The `k` nearest ids with their inner products, best first. Takes `&self`:
    /// searches run concurrently under a read lock.
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
        let res = ConcurrentIndex::search(&self.inner, query, k)?;
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
    }
}
