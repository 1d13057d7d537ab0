//! Fleet-wide limits and budgets through Redis. With `fleet.redis` set, every
//! gateway of the fleet charges the same token buckets (one Lua script checks
//! and charges all the buckets of a request atomically, on Redis's clock) and
//! adds to the same spend counters (INCRBYFLOAT per scope and period), so N
//! replicas enforce a limit once, not N times. Alerts are claimed with SET NX:
//! one webhook per threshold for the whole fleet.
//!
//! Every call is bounded by `fleet.timeout`. When Redis cannot be reached the
//! gateway enforces limits and budgets per process (`on_error: local`, the
//! default) or refuses the requests they apply to (`on_error: reject`), and
//! stops asking Redis for a second before it tries again, so an outage costs
//! one timeout a second, not one per request.

pub use redis;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use smartllm_config::{FleetConfig, FleetOnError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets, all or nothing. KEYS: one hash per bucket (level, time).
/// ARGV: per bucket, its capacity per minute and the cost to take.
/// Returns "0" when charged, or "SECONDS INDEX" of the longest wait.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local worst, worst_i = 0, 0
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i])
  local rate = cap / 60
  local v = redis.call('HMGET', key, 'l', 't')
  local level = tonumber(v[1]) or cap
  local at = tonumber(v[2]) or now
  level = math.min(cap, level + math.max(0, now - at) * rate)
  levels[i] = level
  local need = math.min(cost, cap)
  if level < need then
    local w = (need - level) / rate
    if w > worst then worst, worst_i = w, i end
  end
end
if worst > 0 then return string.format('%.3f %d', worst, worst_i) end
local out = {'0'}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local level = levels[i] - tonumber(ARGV[2 * i])
  redis.call('HSET', key, 'l', string.format('%.6f', level), 't', string.format('%.6f', now))
  redis.call('EXPIRE', key, 120 + math.ceil(math.max(0, -level) * 60 / cap))
  out[#out + 1] = string.format('%.3f', level)
end
return table.concat(out, ' ')
"#;

/// Charge tokens after the fact (the completion): buckets may go into
/// debt; a negative charge gives tokens back, up to a full bucket.
const CHARGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[2 * i - 1])
  local v = redis.call('HMGET', key, 'l', 't')
  local level = tonumber(v[1]) or cap
  local at = tonumber(v[2]) or now
  level = math.min(cap, math.min(cap, level + math.max(0, now - at) * cap / 60) - tonumber(ARGV[2 * i]))
  redis.call('HSET', key, 'l', string.format('%.6f', level), 't', string.format('%.6f', now))
  redis.call('EXPIRE', key, 120 + math.ceil(math.max(0, -level) * 60 / cap))
end
return 0
"#;

/// Budget holds of the whole fleet, checked and taken atomically. KEYS,
/// three per budget period: its spend counter, its holds (a hash: hold id
/// -> USD, and `_sum`, their total) and their expiries (a sorted set). ARGV:
/// hold id, firm USD, total USD, seconds a hold lives; then per period its
/// limit, the spend this gateway sees (Redis's, when it had none to give)
/// and the spend it has not sent yet. Expired holds (a gateway that died, or
/// lost its release) are dropped first. The rule is
/// [`crate::budget::Budgets::check`]'s. Returns "0" when held, or "INDEX
/// HELD SPENT" of the first budget period with no room.
const HOLD: &str = r#"
local now = tonumber(redis.call('TIME')[1])
local id, firm, total, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local periods = #KEYS / 3
-- Run again (its reply lost with a dropped connection): taken already.
if periods > 0 and redis.call('HEXISTS', KEYS[2], id) == 1 then
  return '0'
end
for i = 1, periods do
  local spend, held, exp = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local limit = tonumber(ARGV[2 + 3 * i])
  local seen, unsent = tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  local spent = math.max((tonumber(redis.call('GET', spend)) or 0) + unsent, seen)
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now)) do
    local usd = tonumber(redis.call('HGET', held, h))
    if usd then
      redis.call('HDEL', held, h)
      redis.call('HINCRBYFLOAT', held, '_sum', -usd)
    end
    redis.call('ZREM', exp, h)
  end
  local sum = 0
  if redis.call('HLEN', held) > 1 then
    sum = math.max(0, tonumber(redis.call('HGET', held, '_sum')) or 0)
  else
    redis.call('DEL', held)
  end
  local alone_fits = sum <= 1e-12 and spent + firm <= limit
  if spent >= limit or (total > 0 and spent + sum + total > limit and not alone_fits) then
    return string.format('%d %.9f %.9f', i - 1, sum, spent)
  end
end
for i = 1, periods do
  local held, exp = KEYS[3 * i - 1], KEYS[3 * i]
  redis.call('HSET', held, id, string.format('%.9f', total))
  redis.call('HINCRBYFLOAT', held, '_sum', total)
  redis.call('ZADD', exp, now + ttl, id)
  redis.call('EXPIRE', held, ttl)
  redis.call('EXPIRE', exp, ttl)
end
return '0'
"#;

/// Let go of a hold. KEYS, two per budget period: its holds and their
/// expiries (as in [`HOLD`]). ARGV: the hold id.
const RELEASE: &str = r#"
for i = 1, #KEYS / 2 do
  local held, exp = KEYS[2 * i - 1], KEYS[2 * i]
  local usd = tonumber(redis.call('HGET', held, ARGV[1]))
  if usd then
    redis.call('HDEL', held, ARGV[1])
    if redis.call('HLEN', held) <= 1 then
      redis.call('DEL', held)
    else
      redis.call('HINCRBYFLOAT', held, '_sum', -usd)
    end
  end
  redis.call('ZREM', exp, ARGV[1])
end
return 0
"#;

/// Releases kept while Redis cannot be reached, at most (older holds
/// expire on their own).
const MAX_UNRELEASED: usize = 100_000;

/// How long calls must work, after one failed, before Redis counts as up.
const UP_AFTER: Duration = Duration::from_secs(5);

/// What an operator should look at for a Redis error whose text does not
/// say (a password Redis wants, a TLS port, a full Redis, a replica).
pub fn redis_hint(e: &redis::RedisError) -> Option<&'static str> {
    let text = e.to_string();
    let has = |w: &[&str]| w.iter().any(|w| text.contains(w));
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
        || has(&["NOAUTH", "WRONGPASS", "unauthenticated", "invalid password"])
    {
        Some("authentication: Redis wants a password other than the one in fleet.redis (redis://:PASSWORD@host:port, or redis://USER:PASSWORD@... for an ACL user)")
    } else if e.code() == Some("NOPERM") || has(&["NOPERM"]) {
        Some("the ACL user of fleet.redis may not run this command or key (the gateway needs EVAL/EVALSHA and its key_prefix)")
    } else if e.kind() == redis::ErrorKind::Parse || has(&["Parse error", "Unexpected `"]) {
        Some("Redis answered something that is not Redis's protocol: is this a TLS port (rediss:// is not supported) or not Redis at all?")
    } else if e.code() == Some("OOM") || has(&["OOM command not allowed"]) {
        Some("Redis is full (maxmemory reached with a noeviction policy): raise maxmemory or free memory")
    } else if e.code() == Some("READONLY") || has(&["READONLY"]) {
        Some("fleet.redis points at a replica: point it at the primary")
    } else {
        None
    }
}

fn hint(e: &FleetError) -> Option<&'static str> {
    match e {
        FleetError::Redis(r) => redis_hint(r),
        _ => None,
    }
}

/// One budget period a fleet hold is taken on.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldOn {
    /// "scope-id|period"
    pub id: String,
    pub limit: f64,
    /// The spend this gateway sees (Redis's plus what it has not sent).
    pub spent: f64,
    /// Spend this gateway counted and has not sent to Redis yet.
    pub unsent: f64,
}

/// A budget period on which the fleet's holds leave no room.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoRoom {
    /// Which of the periods asked about.
    pub index: usize,
    /// Held by the fleet's requests in flight.
    pub held: f64,
    /// Spent, as Redis counts it.
    pub spent: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis is unavailable (retrying in a moment): {0}")]
    Down(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis answered {0:?}")]
    Protocol(String),
}

/// A client for the fleet's Redis: `rediss://` over TLS, trusting
/// `fleet.tls_ca_file`'s certificates when given (else the public roots).
/// Nothing connects until the first call.
pub fn redis_client(config: &FleetConfig, url: &str) -> redis::RedisResult<redis::Client> {
    match &config.tls_ca_file {
        Some(ca) => {
            let root_cert = std::fs::read(ca).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read fleet.tls_ca_file",
                    format!("{}: {e}", ca.display()),
                ))
            })?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
        }
        None => redis::Client::open(url),
    }
}

/// One bucket to charge: its id (scope and kind), capacity per minute, cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
    pub per_minute: u64,
    pub cost: f64,
}

pub struct Fleet {
    pub config: FleetConfig,
    client: redis::Client,
    conn: tokio::sync::OnceCell<ConnectionManager>,
    /// After a failure, Redis is not asked again before this instant.
    down_until: Mutex<Option<Instant>>,
    /// When a call last failed, while calls are failing (None: they work):
    /// the outage is logged once, and its end once (not a line a second
    /// while it lasts). One lock, so a call that works and one that fails
    /// at the same moment cannot leave it half told.
    failing: Mutex<Option<Instant>>,
    admit: redis::Script,
    charge: redis::Script,
    hold: redis::Script,
    release: redis::Script,
    /// Holds to let go of once Redis answers again: (hold id, periods).
    unreleased: Mutex<Vec<(String, Vec<String>)>>,
    /// This gateway's mark on the alerts it claims (a claim run twice
    /// reads as its own).
    node: String,
}

impl Fleet {
    /// A client for `config.redis` (None when the fleet is not configured).
    /// Nothing connects until the first call.
    pub fn new(config: &FleetConfig) -> Result<Option<Fleet>, FleetError> {
        let Some(url) = &config.redis else {
            return Ok(None);
        };
        Ok(Some(Fleet {
            config: config.clone(),
            client: redis_client(config, url)?,
            conn: tokio::sync::OnceCell::new(),
            down_until: Mutex::new(None),
            failing: Mutex::new(None),
            admit: redis::Script::new(ADMIT),
            charge: redis::Script::new(CHARGE),
            hold: redis::Script::new(HOLD),
            release: redis::Script::new(RELEASE),
            unreleased: Mutex::new(Vec::new()),
            node: format!("{:016x}", fastrand::u64(..)),
        }))
    }

    pub fn on_error(&self) -> FleetOnError {
        self.config.on_error
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.config.key_prefix)
    }

    /// In the second after a failed call, calls fail at once.
    fn backing_off(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    async fn conn(&self) -> Result<ConnectionManager, FleetError> {
        if self.backing_off() {
            return Err(FleetError::Down("a recent call failed".into()));
        }
        let timeout = self.config.timeout;
        let conn = self
            .conn
            .get_or_try_init(|| async {
                // Requests that queued behind a connect that failed do not
                // each try again in turn (k of them would wait k timeouts).
                if self.backing_off() {
                    return Err(FleetError::Down("a recent call failed".into()));
                }
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let r = match tokio::time::timeout(
                    timeout * 2,
                    ConnectionManager::new_with_config(self.client.clone(), cfg),
                )
                .await
                {
                    Ok(r) => r.map_err(FleetError::from),
                    Err(_) => Err(FleetError::Timeout(timeout)),
                };
                if r.is_err() {
                    // Before the next in line (maybe on another thread)
                    // may run this: it backs off rather than try again.
                    *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + Duration::from_secs(1));
                }
                r
            })
            .await;
        match conn {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(self.failed("connect", e)),
        }
    }

    /// Count a failure and back off for a second. The first failure of an
    /// outage is logged as a warning, the rest at debug.
    fn failed(&self, op: &'static str, e: FleetError) -> FleetError {
        if !matches!(e, FleetError::Down(_)) {
            let now = Instant::now();
            let first = self
                .failing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(now)
                .is_none();
            if first {
                tracing::warn!(op, redis = %self.config.redis_addr(), error = %e, hint = hint(&e), "fleet redis calls fail; limits and budgets fall back per on_error until they work again");
            } else {
                tracing::debug!(op, error = %e, "fleet redis call failed again");
            }
            *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(now + Duration::from_secs(1));
            crate::metrics::fleet_up(false);
        }
        crate::metrics::fleet_error(op);
        e
    }

    /// A call worked. Redis counts as up again (`smartllm_fleet_redis_up`,
    /// and the outage's end logged) only when no call has failed for
    /// [`UP_AFTER`]: a Redis that answers reads but refuses writes (out of
    /// memory, a password rotated under it) is not up.
    fn worked(&self) {
        {
            let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            match *failing {
                Some(at) if at.elapsed() < UP_AFTER => return,
                Some(_) => {
                    *failing = None;
                    tracing::info!(redis = %self.config.redis_addr(), "fleet redis calls work again; limits and budgets are the fleet's again");
                }
                None => {}
            }
        }
        crate::metrics::fleet_up(true);
    }

    /// One Redis call, `f` on the shared connection, within the timeout.
    /// A connection Redis dropped (a restart, a failover, an idle cut) fails
    /// the first call made on it, and the manager reconnects: the call is
    /// made once more, on the new connection, before Redis counts as down
    /// (else every gateway would refuse or fall back for a second after
    /// each Redis restart), so such a call may take twice `timeout`. A
    /// command whose reply was lost with its connection may have run:
    /// holds and claims are written to be run twice safely (a hold already
    /// taken is not taken again; a claim this gateway made reads as its
    /// own); a spend or a token charge counts twice, on the strict side,
    /// as a write that timed out after Redis applied it always could.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, FleetError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        let first = tokio::time::timeout(self.config.timeout, f(conn.clone())).await;
        let result = match first {
            Ok(Err(e)) if e.is_connection_dropped() => {
                tracing::debug!(op, error = %e, "fleet redis connection dropped; the call is made again on a new one");
                crate::metrics::fleet_error("reconnect");
                tokio::time::timeout(self.config.timeout, f(conn)).await
            }
            other => other,
        };
        match result {
            Ok(Ok(v)) => {
                self.worked();
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(op, e.into())),
            Err(_) => Err(self.failed(op, FleetError::Timeout(self.config.timeout))),
        }
    }

    /// Charge every bucket or none: `Ok(Ok(levels))`, the buckets' levels
    /// after the charge; `Ok(Err((seconds, i)))`: refused, bucket `i` frees
    /// up in `seconds`.
    pub async fn admit(&self, charges: &[Charge]) -> Result<Admit, FleetError> {
        if charges.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        let mut inv = self.admit.prepare_invoke();
        for c in charges {
            inv.key(self.key("rl", &c.id));
            inv.arg(c.per_minute).arg(format!("{:.3}", c.cost));
        }
        let inv = &inv;
        let reply: String = self
            .run(
                "admit",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        parse_admit(&reply).map_err(|e| self.failed("admit", e))
    }

    /// Charge tokens used after the fact (may go into debt).
    pub async fn charge(&self, charges: &[Charge]) -> Result<(), FleetError> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut inv = self.charge.prepare_invoke();
        for c in charges {
            inv.key(self.key("rl", &c.id));
            inv.arg(c.per_minute).arg(format!("{:.3}", c.cost));
        }
        let inv = &inv;
        let _: i64 = self
            .run(
                "charge",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        Ok(())
    }

    /// The fleet's spend (USD) for each `scope|period` id; None where Redis has none.
    pub async fn spend(&self, ids: &[String]) -> Result<Vec<Option<f64>>, FleetError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for id in ids {
            cmd.arg(self.key("spend", id));
        }
        let cmd = &cmd;
        let vals: Vec<Option<String>> = self
            .run(
                "spend",
                |mut c| async move { cmd.query_async(&mut c).await },
            )
            .await?;
        Ok(vals
            .into_iter()
            .map(|v| v.and_then(|s| s.parse().ok()))
            .collect())
    }

    /// Start a counter Redis does not have yet from this gateway's own ledger
    /// (when Redis was empty: a new deployment, or data lost); whether this
    /// gateway's figure started it (another gateway's may have first).
    pub async fn seed_spend(&self, id: &str, usd: f64, ttl_secs: u64) -> Result<bool, FleetError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key("spend", id))
            .arg(format!("{usd:.9}"))
            .arg("NX")
            .arg("EX")
            .arg(ttl_secs);
        let cmd = &cmd;
        let set: Option<String> = self
            .run("seed", |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(set.is_some())
    }

    /// Add `usd` to each `(id, ttl, usd)` counter; the fleet's new totals.
    pub async fn add_spend(&self, ids: &[(String, u64, f64)]) -> Result<Vec<f64>, FleetError> {
        self.add_spend_releasing(ids, None).await
    }

    /// [`Fleet::add_spend`], letting go of the hold `release` (its id and
    /// the budget periods it was taken on, see [`Fleet::hold`]) in the same
    /// transaction: no gateway ever sees a request's cost both spent and
    /// still held (which refused a client's next request for what its last
    /// one held a moment ago), nor neither. On an error nothing is applied.
    pub async fn add_spend_releasing(
        &self,
        ids: &[(String, u64, f64)],
        release: Option<(&str, &[String])>,
    ) -> Result<Vec<f64>, FleetError> {
        let mut pipe = redis::pipe();
        for (id, ttl, usd) in ids {
            let k = self.key("spend", id);
            pipe.cmd("INCRBYFLOAT").arg(&k).arg(format!("{usd:.9}"));
            pipe.cmd("EXPIRE").arg(&k).arg(*ttl).ignore();
        }
        if let Some((hold, on)) = release.filter(|(_, on)| !on.is_empty()) {
            pipe.atomic();
            pipe.load_script(&self.release).ignore();
            let mut r = self.release.prepare_invoke();
            r.arg(hold);
            for id in on {
                r.key(self.key("held", id)).key(self.key("heldexp", id));
            }
            pipe.invoke_script(&r).ignore();
        }
        let pipe = &pipe;
        let totals: Vec<String> = self
            .run("add_spend", |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await?;
        Ok(totals.iter().map(|s| s.parse().unwrap_or(0.0)).collect())
    }

    /// Hold `total` USD (of which `firm` is sure, see
    /// [`crate::budget::Estimate`]) on every budget period of `on` under
    /// `hold`, for at most `ttl_secs`, if the fleet's spend and holds leave
    /// room on each; else the first period without.
    pub async fn hold(
        &self,
        hold: &str,
        on: &[HoldOn],
        firm: f64,
        total: f64,
        ttl_secs: u64,
    ) -> Result<Option<NoRoom>, FleetError> {
        if on.is_empty() {
            return Ok(None);
        }
        let mut inv = self.hold.prepare_invoke();
        inv.arg(hold)
            .arg(format!("{firm:.9}"))
            .arg(format!("{total:.9}"))
            .arg(ttl_secs);
        for h in on {
            inv.key(self.key("spend", &h.id))
                .key(self.key("held", &h.id))
                .key(self.key("heldexp", &h.id));
            inv.arg(format!("{:.9}", h.limit))
                .arg(format!("{:.9}", h.spent))
                .arg(format!("{:.9}", h.unsent));
        }
        // Releases Redis missed go first, a few per call, in the hold's own
        // round trip: the request waits for no more than its hold.
        let late: Vec<(String, Vec<String>)> = {
            let mut q = self.unreleased.lock().unwrap_or_else(|p| p.into_inner());
            let n = q.len().min(16);
            q.drain(..n).collect()
        };
        let reply: String = if late.is_empty() {
            let inv = &inv;
            self.run(
                "hold",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?
        } else {
            // Each reply on its own: a release Redis refuses (a key of
            // another type) is logged and dropped, and never costs the hold.
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.load_script(&self.release);
            for (id, ids) in &late {
                let mut r = self.release.prepare_invoke();
                r.arg(id);
                for k in ids {
                    r.key(self.key("held", k)).key(self.key("heldexp", k));
                }
                pipe.invoke_script(&r);
            }
            pipe.load_script(&self.hold);
            pipe.invoke_script(&inv);
            let pipe = &pipe;
            let replies = self
                .run("hold", |mut c| async move {
                    pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut c)
                        .await
                })
                .await;
            match replies {
                Ok(mut replies) => {
                    for (i, r) in replies.iter().enumerate().skip(1).take(late.len()) {
                        if let Err(e) = r {
                            tracing::warn!(hold = %late[i - 1].0, error = %e, "fleet: a late budget release was refused; its hold expires instead");
                        }
                    }
                    match replies.pop() {
                        Some(Ok(redis::Value::BulkString(b))) => {
                            String::from_utf8_lossy(&b).into_owned()
                        }
                        Some(Ok(redis::Value::SimpleString(s))) => s,
                        Some(Ok(other)) => {
                            return Err(
                                self.failed("hold", FleetError::Protocol(format!("{other:?}")))
                            )
                        }
                        Some(Err(e)) => return Err(self.failed("hold", e.into())),
                        None => {
                            return Err(self.failed(
                                "hold",
                                FleetError::Protocol("no reply to the hold".into()),
                            ))
                        }
                    }
                }
                Err(e) => {
                    let mut q = self.unreleased.lock().unwrap_or_else(|p| p.into_inner());
                    let room = MAX_UNRELEASED.saturating_sub(q.len());
                    q.extend(late.into_iter().take(room));
                    return Err(e);
                }
            }
        };
        parse_hold(&reply, on.len()).map_err(|e| self.failed("hold", e))
    }

    /// Let go of a hold taken with [`Fleet::hold`]. One Redis cannot take
    /// now is kept and sent with a later hold (it expires meanwhile).
    pub async fn release(&self, hold: &str, ids: &[String]) -> Result<(), FleetError> {
        if ids.is_empty() {
            return Ok(());
        }
        let result = async {
            let mut inv = self.release.prepare_invoke();
            inv.arg(hold);
            for id in ids {
                inv.key(self.key("held", id)).key(self.key("heldexp", id));
            }
            let inv = &inv;
            self.run("release", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|_| ())
        }
        .await;
        if result.is_err() {
            let mut q = self.unreleased.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() < MAX_UNRELEASED {
                q.push((hold.to_string(), ids.to_vec()));
            }
        }
        result
    }

    /// True for exactly one gateway of the fleet per `id` (an alert to send).
    /// Record a fact the fleet shares (`PREFIX:kind:id`) for `ttl_secs`:
    /// whose a response a provider keeps is, so a follow-up reaching
    /// another gateway finds it.
    pub async fn mark(&self, kind: &str, id: &str, ttl_secs: u64) -> Result<(), FleetError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(kind, id)).arg(1).arg("EX").arg(ttl_secs);
        let cmd = &cmd;
        let _: Option<String> = self
            .run("mark", |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// [`Fleet::mark`] with a value, read back by [`Fleet::mark_of`].
    pub async fn mark_with(
        &self,
        kind: &str,
        id: &str,
        value: &str,
        ttl_secs: u64,
    ) -> Result<(), FleetError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(kind, id))
            .arg(value)
            .arg("EX")
            .arg(ttl_secs);
        let cmd = &cmd;
        let _: Option<String> = self
            .run("mark", |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// The value of a mark (`1` for [`Fleet::mark`]'s), if some gateway
    /// made it and it has not expired.
    pub async fn mark_of(&self, kind: &str, id: &str) -> Result<Option<String>, FleetError> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.key(kind, id));
        let cmd = &cmd;
        self.run(
            "marked",
            |mut c| async move { cmd.query_async(&mut c).await },
        )
        .await
    }

    /// `SET key value NX EX ttl`: None when it was set, else who holds it.
    async fn set_or_holder(
        &self,
        key: &str,
        value: &str,
        ttl_secs: u64,
    ) -> Result<Option<String>, FleetError> {
        let mut set = redis::cmd("SET");
        set.arg(key).arg(value).arg("NX").arg("EX").arg(ttl_secs);
        let set = &set;
        let r: Option<String> = self
            .run(
                "claim",
                |mut c| async move { set.query_async(&mut c).await },
            )
            .await?;
        if r.is_some() {
            return Ok(None);
        }
        let mut get = redis::cmd("GET");
        get.arg(key);
        let get = &get;
        let holder: Option<String> = self
            .run(
                "claim",
                |mut c| async move { get.query_async(&mut c).await },
            )
            .await?;
        // (Gone between the two calls: expired, so nobody holds it.)
        Ok(Some(holder.unwrap_or_default()))
    }

    /// Alerts are claimed per limit (`id|period|80@50`); earlier releases
    /// claimed `id|period|80`. So that a rolling upgrade sends an alert
    /// once, a claim also takes that key, marked as this release's
    /// (`NODE@limit`): one an earlier release holds means the alert went
    /// out already; one of ours is another limit's claim, which does not
    /// stop this one (a raised limit alerts again).
    async fn claim_legacy(&self, id: &str, ttl_secs: u64) -> Result<bool, FleetError> {
        let Some((legacy, _)) = id.rsplit_once('@') else {
            return Ok(true);
        };
        let mark = format!("{}@limit", self.node);
        let holder = self
            .set_or_holder(&self.key("alert", legacy), &mark, ttl_secs)
            .await?;
        Ok(holder.is_none_or(|h| h.is_empty() || h.ends_with("@limit")))
    }

    pub async fn claim(&self, id: &str, ttl_secs: u64) -> Result<bool, FleetError> {
        // Taken: by another gateway, or by this one when the SET ran twice
        // (its first reply lost with a dropped connection).
        match self
            .set_or_holder(&self.key("alert", id), &self.node, ttl_secs)
            .await?
        {
            None => self.claim_legacy(id, ttl_secs).await,
            Some(holder) => Ok(holder == self.node),
        }
    }
}

fn parse_hold(reply: &str, n: usize) -> Result<Option<NoRoom>, FleetError> {
    if reply == "0" {
        return Ok(None);
    }
    let bad = || FleetError::Protocol(reply.to_string());
    let mut parts = reply.split(' ');
    let mut next = || parts.next().ok_or_else(bad);
    let index: usize = next()?.parse().map_err(|_| bad())?;
    let held: f64 = next()?.parse().map_err(|_| bad())?;
    let spent: f64 = next()?.parse().map_err(|_| bad())?;
    if index >= n {
        return Err(bad());
    }
    Ok(Some(NoRoom { index, held, spent }))
}

/// What [`Fleet::admit`] says: the levels after the charge, or the wait
/// and the bucket that refused.
pub type Admit = Result<Vec<f64>, (f64, usize)>;

fn parse_admit(reply: &str) -> Result<Admit, FleetError> {
    let bad = || FleetError::Protocol(reply.to_string());
    if let Some(levels) = reply
        .strip_prefix('0')
        .filter(|r| r.is_empty() || r.starts_with(' '))
    {
        return levels
            .split_whitespace()
            .map(|l| l.parse::<f64>().map_err(|_| bad()))
            .collect::<Result<Vec<f64>, _>>()
            .map(Ok);
    }
    let mut parts = reply.split(' ');
    match (
        parts.next().and_then(|s| s.parse::<f64>().ok()),
        parts.next().and_then(|s| s.parse::<usize>().ok()),
    ) {
        (Some(secs), Some(i)) if i >= 1 => Ok(Err((secs, i - 1))),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_replies() {
        assert_eq!(parse_hold("0", 2).unwrap(), None);
        assert_eq!(
            parse_hold("1 0.250000000 0.5", 2).unwrap(),
            Some(NoRoom {
                index: 1,
                held: 0.25,
                spent: 0.5
            })
        );
        assert!(parse_hold("2 0.1 0", 2).is_err());
        assert!(parse_hold("1 0.1", 2).is_err());
        assert!(parse_hold("x", 2).is_err());
    }

    #[test]
    fn admit_replies() {
        assert_eq!(parse_admit("0").unwrap(), Ok(vec![]));
        assert_eq!(parse_admit("0 3.000 -2.500").unwrap(), Ok(vec![3.0, -2.5]));
        assert_eq!(parse_admit("1.500 2").unwrap(), Err((1.5, 1)));
        assert_eq!(parse_admit("0.250 1").unwrap(), Err((0.25, 0)));
        assert!(parse_admit("0 x").is_err());
        assert!(parse_admit("nonsense").is_err());
        assert!(parse_admit("1.0 0").is_err());
    }

    #[test]
    fn no_url_no_fleet() {
        let cfg = FleetConfig {
            redis: None,
            tls_ca_file: None,
            key_prefix: "smartllm".into(),
            timeout: Duration::from_millis(100),
            on_error: FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        assert!(Fleet::new(&cfg).unwrap().is_none());
    }

    /// A release Redis missed is sent with the next hold, before it, in one
    /// round trip: the room it held is free for that hold. (A real
    /// redis-server: `make test` installs it.)
    #[tokio::test]
    async fn a_missed_release_goes_first_with_the_next_hold() {
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
            on_error: FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        let on = [HoldOn {
            id: "k|day".into(),
            limit: 1.0,
            spent: 0.0,
            unsent: 0.0,
        }];
        let mut f = None;
        for _ in 0..100 {
            let fleet = Fleet::new(&cfg).unwrap().unwrap();
            if fleet.hold("h1", &on, 0.6, 0.6, 600).await.is_ok() {
                f = Some(fleet);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let f = f.expect("redis-server did not start");
        // $0.60 of $1 held: another $0.60 does not fit.
        assert!(f.hold("h2", &on, 0.6, 0.6, 600).await.unwrap().is_some());
        // h1's release missed Redis (as if it were down for a moment).
        f.unreleased
            .lock()
            .unwrap()
            .push(("h1".into(), vec!["k|day".into()]));
        assert_eq!(f.hold("h3", &on, 0.6, 0.6, 600).await.unwrap(), None);
        assert!(f.unreleased.lock().unwrap().is_empty());
        // Now h3 holds $0.60: the next one waits again.
        assert!(f.hold("h4", &on, 0.6, 0.6, 600).await.unwrap().is_some());
        // h3's request cost $0.30: its spend and its release are one
        // transaction, so the $0.60 after it fits at once ($0.30 + $0.60),
        // where spend and hold both counted would refuse it ($1.50).
        let spent = f
            .add_spend_releasing(
                &[("k|day".into(), 60, 0.3)],
                Some(("h3", &["k|day".to_string()])),
            )
            .await
            .unwrap();
        assert_eq!(spent, vec![0.3]);
        assert!(f.unreleased.lock().unwrap().is_empty());
        assert_eq!(f.hold("h5", &on, 0.6, 0.6, 600).await.unwrap(), None);
        let _ = server.kill();
        let _ = server.wait();
    }

    /// A Redis restart (or failover) drops the connection under the
    /// gateway: the first call after it is made again on a new connection,
    /// so it answers, and nothing backs off. (Before, every gateway refused
    /// or fell back for a second after each restart: "broken pipe".)
    #[tokio::test]
    async fn a_restarted_redis_is_called_again_on_a_new_connection() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--dir", &dir.path().display().to_string()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (`make test` installs it)")
        };
        let up = || async {
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server did not start");
        };
        let mut server = start();
        up().await;
        let cfg = FleetConfig {
            redis: Some(format!("redis://127.0.0.1:{port}/0")),
            tls_ca_file: None,
            key_prefix: "t".into(),
            timeout: Duration::from_millis(500),
            on_error: FleetOnError::Reject,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        let f = Fleet::new(&cfg).unwrap().unwrap();
        let charge = [Charge {
            id: "k".into(),
            per_minute: 100,
            cost: 1.0,
        }];
        assert_eq!(f.admit(&charge).await.unwrap(), Ok(vec![99.0]));
        let _ = server.kill();
        let _ = server.wait();
        let mut server = start();
        up().await;
        assert_eq!(f.admit(&charge).await.unwrap(), Ok(vec![99.0]));
        assert_eq!(
            f.add_spend(&[("k|d".into(), 60, 0.5)]).await.unwrap(),
            vec![0.5]
        );
        assert!(!f.backing_off());
        let _ = server.kill();
        let _ = server.wait();
    }

    /// An unreachable Redis fails within the timeout, then backs off without
    /// trying (so an outage costs one timeout a second, not one per request).
    #[tokio::test]
    async fn unreachable_redis_fails_fast_then_backs_off() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = FleetConfig {
            redis: Some(format!("redis://127.0.0.1:{port}/0")),
            tls_ca_file: None,
            key_prefix: "t".into(),
            timeout: Duration::from_millis(200),
            on_error: FleetOnError::Local,
            share_cache: false,
            cache_stream_len: 100_000,
            share_costs: false,
        };
        let f = Fleet::new(&cfg).unwrap().unwrap();
        let charge = [Charge {
            id: "k".into(),
            per_minute: 10,
            cost: 1.0,
        }];
        let t = Instant::now();
        assert!(f.admit(&charge).await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let t = Instant::now();
        let e = f.admit(&charge).await.unwrap_err();
        assert!(matches!(e, FleetError::Down(_)), "{e}");
        assert!(t.elapsed() < Duration::from_millis(50));
        // Requests queued behind a first connect that fails do not each try
        // again in turn: one tries, the rest are told at once.
        *f.down_until.lock().unwrap() = None;
        let f = std::sync::Arc::new(f);
        let mut tries = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (f, charge) = (f.clone(), charge.clone());
            tries.spawn(async move { !matches!(f.admit(&charge).await, Err(FleetError::Down(_))) });
        }
        let tried = tries.join_all().await.into_iter().filter(|&t| t).count();
        assert_eq!(tried, 1);
    }
}
