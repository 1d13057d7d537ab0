//! The one RocksDB instance of the gateway: opened once at start with the column
//! families every layer uses (cache entries, vectors, metadata; the ledger adds
//! its own), shared as `Arc<Store>`, flushed on shutdown.
//!
//! Its memory has one budget. RocksDB's defaults give every column family its
//! own 32 MiB block cache and up to two 64 MiB memtables: with six families
//! that is up to about 1 GiB, reached slowly, which a soak run showed as RSS
//! creeping up for many minutes. Here all families share one LRU block cache
//! of `memory_budget`; the memtables of all families together are capped at
//! half of it by a write buffer manager that charges them to the same cache;
//! and index and filter blocks live in that cache too.

use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBufferManager, DB};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CF_ENTRIES: &str = "entries";
pub const CF_VECTORS: &str = "vectors";
pub const CF_META: &str = "meta";
/// Exact-match key (hash of namespace + normalised request) -> entry id.
pub const CF_EXACT: &str = "exact";
/// Cost ledger: hour x tenant x app x key x model x provider x route x tag ->
/// counters, merged by addition.
pub const CF_LEDGER: &str = "ledger";
/// Traffic mix for cost suggestions: hour x tenant x app x model x task x
/// complexity tier x cache outcome -> the same counters, merged by addition.
pub const CF_LEDGER_MIX: &str = "ledger_mix";
/// Responses API conversations the gateway keeps (`previous_response_id`
/// for translated providers): tenant + response id -> expiry + stored response.
/// Each value begins with its expiry (Unix seconds, 8 bytes big-endian):
/// compaction drops those past it, and each file of the family is compacted
/// at least once a day, so a conversation no one reads again leaves the
/// disk within a day of its expiry.
pub const CF_RESPONSES: &str = "responses";
pub const COLUMN_FAMILIES: [&str; 7] = [
    CF_ENTRIES,
    CF_VECTORS,
    CF_META,
    CF_EXACT,
    CF_LEDGER,
    CF_LEDGER_MIX,
    CF_RESPONSES,
];

/// Number of u64 counters in a ledger value. Values written with fewer
/// (older versions had 8) decode with the rest at 0, and merge with newer
/// ones field by field: the encoding only ever grows at the end.
pub const LEDGER_FIELDS: usize = 10;

/// Does a [`CF_RESPONSES`] value expire at or before `now` (Unix seconds)?
/// A value too short to hold an expiry is kept (it is no record of ours).
pub fn expired(value: &[u8], now: u64) -> bool {
    value
        .first_chunk::<8>()
        .is_some_and(|e| u64::from_be_bytes(*e) <= now)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The compaction filter of [`CF_RESPONSES`] (RocksDB's background threads).
fn drop_expired(_level: u32, _key: &[u8], value: &[u8]) -> rocksdb::CompactionDecision {
    if expired(value, now_secs()) {
        rocksdb::CompactionDecision::Remove
    } else {
        rocksdb::CompactionDecision::Keep
    }
}

/// Little-endian u64 counters, added field by field.
pub fn decode_counters(bytes: &[u8]) -> [u64; LEDGER_FIELDS] {
    let mut out = [0u64; LEDGER_FIELDS];
    for (i, c) in bytes.chunks_exact(8).take(LEDGER_FIELDS).enumerate() {
        out[i] = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
    }
    out
}

pub fn encode_counters(c: &[u64; LEDGER_FIELDS]) -> Vec<u8> {
    c.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The ledger's merge operator: counters add up, so writers never read first
/// and concurrent increments never lose one another. The sum saturates at
/// `u64::MAX` rather than wrapping: a wrapped counter would turn a huge
/// total into a small one, for good, in every later read of that row.
fn add_counters(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut acc = existing.map(decode_counters).unwrap_or([0; LEDGER_FIELDS]);
    for op in operands {
        let d = decode_counters(op);
        for i in 0..LEDGER_FIELDS {
            acc[i] = acc[i].saturating_add(d[i]);
        }
    }
    Some(encode_counters(&acc))
}

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

/// A database directory that holds tables or a manifest but no `CURRENT`
/// (deleted, or lost to a bad disk) is refused: RocksDB would start a new,
/// empty database there and delete the old tables, the ledger and the cache
/// with them. The message says how to recover.
fn refuse_a_store_without_current(path: &Path) -> Result<(), StoreError> {
    if path.join("CURRENT").exists() {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return Ok(());
    };
    let files: Vec<(String, u64)> = entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let size = e.metadata().map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    // Data: tables, a write-ahead log with records, or a manifest past the
    // first (a first open killed before it wrote CURRENT leaves only
    // MANIFEST-000001 and empty files: nothing to lose, opened afresh).
    let holds_data = files.iter().any(|(n, size)| {
        n.ends_with(".sst")
            || (n.ends_with(".log")
                && n.chars().next().is_some_and(|c| c.is_ascii_digit())
                && *size > 0)
            || (n.starts_with("MANIFEST-") && n != "MANIFEST-000001")
    });
    if !holds_data {
        return Ok(());
    }
    let data: Vec<&String> = files
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".sst") || n.ends_with(".log") || n.starts_with("MANIFEST-"))
        .collect();
    let mut manifests: Vec<&String> = data
        .iter()
        .copied()
        .filter(|n| n.starts_with("MANIFEST-"))
        .collect();
    manifests.sort();
    Err(StoreError::Open {
        path: path.to_path_buf(),
        message: format!(
            "it holds {} table, log or manifest files but no CURRENT file, and opening it would start an empty database in their place (the cost ledger and the cache lost); restore CURRENT from a backup, or write the newest manifest's name into it ({}), or move the directory away to start afresh",
            data.len(),
            match manifests.last() {
                Some(m) => format!("`echo {m} > {}`", path.join("CURRENT").display()),
                None => "there is none".to_string(),
            }
        ),
    })
}

pub struct Store {
    db: DB,
    path: PathBuf,
    cache: Cache,
    write_buffers: WriteBufferManager,
}

/// The default `store.memory_budget`: block cache, memtables (at most half)
/// and index/filter blocks together.
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;

/// RocksDB memory in use, for `smartllm_store_memory_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMemory {
    /// The shared block cache, memtable reservations included.
    pub block_cache: u64,
    /// Memtables of every column family.
    pub memtables: u64,
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
        Store::open_with_budget(data_dir, DEFAULT_MEMORY_BUDGET)
    }

    /// Open with `memory_budget` bytes for the block cache and memtables.
    pub fn open_with_budget(
        data_dir: &Path,
        memory_budget: usize,
    ) -> Result<Arc<Store>, StoreError> {
        let path = data_dir.join("db");
        std::fs::create_dir_all(&path).map_err(|source| StoreError::CreateDir {
            path: path.clone(),
            source,
        })?;
        refuse_a_store_without_current(&path)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_keep_log_file_num(4);
        opts.set_max_background_jobs(2);
        let memory_budget = memory_budget.max(8 << 20);
        let cache = Cache::new_lru_cache(memory_budget);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            memory_budget / 2,
            false,
            cache.clone(),
        );
        opts.set_write_buffer_manager(&write_buffers);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        // One family's memtable: small enough that several fit in the budget.
        let write_buffer_size = (memory_budget / 8).clamp(1 << 20, 64 << 20);
        let cfs = COLUMN_FAMILIES.iter().map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(write_buffer_size);
            if *name == CF_LEDGER || *name == CF_LEDGER_MIX {
                o.set_merge_operator_associative("smartllm-ledger-add", add_counters);
            }
            if *name == CF_RESPONSES {
                o.set_compaction_filter("smartllm-responses-expiry", drop_expired);
                o.set_periodic_compaction_seconds(24 * 3600);
            }
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| StoreError::Open {
            path: path.clone(),
            message: e.into_string(),
        })?;
        Ok(Arc::new(Store {
            db,
            path,
            cache,
            write_buffers,
        }))
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

    pub fn delete(&self, cf: &'static str, key: &[u8]) -> Result<(), StoreError> {
        let h = self.db.cf_handle(cf).ok_or(StoreError::UnknownCf(cf))?;
        Ok(self.db.delete_cf(&h, key)?)
    }

    /// Make deletions final on disk: flush every column family (so no
    /// write-ahead log still holds what was deleted) and compact `cfs`
    /// all the way down, bottommost files included, so no SST file keeps a
    /// deleted value until RocksDB would have compacted it on its own.
    /// Blocking, and as slow as rewriting those column families.
    pub fn compact_deleted(&self, cfs: &[&'static str]) -> Result<(), StoreError> {
        self.flush()?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        opts.set_exclusive_manual_compaction(false);
        for cf in cfs {
            let h = self.db.cf_handle(cf).ok_or(StoreError::UnknownCf(cf))?;
            self.db
                .compact_range_cf_opt(&h, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    /// Delete every key of `cf` that starts with `prefix`, in one batch;
    /// how many of them `counted` says count.
    pub fn delete_prefix(
        &self,
        cf: &'static str,
        prefix: &[u8],
        counted: impl Fn(&[u8]) -> bool,
    ) -> Result<u64, StoreError> {
        let h = self.db.cf_handle(cf).ok_or(StoreError::UnknownCf(cf))?;
        let mut batch = rocksdb::WriteBatch::default();
        let mut n = 0;
        let from = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(&h, from) {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            n += u64::from(counted(&k));
            batch.delete_cf(&h, &k);
        }
        self.db.write(batch)?;
        Ok(n)
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

    pub fn memory(&self) -> StoreMemory {
        StoreMemory {
            block_cache: self.cache.get_usage() as u64,
            memtables: self.write_buffers.get_usage() as u64,
        }
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

    /// Expired conversations leave the disk at compaction, whether or not
    /// anyone reads them again; live ones and foreign values stay.
    #[test]
    fn compaction_drops_expired_conversations() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let now = now_secs();
        let value = |expiry: u64| {
            let mut v = expiry.to_be_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        };
        s.put(CF_RESPONSES, b"old", &value(now - 1)).unwrap();
        s.put(CF_RESPONSES, b"live", &value(now + 3600)).unwrap();
        s.put(CF_RESPONSES, b"short", b"x").unwrap();
        s.flush().unwrap();
        let cf = s.db().cf_handle(CF_RESPONSES).unwrap();
        s.db().compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        assert_eq!(s.get(CF_RESPONSES, b"old").unwrap(), None);
        assert!(s.get(CF_RESPONSES, b"live").unwrap().is_some());
        assert!(s.get(CF_RESPONSES, b"short").unwrap().is_some());
        assert!(expired(&value(now), now) && !expired(&value(now + 1), now));
    }

    #[test]
    fn memory_stays_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 16 << 20;
        let s = Store::open_with_budget(dir.path(), budget).unwrap();
        // 64 MiB of 4 KiB values across two families, four times the budget.
        let value = vec![7u8; 4096];
        for i in 0u32..8192 {
            s.put(CF_ENTRIES, &i.to_be_bytes(), &value).unwrap();
            s.put(CF_VECTORS, &i.to_be_bytes(), &value).unwrap();
        }
        for i in 0u32..8192 {
            assert!(s.get(CF_ENTRIES, &i.to_be_bytes()).unwrap().is_some());
        }
        let m = s.memory();
        assert!(m.memtables > 0, "{m:?}");
        assert!(m.memtables <= (budget / 2 + (budget / 8)) as u64, "{m:?}");
        assert!(m.block_cache <= (budget + budget / 8) as u64, "{m:?}");
        assert!(m.block_cache > 0, "{m:?}");
    }

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.put(CF_META, b"k", b"v").unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get(CF_META, b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(s.info().column_families.len(), COLUMN_FAMILIES.len());
    }

    #[test]
    fn ledger_counters_merge_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let cf = s.db().cf_handle(CF_LEDGER).unwrap();
            // A value as older versions wrote it: 8 counters.
            let old: Vec<u8> = [1u64, 2, 3, 4, 5, 6, 7, 8]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            s.db().merge_cf(&cf, b"k", old).unwrap();
            s.db()
                .merge_cf(&cf, b"k", encode_counters(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1]))
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let cf = s.db().cf_handle(CF_LEDGER).unwrap();
        s.db()
            .merge_cf(&cf, b"k", encode_counters(&[10, 0, 0, 0, 0, 0, 0, 0, 0, 5]))
            .unwrap();
        let v = s.db().get_cf(&cf, b"k").unwrap().unwrap();
        assert_eq!(decode_counters(&v), [12, 3, 4, 5, 6, 7, 8, 9, 1, 6]);
    }

    /// A counter near its end stays at `u64::MAX` instead of wrapping to a
    /// small number.
    #[test]
    fn ledger_counters_saturate() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let cf = s.db().cf_handle(CF_LEDGER).unwrap();
        let mut near = [1u64; LEDGER_FIELDS];
        near[1] = u64::MAX - 1;
        s.db().merge_cf(&cf, b"k", encode_counters(&near)).unwrap();
        s.db()
            .merge_cf(&cf, b"k", encode_counters(&[5; LEDGER_FIELDS]))
            .unwrap();
        let v = s.db().get_cf(&cf, b"k").unwrap().unwrap();
        let c = decode_counters(&v);
        assert_eq!((c[0], c[1], c[2]), (6, u64::MAX, 6));
        // Once more on a stored value (a flush, then a merge on top of it).
        s.flush().unwrap();
        s.db()
            .merge_cf(&cf, b"k", encode_counters(&[u64::MAX; LEDGER_FIELDS]))
            .unwrap();
        let v = s.db().get_cf(&cf, b"k").unwrap().unwrap();
        assert_eq!(decode_counters(&v), [u64::MAX; LEDGER_FIELDS]);
    }

    #[test]
    fn second_open_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("lock held");
        assert!(err.to_string().contains("cannot open RocksDB"), "{err}");
    }

    /// A database directory with tables but no CURRENT is refused, its
    /// files left alone; with CURRENT written back it opens with its data.
    #[test]
    fn a_store_without_current_is_refused_not_emptied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(CF_META, b"k", b"v").unwrap();
            store.flush().unwrap();
        }
        let db = dir.path().join("db");
        let current = std::fs::read_to_string(db.join("CURRENT")).unwrap();
        std::fs::remove_file(db.join("CURRENT")).unwrap();
        let before = std::fs::read_dir(&db).unwrap().count();
        let e = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(
            e.contains("no CURRENT file") && e.contains("MANIFEST-"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(&db).unwrap().count(),
            before,
            "nothing touched"
        );
        std::fs::write(db.join("CURRENT"), current).unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A first open killed before it wrote CURRENT (a lone first
        // manifest): nothing to lose, opened afresh.
        let fresh = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(fresh.path().join("db")).unwrap();
        std::fs::write(fresh.path().join("db/MANIFEST-000001"), b"").unwrap();
        if let Err(e) = Store::open(fresh.path()) {
            panic!("{e}");
        }
        assert_eq!(
            store.get(CF_META, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }
}
