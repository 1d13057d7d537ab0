//! The real-time cost ledger. Every request becomes a record (tokens, exact
//! cost from the upstream's usage, cost saved by a cache hit, error); a
//! dedicated writer thread aggregates records in memory and merges them into
//! RocksDB every flush interval as counters keyed by hour x tenant x app x key
//! x model (an additive merge operator: no read-modify-write, nothing lost to
//! races). A process kill loses at most the unflushed interval.

pub mod labels;

use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;
use smartllm_store::{
    decode_counters, encode_counters, Store, CF_LEDGER, CF_LEDGER_MIX, LEDGER_FIELDS,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

pub const METRIC_COST: &str = "smartllm_cost_usd_total";
pub const METRIC_SAVED: &str = "smartllm_cost_saved_usd_total";
pub const METRIC_DROPPED: &str = "smartllm_ledger_dropped_total";

/// USD per million tokens, and per request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    pub cached_input_per_1m: f64,
    pub per_request: f64,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl Price {
    /// Cost in nano-dollars: cached prompt tokens at the cached rate, the rest
    /// of the prompt at the input rate, completion at the output rate.
    pub fn cost_nanos(&self, t: Tokens) -> u64 {
        let cached = t.cached.min(t.prompt);
        let usd = (t.prompt - cached) as f64 * self.input_per_1m / 1e6
            + cached as f64 * self.cached_input_per_1m / 1e6
            + t.completion as f64 * self.output_per_1m / 1e6
            + self.per_request;
        (usd * 1e9).round().max(0.0) as u64
    }
}

static BPE: LazyLock<Option<tiktoken_rs::CoreBPE>> =
    LazyLock::new(|| tiktoken_rs::o200k_base().ok());

/// Token count estimate (o200k_base) for upstreams that report no usage.
pub fn estimate_tokens(text: &str) -> u64 {
    match BPE.as_ref() {
        Some(bpe) => bpe.encode_ordinary(text).len() as u64,
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    Hour,
    Day,
    Tenant,
    App,
    Key,
    Model,
}

impl Dim {
    pub fn parse(s: &str) -> Option<Dim> {
        Some(match s.trim() {
            "hour" => Dim::Hour,
            "day" => Dim::Day,
            "tenant" => Dim::Tenant,
            "app" => Dim::App,
            "key" => Dim::Key,
            "model" => Dim::Model,
            _ => return None,
        })
    }
}

/// One request's contribution.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub unix_secs: u64,
    pub tenant: String,
    pub app: String,
    pub key: String,
    pub model: String,
    pub tokens: Tokens,
    pub cost_nanos: u64,
    pub saved_nanos: u64,
    pub error: bool,
    pub estimated: bool,
    /// What the request was (for cost suggestions); None for requests the
    /// gateway did not analyse.
    pub mix: Option<Mix>,
}

/// What kind of request it was and how the cache met it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Mix {
    /// The router's task (code, chat, ...) or `-`.
    pub task: String,
    /// `simple`, `moderate`, `complex` (from the router's complexity) or `-`.
    pub tier: String,
    /// `hit`, `near` (a miss whose best match came close to the threshold),
    /// `miss`, `bypass` (no-store, temperature, exclusions) or `off`.
    pub cache: String,
}

/// Counter positions in a ledger value.
const REQUESTS: usize = 0;
const INPUT: usize = 1;
const OUTPUT: usize = 2;
const CACHED: usize = 3;
const COST: usize = 4;
const SAVED: usize = 5;
const ERRORS: usize = 6;
const ESTIMATED: usize = 7;

fn clean(s: &str) -> &str {
    if s.is_empty() || s.contains('\0') {
        "-"
    } else {
        s
    }
}

fn key_bytes(hour: u32, tenant: &str, app: &str, key: &str, model: &str) -> Vec<u8> {
    let mut out = hour.to_be_bytes().to_vec();
    for part in [tenant, app, key, model] {
        out.extend_from_slice(clean(part).as_bytes());
        out.push(0);
    }
    out
}

fn parse_key(k: &[u8]) -> Option<(u32, [String; 4])> {
    let hour = u32::from_be_bytes(k.get(..4)?.try_into().ok()?);
    let mut parts = k[4..]
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    Some((
        hour,
        [parts.next()?, parts.next()?, parts.next()?, parts.next()?],
    ))
}

fn mix_key(hour: u32, r: &Record, m: &Mix) -> Vec<u8> {
    let mut out = hour.to_be_bytes().to_vec();
    for part in [&r.tenant, &r.app, &r.model, &m.task, &m.tier, &m.cache] {
        out.extend_from_slice(clean(part).as_bytes());
        out.push(0);
    }
    out
}

enum Msg {
    Record(Box<Record>),
    Flush(mpsc::Sender<()>),
    Stop,
}

/// Sends records to the writer thread without ever blocking a request.
#[derive(Clone)]
pub struct Ledger {
    tx: SyncSender<Msg>,
    store: Arc<Store>,
    writer: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// The writer thread, woken for flushes, stops and a filling queue only:
    /// a record does not wake it (that would cost two context switches per
    /// request); it drains the queue when its flush interval comes round.
    /// Signed: the writer may drain a record before its sender counts it.
    thread: std::thread::Thread,
    queued: Arc<std::sync::atomic::AtomicIsize>,
}

const QUEUE_CAPACITY: usize = 65_536;
/// Records queued at which the writer is woken early to drain.
const WAKE_AT: isize = (QUEUE_CAPACITY / 4) as isize;

impl Ledger {
    /// Start the writer thread, flushing every `flush_interval`.
    pub fn start(store: Arc<Store>, flush_interval: Duration) -> std::io::Result<Ledger> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_store = store.clone();
        let queued = Arc::new(std::sync::atomic::AtomicIsize::new(0));
        let writer_queued = queued.clone();
        let handle = std::thread::Builder::new()
            .name("smartllm-ledger".into())
            .spawn(move || writer(writer_store, rx, flush_interval, &writer_queued))?;
        Ok(Ledger {
            tx,
            store,
            thread: handle.thread().clone(),
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            queued,
        })
    }

    /// Write what is pending and stop the writer (shutdown). Later records are dropped.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Stop);
        self.thread.unpark();
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }

    pub fn record(&self, r: Record) {
        let usd = r.cost_nanos as f64 / 1e9;
        let saved = r.saved_nanos as f64 / 1e9;
        if usd > 0.0 || saved > 0.0 {
            // Tenant and app names are bounded (and maybe hashed) in metrics.
            let series = [
                (
                    "tenant",
                    labels::value(labels::LabelKind::Tenant, &r.tenant),
                ),
                ("app", labels::value(labels::LabelKind::App, &r.app)),
                ("model", r.model.clone()),
            ];
            if usd > 0.0 {
                metrics::gauge!(METRIC_COST, &series).increment(usd);
            }
            if saved > 0.0 {
                metrics::gauge!(METRIC_SAVED, &series).increment(saved);
            }
        }
        match self.tx.try_send(Msg::Record(Box::new(r))) {
            Ok(()) => {
                let n = self
                    .queued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if n == WAKE_AT {
                    self.thread.unpark();
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(METRIC_DROPPED).increment(1);
            }
        }
    }

    /// Write everything recorded so far (queries call this first, so they are exact).
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            self.thread.unpark();
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Aggregate the ledger between two instants (unix seconds, `to` exclusive).
    pub fn query(&self, from: u64, to: u64, group_by: &[Dim]) -> Result<Vec<Row>, rocksdb::Error> {
        self.flush();
        query(&self.store, from, to, group_by)
    }

    /// The traffic mix between two instants, summed over hours.
    pub fn mix(&self, from: u64, to: u64) -> Result<Vec<MixRow>, rocksdb::Error> {
        self.flush();
        mix_query(&self.store, from, to)
    }
}

/// Counters waiting for the next flush, per column family.
#[derive(Default)]
struct Pending {
    ledger: HashMap<Vec<u8>, [u64; LEDGER_FIELDS]>,
    mix: HashMap<Vec<u8>, [u64; LEDGER_FIELDS]>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.ledger.is_empty() && self.mix.is_empty()
    }
}

fn writer(
    store: Arc<Store>,
    rx: Receiver<Msg>,
    interval: Duration,
    queued: &std::sync::atomic::AtomicIsize,
) {
    let mut pending = Pending::default();
    let mut next_flush = Instant::now() + interval;
    loop {
        let wait = next_flush.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::park_timeout(wait);
        }
        let mut acks = Vec::new();
        let mut stop = false;
        let mut drained = 0;
        loop {
            match rx.try_recv() {
                Ok(Msg::Record(r)) => {
                    add(&mut pending, &r);
                    drained += 1;
                }
                Ok(Msg::Flush(ack)) => acks.push(ack),
                Ok(Msg::Stop) => stop = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
            }
        }
        queued.fetch_sub(drained, std::sync::atomic::Ordering::Relaxed);
        if acks.is_empty() && !stop && Instant::now() < next_flush {
            continue;
        }
        if !pending.is_empty() {
            if let Err(e) = flush(&store, &mut pending) {
                tracing::error!(error = %e, "writing the cost ledger failed; will retry");
            }
        }
        for a in acks {
            let _ = a.send(());
        }
        next_flush = Instant::now() + interval;
        if stop {
            return;
        }
    }
}

fn add(pending: &mut Pending, r: &Record) {
    let hour = (r.unix_secs / 3600) as u32;
    let c = pending
        .ledger
        .entry(key_bytes(hour, &r.tenant, &r.app, &r.key, &r.model))
        .or_insert([0; LEDGER_FIELDS]);
    count(c, r);
    if let Some(m) = &r.mix {
        count(
            pending
                .mix
                .entry(mix_key(hour, r, m))
                .or_insert([0; LEDGER_FIELDS]),
            r,
        );
    }
}

fn count(c: &mut [u64; LEDGER_FIELDS], r: &Record) {
    c[REQUESTS] += 1;
    c[INPUT] += r.tokens.prompt;
    c[OUTPUT] += r.tokens.completion;
    c[CACHED] += r.tokens.cached;
    c[COST] += r.cost_nanos;
    c[SAVED] += r.saved_nanos;
    c[ERRORS] += r.error as u64;
    c[ESTIMATED] += r.estimated as u64;
}

fn flush(store: &Store, pending: &mut Pending) -> Result<(), rocksdb::Error> {
    let mut batch = WriteBatch::default();
    for (name, map) in [(CF_LEDGER, &pending.ledger), (CF_LEDGER_MIX, &pending.mix)] {
        if let Some(cf) = store.db().cf_handle(name) {
            for (k, v) in map.iter() {
                batch.merge_cf(cf, k, encode_counters(v));
            }
        }
    }
    store.db().write(batch)?;
    pending.ledger.clear();
    pending.mix.clear();
    Ok(())
}

/// One group of the traffic mix.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MixRow {
    pub tenant: String,
    pub app: String,
    pub model: String,
    #[serde(flatten)]
    pub mix: Mix,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub cost_usd: f64,
    pub saved_usd: f64,
    pub errors: u64,
}

/// The traffic mix between two instants (unix seconds, `to` exclusive),
/// summed over hours.
pub fn mix_query(store: &Store, from: u64, to: u64) -> Result<Vec<MixRow>, rocksdb::Error> {
    let Some(cf) = store.db().cf_handle(CF_LEDGER_MIX) else {
        return Ok(Vec::new());
    };
    let (from_h, to_h) = ((from / 3600) as u32, to.div_ceil(3600) as u32);
    let start = from_h.to_be_bytes();
    let mut groups: BTreeMap<[String; 6], [u64; LEDGER_FIELDS]> = BTreeMap::new();
    for item in store
        .db()
        .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        let Some(hour) = k
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .map(u32::from_be_bytes)
        else {
            continue;
        };
        if hour >= to_h {
            break;
        }
        let parts: Vec<String> = k[4..]
            .split(|b| *b == 0)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        let Ok(group) = <[String; 6]>::try_from(parts.into_iter().take(6).collect::<Vec<_>>())
        else {
            continue;
        };
        let c = decode_counters(&v);
        let acc = groups.entry(group).or_insert([0; LEDGER_FIELDS]);
        for i in 0..LEDGER_FIELDS {
            acc[i] += c[i];
        }
    }
    Ok(groups
        .into_iter()
        .map(|([tenant, app, model, task, tier, cache], c)| MixRow {
            tenant,
            app,
            model,
            mix: Mix { task, tier, cache },
            requests: c[REQUESTS],
            input_tokens: c[INPUT],
            output_tokens: c[OUTPUT],
            cached_tokens: c[CACHED],
            cost_usd: c[COST] as f64 / 1e9,
            saved_usd: c[SAVED] as f64 / 1e9,
            errors: c[ERRORS],
        })
        .collect())
}

/// One aggregated row.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Row {
    pub group: BTreeMap<Dim, String>,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
    pub cost_usd: f64,
    pub saved_usd: f64,
    pub errors: u64,
    pub estimated: u64,
}

pub use smartllm_protocol::time::now_secs;

pub fn query(
    store: &Store,
    from: u64,
    to: u64,
    group_by: &[Dim],
) -> Result<Vec<Row>, rocksdb::Error> {
    let Some(cf) = store.db().cf_handle(CF_LEDGER) else {
        return Ok(Vec::new());
    };
    let (from_h, to_h) = ((from / 3600) as u32, to.div_ceil(3600) as u32);
    let start = from_h.to_be_bytes();
    let mut groups: BTreeMap<Vec<(Dim, String)>, [u64; LEDGER_FIELDS]> = BTreeMap::new();
    for item in store
        .db()
        .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        let Some((hour, [tenant, app, key, model])) = parse_key(&k) else {
            continue;
        };
        if hour >= to_h {
            break;
        }
        let group: Vec<(Dim, String)> = group_by
            .iter()
            .map(|d| {
                let v = match d {
                    Dim::Hour => hour.to_string(),
                    Dim::Day => (hour / 24).to_string(),
                    Dim::Tenant => tenant.clone(),
                    Dim::App => app.clone(),
                    Dim::Key => key.clone(),
                    Dim::Model => model.clone(),
                };
                (*d, v)
            })
            .collect();
        let c = decode_counters(&v);
        let acc = groups.entry(group).or_insert([0; LEDGER_FIELDS]);
        for i in 0..LEDGER_FIELDS {
            acc[i] += c[i];
        }
    }
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|(g, c)| Row {
            group: g
                .into_iter()
                .map(|(d, v)| match d {
                    Dim::Hour => (d, format_hour(v.parse().unwrap_or(0))),
                    Dim::Day => (d, format_day(v.parse().unwrap_or(0))),
                    _ => (d, v),
                })
                .collect(),
            requests: c[REQUESTS],
            input_tokens: c[INPUT],
            output_tokens: c[OUTPUT],
            cached_tokens: c[CACHED],
            cost_usd: c[COST] as f64 / 1e9,
            saved_usd: c[SAVED] as f64 / 1e9,
            errors: c[ERRORS],
            estimated: c[ESTIMATED],
        })
        .collect();
    rows.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then_with(|| a.group.cmp(&b.group))
    });
    Ok(rows)
}

/// `2026-11-25T10:00Z` for an hour number since the epoch.
pub fn format_hour(hour: u64) -> String {
    let (y, m, d) = civil(hour / 24);
    format!("{y:04}-{m:02}-{d:02}T{:02}:00Z", hour % 24)
}

pub fn format_day(day: u64) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 -> (year, month, day) (Howard Hinnant's algorithm).
pub fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices() {
        let p = Price {
            input_per_1m: 0.15,
            output_per_1m: 0.60,
            cached_input_per_1m: 0.075,
            per_request: 0.0,
        };
        // 1000 prompt (200 cached), 500 completion
        let nanos = p.cost_nanos(Tokens {
            prompt: 1000,
            completion: 500,
            cached: 200,
        });
        // 800*0.15 + 200*0.075 + 500*0.6 = 120 + 15 + 300 = 435 micro-USD
        assert_eq!(nanos, 435_000);
        assert_eq!(
            Price {
                per_request: 0.001,
                ..p
            }
            .cost_nanos(Tokens::default()),
            1_000_000
        );
    }

    #[test]
    fn estimates_tokens() {
        let n = estimate_tokens("The quick brown fox jumps over the lazy dog.");
        assert!((8..=12).contains(&n), "{n}");
    }

    #[test]
    fn dates() {
        assert_eq!(format_day(0), "1970-01-01");
        assert_eq!(format_day(20_417), "2025-11-25");
        assert_eq!(format_hour(20_417 * 24 + 13), "2025-11-25T13:00Z");
    }

    #[test]
    fn records_aggregate_flush_and_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_764_000_000u64; // some hour
        let rec = |model: &str, app: &str, secs: u64, prompt: u64, cost: u64| Record {
            unix_secs: secs,
            tenant: "acme".into(),
            app: app.into(),
            key: "k1".into(),
            model: model.into(),
            tokens: Tokens {
                prompt,
                completion: 10,
                cached: 0,
            },
            cost_nanos: cost,
            ..Default::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let ledger = Ledger::start(store, Duration::from_secs(3600)).unwrap();
            ledger.record(rec("a", "web", t0, 100, 1000));
            ledger.record(rec("a", "web", t0 + 10, 50, 500));
            ledger.record(rec("b", "cli", t0 + 3600, 7, 70));
            ledger.record(Record {
                error: true,
                ..rec("b", "cli", t0 + 3601, 0, 0)
            });
            // Flushed on query even though the interval is an hour.
            let rows = ledger.query(t0 - 3600, t0 + 7200, &[Dim::Model]).unwrap();
            assert_eq!(rows.len(), 2);
            assert_eq!(
                (
                    rows[0].group[&Dim::Model].as_str(),
                    rows[0].requests,
                    rows[0].input_tokens
                ),
                ("a", 2, 150)
            );
            assert!((rows[0].cost_usd - 1.5e-6).abs() < 1e-12);
            assert_eq!((rows[1].requests, rows[1].errors), (2, 1));
            ledger.shutdown();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = query(&store, t0 - 3600, t0 + 7200, &[Dim::App, Dim::Hour]).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let all = query(&store, t0, t0 + 3600, &[]).unwrap();
        assert_eq!(all[0].requests, 2, "time range filters hours");
    }

    #[test]
    fn the_traffic_mix_is_counted_per_task_tier_and_cache_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_764_000_000u64;
        let rec = |task: &str, tier: &str, cache: &str, cost: u64| Record {
            unix_secs: t0,
            tenant: "acme".into(),
            app: "web".into(),
            key: "k".into(),
            model: "big".into(),
            tokens: Tokens {
                prompt: 100,
                completion: 20,
                cached: 0,
            },
            cost_nanos: cost,
            mix: Some(Mix {
                task: task.into(),
                tier: tier.into(),
                cache: cache.into(),
            }),
            ..Default::default()
        };
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::start(store.clone(), Duration::from_secs(3600)).unwrap();
        ledger.record(rec("chat", "simple", "miss", 100));
        ledger.record(rec("chat", "simple", "miss", 300));
        ledger.record(rec("code", "complex", "near", 900));
        // A request without a mix counts in the ledger only.
        ledger.record(Record {
            mix: None,
            ..rec("-", "-", "-", 5)
        });
        let rows = ledger.mix(t0 - 10, t0 + 10).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let chat = rows.iter().find(|r| r.mix.task == "chat").unwrap();
        assert_eq!(
            (chat.requests, chat.input_tokens, chat.mix.tier.as_str()),
            (2, 200, "simple")
        );
        assert!((chat.cost_usd - 400e-9).abs() < 1e-15);
        let code = rows.iter().find(|r| r.mix.task == "code").unwrap();
        assert_eq!(
            (code.mix.cache.as_str(), code.model.as_str()),
            ("near", "big")
        );
        assert!(ledger.mix(t0 + 3600, t0 + 7200).unwrap().is_empty());
        let all = ledger.query(t0 - 10, t0 + 10, &[]).unwrap();
        assert_eq!(all[0].requests, 4);
        ledger.shutdown();
    }
}
