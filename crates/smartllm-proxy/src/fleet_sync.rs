//! The fleet's shared cache and cost view through Redis.
//!
//! **Cache** (`fleet.share_cache`). Every insert, purge and cache-version
//! change a gateway makes is appended to one Redis stream
//! (`PREFIX:cache:stream`, trimmed to about `fleet.cache_stream_len`
//! entries), and every gateway applies the others' to its own RocksDB and
//! FAISS index, so a lookup never leaves the process. An insert carries the
//! entry as stored (sealed with the cache key, which the fleet shares) and its
//! vector; the receiving gateway stores it under its own id and namespace tag,
//! so tenant isolation is the same as for its own entries. Besides the stream,
//! each live entry is also kept as a hash (`PREFIX:cache:e:NAMESPACE:EXACT`,
//! expiring with the entry, removed by purges): the snapshot a gateway loads
//! when it starts with an empty position or has fallen behind what the stream
//! still holds (every entry carries a fleet-wide sequence number, so a gap
//! after the entry it applied last shows). A gateway remembers how far it
//! has applied the stream (in RocksDB), so a restart resumes where it stopped.
//!
//! **Costs** (`fleet.share_costs`). Each ledger flush's counters are added to
//! hourly Redis hashes (`PREFIX:ledger:HOUR`, integer nano-dollars and
//! tokens) by a script that applies each batch exactly once (a per-batch
//! marker), so the fleet's totals equal the sum of the gateways' ledgers.
//!
//! Nothing here is on a request's path: requests hand events to bounded
//! queues (a full queue drops the event and counts it), background tasks talk
//! to Redis, and while Redis is down every gateway keeps serving from its own
//! cache; publishing resumes, and the reader catches up, when it returns.

use crate::Shared;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use smartllm_cache::{Applied, Purge, SemanticCache, Stored};
use smartllm_config::FleetConfig;
use smartllm_ledger::FleetBatch;
use smartllm_quota::fleet::redis::{self, aio::MultiplexedConnection, Value};
use smartllm_store::{Store, CF_META, LEDGER_FIELDS};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Events waiting to be published while Redis is slow or away.
const OUTBOX: usize = 10_000;
/// Ledger batches waiting likewise (one a flush interval).
const COST_QUEUE: usize = 1_024;
/// Where this gateway's stream position is kept (RocksDB `meta`).
const POSITION_KEY: &[u8] = b"fleet.cache_stream_position";
/// How long a cost batch's exactly-once marker is kept.
const MARKER_SECS: u64 = 86_400;
/// How long the fleet's hourly cost hashes are kept.
pub const COST_RETENTION_SECS: u64 = 400 * 86_400;
/// How long a stop keeps sending cost batches (the last flush included).
const STOP_WAIT: Duration = Duration::from_secs(5);
/// Stream entries read per round trip, and how long a read waits for one.
const READ_COUNT: usize = 256;
const READ_BLOCK: Duration = Duration::from_secs(2);

/// Applies a cost batch once: KEYS[1] is the batch's marker, KEYS[2..] the
/// hourly hashes; ARGV: marker TTL, hash TTL, then (hash index, field, delta).
const ADD_COSTS: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 3, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 1
"#;

/// Appends a change to the stream with the next fleet-wide sequence number
/// (field `s`), so a gateway can tell whether the stream was trimmed past
/// what it applied: KEYS[1] the stream, KEYS[2] the counter; ARGV[1] the
/// stream's length, then the entry's fields and values.
const APPEND: &str = r#"
local s = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 's', s, unpack(ARGV, 2))
"#;

/// Notes a purge in the fleet's purge record (a tombstone, newest time per
/// target): KEYS[1] the record; ARGV[1] the target, ARGV[2] when it was
/// issued (milliseconds), ARGV[3] how long the record is kept.
const MARK_PURGE: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"#;

/// Writes an entry's snapshot hash unless a purge that covers it was issued
/// after it was asked for (a backlogged insert must not bring back what a
/// purge removed): KEYS[1] the hash, KEYS[2] the purge record; ARGV[1] when
/// the entry was asked for (milliseconds, `Entry::asked_at_ms`), ARGV[2] its
/// namespace, ARGV[3] its route, ARGV[4] its model, ARGV[5] its TTL, ARGV[6]
/// its tenant (empty: none recorded), then the hash's fields and values.
/// 0: purged.
const SNAPSHOT_UNLESS_PURGED: &str = r#"
local t = tonumber(ARGV[1])
local fields = {'all', 'namespace:' .. ARGV[2], 'route:' .. ARGV[3], 'route:' .. ARGV[4]}
if ARGV[6] ~= '' then table.insert(fields, 'tenant:' .. ARGV[6]) end
for _, f in ipairs(fields) do
  local p = redis.call('HGET', KEYS[2], f)
  if p and t < tonumber(p) then return 0 end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"#;

/// How long the fleet's purge record outlives its last purge: longer than
/// any insert waits in a gateway's outbox.
const PURGE_RECORD_SECS: u64 = 35 * 86_400;

/// A purge target as the purge record names it.
fn purge_field(what: &Purge) -> String {
    match what {
        Purge::All => "all".to_string(),
        Purge::Namespace(ns) => format!("namespace:{ns}"),
        Purge::Route(r) => format!("route:{r}"),
        Purge::Tenant(t) => format!("tenant:{t}"),
    }
}

/// The purge a record's field names.
fn purge_of(field: &str) -> Option<Purge> {
    match field.split_once(':') {
        None if field == "all" => Some(Purge::All),
        Some(("namespace", ns)) if !ns.is_empty() => Some(Purge::Namespace(ns.to_string())),
        Some(("route", r)) if !r.is_empty() => Some(Purge::Route(r.to_string())),
        Some(("tenant", t)) if !t.is_empty() => Some(Purge::Tenant(t.to_string())),
        _ => None,
    }
}

/// A change to the cache that the other gateways apply.
#[derive(Debug)]
pub enum CacheEvent {
    Insert(Box<Stored>),
    /// A purge, and when it was issued (milliseconds): an outbox that
    /// sends it late does not move it later.
    Purge(Purge, u64),
    /// A route's (or model's) cache version went up to `version`: entries of
    /// an older one are gone. `name` `*` is the default policy.
    Version {
        name: String,
        version: u32,
    },
}

impl CacheEvent {
    /// What the change is, for a log line.
    fn describe(&self) -> String {
        match self {
            CacheEvent::Insert(_) => "insert".into(),
            CacheEvent::Purge(Purge::All, _) => "purge of everything".into(),
            CacheEvent::Purge(Purge::Route(r), _) => format!("purge of route or model '{r}'"),
            CacheEvent::Purge(Purge::Namespace(_), _) => "purge of a tenant's namespace".into(),
            CacheEvent::Purge(Purge::Tenant(t), _) => format!("purge of tenant '{t}'"),
            CacheEvent::Version { name, version } => {
                format!("cache version {version} of '{name}'")
            }
        }
    }
}

/// A Redis refusal that passes (Redis loading its data, a replica, out of
/// memory, busy, or wanting a password it will be given): the change waits
/// and is sent again, rather than dropped. (Before Redis 7 a script's
/// refusal comes as ERR with the real one in its text.)
fn passing(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
        || e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(
            e.code(),
            Some("OOM" | "BUSY" | "MISCONF" | "NOAUTH" | "WRONGPASS" | "READONLY" | "LOADING")
        )
        || [
            "OOM command not allowed",
            "READONLY",
            "LOADING",
            "MISCONF",
            "BUSY",
            "NOAUTH",
            "WRONGPASS",
            "unauthenticated",
        ]
        .iter()
        .any(|w| text.contains(w))
}

pub struct FleetSync {
    config: FleetConfig,
    client: redis::Client,
    /// This process (its own stream entries are skipped when read back).
    node: String,
    /// The embedder's fingerprint: vectors made by another are not applied
    /// (their entries are, for exact hits).
    model_tag: String,
    outbox: mpsc::Sender<CacheEvent>,
    outbox_rx: Mutex<Option<mpsc::Receiver<CacheEvent>>>,
    /// Purges and version bumps: never dropped, and sent before inserts
    /// (an insert asked before a purge that lands after it is refused by
    /// Redis's purge record, not spread to the fleet).
    control: mpsc::UnboundedSender<CacheEvent>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<CacheEvent>>>,
    /// Control events queued and not yet sent (nor given up): a stop waits
    /// for them.
    control_unsent: Arc<AtomicU64>,
    /// The publisher has ended (or its task was dropped, a quick stop):
    /// nothing will send what is still counted unsent.
    publisher_gone: AtomicBool,
    costs: mpsc::Sender<FleetBatch>,
    costs_rx: Mutex<Option<mpsc::Receiver<FleetBatch>>>,
    /// Cost batches handed over and not yet confirmed by Redis.
    costs_unsent: Arc<AtomicU64>,
    /// Cache inserts the publisher had not sent when it stopped.
    inserts_left: AtomicU64,
}

fn count(what: &'static str, outcome: &'static str) {
    metrics::counter!("smartllm_fleet_sync_total", "what" => what, "outcome" => outcome)
        .increment(1);
}

impl FleetSync {
    /// None unless `fleet.redis` is set and the cache or costs are shared.
    pub fn new(config: &FleetConfig, model_tag: String) -> Option<Arc<FleetSync>> {
        let url = config.redis.as_ref()?;
        if !(config.share_cache || config.share_costs) {
            return None;
        }
        let client = match smartllm_quota::fleet::redis_client(config, url) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot use fleet.redis; the cache and costs are not shared");
                return None;
            }
        };
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        let (control, control_rx) = mpsc::unbounded_channel();
        let (costs, costs_rx) = mpsc::channel(COST_QUEUE);
        Some(Arc::new(FleetSync {
            config: config.clone(),
            client,
            node: format!("{:x}-{:016x}", std::process::id(), fastrand::u64(..)),
            model_tag,
            outbox,
            outbox_rx: Mutex::new(Some(outbox_rx)),
            control,
            control_rx: Mutex::new(Some(control_rx)),
            control_unsent: Arc::new(AtomicU64::new(0)),
            publisher_gone: AtomicBool::new(false),
            costs,
            costs_rx: Mutex::new(Some(costs_rx)),
            costs_unsent: Arc::new(AtomicU64::new(0)),
            inserts_left: AtomicU64::new(0),
        }))
    }

    /// Whether these tasks run on `fleet`'s Redis and key prefix (they
    /// keep the ones they started with until a restart).
    pub fn started_on(&self, fleet: &FleetConfig) -> bool {
        self.config.redis == fleet.redis && self.config.key_prefix == fleet.key_prefix
    }

    pub fn shares_cache(&self) -> bool {
        self.config.share_cache
    }

    pub fn shares_costs(&self) -> bool {
        self.config.share_costs
    }

    /// Purges and version bumps queued and not yet sent (or given up).
    pub fn control_unsent(&self) -> u64 {
        self.control_unsent.load(Ordering::SeqCst)
    }

    /// Whether a stop may still wait for [`Self::control_unsent`]: the
    /// publisher runs (a quick stop drops it without a flush).
    pub fn control_pending(&self) -> bool {
        self.control_unsent() > 0 && !self.publisher_gone.load(Ordering::SeqCst)
    }

    /// `n` control events sent or given up (never below zero).
    fn control_sent(&self, n: u64) {
        let _ = self
            .control_unsent
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Cost batches handed over and not yet confirmed by Redis.
    pub fn costs_unsent(&self) -> u64 {
        self.costs_unsent.load(Ordering::SeqCst)
    }

    /// Cache inserts queued for the fleet and not yet sent (what the
    /// publisher left when it stopped, once it has).
    pub fn inserts_queued(&self) -> usize {
        (self.outbox.max_capacity() - self.outbox.capacity())
            .max(self.inserts_left.load(Ordering::SeqCst) as usize)
    }

    /// Until every cost batch handed over so far is in Redis, or `timeout`.
    pub async fn wait_costs_sent(&self, timeout: Duration) {
        let until = tokio::time::Instant::now() + timeout;
        while self.costs_unsent.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Queue a cache change for the fleet (never waits).
    pub fn publish(&self, event: CacheEvent) {
        if !self.config.share_cache {
            return;
        }
        let queued = match event {
            CacheEvent::Insert(_) => self.outbox.try_send(event).is_ok(),
            // Rare (an operator, a reload), and they must reach the fleet.
            _ => {
                self.control_unsent.fetch_add(1, Ordering::SeqCst);
                let sent = self.control.send(event).is_ok();
                if !sent {
                    // The publisher has stopped.
                    self.control_sent(1);
                }
                sent
            }
        };
        if !queued {
            count("cache_publish", "dropped");
        }
    }

    /// What the ledger calls with each flushed batch (never waits).
    pub fn cost_sink(self: &Arc<Self>) -> smartllm_ledger::FleetSinkFn {
        let tx = self.costs.clone();
        let unsent = self.costs_unsent.clone();
        Box::new(move |batch| {
            unsent.fetch_add(1, Ordering::SeqCst);
            let ok = tx.try_send(batch).is_ok();
            if !ok {
                unsent.fetch_sub(1, Ordering::SeqCst);
            }
            ok
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.config.key_prefix)
    }

    /// A `SCAN MATCH` pattern over snapshot hashes (the prefix and the
    /// namespace taken literally).
    fn entry_pattern(&self, namespace: Option<&str>) -> String {
        format!(
            "{}:cache:e:{}:*",
            glob_escape(&self.config.key_prefix),
            namespace.map_or_else(|| "*".to_string(), glob_escape)
        )
    }

    fn stream_key(&self) -> String {
        self.key("cache:stream")
    }

    fn purges_key(&self) -> String {
        self.key("cache:purges")
    }

    fn entry_key(&self, namespace: &str, exact: &str) -> String {
        self.key(&format!("cache:e:{namespace}:{exact}"))
    }

    fn hour_key(&self, hour: u32) -> String {
        self.key(&format!("ledger:{hour}"))
    }

    /// A connection whose replies may take `timeout` (the stream reader's
    /// blocking reads get their own).
    async fn connect(&self, timeout: Duration) -> Result<MultiplexedConnection, redis::RedisError> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
    }

    // ---- publishing -------------------------------------------------------

    /// [`Self::connect`] for `what` (a fleet task), saying when it loses
    /// Redis and when it has it again: once each, not at every retry (an
    /// unreachable Redis, a wrong password, would otherwise leave the cache
    /// and costs unshared without a word).
    async fn connect_noted(
        &self,
        what: &'static str,
        timeout: Duration,
        down: &mut bool,
    ) -> Result<MultiplexedConnection, redis::RedisError> {
        // A connection is not Redis answering: a password it wants (and
        // was not given) fails only the first command.
        let conn = match self.connect(timeout).await {
            Ok(mut c) => match redis::cmd("PING").query_async::<()>(&mut c).await {
                Ok(()) => Ok(c),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        // The gauge the limits' calls keep too: a fleet that only shares
        // its cache or costs has it as well.
        smartllm_quota::metrics::fleet_up(conn.is_ok());
        match conn {
            Ok(c) => {
                if std::mem::take(down) {
                    tracing::info!(what, redis = %self.config.redis_addr(), "fleet: redis reachable again");
                }
                Ok(c)
            }
            Err(e) => {
                if !std::mem::replace(down, true) {
                    tracing::warn!(what, redis = %self.config.redis_addr(), error = %e, hint = smartllm_quota::fleet::redis_hint(&e), "fleet: cannot reach redis; retrying (meanwhile this is not shared)");
                }
                Err(e)
            }
        }
    }

    async fn publish_one(
        &self,
        conn: &mut MultiplexedConnection,
        event: &CacheEvent,
        named: &BTreeSet<String>,
    ) -> redis::RedisResult<()> {
        let append = redis::Script::new(APPEND);
        let mut add = append.prepare_invoke();
        add.key(self.stream_key())
            .key(self.key("cache:seq"))
            .arg(self.config.cache_stream_len)
            .arg("o")
            .arg(&self.node);
        match event {
            CacheEvent::Insert(s) => {
                let e = &s.entry;
                let ttl = e.expires_at.saturating_sub(smartllm_cache::now_secs());
                if ttl == 0 {
                    return Ok(());
                }
                // As sent: sealed with the cache key the fleet shares, when set,
                // bound to the entry's exact key.
                let vector = &s.sealed_vector;
                // The snapshot first: a gateway loading it meanwhile gets the
                // entry twice (once more from the stream), never not at all.
                // Not at all when a purge covering it came after it was asked
                // for (this gateway's backlog, sent after another's purge).
                let key = self.entry_key(&e.namespace, &e.exact);
                let written: i64 = redis::Script::new(SNAPSHOT_UNLESS_PURGED)
                    .key(&key)
                    .key(self.purges_key())
                    .arg(e.asked_at_ms())
                    .arg(&e.namespace)
                    .arg(&e.route)
                    .arg(&e.model)
                    .arg(ttl)
                    .arg(e.tenant.as_deref().unwrap_or(""))
                    .arg("p")
                    .arg(&s.sealed)
                    .arg("e")
                    .arg(vector)
                    .arg("m")
                    .arg(&self.model_tag)
                    .arg("r")
                    .arg(&e.route)
                    .arg("c")
                    .arg(&e.model)
                    .arg("n")
                    .arg(e.version)
                    .arg("u")
                    .arg(e.tenant.as_deref().unwrap_or(""))
                    .invoke_async(conn)
                    .await?;
                if written == 0 {
                    count("cache_publish", "purged");
                    return Ok(());
                }
                add.arg("k")
                    .arg("i")
                    .arg("p")
                    .arg(&s.sealed)
                    .arg("e")
                    .arg(vector)
                    .arg("m")
                    .arg(&self.model_tag);
                add.invoke_async::<()>(conn).await
            }
            CacheEvent::Purge(what, issued) => {
                let issued = *issued;
                let (w, a) = match what {
                    Purge::All => ("all", ""),
                    Purge::Namespace(ns) => ("namespace", ns.as_str()),
                    Purge::Route(r) => ("route", r.as_str()),
                    Purge::Tenant(t) => ("tenant", t.as_str()),
                };
                // The record first (a late insert checks it), then the
                // snapshot, then the stream: a gateway that reads the stream
                // from before the purge also replays it, and one that starts
                // after it finds a snapshot without the purged entries.
                redis::Script::new(MARK_PURGE)
                    .key(self.purges_key())
                    .arg(purge_field(what))
                    .arg(issued)
                    .arg(PURGE_RECORD_SECS)
                    .invoke_async::<()>(conn)
                    .await?;
                let pattern = match what {
                    Purge::Namespace(ns) => self.entry_pattern(Some(ns)),
                    _ => self.entry_pattern(None),
                };
                self.remove_snapshot_keys(conn, &pattern, |r, c, _, u| match what {
                    Purge::Route(name) => r == name || c == name,
                    Purge::Tenant(t) => u == t,
                    _ => true,
                })
                .await?;
                add.arg("k")
                    .arg("p")
                    .arg("w")
                    .arg(w)
                    .arg("a")
                    .arg(a)
                    .arg("t")
                    .arg(issued / 1000)
                    .arg("tm")
                    .arg(issued);
                add.invoke_async::<()>(conn).await
            }
            CacheEvent::Version { name, version } => {
                add.arg("k")
                    .arg("v")
                    .arg("a")
                    .arg(name)
                    .arg("n")
                    .arg(*version);
                add.invoke_async::<()>(conn).await?;
                let pattern = self.entry_pattern(None);
                self.remove_snapshot_keys(conn, &pattern, |r, c, n, _| {
                    n < *version && covered(name, r, c, named)
                })
                .await
            }
        }
    }

    /// Delete the snapshot hashes matching `pattern` for which `remove`
    /// (route, model, version, tenant: empty when not recorded) is true.
    async fn remove_snapshot_keys(
        &self,
        conn: &mut MultiplexedConnection,
        pattern: &str,
        remove: impl Fn(&str, &str, u32, &str) -> bool,
    ) -> redis::RedisResult<()> {
        let mut cursor = 0u64;
        loop {
            let (next, keys, rows) =
                scan_hashes(conn, pattern, cursor, &["r", "c", "n", "u"]).await?;
            let doomed: Vec<&String> = keys
                .iter()
                .zip(rows)
                .filter(|(_, row)| {
                    let text = |i: usize| {
                        row[i]
                            .as_deref()
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default()
                    };
                    remove(&text(0), &text(1), text(2).parse().unwrap_or(0), &text(3))
                })
                .map(|(k, _)| k)
                .collect();
            if !doomed.is_empty() {
                redis::cmd("DEL")
                    .arg(doomed)
                    .query_async::<()>(conn)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    async fn run_publisher(self: Arc<Self>, shared: Arc<Shared>, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.outbox_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let Some(mut control) = self.control_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        /// Marks the publisher gone however it ends (a dropped task too).
        struct Gone<'a>(&'a AtomicBool);
        impl Drop for Gone<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _gone = Gone(&self.publisher_gone);
        let mut conn: Option<MultiplexedConnection> = None;
        let mut backoff = Duration::from_millis(100);
        let mut down = false;
        let mut failing = false;
        loop {
            let event = tokio::select! {
                biased;
                e = control.recv() => match e { Some(e) => e, None => return },
                e = rx.recv() => match e { Some(e) => e, None => return },
                _ = shutdown.changed() => {
                    self.inserts_left.store(rx.len() as u64, Ordering::SeqCst);
                    self.flush_control(&shared, &mut control, conn.take()).await;
                    return;
                }
            };
            // Retried while Redis is unreachable or refuses for a while
            // (`passing`): later events queue behind it (a full queue drops
            // new inserts, counted), so order is kept. One Redis refuses
            // for good (an error reply of another kind: a script or a key
            // of the wrong type) is dropped after 3 tries rather than stop
            // every later one.
            let control_event = !matches!(event, CacheEvent::Insert(_));
            // A version bump goes out before inserts queued ahead of it:
            // those of a version the running config no longer serves are
            // dropped rather than seed snapshot hashes nobody reads.
            if let CacheEvent::Insert(s) = &event {
                let e = &s.entry;
                let rt = shared.runtime.load();
                if crate::cache_sweeper::outdated(&rt.config, &e.route, &e.model, e.version) {
                    count("cache_publish", "outdated");
                    continue;
                }
            }
            let mut refused = 0;
            loop {
                if conn.is_none() {
                    conn = self
                        .connect_noted("cache changes", self.config.timeout * 4, &mut down)
                        .await
                        .ok();
                }
                if let Some(c) = conn.as_mut() {
                    let named = named_policies(&shared);
                    match self.publish_one(c, &event, &named).await {
                        Ok(()) => {
                            count("cache_publish", "ok");
                            if std::mem::take(&mut failing) {
                                tracing::info!("publishing cache changes to the fleet works again");
                            }
                            backoff = Duration::from_millis(100);
                            break;
                        }
                        Err(e) => {
                            count("cache_publish", "error");
                            let unreachable = e.is_io_error()
                                || e.is_timeout()
                                || e.is_connection_dropped()
                                || e.is_connection_refusal()
                                || passing(&e);
                            if !unreachable {
                                refused += 1;
                                if refused >= 3 {
                                    count("cache_publish", "dropped");
                                    tracing::error!(change = event.describe(), error = %e, "redis refused a cache change three times; it is not shared");
                                    break;
                                }
                            }
                            // Said once a stretch, not at every retry.
                            if !std::mem::replace(&mut failing, true) {
                                tracing::warn!(change = event.describe(), error = %e, hint = smartllm_quota::fleet::redis_hint(&e), "publishing a cache change to the fleet failed; retrying (changes wait in order)");
                            }
                            conn = None;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {
                        self.inserts_left.store(
                            rx.len() as u64 + u64::from(!control_event),
                            Ordering::SeqCst,
                        );
                        if control_event {
                            // Tried again with the rest, below (still
                            // counted unsent).
                            let _ = self.control.send(event);
                        }
                        self.flush_control(&shared, &mut control, conn.take()).await;
                        return;
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            if control_event {
                self.control_sent(1);
            }
        }
    }

    /// At shutdown: the purges and version bumps not yet sent get one more
    /// try each (queued inserts are let go), within a few timeouts in all.
    async fn flush_control(
        &self,
        shared: &Shared,
        control: &mut mpsc::UnboundedReceiver<CacheEvent>,
        conn: Option<MultiplexedConnection>,
    ) {
        // No more are taken from here on (a later publish is dropped).
        control.close();
        let mut pending = Vec::new();
        while let Ok(e) = control.try_recv() {
            pending.push(e);
        }
        if pending.is_empty() {
            return;
        }
        let total = pending.len();
        let (mut sent, mut tried) = (0, 0);
        let deadline = self.config.timeout * 8;
        let _ = tokio::time::timeout(deadline, async {
            let mut conn = match conn {
                Some(c) => c,
                None => match self.connect(self.config.timeout * 4).await {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            let named = named_policies(shared);
            for e in &pending {
                // Each on its own: one refused does not keep the rest back.
                if self.publish_one(&mut conn, e, &named).await.is_ok() {
                    count("cache_publish", "ok");
                    sent += 1;
                }
                tried += 1;
                self.control_sent(1);
            }
        })
        .await;
        // Whatever was not tried is given up too: a stop waits no longer.
        self.control_sent((total - tried) as u64);
        if sent < total {
            for _ in sent..total {
                count("cache_publish", "dropped");
            }
            tracing::error!(
                sent,
                not_sent = total - sent,
                "cache purges or version changes could not reach the fleet's Redis before shutdown; other gateways keep what they hold"
            );
        }
    }

    // ---- applying ---------------------------------------------------------

    /// The stream entry last applied and its sequence number (`ID SEQ`).
    async fn position(&self, store: &Arc<Store>) -> Option<Position> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let cf = store.db().cf_handle(CF_META)?;
            let v = store.db().get_cf(cf, POSITION_KEY).ok()??;
            let text = String::from_utf8(v).ok()?;
            let (id, seq) = text.split_once(' ')?;
            Some((id.to_string(), seq.parse().ok()?))
        })
        .await
        .ok()
        .flatten()
    }

    async fn save_position(&self, store: &Arc<Store>, (id, seq): Position) {
        let store = store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(cf) = store.db().cf_handle(CF_META) {
                let text = format!("{id} {seq}");
                if let Err(e) = store.db().put_cf(cf, POSITION_KEY, text.as_bytes()) {
                    tracing::warn!(error = %e, "saving the fleet stream position failed");
                }
            }
        })
        .await;
    }

    /// Apply one insert (blocking pool).
    async fn apply_insert(
        &self,
        cache: &Arc<SemanticCache>,
        sealed: Vec<u8>,
        vector: Vec<u8>,
        model: &[u8],
    ) {
        // A vector of another embedder (a peer not yet upgraded, another
        // model file or window) cannot be compared with this one's: the
        // entry is kept for its exact key alone.
        let same_space = model == self.model_tag.as_bytes();
        if !same_space {
            count("cache_apply", "other_model");
        }
        let with_vector = same_space && !vector.is_empty();
        let cache = cache.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            // A vector that cannot be used here (one in the clear at a
            // keyed cache): the entry still serves by its exact key.
            let embedding = match with_vector {
                true => match cache.open_vector_of(&sealed, &vector) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        count("cache_apply", "vector_refused");
                        tracing::debug!(error = %e, "a fleet cache entry's vector was not used");
                        None
                    }
                },
                false => None,
            };
            cache.apply_remote(&sealed, embedding)
        })
        .await;
        match outcome {
            Ok(Ok(Applied::Stored)) => count("cache_apply", "stored"),
            Ok(Ok(Applied::Duplicate)) => count("cache_apply", "duplicate"),
            Ok(Ok(Applied::Expired)) => count("cache_apply", "expired"),
            Ok(Ok(Applied::Purged)) => count("cache_apply", "purged"),
            Ok(Err(e)) => {
                count("cache_apply", "rejected");
                tracing::debug!(error = %e, "a fleet cache entry was not applied");
            }
            Err(_) => count("cache_apply", "rejected"),
        }
    }

    async fn apply_message(
        &self,
        shared: &Shared,
        cache: &Arc<SemanticCache>,
        fields: &HashMap<String, Vec<u8>>,
    ) {
        let text = |k: &str| {
            fields
                .get(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        if text("o") == self.node {
            return;
        }
        match text("k").as_str() {
            "i" => {
                let (Some(p), Some(m)) = (fields.get("p"), fields.get("m")) else {
                    return count("cache_apply", "rejected");
                };
                let e = fields.get("e").cloned().unwrap_or_default();
                self.apply_insert(cache, p.clone(), e, m).await;
            }
            "p" => {
                let what = match (text("w").as_str(), text("a")) {
                    ("all", _) => Purge::All,
                    ("namespace", ns) if !ns.is_empty() => Purge::Namespace(ns),
                    ("route", r) if !r.is_empty() => Purge::Route(r),
                    ("tenant", t) if !t.is_empty() => Purge::Tenant(t),
                    _ => return count("cache_apply", "rejected"),
                };
                // When it was issued, in milliseconds (older gateways send
                // seconds, or no time: now).
                let issued = text("tm")
                    .parse::<u64>()
                    // Seconds from an older gateway: the end of that
                    // second (covering what was asked in it before).
                    .or_else(|_| {
                        text("t")
                            .parse::<u64>()
                            .map(|s| s.saturating_mul(1000).saturating_add(999))
                    })
                    .unwrap_or_else(|_| smartllm_cache::now_ms());
                // A tenant's erasure takes the Responses API conversations
                // this gateway keeps for it too.
                let responses = match &what {
                    Purge::Tenant(t) => shared.responses.clone().map(|r| (r, t.clone())),
                    _ => None,
                };
                let erasure = matches!(what, Purge::Tenant(_));
                let c = cache.clone();
                let purged = tokio::task::spawn_blocking(move || {
                    let n = c.purge_from_fleet(&what, issued)?;
                    if let Some((r, tenant)) = responses {
                        if let Err(e) = r.purge_tenant_at(&tenant, issued) {
                            tracing::error!(error = %e, "a tenant purge from the fleet could not remove the tenant's stored responses");
                        }
                    }
                    Ok::<_, smartllm_cache::CacheError>(n)
                })
                .await;
                match purged {
                    Ok(Ok(n)) => {
                        count("cache_apply", "purge");
                        tracing::info!(removed = n, "cache purge from the fleet applied");
                        if erasure {
                            crate::erase_from_disk(shared);
                        }
                    }
                    _ => count("cache_apply", "rejected"),
                }
            }
            "v" => {
                let (name, Ok(version)) = (text("a"), text("n").parse::<u32>()) else {
                    return count("cache_apply", "rejected");
                };
                let named = named_policies(shared);
                let c = cache.clone();
                let swept = tokio::task::spawn_blocking(move || {
                    c.sweep(|e| e.version < version && covered(&name, &e.route, &e.model, &named))
                })
                .await;
                match swept {
                    Ok(Ok(_)) => count("cache_apply", "version"),
                    _ => count("cache_apply", "rejected"),
                }
            }
            _ => count("cache_apply", "rejected"),
        }
    }

    /// Every live entry from the snapshot hashes; returns how many were stored.
    async fn load_snapshot(
        &self,
        conn: &mut MultiplexedConnection,
        cache: &Arc<SemanticCache>,
        shared: &Shared,
    ) -> redis::RedisResult<u64> {
        // The fleet's purges first: an entry in the snapshot from before one
        // that covers it (written back by a gateway's backlog) stays out.
        let purges: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(self.purges_key())
            .query_async(conn)
            .await?;
        let known: Vec<(Purge, u64)> = purges
            .iter()
            .filter_map(|(f, t)| Some((purge_of(f)?, *t)))
            .collect();
        if !known.is_empty() {
            let c = cache.clone();
            let responses = shared.responses.clone();
            let erased = tokio::task::spawn_blocking(move || {
                let mut erased = false;
                for (what, at) in &known {
                    c.remember_fleet_purge(what, *at);
                    // A tenant's erasure this gateway missed (the stream
                    // trimmed past it): its stored responses go too, once
                    // (the store notes the purges it applied).
                    if let (Purge::Tenant(t), Some(r)) = (what, &responses) {
                        match r.purge_tenant_at(t, *at) {
                            Ok(Some(n)) if n > 0 => erased = true,
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "a tenant purge of the fleet's record could not remove the tenant's stored responses"),
                        }
                    }
                }
                erased
            })
            .await;
            if erased.unwrap_or(false) {
                crate::erase_from_disk(shared);
            }
        }
        let pattern = self.entry_pattern(None);
        let mut cursor = 0u64;
        let mut n = 0;
        loop {
            let (next, _, rows) = scan_hashes(conn, &pattern, cursor, &["p", "e", "m"]).await?;
            for mut row in rows {
                if let (Some(p), Some(m)) = (row[0].take(), row[2].take()) {
                    self.apply_insert(cache, p, row[1].take().unwrap_or_default(), &m)
                        .await;
                    n += 1;
                }
            }
            if next == 0 {
                return Ok(n);
            }
            cursor = next;
        }
    }

    /// Where to read from: the saved position while the stream still holds
    /// the entry that follows it (sequence numbers without a gap); otherwise
    /// (and for a gateway that never read the stream) the snapshot, then the
    /// stream's last entry as it was before the snapshot was read (entries
    /// added meanwhile arrive twice and are recognised as duplicates).
    async fn catch_up(
        &self,
        conn: &mut MultiplexedConnection,
        cache: &Arc<SemanticCache>,
        saved: Option<Position>,
        shared: &Shared,
    ) -> redis::RedisResult<Position> {
        let stream = self.stream_key();
        if let Some((id, seq)) = &saved {
            let next: Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(format!("({id}"))
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            let next_seq = stream_entries(next)
                .into_iter()
                .next()
                .map(|(_, f)| seq_of(&f));
            // Nothing after ours, or the very next one: nothing was missed.
            if next_seq.is_none_or(|n| n <= seq + 1) {
                return Ok((id.clone(), *seq));
            }
        }
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let last = stream_entries(last)
            .into_iter()
            .next()
            .map(|(id, f)| (id, seq_of(&f)))
            .unwrap_or_else(|| ("0-0".to_string(), 0));
        if saved.is_some() {
            // Purges and version bumps this gateway missed are gone from
            // the stream; the snapshot reflects them. So a gateway that fell
            // behind takes the fleet's cache as the snapshot has it.
            let c = cache.clone();
            match tokio::task::spawn_blocking(move || c.clear_for_snapshot()).await {
                Ok(Ok(n)) => {
                    tracing::info!(removed = n, "local cache replaced by the fleet's snapshot")
                }
                _ => tracing::warn!("clearing the local cache before the fleet snapshot failed"),
            }
        }
        let n = self.load_snapshot(conn, cache, shared).await?;
        tracing::info!(
            entries = n,
            behind = saved.is_some(),
            "fleet cache snapshot loaded"
        );
        count("cache_snapshot", "loaded");
        Ok(last)
    }

    async fn run_reader(self: Arc<Self>, shared: Arc<Shared>, mut shutdown: ShutdownWatch) {
        let (Some(cache), Some(store)) = (shared.cache.clone(), shared.components.store.clone())
        else {
            return;
        };
        let stream = self.stream_key();
        let mut saved = self.position(&store).await;
        let mut backoff = Duration::from_millis(200);
        let mut down = false;
        'connect: loop {
            let mut conn = match self
                .connect_noted(
                    "cache stream",
                    READ_BLOCK + self.config.timeout * 4,
                    &mut down,
                )
                .await
            {
                Ok(c) => c,
                Err(_) => {
                    metrics::gauge!("smartllm_fleet_cache_connected").set(0.0);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'connect;
                }
            };
            let mut pos = match self
                .catch_up(&mut conn, &cache, saved.clone(), &shared)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "fleet cache catch-up failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue 'connect;
                }
            };
            metrics::gauge!("smartllm_fleet_cache_connected").set(1.0);
            backoff = Duration::from_millis(200);
            loop {
                let mut xread = redis::cmd("XREAD");
                xread
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(READ_BLOCK.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&pos.0);
                let read = xread.query_async::<Value>(&mut conn);
                let reply = tokio::select! {
                    r = read => r,
                    _ = shutdown.changed() => {
                        self.save_position(&store, pos).await;
                        return;
                    }
                };
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the fleet cache stream failed; reconnecting");
                        metrics::gauge!("smartllm_fleet_cache_connected").set(0.0);
                        saved = Some(pos);
                        continue 'connect;
                    }
                };
                let entries: Vec<(String, HashMap<String, Vec<u8>>)> = match reply {
                    Value::Array(streams) => streams
                        .into_iter()
                        .flat_map(|s| match s {
                            Value::Array(mut kv) if kv.len() == 2 => stream_entries(kv.remove(1)),
                            _ => Vec::new(),
                        })
                        .collect(),
                    Value::Map(streams) => streams
                        .into_iter()
                        .flat_map(|(_, v)| stream_entries(v))
                        .collect(),
                    _ => Vec::new(),
                };
                if entries.is_empty() {
                    continue;
                }
                // Entries trimmed before this gateway read them (it fell
                // more than the stream's length behind): catch up again.
                let first = entries.first().map(|(_, f)| seq_of(f)).unwrap_or(0);
                if pos.1 > 0 && first > pos.1 + 1 {
                    tracing::warn!(
                        applied = pos.1,
                        next = first,
                        "the fleet cache stream was trimmed past this gateway; catching up from the snapshot"
                    );
                    saved = Some(pos);
                    continue 'connect;
                }
                for (id, fields) in &entries {
                    self.apply_message(&shared, &cache, fields).await;
                    pos = (id.clone(), seq_of(fields));
                }
                self.save_position(&store, pos.clone()).await;
            }
        }
    }

    // ---- costs ------------------------------------------------------------

    async fn run_costs(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.costs_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let script = redis::Script::new(ADD_COSTS);
        let mut conn: Option<MultiplexedConnection> = None;
        let mut down = false;
        let mut costs_failing = false;
        // The batch being sent (retried as it is, under its marker, until
        // Redis confirms it) and what arrived since.
        let mut inflight: Option<(u64, u64, Counters)> = None;
        let mut next = Counters::new();
        let mut next_batches = 0u64;
        let mut seq = 0u64;
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let mut stopping = false;
        // A stop keeps sending for a while: the gateway's last ledger flush
        // (the finisher's) comes after the services were told to stop.
        let mut stop_by: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                b = rx.recv() => match b {
                    Some(batch) => {
                        merge(&mut next, batch);
                        next_batches += 1;
                    }
                    None => stopping = true,
                },
                _ = ticker.tick() => {}
                _ = shutdown.changed(), if !stopping => {
                    stopping = true;
                    stop_by = Some(tokio::time::Instant::now() + STOP_WAIT);
                }
            }
            while let Ok(batch) = rx.try_recv() {
                merge(&mut next, batch);
                next_batches += 1;
            }
            if inflight.is_none() && next_batches > 0 {
                seq += 1;
                inflight = Some((
                    seq,
                    std::mem::take(&mut next_batches),
                    std::mem::take(&mut next),
                ));
            }
            if let Some((n, batches, counters)) = &inflight {
                if conn.is_none() {
                    conn = self
                        .connect_noted("costs", self.config.timeout * 4, &mut down)
                        .await
                        .ok();
                }
                if let Some(c) = conn.as_mut() {
                    match self.add_costs(c, &script, *n, counters).await {
                        Ok(()) => {
                            count("costs", "ok");
                            if std::mem::take(&mut costs_failing) {
                                tracing::info!("adding costs to the fleet view works again");
                            }
                            self.costs_unsent.fetch_sub(*batches, Ordering::SeqCst);
                            inflight = None;
                        }
                        Err(e) => {
                            count("costs", "error");
                            // Said once a stretch, not every half second.
                            if !std::mem::replace(&mut costs_failing, true) {
                                tracing::warn!(error = %e, hint = smartllm_quota::fleet::redis_hint(&e), "adding costs to the fleet view failed; retrying (the costs wait)");
                            }
                            conn = None;
                        }
                    }
                }
            }
            let out_of_time = stop_by.is_some_and(|t| tokio::time::Instant::now() >= t);
            let sent = inflight.is_none() && self.costs_unsent.load(Ordering::SeqCst) == 0;
            if stopping && (out_of_time || (sent && stop_by.is_none())) {
                return;
            }
        }
    }

    async fn add_costs(
        &self,
        conn: &mut MultiplexedConnection,
        script: &redis::Script,
        seq: u64,
        counters: &Counters,
    ) -> redis::RedisResult<()> {
        let mut inv = script.prepare_invoke();
        inv.key(self.key(&format!("ledger:batch:{}:{seq}", self.node)));
        let mut hours: Vec<u32> = Vec::new();
        inv.arg(MARKER_SECS).arg(COST_RETENTION_SECS);
        for (k, c) in counters {
            let Some(hour) = smartllm_ledger::key_hour(k) else {
                continue;
            };
            let at = match hours.iter().position(|h| *h == hour) {
                Some(i) => i,
                None => {
                    hours.push(hour);
                    inv.key(self.hour_key(hour));
                    hours.len() - 1
                }
            };
            for (i, v) in c.iter().enumerate() {
                if *v > 0 {
                    let mut field = k.clone();
                    field.push(i as u8);
                    inv.arg(at + 2).arg(field).arg(*v as i64);
                }
            }
        }
        let _: i64 = inv.invoke_async(conn).await?;
        Ok(())
    }

    /// The fleet's ledger counters for the hours of `[from, to)`.
    pub async fn cost_counters(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<(Vec<u8>, [u64; LEDGER_FIELDS])>, redis::RedisError> {
        let mut conn = self.connect(Duration::from_secs(10)).await?;
        let (from_h, to_h) = ((from / 3600) as u32, to.div_ceil(3600) as u32);
        let mut out = Counters::new();
        let hours: Vec<u32> = (from_h..to_h).collect();
        for chunk in hours.chunks(256) {
            let mut pipe = redis::pipe();
            for h in chunk {
                pipe.cmd("HGETALL").arg(self.hour_key(*h));
            }
            let maps: Vec<Vec<(Vec<u8>, i64)>> = pipe.query_async(&mut conn).await?;
            for (field, v) in maps.into_iter().flatten() {
                let Some((&i, key)) = field.split_last() else {
                    continue;
                };
                if (i as usize) < LEDGER_FIELDS {
                    out.entry(key.to_vec()).or_insert([0; LEDGER_FIELDS])[i as usize] +=
                        v.max(0) as u64;
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// One `SCAN` page of snapshot hashes matching `pattern` from `cursor`:
/// the next cursor, the keys, and the `fields` of each (one pipeline).
async fn scan_hashes(
    conn: &mut MultiplexedConnection,
    pattern: &str,
    cursor: u64,
    fields: &[&str],
) -> redis::RedisResult<(u64, Vec<String>, Vec<Vec<Option<Vec<u8>>>>)> {
    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(500)
        .query_async(conn)
        .await?;
    if keys.is_empty() {
        return Ok((next, keys, Vec::new()));
    }
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("HMGET").arg(k).arg(fields);
    }
    let rows = pipe.query_async(conn).await?;
    Ok((next, keys, rows))
}

/// Ledger counters by key (hour first), summed.
type Counters = HashMap<Vec<u8>, [u64; LEDGER_FIELDS]>;

fn merge(into: &mut Counters, batch: FleetBatch) {
    for (k, c) in batch {
        let acc = into.entry(k).or_insert([0; LEDGER_FIELDS]);
        for i in 0..LEDGER_FIELDS {
            acc[i] = acc[i].saturating_add(c[i]);
        }
    }
}

/// The routes and models with a cache policy of their own.
fn named_policies(shared: &Shared) -> BTreeSet<String> {
    shared
        .runtime
        .load()
        .config
        .cache
        .routes
        .keys()
        .cloned()
        .collect()
}

/// Whether a version change of `name` covers an entry of this route and
/// model (`*`: those with no policy of their own among `named`).
fn covered(name: &str, route: &str, model: &str, named: &BTreeSet<String>) -> bool {
    if name == "*" {
        !named.contains(route) && !named.contains(model)
    } else {
        route == name || model == name
    }
}

/// `MATCH` patterns treat `*?[]\` specially.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A stream entry's id and sequence number.
type Position = (String, u64);

/// The sequence number an entry was appended with.
fn seq_of(fields: &HashMap<String, Vec<u8>>) -> u64 {
    fields
        .get("s")
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// `[[id, [field, value, ...]], ...]` as (id, fields).
fn stream_entries(v: Value) -> Vec<(String, HashMap<String, Vec<u8>>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = bytes_of(pair.pop()?)?;
            let mut map = HashMap::new();
            let flat: Vec<Value> = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => Vec::new(),
            };
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v)) {
                    map.insert(String::from_utf8_lossy(&k).into_owned(), v);
                }
            }
            Some((String::from_utf8_lossy(&id).into_owned(), map))
        })
        .collect()
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// Runs the publisher, the stream reader and the cost adder.
pub struct FleetSyncService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for FleetSyncService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(sync) = self.shared.fleet_sync.clone() else {
            return;
        };
        let tasks = tokio_util::task::TaskTracker::new();
        if sync.config.share_cache {
            tasks.spawn(
                sync.clone()
                    .run_publisher(self.shared.clone(), shutdown.clone()),
            );
            tasks.spawn(
                sync.clone()
                    .run_reader(self.shared.clone(), shutdown.clone()),
            );
        }
        if sync.config.share_costs {
            tasks.spawn(sync.clone().run_costs(shutdown.clone()));
        }
        tasks.close();
        tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A purge is recorded in Redis, and an insert asked for before it
    /// (a gateway's backlog, sent after another gateway's purge) writes no
    /// snapshot hash and no stream entry: a gateway that starts later cannot
    /// load what the purge removed. (A real redis-server: `make test`
    /// installs it.)
    #[tokio::test]
    async fn a_backlogged_insert_does_not_bring_back_what_a_purge_removed() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut server = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (`make test` installs it)");
        let cfg = FleetConfig {
            redis: Some(format!("redis://127.0.0.1:{port}/0")),
            tls_ca_file: None,
            key_prefix: "t".into(),
            timeout: Duration::from_millis(500),
            on_error: smartllm_config::FleetOnError::Local,
            share_cache: true,
            cache_stream_len: 1000,
            share_costs: false,
        };
        let f = FleetSync::new(&cfg, "tag".into()).unwrap();
        let mut conn = None;
        for _ in 0..100 {
            if let Ok(c) = f.connect(Duration::from_millis(500)).await {
                conn = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut conn = conn.expect("redis-server did not start");
        let now = smartllm_cache::now_secs();
        let stored = |created_at: u64, exact: &str| {
            CacheEvent::Insert(Box::new(Stored {
                id: 1,
                sealed: b"sealed".to_vec(),
                embedding: Some(vec![0.5; 4]),
                sealed_vector: [0.5f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect(),
                entry: Arc::new(smartllm_cache::Entry {
                    id: 1,
                    namespace: "ns".into(),
                    exact: exact.into(),
                    query: "q".into(),
                    response: "{}".into(),
                    route: "faq".into(),
                    model: "m".into(),
                    created_at,
                    expires_at: now + 600,
                    version: 1,
                    asked_ms: None,
                    tenant: None,
                }),
            }))
        };
        let named = BTreeSet::new();
        let exists = |mut c: MultiplexedConnection, k: String| async move {
            redis::cmd("EXISTS")
                .arg(k)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        };
        f.publish_one(&mut conn, &stored(now - 5, "before"), &named)
            .await
            .unwrap();
        assert_eq!(exists(conn.clone(), f.entry_key("ns", "before")).await, 1);
        f.publish_one(
            &mut conn,
            &CacheEvent::Purge(Purge::Route("faq".into()), smartllm_cache::now_ms()),
            &named,
        )
        .await
        .unwrap();
        assert_eq!(
            exists(conn.clone(), f.entry_key("ns", "before")).await,
            0,
            "the purge removed it"
        );
        let record: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(f.purges_key())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(record["route:faq"] >= now * 1000, "{record:?}");
        assert_eq!(purge_of("route:faq"), Some(Purge::Route("faq".into())));
        assert_eq!(
            purge_of(&purge_field(&Purge::Tenant("team:a".into()))),
            Some(Purge::Tenant("team:a".into()))
        );
        assert_eq!(purge_of(&purge_field(&Purge::All)), Some(Purge::All));
        let stream_len = |mut c: MultiplexedConnection, k: String| async move {
            redis::cmd("XLEN")
                .arg(k)
                .query_async::<u64>(&mut c)
                .await
                .unwrap()
        };
        let len = stream_len(conn.clone(), f.stream_key()).await;
        // The backlog arrives after the purge: neither snapshot nor stream.
        f.publish_one(&mut conn, &stored(now - 5, "late"), &named)
            .await
            .unwrap();
        assert_eq!(exists(conn.clone(), f.entry_key("ns", "late")).await, 0);
        assert_eq!(stream_len(conn.clone(), f.stream_key()).await, len);
        // An answer asked for after the purge is shared as usual.
        f.publish_one(&mut conn, &stored(now + 1, "after"), &named)
            .await
            .unwrap();
        assert_eq!(exists(conn.clone(), f.entry_key("ns", "after")).await, 1);
        assert_eq!(stream_len(conn.clone(), f.stream_key()).await, len + 1);
        let _ = server.kill();
        let _ = server.wait();
    }

    /// A full outbox drops inserts, never a purge or a version change:
    /// those wait in their own queue and go first.
    #[test]
    fn purges_and_version_changes_are_never_dropped() {
        let cfg = FleetConfig {
            redis: Some("redis://127.0.0.1:1/0".into()),
            tls_ca_file: None,
            key_prefix: "t".into(),
            timeout: Duration::from_millis(100),
            on_error: smartllm_config::FleetOnError::Local,
            share_cache: true,
            cache_stream_len: 1000,
            share_costs: false,
        };
        let f = FleetSync::new(&cfg, "tag".into()).unwrap();
        let entry = Arc::new(smartllm_cache::Entry {
            id: 1,
            namespace: "ns".into(),
            exact: "q".into(),
            query: "q".into(),
            response: "{}".into(),
            route: "faq".into(),
            model: "m".into(),
            created_at: 1,
            expires_at: 2,
            version: 1,
            asked_ms: None,
            tenant: None,
        });
        for _ in 0..=OUTBOX {
            f.publish(CacheEvent::Insert(Box::new(Stored {
                id: 1,
                sealed: Vec::new(),
                embedding: None,
                sealed_vector: Vec::new(),
                entry: entry.clone(),
            })));
        }
        f.publish(CacheEvent::Purge(Purge::All, 5));
        f.publish(CacheEvent::Version {
            name: "*".into(),
            version: 2,
        });
        assert_eq!(f.control_unsent(), 2);
        assert!(f.control_pending());
        // A publisher dropped without a flush (a quick stop): no stop waits.
        f.publisher_gone.store(true, Ordering::SeqCst);
        assert!(!f.control_pending());
        f.control_sent(5);
        assert_eq!(f.control_unsent(), 0, "never below zero");
        let mut control = f.control_rx.lock().unwrap().take().unwrap();
        assert!(matches!(
            control.try_recv(),
            Ok(CacheEvent::Purge(Purge::All, 5))
        ));
        assert!(matches!(
            control.try_recv(),
            Ok(CacheEvent::Version { version: 2, .. })
        ));
        let mut outbox = f.outbox_rx.lock().unwrap().take().unwrap();
        let mut inserts = 0;
        while outbox.try_recv().is_ok() {
            inserts += 1;
        }
        assert_eq!(inserts, OUTBOX);
    }

    #[test]
    fn sequence_numbers_come_from_the_s_field() {
        let mut f = HashMap::new();
        assert_eq!(seq_of(&f), 0);
        f.insert("s".to_string(), b"42".to_vec());
        assert_eq!(seq_of(&f), 42);
    }

    #[test]
    fn version_changes_cover_their_route_or_the_defaults() {
        let named: BTreeSet<String> = ["auto".to_string()].into();
        assert!(covered("auto", "auto", "m", &named));
        assert!(!covered("auto", "other", "m", &named));
        assert!(covered("*", "other", "m", &named));
        assert!(!covered("*", "auto", "m", &named));
    }

    #[test]
    fn stream_replies_parse() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"o".to_vec()),
                Value::BulkString(b"n1".to_vec()),
                Value::BulkString(b"k".to_vec()),
                Value::BulkString(b"i".to_vec()),
            ]),
        ])]);
        let e = stream_entries(reply);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, "1-0");
        assert_eq!(e[0].1["k"], b"i");
        assert_eq!(glob_escape("a*b"), "a\\*b");
    }
}
