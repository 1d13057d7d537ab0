//! The one RocksDB instance of the gateway: opened once at start with the column
//! families every layer uses (cache entries, vectors, metadata; the ledger adds
//! its own), shared as `Arc<Store>`, flushed on shutdown.

use rocksdb::{ColumnFamilyDescriptor, Options, DB};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CF_ENTRIES: &str = "entries";
pub const CF_VECTORS: &str = "vectors";
pub const CF_META: &str = "meta";
/// Exact-match key (hash of namespace + normalised request) -> entry id.
pub const CF_EXACT: &str = "exact";
pub const COLUMN_FAMILIES: [&str; 4] = [CF_ENTRIES, CF_VECTORS, CF_META, CF_EXACT];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open RocksDB at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("RocksDB error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("unknown column family {0}")]
    UnknownCf(&'static str),
}

pub struct Store {
    db: DB,
    path: PathBuf,
}

/// Facts about the open store, for `/readyz`.
#[derive(Debug, Clone)]
pub struct StoreInfo {
    pub path: PathBuf,
    pub column_families: Vec<String>,
    pub estimated_keys: u64,
    pub live_data_bytes: u64,
}

impl Store {
    /// Open (creating if needed) the store under `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Arc<Store>, StoreError> {
        let path = data_dir.join("db");
        std::fs::create_dir_all(&path).map_err(|source| StoreError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_keep_log_file_num(4);
        opts.set_max_background_jobs(2);
        let cfs = COLUMN_FAMILIES.iter().map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| StoreError::Open {
            path: path.clone(),
            message: e.into_string(),
        })?;
        Ok(Arc::new(Store { db, path }))
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn put(&self, cf: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let h = self.db.cf_handle(cf).ok_or(StoreError::UnknownCf(cf))?;
        Ok(self.db.put_cf(&h, key, value)?)
    }

    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let h = self.db.cf_handle(cf).ok_or(StoreError::UnknownCf(cf))?;
        Ok(self.db.get_cf(&h, key)?)
    }

    /// Flush memtables and the WAL to disk (shutdown, tests).
    pub fn flush(&self) -> Result<(), StoreError> {
        for name in COLUMN_FAMILIES {
            if let Some(h) = self.db.cf_handle(name) {
                self.db.flush_cf(&h)?;
            }
        }
        self.db.flush()?;
        self.db.flush_wal(true)?;
        Ok(())
    }

    pub fn info(&self) -> StoreInfo {
        let mut estimated_keys = 0;
        let mut live_data_bytes = 0;
        for name in COLUMN_FAMILIES {
            if let Some(h) = self.db.cf_handle(name) {
                estimated_keys += self
                    .db
                    .property_int_value_cf(&h, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                live_data_bytes += self
                    .db
                    .property_int_value_cf(&h, "rocksdb.estimate-live-data-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        StoreInfo {
            path: self.path.clone(),
            column_families: COLUMN_FAMILIES.iter().map(|s| s.to_string()).collect(),
            estimated_keys,
            live_data_bytes,
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "flushing RocksDB on shutdown failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(CF_META, b"k", b"v").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get(CF_META, b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(s.info().column_families.len(), 4);
    }

    #[test]
    fn second_open_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("lock held");
        assert!(err.to_string().contains("cannot open RocksDB"), "{err}");
    }
}
