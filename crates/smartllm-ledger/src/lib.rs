//! The real-time cost ledger. Every request becomes a record (tokens, exact
//! cost from the upstream's usage, cost saved by a cache hit, error); a
//! dedicated writer thread aggregates records in memory and merges them into
//! RocksDB every flush interval as counters keyed by hour x tenant x app x key
//! x model x provider x route x tag (an additive merge operator: no
//! read-modify-write, nothing lost to races). A process kill loses at most the
//! unflushed interval.
//!
//! Storage layout: the key is the hour (4 bytes, big-endian) and then
//! NUL-terminated parts. Rows written before provider, route and tag existed
//! end after the model; they read back with those three as `-`. Values are
//! little-endian u64 counters; older, shorter values read with the counters
//! they lack at 0 (the merge operator adds field by field), so no migration
//! is needed either way.

pub mod labels;

use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;
use smartllm_store::{
    decode_counters, encode_counters, Store, CF_LEDGER, CF_LEDGER_MIX, CF_META, LEDGER_FIELDS,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub const METRIC_COST: &str = "smartllm_cost_usd_total";
pub const METRIC_SAVED: &str = "smartllm_cost_saved_usd_total";
/// Records lost for good: recorded after the writer stopped. (A record that
/// finds the queue full is not lost: it waits in the overflow.)
pub const METRIC_DROPPED: &str = "smartllm_ledger_dropped_total";
/// Writes to RocksDB that failed, by what (`ledger`, `cache`): a full or
/// failing disk, which RocksDB keeps refusing until the gateway restarts.
pub const METRIC_STORE_WRITE_ERRORS: &str = "smartllm_store_write_errors_total";

/// The most tokens of one kind (prompt, completion, cached, ...) the ledger
/// counts for one request: 10 billion, far above any real context window or
/// answer, and far below where sums of them could overflow a u64 counter
/// (about 1.8e19: more than a billion such requests in one row of one hour).
/// An upstream that reports nonsense (`prompt_tokens: 18446744073709551615`)
/// is counted at this cap, and priced at it, instead of pinning the hour's
/// counters at their maximum.
pub const MAX_TOKENS_PER_REQUEST: u64 = 10_000_000_000;

/// USD per million tokens, and per request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Price {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    /// Prompt tokens read from the provider's prompt cache.
    pub cached_input_per_1m: f64,
    /// Prompt tokens written to the prompt cache for 5 minutes.
    pub cache_write_5m_per_1m: f64,
    /// Prompt tokens written to the prompt cache for 1 hour.
    pub cache_write_1h_per_1m: f64,
    /// Reasoning tokens when priced apart from the rest of the output.
    pub reasoning_per_1m: Option<f64>,
    /// Audio prompt tokens, when priced apart from text (else at the input price).
    pub audio_input_per_1m: Option<f64>,
    /// Audio answer tokens, when priced apart from text (else at the output price).
    pub audio_output_per_1m: Option<f64>,
    pub per_request: f64,
    /// USD per 1,000 web searches a server-side tool ran.
    pub web_search_per_1k: f64,
    /// Prices for every token of a request whose prompt is longer than
    /// `above_tokens` (the per-request price stays).
    pub long_context: Option<LongContext>,
}

/// A long-context tier (USD per million tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LongContext {
    pub above_tokens: u64,
    pub input_per_1m: f64,
    pub output_per_1m: f64,
    pub cached_input_per_1m: f64,
    pub cache_write_5m_per_1m: f64,
    pub cache_write_1h_per_1m: f64,
}

/// Token counts of one request. `cached`, `cache_write` and `audio_in` are
/// part of `prompt`; `cache_write_1h` is part of `cache_write`; `reasoning`
/// and `audio_out` are part of `completion` (as OpenAI and Anthropic count
/// them). The ledger's counters keep the audio tokens in the prompt and
/// completion counts; only their price differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub reasoning: u64,
    pub audio_in: u64,
    pub audio_out: u64,
    /// Web searches a server-side tool ran (billed per search, not token).
    pub web_searches: u64,
}

impl Tokens {
    /// Every count at most [`MAX_TOKENS_PER_REQUEST`].
    pub fn clamped(self) -> Tokens {
        let c = |n: u64| n.min(MAX_TOKENS_PER_REQUEST);
        Tokens {
            prompt: c(self.prompt),
            completion: c(self.completion),
            cached: c(self.cached),
            cache_write: c(self.cache_write),
            cache_write_1h: c(self.cache_write_1h),
            reasoning: c(self.reasoning),
            audio_in: c(self.audio_in),
            audio_out: c(self.audio_out),
            web_searches: c(self.web_searches),
        }
    }
}

impl Price {
    /// Every token price times `factor` (a processing tier's), the
    /// per-request price as it is.
    pub fn scaled(self, factor: f64) -> Price {
        let f = |p: f64| p * factor;
        Price {
            input_per_1m: f(self.input_per_1m),
            output_per_1m: f(self.output_per_1m),
            cached_input_per_1m: f(self.cached_input_per_1m),
            cache_write_5m_per_1m: f(self.cache_write_5m_per_1m),
            cache_write_1h_per_1m: f(self.cache_write_1h_per_1m),
            reasoning_per_1m: self.reasoning_per_1m.map(f),
            audio_input_per_1m: self.audio_input_per_1m.map(f),
            audio_output_per_1m: self.audio_output_per_1m.map(f),
            per_request: self.per_request,
            web_search_per_1k: self.web_search_per_1k,
            long_context: self.long_context.map(|l| LongContext {
                above_tokens: l.above_tokens,
                input_per_1m: f(l.input_per_1m),
                output_per_1m: f(l.output_per_1m),
                cached_input_per_1m: f(l.cached_input_per_1m),
                cache_write_5m_per_1m: f(l.cache_write_5m_per_1m),
                cache_write_1h_per_1m: f(l.cache_write_1h_per_1m),
            }),
        }
    }

    /// Cost in nano-dollars. The prompt splits into cache reads, cache
    /// writes (5-minute and 1-hour), audio and the rest at the input price;
    /// the completion is billed at the output price, its reasoning tokens at
    /// the reasoning price and its audio at the audio price when there are
    /// such (a token is billed once); a prompt above the long-context
    /// threshold bills every text token at the tier's prices, reasoning
    /// raised as the tier raises output (thinking is output: Gemini's
    /// tiers bill it so). Counts above
    /// [`MAX_TOKENS_PER_REQUEST`] are billed at it, as the ledger counts them.
    pub fn cost_nanos(&self, t: Tokens) -> u64 {
        let t = t.clamped();
        let long = self.long_context.is_some_and(|l| t.prompt > l.above_tokens);
        let (input, output, cached_in, write_5m, write_1h) = match self.long_context {
            Some(l) if t.prompt > l.above_tokens => (
                l.input_per_1m,
                l.output_per_1m,
                l.cached_input_per_1m,
                l.cache_write_5m_per_1m,
                l.cache_write_1h_per_1m,
            ),
            _ => (
                self.input_per_1m,
                self.output_per_1m,
                self.cached_input_per_1m,
                self.cache_write_5m_per_1m,
                self.cache_write_1h_per_1m,
            ),
        };
        let cached = t.cached.min(t.prompt);
        let written = t.cache_write.min(t.prompt - cached);
        let written_1h = t.cache_write_1h.min(written);
        let uncached = t.prompt - cached - written;
        let (audio_in, audio_in_price) = match self.audio_input_per_1m {
            Some(p) => (t.audio_in.min(uncached), p),
            None => (0, 0.0),
        };
        let (reasoning, reasoning_price) = match self.reasoning_per_1m {
            Some(p) if long && self.output_per_1m > 0.0 => (
                t.reasoning.min(t.completion),
                p * output / self.output_per_1m,
            ),
            Some(p) => (t.reasoning.min(t.completion), p),
            None => (0, 0.0),
        };
        let (audio_out, audio_out_price) = match self.audio_output_per_1m {
            Some(p) => (t.audio_out.min(t.completion - reasoning), p),
            None => (0, 0.0),
        };
        // Micro-dollars per token x tokens, summed in f64 and rounded once.
        let usd_1m = (uncached - audio_in) as f64 * input
            + audio_in as f64 * audio_in_price
            + cached as f64 * cached_in
            + (written - written_1h) as f64 * write_5m
            + written_1h as f64 * write_1h
            + (t.completion - reasoning - audio_out) as f64 * output
            + reasoning as f64 * reasoning_price
            + audio_out as f64 * audio_out_price;
        let nanos = usd_1m * 1e3
            + self.per_request * 1e9
            + t.web_searches as f64 * self.web_search_per_1k * 1e6;
        nanos.round().max(0.0) as u64
    }
}

static BPE: LazyLock<Option<tiktoken_rs::CoreBPE>> =
    LazyLock::new(|| tiktoken_rs::o200k_base().ok());

/// Builds the tokenizer's tables now (about 0.1 s) rather than in the first
/// request that counts tokens.
pub fn warm_up() {
    LazyLock::force(&BPE);
}

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
    Provider,
    Route,
    Tag,
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
            "provider" => Dim::Provider,
            "route" => Dim::Route,
            "tag" => Dim::Tag,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dim::Hour => "hour",
            Dim::Day => "day",
            Dim::Tenant => "tenant",
            Dim::App => "app",
            Dim::Key => "key",
            Dim::Model => "model",
            Dim::Provider => "provider",
            Dim::Route => "route",
            Dim::Tag => "tag",
        }
    }
}

/// A tag as the ledger keeps it: at most 64 characters of letters, digits
/// and `-_.:/@+=`; anything else is no tag (`-`).
pub fn clean_tag(tag: &str) -> Option<String> {
    let tag = tag.trim();
    (!tag.is_empty()
        && tag.len() <= 64
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@+=".contains(c)))
    .then(|| tag.to_string())
}

/// One request's contribution.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub unix_secs: u64,
    pub tenant: String,
    pub app: String,
    pub key: String,
    pub model: String,
    /// The provider that answered (`-`: none, e.g. a cache hit).
    pub provider: String,
    /// The alias the client asked for, when it was a route.
    pub route: String,
    /// The client's `x-smartllm-tag` (or `metadata.tag`), see [`clean_tag`].
    pub tag: String,
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
    /// The route alias the request named (empty: a model by name, and rows
    /// written before routes were kept): whose cache policy applied.
    pub route: String,
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
const CACHE_WRITE: usize = 8;
const REASONING: usize = 9;

fn clean(s: &str) -> &str {
    if s.is_empty() || s.contains('\0') {
        "-"
    } else {
        s
    }
}

fn key_bytes(hour: u32, r: &Record) -> Vec<u8> {
    let mut out = hour.to_be_bytes().to_vec();
    for part in [
        &r.tenant,
        &r.app,
        &r.key,
        &r.model,
        &r.provider,
        &r.route,
        &r.tag,
    ] {
        out.extend_from_slice(clean(part).as_bytes());
        out.push(0);
    }
    out
}

/// Hour and [tenant, app, key, model, provider, route, tag]; rows of the
/// older layout (up to the model) get `-` for the last three.
fn parse_key(k: &[u8]) -> Option<(u32, [String; 7])> {
    let hour = key_hour(k)?;
    let body = k[4..].strip_suffix(&[0]).unwrap_or(&k[4..]);
    let mut parts = body
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut next = || parts.next();
    let (tenant, app, key, model) = (next()?, next()?, next()?, next()?);
    let mut rest = || next().unwrap_or_else(|| "-".to_string());
    Some((hour, [tenant, app, key, model, rest(), rest(), rest()]))
}

/// Where the tag (the last part) of a ledger key begins.
fn tag_start(k: &[u8]) -> Option<usize> {
    let body = k.get(4..)?;
    let body = body.strip_suffix(&[0]).unwrap_or(body);
    body.iter().rposition(|b| *b == 0).map(|i| 4 + i + 1)
}

/// A ledger key with its tag replaced by `tag`.
fn retag(k: &[u8], tag: &str) -> Vec<u8> {
    let Some(at) = tag_start(k) else {
        return k.to_vec();
    };
    let mut out = k[..at].to_vec();
    out.extend_from_slice(clean(tag).as_bytes());
    out.push(0);
    out
}

/// The hour (since the epoch) a ledger or mix key counts.
pub fn key_hour(k: &[u8]) -> Option<u32> {
    k.get(..4)
        .and_then(|h| h.try_into().ok())
        .map(u32::from_be_bytes)
}

fn mix_key(hour: u32, r: &Record, m: &Mix) -> Vec<u8> {
    let mut out = hour.to_be_bytes().to_vec();
    for part in [&r.tenant, &r.app, &r.model, &m.task, &m.tier, &m.cache] {
        out.extend_from_slice(clean(part).as_bytes());
        out.push(0);
    }
    // Last, and only when there is one: keys written before it was kept
    // read the same.
    if !m.route.is_empty() {
        out.extend_from_slice(clean(&m.route).as_bytes());
        out.push(0);
    }
    out
}

/// Ledger counters flushed to RocksDB, handed on to the fleet's shared view
/// (`fleet.share_costs`): (key, counters) pairs, keys as [`rows_from`] reads them.
pub type FleetBatch = Vec<(Vec<u8>, [u64; LEDGER_FIELDS])>;

/// Takes a flushed batch for the fleet view without blocking; false when it
/// had to drop it.
pub type FleetSinkFn = Box<dyn Fn(FleetBatch) -> bool + Send + Sync>;

/// Where flushed counters also go, when the fleet view is on (set once, at start).
type FleetSink = Arc<std::sync::OnceLock<FleetSinkFn>>;

enum Msg {
    Record(Box<Record>),
    /// Write what is pending; the reply says whether the write succeeded.
    Flush(mpsc::Sender<bool>),
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
    /// Records that found the queue full, aggregated as the writer does; the
    /// writer takes them on its next pass. A slow writer delays them but
    /// loses none. Only a full queue takes this lock.
    overflow: Arc<Mutex<Pending>>,
    fleet: FleetSink,
}

const QUEUE_CAPACITY: usize = 65_536;
/// Records queued at which the writer is woken early to drain.
const WAKE_AT: isize = (QUEUE_CAPACITY / 4) as isize;
/// Ledger keys the overflow holds before a record of a new key counts under
/// [`OTHER_TAG`] there: tags come from clients, and the overflow must not
/// grow without bound while the writer is behind.
const OVERFLOW_KEYS: usize = 65_536;
/// How long [`Ledger::flush`] waits for the writer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes tried at a stop before its counters are given up (there is no
/// next flush to retry them), and the pause between two.
const STOP_ATTEMPTS: u32 = 5;
const STOP_RETRY_PAUSE: Duration = Duration::from_millis(200);

impl Ledger {
    /// Start the writer thread, flushing every `flush_interval`.
    pub fn start(store: Arc<Store>, flush_interval: Duration) -> std::io::Result<Ledger> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_store = store.clone();
        let queued = Arc::new(std::sync::atomic::AtomicIsize::new(0));
        let writer_queued = queued.clone();
        let overflow = Arc::new(Mutex::new(Pending::default()));
        let writer_overflow = overflow.clone();
        let fleet = FleetSink::default();
        let writer_fleet = fleet.clone();
        let handle = std::thread::Builder::new()
            .name("smartllm-ledger".into())
            .spawn(move || {
                writer(
                    writer_store,
                    rx,
                    flush_interval,
                    &writer_queued,
                    &writer_overflow,
                    &writer_fleet,
                )
            })?;
        Ok(Ledger {
            tx,
            store,
            thread: handle.thread().clone(),
            writer: Arc::new(std::sync::Mutex::new(Some(handle))),
            queued,
            overflow,
            fleet,
        })
    }

    /// From now on, every flush also hands its counters to `sink` (the
    /// fleet's shared cost view); a batch it cannot take is counted in
    /// `smartllm_ledger_fleet_dropped_total`. Set once; later calls are ignored.
    pub fn share_with(&self, sink: FleetSinkFn) {
        let _ = self.fleet.set(sink);
    }

    /// Write what is pending and stop the writer (shutdown). Later records are dropped.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Stop);
        self.thread.unpark();
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }

    /// Count one request (token counts clamped to [`MAX_TOKENS_PER_REQUEST`]).
    pub fn record(&self, mut r: Record) {
        r.tokens = r.tokens.clamped();
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
            Err(TrySendError::Full(Msg::Record(r))) => {
                // The writer is behind: the record waits in the overflow,
                // which the writer takes on its next pass.
                spill(&self.overflow, &r);
                self.thread.unpark();
            }
            Err(_) => {
                // The writer has stopped: nothing will ever write it.
                metrics::counter!(METRIC_DROPPED).increment(1);
            }
        }
    }

    /// Write everything recorded so far (queries call this first, so they are
    /// exact). A write that failed, or a writer that has not answered in 10 s,
    /// is logged: the counters stay pending and the writer tries again at its
    /// next flush, so a query right after may miss them.
    pub fn flush(&self) {
        match self.flush_reply(FLUSH_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "writing the cost ledger failed at a flush; its counters stay pending and will be retried, so this query may miss them"
            ),
            Err(RecvTimeoutError::Timeout) => tracing::warn!(
                timeout_secs = FLUSH_TIMEOUT.as_secs(),
                "the cost ledger's writer did not answer a flush in time; this query may miss the latest counters"
            ),
            // The writer has stopped (shutdown): what it had is written.
            Err(RecvTimeoutError::Disconnected) => {}
        }
    }

    /// Ask the writer to write what is pending and wait up to `timeout` for
    /// its answer: whether the write succeeded (true when there was nothing
    /// to write). Disconnected: the writer has stopped.
    fn flush_reply(&self, timeout: Duration) -> Result<bool, RecvTimeoutError> {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_err() {
            return Err(RecvTimeoutError::Disconnected);
        }
        self.thread.unpark();
        done.recv_timeout(timeout)
    }

    /// Aggregate the ledger between two instants (unix seconds, `to` exclusive).
    pub fn query(&self, from: u64, to: u64, group_by: &[Dim]) -> Result<Vec<Row>, rocksdb::Error> {
        self.flush();
        query(&self.store, from, to, group_by)
    }

    /// [`Ledger::query`] over the rows a filter admits.
    pub fn query_where(
        &self,
        from: u64,
        to: u64,
        group_by: &[Dim],
        filter: &Filter,
    ) -> Result<Vec<Row>, rocksdb::Error> {
        self.flush();
        query_where(&self.store, from, to, group_by, filter)
    }

    /// The traffic mix between two instants, summed over hours.
    pub fn mix(&self, from: u64, to: u64) -> Result<Vec<MixRow>, rocksdb::Error> {
        self.flush();
        mix_query(&self.store, from, to)
    }

    /// Keep `mark` (a budget alert sent, named with its period) across
    /// restarts: what spend read back cannot tell, such as a budget that
    /// began refusing before its limit. Blocking (a RocksDB write).
    pub fn keep_mark(&self, mark: &str) -> Result<(), smartllm_store::StoreError> {
        self.store
            .put(CF_META, &[MARK_PREFIX, mark.as_bytes()].concat(), b"")
    }

    /// The marks kept ([`Ledger::keep_mark`]); those `current` rejects (a
    /// past period's) are removed. Blocking (reads RocksDB).
    pub fn marks(&self, current: impl Fn(&str) -> bool) -> Vec<String> {
        let Some(cf) = self.store.db().cf_handle(CF_META) else {
            return Vec::new();
        };
        let mut kept = Vec::new();
        let mut stale = WriteBatch::default();
        let start = IteratorMode::From(MARK_PREFIX, rocksdb::Direction::Forward);
        for item in self.store.db().iterator_cf(&cf, start) {
            let Ok((k, _)) = item else { break };
            let Some(mark) = k.strip_prefix(MARK_PREFIX) else {
                break;
            };
            match std::str::from_utf8(mark) {
                Ok(m) if current(m) => kept.push(m.to_string()),
                _ => stale.delete_cf(&cf, &k),
            }
        }
        if !stale.is_empty() {
            if let Err(e) = self.store.db().write(stale) {
                tracing::warn!(error = %e, "removing past budget alert marks failed");
            }
        }
        kept
    }
}

/// The key space of [`Ledger::keep_mark`]'s marks in the meta column family.
const MARK_PREFIX: &[u8] = b"budget-alert\0";

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

    /// The counters of every ledger row, summed (to log what a failed write lost).
    fn totals(&self) -> [u64; LEDGER_FIELDS] {
        let mut t = [0; LEDGER_FIELDS];
        for c in self.ledger.values() {
            sum_into(&mut t, c);
        }
        t
    }
}

/// Fold a record that found the queue full into the overflow. Past
/// [`OVERFLOW_KEYS`] ledger keys, a record of a new key counts under
/// [`OTHER_TAG`] (the writer bounds the tags again when it takes them).
fn spill(overflow: &Mutex<Pending>, r: &Record) {
    let hour = (r.unix_secs / 3600) as u32;
    let mut key = key_bytes(hour, r);
    let mut o = overflow.lock().unwrap_or_else(PoisonError::into_inner);
    if o.ledger.len() >= OVERFLOW_KEYS && !o.ledger.contains_key(&key) {
        key = retag(&key, OTHER_TAG);
    }
    add_keyed(&mut o, key, r);
}

/// Move the overflow's counters into `pending`, their tags bounded as if
/// the records had come through the queue.
fn take_spilled(pending: &mut Pending, tags: &mut TagBound, spilled: Pending) {
    for (k, c) in spilled.ledger {
        let k = tags.bound_key(k);
        sum_into(pending.ledger.entry(k).or_insert([0; LEDGER_FIELDS]), &c);
    }
    for (k, c) in spilled.mix {
        sum_into(pending.mix.entry(k).or_insert([0; LEDGER_FIELDS]), &c);
    }
}

/// Run `f` until it succeeds, at most `attempts` times (at least once),
/// pausing `pause` between two; the last error if none succeeded.
fn with_retries<E>(
    attempts: u32,
    pause: Duration,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<(), E> {
    let mut tried = 1;
    loop {
        match f() {
            Err(_) if tried < attempts => {
                std::thread::sleep(pause);
                tried += 1;
            }
            done => return done,
        }
    }
}

fn writer(
    store: Arc<Store>,
    rx: Receiver<Msg>,
    interval: Duration,
    queued: &std::sync::atomic::AtomicIsize,
    overflow: &Mutex<Pending>,
    fleet: &FleetSink,
) {
    let mut pending = Pending::default();
    let mut tags = TagBound::default();
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
                    let mut r = r;
                    tags.bound(&mut r);
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
        // Records that found the queue full (they came after those queued:
        // a flush asked for before them finds them here too).
        let spilled = std::mem::take(&mut *overflow.lock().unwrap_or_else(PoisonError::into_inner));
        if !spilled.is_empty() {
            take_spilled(&mut pending, &mut tags, spilled);
        }
        if acks.is_empty() && !stop && Instant::now() < next_flush {
            continue;
        }
        let mut written = true;
        if !pending.is_empty() {
            let shared = fleet.get().map(|sink| (sink, pending.ledger.clone()));
            // At a stop there is no next flush to retry at: try a few times now.
            let attempts = if stop { STOP_ATTEMPTS } else { 1 };
            match with_retries(attempts, STOP_RETRY_PAUSE, || flush(&store, &mut pending)) {
                Ok(()) => {
                    if let Some((sink, counters)) = shared {
                        if !sink(counters.into_iter().collect()) {
                            metrics::counter!("smartllm_ledger_fleet_dropped_total").increment(1);
                        }
                    }
                }
                Err(e) if stop => {
                    written = false;
                    let t = pending.totals();
                    let (requests, input_tokens, output_tokens) =
                        (t[REQUESTS], t[INPUT], t[OUTPUT]);
                    let (cost_usd, saved_usd) = (t[COST] as f64 / 1e9, t[SAVED] as f64 / 1e9);
                    tracing::error!(
                        error = %e,
                        attempts,
                        rows = pending.ledger.len(),
                        mix_rows = pending.mix.len(),
                        requests,
                        input_tokens,
                        output_tokens,
                        cost_usd,
                        saved_usd,
                        "writing the cost ledger failed at stop; these counters are lost"
                    );
                }
                Err(e) => {
                    written = false;
                    metrics::counter!(METRIC_STORE_WRITE_ERRORS, "what" => "ledger").increment(1);
                    tracing::error!(error = %e, "writing the cost ledger failed; will retry at the next flush");
                }
            }
        }
        for a in acks {
            let _ = a.send(written);
        }
        next_flush = Instant::now() + interval;
        if stop {
            // Records that came while the last write ran: written once
            // more, or counted as dropped.
            let mut late = Pending::default();
            while let Ok(m) = rx.try_recv() {
                if let Msg::Record(mut r) = m {
                    tags.bound(&mut r);
                    add(&mut late, &r);
                }
            }
            let spilled =
                std::mem::take(&mut *overflow.lock().unwrap_or_else(PoisonError::into_inner));
            take_spilled(&mut late, &mut tags, spilled);
            write_late(&store, &mut late, fleet);
            return;
        }
    }
}

/// Write the records that came while the last write at a stop ran, and hand
/// them to the fleet's cost view as every other flush does (else the
/// fleet's view would miss the last requests of every gateway that stops).
fn write_late(store: &Store, late: &mut Pending, fleet: &FleetSink) {
    if late.is_empty() {
        return;
    }
    let n = late.totals()[REQUESTS];
    let shared = fleet.get().map(|sink| (sink, late.ledger.clone()));
    match flush(store, late) {
        Ok(()) => {
            if let Some((sink, counters)) = shared {
                if !sink(counters.into_iter().collect()) {
                    metrics::counter!("smartllm_ledger_fleet_dropped_total").increment(1);
                }
            }
        }
        Err(e) => {
            metrics::counter!(METRIC_DROPPED).increment(n);
            tracing::error!(error = %e, requests = n, "writing the cost ledger's last records failed at stop; they are lost");
        }
    }
}

/// Distinct tags the ledger keeps per hour; later new ones count as
/// [`OTHER_TAG`] (tags come from clients: their number must not grow the
/// ledger without bound).
pub const MAX_TAGS_PER_HOUR: usize = 1000;
pub const OTHER_TAG: &str = "(other)";

/// The tags kept in the latest hour and in the one before it: a record of
/// the previous hour that arrives after one of the new hour (it waited in
/// the queue, or its request ran across the hour) must find that hour's cap
/// where it was, not reset.
#[derive(Default)]
struct TagBound {
    hour: u64,
    seen: HashSet<String>,
    /// Tags of `hour - 1`.
    previous: HashSet<String>,
}

impl TagBound {
    fn bound(&mut self, r: &mut Record) {
        if !self.keep(r.unix_secs / 3600, &r.tag) {
            r.tag = OTHER_TAG.to_string();
        }
    }

    /// A ledger key with its tag bounded as [`TagBound::bound`] does.
    fn bound_key(&mut self, key: Vec<u8>) -> Vec<u8> {
        let (Some(hour), Some(at)) = (key_hour(&key), tag_start(&key)) else {
            return key;
        };
        let end = key.len() - usize::from(key.ends_with(&[0]));
        let keep = self.keep(u64::from(hour), &String::from_utf8_lossy(&key[at..end]));
        if keep {
            key
        } else {
            retag(&key, OTHER_TAG)
        }
    }

    /// May `tag` count under its own name in `hour`? (It is then counted
    /// among that hour's tags.) Hours before the previous one are not
    /// tracked: there only tags known from the last two hours keep their name.
    fn keep(&mut self, hour: u64, tag: &str) -> bool {
        if tag.is_empty() || tag == "-" {
            return true;
        }
        let seen = if hour == self.hour {
            &mut self.seen
        } else if hour > self.hour {
            // A new hour: the current one becomes the previous (after a gap,
            // the previous had no tags).
            let current = std::mem::take(&mut self.seen);
            self.previous = if hour == self.hour + 1 {
                current
            } else {
                HashSet::new()
            };
            self.hour = hour;
            &mut self.seen
        } else if hour + 1 == self.hour {
            &mut self.previous
        } else {
            return self.seen.contains(tag) || self.previous.contains(tag);
        };
        if seen.contains(tag) {
            return true;
        }
        if seen.len() >= MAX_TAGS_PER_HOUR {
            return false;
        }
        seen.insert(tag.to_string());
        true
    }
}

fn add(pending: &mut Pending, r: &Record) {
    let hour = (r.unix_secs / 3600) as u32;
    add_keyed(pending, key_bytes(hour, r), r);
}

/// [`add`] under a ledger key already made (see [`spill`]).
fn add_keyed(pending: &mut Pending, key: Vec<u8>, r: &Record) {
    let hour = (r.unix_secs / 3600) as u32;
    let c = pending.ledger.entry(key).or_insert([0; LEDGER_FIELDS]);
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

/// Counters saturate at `u64::MAX` rather than wrap (as the store's merge
/// operator does): a wrapped sum would read as a small one.
fn count(c: &mut [u64; LEDGER_FIELDS], r: &Record) {
    let mut inc = |i: usize, n: u64| c[i] = c[i].saturating_add(n);
    inc(REQUESTS, 1);
    inc(INPUT, r.tokens.prompt);
    inc(OUTPUT, r.tokens.completion);
    inc(CACHED, r.tokens.cached);
    inc(COST, r.cost_nanos);
    inc(SAVED, r.saved_nanos);
    inc(ERRORS, r.error as u64);
    inc(ESTIMATED, r.estimated as u64);
    inc(CACHE_WRITE, r.tokens.cache_write);
    inc(REASONING, r.tokens.reasoning);
}

/// `acc += c`, field by field, saturating (see [`count`]).
fn sum_into(acc: &mut [u64; LEDGER_FIELDS], c: &[u64; LEDGER_FIELDS]) {
    for (a, n) in acc.iter_mut().zip(c) {
        *a = a.saturating_add(*n);
    }
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
    let mut groups: BTreeMap<[String; 7], [u64; LEDGER_FIELDS]> = BTreeMap::new();
    for item in store
        .db()
        .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        let Some(hour) = key_hour(&k) else {
            continue;
        };
        if hour >= to_h {
            break;
        }
        let mut parts: Vec<String> = k[4..]
            .split(|b| *b == 0)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        // Six parts and a trailing empty one, or seven (the route) and it.
        if parts.len() < 6 {
            continue;
        }
        parts.resize(8, String::new());
        let Ok(group) = <[String; 7]>::try_from(parts.into_iter().take(7).collect::<Vec<_>>())
        else {
            continue;
        };
        let c = decode_counters(&v);
        sum_into(groups.entry(group).or_insert([0; LEDGER_FIELDS]), &c);
    }
    Ok(groups
        .into_iter()
        .map(
            |([tenant, app, model, task, tier, cache, route], c)| MixRow {
                tenant,
                app,
                model,
                mix: Mix {
                    task,
                    tier,
                    cache,
                    route,
                },
                requests: c[REQUESTS],
                input_tokens: c[INPUT],
                output_tokens: c[OUTPUT],
                cached_tokens: c[CACHED],
                cost_usd: c[COST] as f64 / 1e9,
                saved_usd: c[SAVED] as f64 / 1e9,
                errors: c[ERRORS],
            },
        )
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
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
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
    query_where(store, from, to, group_by, &Filter::default())
}

/// Only rows whose dimensions have these values (None: any).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub tenant: Option<String>,
    pub app: Option<String>,
    pub key: Option<String>,
}

impl Filter {
    fn admits(&self, tenant: &str, app: &str, key: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
            && self.app.as_deref().is_none_or(|a| a == app)
            && self.key.as_deref().is_none_or(|k| k == key)
    }
}

pub fn query_where(
    store: &Store,
    from: u64,
    to: u64,
    group_by: &[Dim],
    filter: &Filter,
) -> Result<Vec<Row>, rocksdb::Error> {
    let Some(cf) = store.db().cf_handle(CF_LEDGER) else {
        return Ok(Vec::new());
    };
    let start = ((from / 3600) as u32).to_be_bytes();
    let mut items = Vec::new();
    for item in store
        .db()
        .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
    {
        let (k, v) = item?;
        if key_hour(&k).is_some_and(|h| h >= to.div_ceil(3600) as u32) {
            break;
        }
        items.push((k.into_vec(), decode_counters(&v)));
    }
    Ok(rows_from(items, from, to, group_by, filter))
}

/// Ledger counters (key, counters), as stored or as the fleet's shared view
/// holds them, summed into rows between two instants (unix seconds, `to`
/// exclusive), grouped by `group_by`, costliest first.
pub fn rows_from(
    items: impl IntoIterator<Item = (Vec<u8>, [u64; LEDGER_FIELDS])>,
    from: u64,
    to: u64,
    group_by: &[Dim],
    filter: &Filter,
) -> Vec<Row> {
    let (from_h, to_h) = ((from / 3600) as u32, to.div_ceil(3600) as u32);
    let mut groups: BTreeMap<Vec<(Dim, String)>, [u64; LEDGER_FIELDS]> = BTreeMap::new();
    for (k, c) in items {
        let Some((hour, [tenant, app, key, model, provider, route, tag])) = parse_key(&k) else {
            continue;
        };
        if hour < from_h || hour >= to_h {
            continue;
        }
        if !filter.admits(&tenant, &app, &key) {
            continue;
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
                    Dim::Provider => provider.clone(),
                    Dim::Route => route.clone(),
                    Dim::Tag => tag.clone(),
                };
                (*d, v)
            })
            .collect();
        sum_into(groups.entry(group).or_insert([0; LEDGER_FIELDS]), &c);
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
            cache_write_tokens: c[CACHE_WRITE],
            reasoning_tokens: c[REASONING],
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
    rows
}

/// Rows as CSV (RFC 4180): the grouping columns in `group_by` order, then
/// the counters (the columns added later come last).
///
/// A spreadsheet runs a cell that starts with `=`, `+`, `-`, `@`, a tab or a
/// carriage return as a formula (CSV injection), and tags, names and keys
/// come from clients and configs: such a text column gets a leading `'`
/// (OWASP's advice), so it opens as the text it is. `-` alone (the ledger's
/// "none") is no formula and stays as it is; the counters, written by the
/// ledger itself, are never prefixed.
pub fn to_csv(rows: &[Row], group_by: &[Dim]) -> String {
    fn field(s: &str) -> String {
        let s = if s != "-" && s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{s}")
        } else {
            s.to_string()
        };
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    }
    let mut out: String = group_by
        .iter()
        .map(|d| format!("{},", d.as_str()))
        .collect();
    out.push_str("requests,input_tokens,output_tokens,cached_tokens,cost_usd,saved_usd,errors,estimated,cache_write_tokens,reasoning_tokens\r\n");
    for r in rows {
        for d in group_by {
            out.push_str(&field(r.group.get(d).map_or("", String::as_str)));
            out.push(',');
        }
        out.push_str(&format!(
            "{},{},{},{},{:.9},{:.9},{},{},{},{}\r\n",
            r.requests,
            r.input_tokens,
            r.output_tokens,
            r.cached_tokens,
            r.cost_usd,
            r.saved_usd,
            r.errors,
            r.estimated,
            r.cache_write_tokens,
            r.reasoning_tokens
        ));
    }
    out
}

/// `2026-11-25T10:00Z` for an hour number since the epoch.
pub fn format_hour(hour: u64) -> String {
    let (y, m, d) = civil(hour / 24);
    format!("{y:04}-{m:02}-{d:02}T{:02}:00Z", hour % 24)
}

/// `2026-12-01T10:00:00Z` for seconds since the epoch (UTC).
pub fn format_rfc3339(secs: u64) -> String {
    let (y, m, d) = civil(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    fn dates_are_rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn prices() {
        let p = Price {
            input_per_1m: 0.15,
            output_per_1m: 0.60,
            cached_input_per_1m: 0.075,
            ..Price::default()
        };
        // 1000 prompt (200 cached), 500 completion
        let nanos = p.cost_nanos(Tokens {
            prompt: 1000,
            completion: 500,
            cached: 200,
            ..Tokens::default()
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
        // Web searches by the search: $10 per 1,000, three are 3 cents,
        // whatever the tier's token multiplier.
        let searches = Tokens {
            web_searches: 3,
            ..Tokens::default()
        };
        let with_search = Price {
            web_search_per_1k: 10.0,
            ..p
        };
        assert_eq!(with_search.cost_nanos(searches), 30_000_000);
        assert_eq!(with_search.scaled(0.5).cost_nanos(searches), 30_000_000);
    }

    #[test]
    fn every_token_kind_at_its_price() {
        // Anthropic-like: 1000 prompt tokens = 100 read + 400 written (150 of
        // them for an hour) + 500 plain; 300 output.
        let p = Price {
            input_per_1m: 3.0,
            output_per_1m: 15.0,
            cached_input_per_1m: 0.3,
            cache_write_5m_per_1m: 3.75,
            cache_write_1h_per_1m: 6.0,
            ..Price::default()
        };
        let t = Tokens {
            prompt: 1000,
            completion: 300,
            cached: 100,
            cache_write: 400,
            cache_write_1h: 150,
            ..Tokens::default()
        };
        // 500*3 + 100*0.3 + 250*3.75 + 150*6 + 300*15 = 1500+30+937.5+900+4500 micro-$
        assert_eq!(p.cost_nanos(t), 7_867_500);
        // Reasoning is part of the output: at the output price unless priced apart.
        let r = Tokens {
            prompt: 10,
            completion: 100,
            reasoning: 60,
            ..Tokens::default()
        };
        assert_eq!(
            p.cost_nanos(r),
            (10.0 * 3.0 * 1e3 + 100.0 * 15.0 * 1e3) as u64
        );
        let pr = Price {
            reasoning_per_1m: Some(20.0),
            ..p
        };
        assert_eq!(pr.cost_nanos(r), 30_000 + 40 * 15_000 + 60 * 20_000);
        // Long context: past the threshold every token at the tier's prices.
        let lc = Price {
            long_context: Some(LongContext {
                above_tokens: 1000,
                input_per_1m: 6.0,
                output_per_1m: 22.5,
                cached_input_per_1m: 0.6,
                cache_write_5m_per_1m: 7.5,
                cache_write_1h_per_1m: 12.0,
            }),
            ..p
        };
        assert_eq!(lc.cost_nanos(t), p.cost_nanos(t), "at the threshold: base");
        let long = Tokens {
            prompt: 1001,
            completion: 10,
            ..Tokens::default()
        };
        assert_eq!(lc.cost_nanos(long), 1001 * 6_000 + 10 * 22_500);
        // Reasoning in the tier: raised as output is (15 -> 22.5: x1.5).
        let lcr = Price {
            reasoning_per_1m: Some(20.0),
            ..lc
        };
        let long_reasoning = Tokens {
            reasoning: 6,
            ..long
        };
        assert_eq!(
            lcr.cost_nanos(long_reasoning),
            1001 * 6_000 + 4 * 22_500 + 6 * 30_000
        );
        // Audio (gpt-4o-audio-like): part of the prompt and the answer, at
        // its own prices when it has them, else at the text prices.
        let audio = Tokens {
            prompt: 100,
            completion: 50,
            audio_in: 80,
            audio_out: 40,
            ..Tokens::default()
        };
        assert_eq!(p.cost_nanos(audio), 100 * 3_000 + 50 * 15_000);
        let pa = Price {
            audio_input_per_1m: Some(40.0),
            audio_output_per_1m: Some(80.0),
            ..p
        };
        assert_eq!(
            pa.cost_nanos(audio),
            20 * 3_000 + 80 * 40_000 + 10 * 15_000 + 40 * 80_000
        );
    }

    /// Budget alert marks outlive a restart (a new Ledger on the same
    /// store), and those of past periods go at the next read.
    #[test]
    fn alert_marks_are_kept_and_past_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::start(store.clone(), Duration::from_millis(50)).unwrap();
        ledger.keep_mark("key:k|d:2026-12-03|refusing@1").unwrap();
        ledger.keep_mark("key:k|d:2026-12-04|refusing@1").unwrap();
        ledger.shutdown();
        let ledger = Ledger::start(store, Duration::from_millis(50)).unwrap();
        let today = |m: &str| m.contains("d:2026-12-04");
        assert_eq!(ledger.marks(today), ["key:k|d:2026-12-04|refusing@1"]);
        assert_eq!(ledger.marks(|_| true), ["key:k|d:2026-12-04|refusing@1"]);
        ledger.shutdown();
    }

    #[test]
    fn rows_of_the_older_key_layout_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = 1_764_000_000u64;
        let hour = (t0 / 3600) as u32;
        // The layout before provider/route/tag: hour + 4 parts, 8 counters.
        let mut old_key = hour.to_be_bytes().to_vec();
        for p in ["acme", "web", "k1", "gpt"] {
            old_key.extend_from_slice(p.as_bytes());
            old_key.push(0);
        }
        let cf = store.db().cf_handle(CF_LEDGER).unwrap();
        let old = [2u64, 100, 10, 0, 5000, 0, 0, 0];
        store
            .db()
            .merge_cf(
                cf,
                &old_key,
                old.iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let ledger = Ledger::start(store.clone(), Duration::from_secs(3600)).unwrap();
        ledger.record(Record {
            unix_secs: t0,
            tenant: "acme".into(),
            app: "web".into(),
            key: "k1".into(),
            model: "gpt".into(),
            provider: "openai".into(),
            route: "auto".into(),
            tag: "nightly".into(),
            tokens: Tokens {
                prompt: 50,
                completion: 5,
                cache_write: 7,
                reasoning: 3,
                ..Tokens::default()
            },
            cost_nanos: 1000,
            ..Default::default()
        });
        let by = [Dim::Model, Dim::Provider, Dim::Route, Dim::Tag];
        let rows = ledger.query(t0, t0 + 1, &by).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        let old_row = rows.iter().find(|r| r.group[&Dim::Tag] == "-").unwrap();
        assert_eq!(
            (
                old_row.requests,
                old_row.input_tokens,
                old_row.group[&Dim::Provider].as_str()
            ),
            (2, 100, "-")
        );
        let new_row = rows
            .iter()
            .find(|r| r.group[&Dim::Tag] == "nightly")
            .unwrap();
        assert_eq!(
            (
                new_row.cache_write_tokens,
                new_row.reasoning_tokens,
                new_row.group[&Dim::Route].as_str()
            ),
            (7, 3, "auto")
        );
        let all = ledger.query(t0, t0 + 1, &[Dim::Model]).unwrap();
        assert_eq!((all[0].requests, all[0].input_tokens), (3, 150));
        assert!((all[0].cost_usd - 6e-6).abs() < 1e-12);
        let mine = ledger
            .query_where(
                t0,
                t0 + 1,
                &[],
                &Filter {
                    key: Some("k1".into()),
                    ..Filter::default()
                },
            )
            .unwrap();
        assert_eq!(mine[0].requests, 3);
        let none = ledger
            .query_where(
                t0,
                t0 + 1,
                &[],
                &Filter {
                    key: Some("k2".into()),
                    ..Filter::default()
                },
            )
            .unwrap();
        assert!(none.is_empty());
        let csv = to_csv(&rows, &by);
        assert!(
            csv.starts_with("model,provider,route,tag,requests,"),
            "{csv}"
        );
        assert!(
            csv.contains("gpt,openai,auto,nightly,1,50,5,0,0.000001000,0.000000000,0,0,7,3\r\n"),
            "{csv}"
        );
        assert_eq!(clean_tag("ok tag"), None);
        assert_eq!(
            clean_tag(" team-a/feature:x "),
            Some("team-a/feature:x".into())
        );
        ledger.shutdown();
    }

    #[test]
    fn distinct_tags_per_hour_are_bounded() {
        let mut b = TagBound::default();
        let mut rec = |tag: String, secs: u64| {
            let mut r = Record {
                unix_secs: secs,
                tag,
                ..Default::default()
            };
            b.bound(&mut r);
            r.tag
        };
        for i in 0..MAX_TAGS_PER_HOUR {
            assert_eq!(rec(format!("t{i}"), 7200), format!("t{i}"));
        }
        assert_eq!(rec("t0".into(), 7200), "t0", "a known tag stays");
        assert_eq!(rec("new".into(), 7201), OTHER_TAG);
        assert_eq!(rec("new".into(), 10_800), "new", "a new hour starts afresh");
        // A late record of the hour before finds that hour's cap, not a reset.
        assert_eq!(
            rec("late".into(), 7300),
            OTHER_TAG,
            "the previous hour is full"
        );
        assert_eq!(rec("t5".into(), 7300), "t5");
        assert_eq!(rec("new2".into(), 10_801), "new2", "the new hour is apart");
        // Older hours are not tracked: only tags known lately keep their name.
        assert_eq!(rec("t6".into(), 3600), "t6");
        assert_eq!(rec("older".into(), 3600), OTHER_TAG);
        // After a gap both hours start afresh.
        assert_eq!(rec("late".into(), 36_000), "late");
        assert_eq!(rec("late2".into(), 32_400), "late2");

        // Keys taken from the overflow are bounded the same way.
        let key = |tag: &str, secs: u64| {
            key_bytes(
                (secs / 3600) as u32,
                &Record {
                    unix_secs: secs,
                    tenant: "acme".into(),
                    tag: tag.into(),
                    ..Default::default()
                },
            )
        };
        let mut k = TagBound::default();
        for i in 0..MAX_TAGS_PER_HOUR {
            assert_eq!(
                k.bound_key(key(&format!("t{i}"), 7200)),
                key(&format!("t{i}"), 7200)
            );
        }
        assert_eq!(k.bound_key(key("t1", 7200)), key("t1", 7200));
        assert_eq!(k.bound_key(key("x", 7200)), key(OTHER_TAG, 7200));
        assert_eq!(
            k.bound_key(key("", 7200)),
            key("-", 7200),
            "no tag is no tag"
        );
        assert_eq!(retag(&key("x", 7200), "y"), key("y", 7200));
    }

    #[test]
    fn huge_token_counts_are_clamped_and_sums_saturate() {
        // A request's counts are capped, and so is its price.
        let p = Price {
            input_per_1m: 1.0,
            ..Price::default()
        };
        let absurd = Tokens {
            prompt: u64::MAX,
            ..Tokens::default()
        };
        assert_eq!(absurd.clamped().prompt, MAX_TOKENS_PER_REQUEST);
        // 10 billion tokens at $1 per million: $10,000.
        assert_eq!(p.cost_nanos(absurd), 10_000_000_000_000);

        // Sums stop at u64::MAX instead of wrapping to a small number.
        let mut c = [u64::MAX - 1; LEDGER_FIELDS];
        count(
            &mut c,
            &Record {
                tokens: Tokens {
                    prompt: 5,
                    ..Tokens::default()
                },
                cost_nanos: 5,
                error: true,
                ..Default::default()
            },
        );
        assert_eq!(
            (c[REQUESTS], c[INPUT], c[COST], c[ERRORS], c[OUTPUT]),
            (u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX - 1)
        );
        let t0 = 1_764_000_000u64;
        let k = key_bytes(
            (t0 / 3600) as u32,
            &Record {
                unix_secs: t0,
                ..Default::default()
            },
        );
        let rows = rows_from(
            vec![
                (k.clone(), [u64::MAX - 1; LEDGER_FIELDS]),
                (k, [2; LEDGER_FIELDS]),
            ],
            t0,
            t0 + 1,
            &[],
            &Filter::default(),
        );
        assert_eq!((rows[0].requests, rows[0].errors), (u64::MAX, u64::MAX));

        // Through the ledger: an upstream's u64::MAX counts at the cap.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::start(store, Duration::from_secs(3600)).unwrap();
        for _ in 0..2 {
            ledger.record(Record {
                unix_secs: t0,
                tenant: "acme".into(),
                tokens: Tokens {
                    prompt: u64::MAX,
                    completion: u64::MAX,
                    cached: u64::MAX,
                    ..Tokens::default()
                },
                ..Default::default()
            });
        }
        let rows = ledger.query(t0, t0 + 1, &[]).unwrap();
        assert_eq!(
            (
                rows[0].requests,
                rows[0].input_tokens,
                rows[0].output_tokens
            ),
            (2, 2 * MAX_TOKENS_PER_REQUEST, 2 * MAX_TOKENS_PER_REQUEST)
        );
        ledger.shutdown();
    }

    #[test]
    fn a_full_queue_delays_records_instead_of_dropping_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = 1_764_000_000u64;
        let rec = |tag: &str, prompt: u64| Record {
            unix_secs: t0,
            tenant: "acme".into(),
            app: "web".into(),
            key: "k".into(),
            model: "m".into(),
            tag: tag.into(),
            tokens: Tokens {
                prompt,
                ..Tokens::default()
            },
            cost_nanos: 10,
            mix: Some(Mix {
                task: "chat".into(),
                tier: "simple".into(),
                cache: "miss".into(),
                route: String::new(),
            }),
            ..Default::default()
        };
        // A queue of two, and no writer yet to drain it.
        let (tx, rx) = mpsc::sync_channel(2);
        let overflow = Arc::new(Mutex::new(Pending::default()));
        let queued = Arc::new(std::sync::atomic::AtomicIsize::new(0));
        let fleet = FleetSink::default();
        let ledger = Ledger {
            tx,
            store: store.clone(),
            writer: Arc::new(Mutex::new(None)),
            thread: std::thread::current(),
            queued: queued.clone(),
            overflow: overflow.clone(),
            fleet: fleet.clone(),
        };
        ledger.record(rec("a", 1));
        // No writer answers: the flush times out (its message fills the queue).
        assert_eq!(
            ledger.flush_reply(Duration::from_millis(20)),
            Err(RecvTimeoutError::Timeout)
        );
        ledger.record(rec("a", 10));
        ledger.record(rec("b", 100));
        {
            let o = overflow.lock().unwrap();
            assert_eq!((o.ledger.len(), o.mix.len()), (2, 1), "aggregated");
            assert_eq!(o.totals()[REQUESTS], 2);
        }
        let handle = std::thread::spawn({
            let (store, overflow) = (store.clone(), overflow.clone());
            move || {
                writer(
                    store,
                    rx,
                    Duration::from_millis(10),
                    &queued,
                    &overflow,
                    &fleet,
                )
            }
        });
        *ledger.writer.lock().unwrap() = Some(handle);
        assert_eq!(ledger.flush_reply(Duration::from_secs(10)), Ok(true));
        assert!(overflow.lock().unwrap().is_empty());
        let rows = query(&store, t0, t0 + 1, &[Dim::Tag]).unwrap();
        let tag = |t: &str| {
            let r = rows.iter().find(|r| r.group[&Dim::Tag] == t).unwrap();
            (r.requests, r.input_tokens)
        };
        assert_eq!((tag("a"), tag("b")), ((2, 11), (1, 100)));
        let mix = mix_query(&store, t0, t0 + 1).unwrap();
        assert_eq!((mix[0].requests, mix[0].input_tokens), (3, 111));
        ledger.shutdown();
        assert_eq!(
            ledger.flush_reply(Duration::from_secs(1)),
            Err(RecvTimeoutError::Disconnected),
            "the writer has stopped"
        );
    }

    #[test]
    fn records_written_at_stop_reach_the_fleet_view() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t0 = 1_764_000_000u64;
        let fleet = FleetSink::default();
        let got: Arc<Mutex<Vec<FleetBatch>>> = Arc::default();
        let sink_got = got.clone();
        let _ = fleet.set(Box::new(move |b| {
            sink_got.lock().unwrap().push(b);
            true
        }));
        // A record that came while the last write at a stop ran.
        let mut late = Pending::default();
        add(
            &mut late,
            &Record {
                unix_secs: t0,
                tenant: "acme".into(),
                cost_nanos: 42,
                ..Default::default()
            },
        );
        write_late(&store, &mut late, &fleet);
        assert!(late.is_empty());
        let all = query(&store, t0, t0 + 1, &[]).unwrap();
        assert_eq!(all[0].requests, 1, "written");
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1, "handed to the fleet view");
        assert_eq!((got[0][0].1[REQUESTS], got[0][0].1[COST]), (1, 42));
    }

    #[test]
    fn writes_are_retried_a_few_times() {
        let mut calls = 0;
        let r: Result<(), &str> = with_retries(5, Duration::ZERO, || {
            calls += 1;
            if calls < 3 {
                Err("busy")
            } else {
                Ok(())
            }
        });
        assert_eq!((r, calls), (Ok(()), 3));
        let mut calls = 0;
        let r: Result<(), &str> = with_retries(4, Duration::ZERO, || {
            calls += 1;
            Err("down")
        });
        assert_eq!((r, calls), (Err("down"), 4));
        let mut calls = 0;
        let r: Result<(), &str> = with_retries(1, Duration::ZERO, || {
            calls += 1;
            Err("down")
        });
        assert_eq!((r, calls), (Err("down"), 1), "once when not stopping");
    }

    #[test]
    fn csv_text_cannot_start_a_formula() {
        let by = [
            Dim::Tenant,
            Dim::App,
            Dim::Key,
            Dim::Model,
            Dim::Route,
            Dim::Tag,
        ];
        let row = Row {
            group: BTreeMap::from([
                (Dim::Tenant, "+a,b".to_string()),
                (Dim::App, "@cmd".to_string()),
                (Dim::Key, "-".to_string()),
                (Dim::Model, "\tx".to_string()),
                (Dim::Route, "-2+3".to_string()),
                (Dim::Tag, "=1+2".to_string()),
            ]),
            requests: 3,
            cost_usd: 0.5,
            ..Row::default()
        };
        let csv = to_csv(&[row], &by);
        assert!(
            csv.ends_with(
                "\"'+a,b\",'@cmd,-,'\tx,'-2+3,'=1+2,3,0,0,0,0.500000000,0.000000000,0,0,0,0\r\n"
            ),
            "{csv}"
        );
        assert!(
            csv.starts_with("tenant,app,key,model,route,tag,requests,"),
            "{csv}"
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
                ..Tokens::default()
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
        let rec = |task: &str, tier: &str, cache: &str, route: &str, cost: u64| Record {
            unix_secs: t0,
            tenant: "acme".into(),
            app: "web".into(),
            key: "k".into(),
            model: "big".into(),
            tokens: Tokens {
                prompt: 100,
                completion: 20,
                ..Tokens::default()
            },
            cost_nanos: cost,
            mix: Some(Mix {
                task: task.into(),
                tier: tier.into(),
                cache: cache.into(),
                route: route.into(),
            }),
            ..Default::default()
        };
        let store = Store::open(dir.path()).unwrap();
        let ledger = Ledger::start(store.clone(), Duration::from_secs(3600)).unwrap();
        ledger.record(rec("chat", "simple", "miss", "", 100));
        ledger.record(rec("chat", "simple", "miss", "", 300));
        ledger.record(rec("code", "complex", "near", "smart", 900));
        // A request without a mix counts in the ledger only.
        ledger.record(Record {
            mix: None,
            ..rec("-", "-", "-", "", 5)
        });
        let rows = ledger.mix(t0 - 10, t0 + 10).unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        // The route that named the model, whose cache policy applied.
        assert_eq!(
            rows.iter()
                .map(|r| r.mix.route.as_str())
                .collect::<Vec<_>>(),
            ["", "smart"]
        );
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
