//! Semantic cache building blocks. This first part holds the FAISS vector index
//! (inner product over unit vectors = cosine similarity), keyed by caller ids.
//! The exact L1, RocksDB entries, policy and IVF management build on it.

pub mod index;

pub use index::{IndexError, VectorIndex};
