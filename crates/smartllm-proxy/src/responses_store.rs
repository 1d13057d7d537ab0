//! The Responses API conversations the gateway keeps for providers that do
//! not keep state themselves (translated to Chat Completions or Anthropic
//! Messages): `previous_response_id` continues them, `GET` and `DELETE
//! /v1/responses/{id}` read and remove them. Scoped by tenant (another
//! tenant's id is not found), kept for [`TTL_SECS`], each at most
//! [`MAX_BYTES`], sealed with the cache's key when `cache.encryption_key_file`
//! is set (a conversation is prompts and answers, as a cache entry is).
//!
//! A response that continues another is kept as what it adds to that
//! conversation (its input and answer) and the id it continues: a
//! conversation of N turns takes the room of its text, not of N copies of
//! it. Reading one walks back to a response kept whole. Every
//! [`MAX_DEPTH`] links, or when the conversation's oldest link was written
//! more than [`WHOLE_AFTER`] ago (it would expire before the new one), the
//! new response is kept whole again, so a walk is short and every response
//! lives at least `TTL_SECS - WHOLE_AFTER` (a linked one expires with the
//! links it needs). A deleted response is kept as a link without its
//! response object (not found, not continued) for the responses that
//! continue it, which carry its words as the copies they used to hold did.
//!
//! Writes and deletes go to one writer thread through a queue, in order;
//! until the writer has done one, it is in `pending`, which reads consult
//! first: a follow-up that names a response the instant its answer arrived
//! finds it, and a deleted one is gone at once. The writer wakes for the
//! first operation, lets more arrive for [`LINGER`], then does them all:
//! under load a RocksDB write costs no thread handoff per response (each
//! used to be its own blocking-pool task, and a translated Responses request
//! cost twice a Chat Completions one). Reads run on the blocking pool, never
//! on the proxy's threads. A drain waits for queued writes (each holds a
//! token of the shared task tracker). Past the queue's bound an operation
//! runs on the blocking pool beside the writer (a save only while fewer
//! than [`OVERFLOW`] do: past that it is dropped, as a conversation too
//! large to keep is, rather than holding memory without bound); a lock per
//! key stripe, taken only there, keeps two of them off one key, so the
//! key's newest operation is the one that sticks.

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use smartllm_cache::Codec;
use smartllm_protocol::responses::StoredResponse;
use smartllm_store::{Store, CF_RESPONSES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc::{self, Receiver, Sender};
use tokio::sync::Semaphore;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// How long a stored response lives by default (`store.responses_ttl`;
/// OpenAI keeps them 30 days).
pub const TTL_SECS: u64 = 30 * 24 * 3600;
/// A conversation larger than this is not stored (its follow-ups get a 404).
pub const MAX_BYTES: usize = 8 << 20;
/// Operations queued at most; past it a write goes to the blocking pool.
const QUEUE: usize = 4096;
/// Saves past the queue on the blocking pool at once; past it a save is
/// dropped (each holds a whole conversation). Deletes are never dropped: the
/// client was told the response is gone.
const OVERFLOW: usize = 64;
/// Key stripes serialising the operations on one key (see [`Shared`]).
const STRIPES: usize = 64;
/// How long the writer lets operations gather after the first one wakes it.
pub const LINGER: Duration = Duration::from_millis(1);
/// Links at most between a response and the whole one its reading starts from.
pub const MAX_DEPTH: u32 = 64;
/// A conversation whose links expire sooner than this before a new
/// response would is kept whole again with it.
pub const WHOLE_AFTER: u64 = 24 * 3600;

/// How a kept response is stored: `depth` links down to a whole one (0:
/// whole), and when the first of them expires (so does it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub depth: u32,
    pub expires_at: u64,
}

/// What a new response continues: the response `parent` (its
/// conversation has `prefix` messages, stored as `chain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub parent: String,
    pub prefix: usize,
    pub chain: Chain,
}

/// How a response continuing `link` (or none) is stored when written at
/// `now`, kept `ttl` seconds: linked while its conversation's links live
/// long enough (see [`WHOLE_AFTER`], scaled down with a shorter `ttl`).
fn stored_as(link: Option<&Link>, now: u64, ttl: u64) -> Chain {
    let whole = Chain {
        depth: 0,
        expires_at: now + ttl,
    };
    let whole_after = WHOLE_AFTER.min(ttl / 30);
    match link {
        Some(l) if l.chain.depth < MAX_DEPTH && l.chain.expires_at + whole_after >= now + ttl => {
            Chain {
                depth: l.chain.depth + 1,
                expires_at: whole.expires_at.min(l.chain.expires_at),
            }
        }
        _ => whole,
    }
}

/// A response as RocksDB keeps it (sealed JSON after the expiry): whole
/// (`parent` none: `messages` is its conversation), or what it adds to
/// `parent`'s. Responses kept before links were are whole records.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    #[serde(default)]
    response: Value,
    messages: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    /// Deleted: kept for the responses that continue it, found by no one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

fn key(tenant: &str, id: &str) -> Vec<u8> {
    // Length-prefixed: no tenant name can reach into another's keys.
    let mut k = Vec::with_capacity(tenant.len() + id.len() + 4);
    k.extend_from_slice(&(tenant.len() as u32).to_be_bytes());
    k.extend_from_slice(tenant.as_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// A queued operation: the newest one of its key, until done.
#[derive(Clone)]
struct Pending {
    seq: u64,
    /// The response a save keeps; for a delete, the save it overtook, if
    /// any (responses continuing it may need its words).
    stored: Option<Arc<StoredResponse>>,
    /// What that response continues.
    link: Option<Arc<Link>>,
    deleted: bool,
    /// When the request that made a save started (milliseconds): a save
    /// from before a purge of its tenant is not written.
    asked_ms: u64,
}

/// The prefix of the keys noting, one per child, which responses link to
/// the one under `k` (ids hold no NUL, so no response's key starts so).
fn linked_key(k: &[u8]) -> Vec<u8> {
    let mut m = k.to_vec();
    m.extend_from_slice(b"\0linked");
    m
}

/// The note that the response under `child` links to the one under `parent`.
fn link_note_key(parent: &[u8], child: &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(child.get(..4)?.try_into().ok()?) as usize;
    let mut m = linked_key(parent);
    m.extend_from_slice(child.get(4 + len..)?);
    Some(m)
}

/// The key of response `id` of the tenant whose key `k` is.
fn sibling(k: &[u8], id: &str) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(k.get(..4)?.try_into().ok()?) as usize;
    let mut s = k.get(..4 + len)?.to_vec();
    s.extend_from_slice(id.as_bytes());
    Some(s)
}

/// What a record's JSON is since links were: an older release reads it as
/// no conversation at all (404, the client sends it whole) rather than as
/// a partial one.
#[derive(Serialize, Deserialize)]
struct Envelope {
    linked: Record,
}

struct Op {
    key: Vec<u8>,
    seq: u64,
    /// Keeps a drain waiting until the operation is done.
    _token: TaskTrackerToken,
}

/// What the writer and the overflow's blocking tasks share.
struct Shared {
    /// How long a kept response lives, in seconds (`store.responses_ttl`).
    ttl: u64,
    /// The last purge of each tenant (milliseconds), as kept in `meta`:
    /// a save asked for before it is dropped, and a purge the fleet sends
    /// again is not applied twice.
    purged: Mutex<HashMap<String, u64>>,
    pending: DashMap<Vec<u8>, Pending>,
    /// Taken (by key hash) around checking and doing an operation, only on
    /// the writer and blocking threads: two of them never do the same key
    /// at once, so an older save cannot land after a newer delete.
    stripes: [Mutex<()>; STRIPES],
    /// Taken around checking that a parent is kept and noting a link to it,
    /// and around checking for links and removing a record: a child saved
    /// on one thread and its parent deleted on another cannot both see the
    /// other's "before" (stripes keep only one key's operations apart).
    links: Mutex<()>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            ttl: TTL_SECS,
            purged: Mutex::new(HashMap::new()),
            pending: DashMap::new(),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            links: Mutex::new(()),
        }
    }
}

impl Shared {
    fn links(&self) -> MutexGuard<'_, ()> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Shared {
    /// Was the tenant whose key `k` is (or whose provider-kept markers)
    /// purged after `asked_ms`?
    fn purged_since(&self, k: &[u8], asked_ms: u64) -> bool {
        let Some(tenant) = tenant_of(k) else {
            return false;
        };
        let tenant = tenant.strip_suffix(NATIVE).unwrap_or(tenant);
        self.purged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .is_some_and(|at| asked_ms < *at)
    }

    fn stripe(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        let i = self.pending.hash_usize(&key) % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct ResponsesStore {
    store: Arc<Store>,
    codec: Arc<Codec>,
    shared: Arc<Shared>,
    seq: AtomicU64,
    tx: Sender<Op>,
    /// Room for saves past the queue (see [`OVERFLOW`]).
    overflow: Arc<Semaphore>,
}

impl ResponsesStore {
    /// Start the writer thread.
    pub fn start(store: Arc<Store>, codec: Codec) -> std::io::Result<Self> {
        Self::with_queue(store, codec, QUEUE, OVERFLOW, TTL_SECS)
    }

    /// [`ResponsesStore::start`], each response kept for `ttl`
    /// (`store.responses_ttl`).
    pub fn start_with_ttl(store: Arc<Store>, codec: Codec, ttl: Duration) -> std::io::Result<Self> {
        Self::with_queue(store, codec, QUEUE, OVERFLOW, ttl.as_secs().max(60))
    }

    /// How long a kept response lives.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.shared.ttl)
    }

    fn with_queue(
        store: Arc<Store>,
        codec: Codec,
        queue: usize,
        overflow: usize,
        ttl: u64,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue);
        let shared = Arc::new(Shared {
            ttl,
            purged: Mutex::new(purge_marks(&store)),
            ..Shared::default()
        });
        let codec = Arc::new(codec);
        let (s, p, c) = (store.clone(), shared.clone(), codec.clone());
        std::thread::Builder::new()
            .name("smartllm-responses".into())
            .spawn(move || writer(&s, &c, &p, rx))?;
        Ok(Self {
            store,
            codec,
            shared,
            seq: AtomicU64::new(0),
            tx,
            overflow: Arc::new(Semaphore::new(overflow)),
        })
    }

    /// The stored response `id` of `tenant` with its whole conversation,
    /// if it is there and not expired.
    pub async fn load(&self, tenant: &str, id: &str) -> Option<StoredResponse> {
        self.load_chain(tenant, id).await.map(|(s, _)| s)
    }

    /// [`ResponsesStore::load`], and how it is stored (what a response
    /// continuing it links to).
    pub async fn load_chain(&self, tenant: &str, id: &str) -> Option<(StoredResponse, Chain)> {
        let k = key(tenant, id);
        // Only the `Arc` is cloned under the map's guard: a whole
        // conversation's copy is made after it is let go.
        let pending = self
            .shared
            .pending
            .get(&k)
            .map(|p| (p.stored.clone(), p.link.clone(), p.deleted));
        if let Some((stored, link, deleted)) = pending {
            let chain = stored_as(link.as_deref(), now(), self.shared.ttl);
            return stored
                .filter(|_| !deleted)
                .map(|s| (Arc::unwrap_or_clone(s), chain));
        }
        let (store, codec, shared) = (self.store.clone(), self.codec.clone(), self.shared.clone());
        let (tenant, id) = (tenant.to_string(), id.to_string());
        tokio::task::spawn_blocking(move || read_chain(&store, &codec, &shared, &tenant, &id))
            .await
            .ok()
            .flatten()
    }

    /// The `response` object of `tenant`'s stored response `id` (`GET`),
    /// read without its conversation.
    pub async fn response(&self, tenant: &str, id: &str) -> Option<Value> {
        let k = key(tenant, id);
        let pending = self
            .shared
            .pending
            .get(&k)
            .map(|p| (p.stored.clone(), p.deleted));
        if let Some((stored, deleted)) = pending {
            return stored.filter(|_| !deleted).map(|s| s.response.clone());
        }
        let (store, codec) = (self.store.clone(), self.codec.clone());
        tokio::task::spawn_blocking(move || {
            read_record(&store, &codec, &k)
                .filter(|(r, _)| !r.deleted)
                .map(|(r, _)| r.response)
        })
        .await
        .ok()
        .flatten()
    }

    /// Keep `stored` for `tenant` (off the request path; failures are logged).
    pub fn save(&self, tasks: &TaskTracker, tenant: &str, stored: StoredResponse) {
        self.save_linked(tasks, tenant, stored, None, smartllm_cache::now_ms());
    }

    /// [`ResponsesStore::save`] a response that continues `link` (its
    /// conversation then starts with the `link.prefix` messages of the
    /// parent's): kept as what it adds.
    /// `asked_ms`: when its request started (a purge of the tenant since
    /// then drops it).
    pub fn save_linked(
        &self,
        tasks: &TaskTracker,
        tenant: &str,
        stored: StoredResponse,
        link: Option<Link>,
        asked_ms: u64,
    ) {
        let link = link
            .filter(|l| l.prefix <= stored.messages.len())
            .map(Arc::new);
        self.queue(
            tasks,
            key(tenant, stored.id()),
            Some(Arc::new(stored)),
            link,
            false,
            asked_ms,
        );
    }

    /// Remember that `provider` (speaking Responses) gave `tenant` the
    /// response `id` (kept as long as a stored conversation): only `tenant`
    /// may continue it (`previous_response_id`), and on that provider (its
    /// account keeps the conversation).
    pub fn own(&self, tasks: &TaskTracker, tenant: &str, id: &str, provider: &str, asked_ms: u64) {
        let marker = StoredResponse {
            response: serde_json::json!({"id": id, "object": "response", "provider": provider}),
            messages: Vec::new(),
        };
        self.queue(
            tasks,
            key(&owner(tenant), id),
            Some(Arc::new(marker)),
            None,
            false,
            asked_ms,
        );
    }

    /// Did a provider speaking Responses give `tenant` the response `id`?
    /// Which one (none for a marker written before providers were kept).
    pub async fn owner_of(&self, tenant: &str, id: &str) -> Option<Option<String>> {
        let marker = self.response(&owner(tenant), id).await?;
        Some(
            marker["provider"]
                .as_str()
                .filter(|p| !p.is_empty())
                .map(str::to_string),
        )
    }

    /// Remove the stored response `id` of `tenant`; whether it was there.
    pub async fn delete(&self, tasks: &TaskTracker, tenant: &str, id: &str) -> bool {
        if self.response(tenant, id).await.is_none() {
            return false;
        }
        self.queue(tasks, key(tenant, id), None, None, true, u64::MAX);
        true
    }

    fn queue(
        &self,
        tasks: &TaskTracker,
        key: Vec<u8>,
        stored: Option<Arc<StoredResponse>>,
        link: Option<Arc<Link>>,
        deleted: bool,
        asked_ms: u64,
    ) {
        // Where the operation goes (the writer's queue; past it, or with the
        // writer gone, the blocking pool, where a save needs room) is
        // settled before it is made the key's newest in `pending`: one
        // dropped after that would leave `pending` naming an operation that
        // never runs.
        let slot = self.tx.try_reserve().ok();
        // A delete is never dropped (the client was told it is gone).
        let room = match (&slot, stored.as_ref().filter(|_| !deleted)) {
            (Some(_), _) | (None, None) => None,
            // An owner's marker is a few bytes and without it the tenant
            // cannot go on from a provider-kept answer: never dropped,
            // like a delete.
            (None, Some(marker)) if marker.messages.is_empty() => None,
            (None, Some(dropped)) => match self.overflow.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    tracing::warn!(
                        id = dropped.id(),
                        "response store writes are behind (queue and overflow full); this conversation is not kept, previous_response_id will not find it"
                    );
                    return;
                }
            },
        };
        // A delete overtaking a save still queued keeps what it would have
        // saved: a response continuing it may already link to it.
        let (stored, link) = match (deleted, self.shared.pending.get(&key)) {
            (true, Some(p)) => (p.stored.clone(), p.link.clone()),
            _ => (stored, link),
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.shared.pending.insert(
            key.clone(),
            Pending {
                seq,
                stored,
                link,
                deleted,
                asked_ms,
            },
        );
        let op = Op {
            key,
            seq,
            _token: tasks.token(),
        };
        match slot {
            Some(slot) => slot.send(op),
            None => {
                let (store, codec, shared) =
                    (self.store.clone(), self.codec.clone(), self.shared.clone());
                tasks.spawn_blocking(move || {
                    apply(&store, &codec, &shared, op);
                    drop(room);
                });
            }
        }
    }

    /// Remove every response kept for `tenant`, its markers of
    /// provider-kept responses included (a tenant's erasure), for a purge
    /// issued at `at_ms`; how many responses were kept (None: a purge at
    /// or after it was applied here already, as the fleet's record says
    /// again to a gateway that loads its snapshot). Operations queued before
    /// it come to nothing, and a save asked for before it is not written
    /// whenever it comes; later ones are kept as usual. Blocking: run it on
    /// the blocking pool.
    pub fn purge_tenant_at(
        &self,
        tenant: &str,
        at_ms: u64,
    ) -> Result<Option<u64>, smartllm_store::StoreError> {
        let shared = &self.shared;
        {
            // Noted first: a save checks it under its key's stripe, taken
            // below before anything is removed.
            let mut purged = shared.purged.lock().unwrap_or_else(|e| e.into_inner());
            if purged.get(tenant).is_some_and(|t| *t >= at_ms) {
                return Ok(None);
            }
            let mut mark = PURGE_MARK.to_vec();
            mark.extend_from_slice(tenant.as_bytes());
            self.store
                .put(smartllm_store::CF_META, &mark, &at_ms.to_be_bytes())?;
            purged.insert(tenant.to_string(), at_ms);
        }
        // Every stripe, in order (an operation holds one at a time, and
        // `links` after it): none is being done meanwhile, and each queued
        // one finds its key no longer pending and does nothing.
        let _stripes: Vec<MutexGuard<'_, ()>> = shared
            .stripes
            .iter()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let _links = shared.links();
        let (own, markers) = (key(tenant, ""), key(&owner(tenant), ""));
        shared
            .pending
            .retain(|k, _| !k.starts_with(&own) && !k.starts_with(&markers));
        purge_tenant_records(&self.store, tenant).map(Some)
    }

    /// [`ResponsesStore::purge_tenant_at`] now.
    #[cfg(test)]
    fn purge_tenant(&self, tenant: &str) -> Result<u64, smartllm_store::StoreError> {
        self.purge_tenant_at(tenant, smartllm_cache::now_ms())
            .map(Option::unwrap_or_default)
    }

    /// Seal with the current key (`cache.encryption_key_file`) what was
    /// sealed with an old one (`cache.encryption_old_key_files`) or kept in
    /// the clear before a key was set, as the cache's sweep does for its
    /// entries: once an old key file is dropped, every kept response still
    /// opens (and can be deleted). How many were sealed again. Blocking:
    /// [`ResponsesStore::start`] runs it once on a thread of its own.
    pub fn reseal(&self) -> Result<u64, smartllm_store::StoreError> {
        if !self.codec.encrypted() {
            return Ok(0);
        }
        let db = self.store.db();
        let cf = db
            .cf_handle(CF_RESPONSES)
            .ok_or(smartllm_store::StoreError::UnknownCf(CF_RESPONSES))?;
        let mut resealed = 0;
        let mut it = db.raw_iterator_cf(&cf);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !needs_resealing(&self.codec, v) {
                it.next();
                continue;
            }
            let (k, v) = (k.to_vec(), v.to_vec());
            it.next();
            // No operation on the key runs meanwhile: one done since the
            // read wrote its own (current) form, which is left as it is.
            // (And no removal up a conversation, which holds `links`.)
            let _stripe = self.shared.stripe(&k);
            let _links = self.shared.links();
            let Some(now) = self.store.get(CF_RESPONSES, &k)? else {
                continue;
            };
            if now[..] != v[..] {
                continue;
            }
            let Some((record, expires_at)) = read_record(&self.store, &self.codec, &k) else {
                continue;
            };
            put_record(&self.store, &self.codec, &k, record, expires_at);
            resealed += 1;
        }
        it.status()?;
        Ok(resealed)
    }

    /// Operations queued and not yet done.
    pub fn pending(&self) -> usize {
        self.shared.pending.len()
    }
}

fn writer(store: &Store, codec: &Codec, shared: &Shared, mut rx: Receiver<Op>) {
    // A thread of its own, outside the runtime: it may block on the queue.
    while let Some(first) = rx.blocking_recv() {
        // Asleep rather than waiting on the queue: what arrives meanwhile
        // wakes nobody.
        std::thread::sleep(LINGER);
        apply(store, codec, shared, first);
        while let Ok(op) = rx.try_recv() {
            apply(store, codec, shared, op);
        }
    }
}

/// Do `op` if it is still its key's newest, then let reads go to RocksDB.
fn apply(store: &Store, codec: &Codec, shared: &Shared, op: Op) {
    let _stripe = shared.stripe(&op.key);
    let pending = &shared.pending;
    let Some(p) = pending.get(&op.key).map(|p| p.clone()) else {
        return;
    };
    if p.seq != op.seq {
        // A newer operation on the key is queued behind this one.
        return;
    }
    // Asked for before its tenant's purge (which holds every stripe while
    // it removes, and notes its time first): not written.
    if !p.deleted && p.stored.is_some() && shared.purged_since(&op.key, p.asked_ms) {
        pending.remove_if(&op.key, |_, cur| cur.seq == op.seq);
        return;
    }
    #[cfg(test)]
    if p.stored.is_some() {
        // Widens the window between the check and the write, so that the
        // test below meets the race it is about.
        std::thread::sleep(Duration::from_micros(200));
    }
    match &p.stored {
        Some(stored) => write(
            store,
            codec,
            shared,
            &op.key,
            stored,
            p.link.as_deref(),
            p.deleted,
        ),
        None if p.deleted => tombstone(store, codec, shared, &op.key),
        None => {}
    }
    pending.remove_if(&op.key, |_, cur| cur.seq == op.seq);
}

fn now() -> u64 {
    smartllm_protocol::time::now_secs()
}

/// Put `record` under `k`, sealed, expiring at `expires_at`.
fn put_record(store: &Store, codec: &Codec, k: &[u8], record: Record, expires_at: u64) {
    let body = match serde_json::to_vec(&Envelope { linked: record })
        .map_err(|e| e.to_string())
        .and_then(|b| codec.seal(b).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "sealing a response failed; not kept");
            return;
        }
    };
    let mut v = expires_at.to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    if let Err(e) = store.put(CF_RESPONSES, k, &v) {
        tracing::warn!(error = %e, "storing a response failed");
    }
}

/// Whether a live response links to the one under `k` (an error reads as
/// yes: its words are kept rather than lost).
fn has_links(store: &Store, k: &[u8]) -> bool {
    let prefix = linked_key(k);
    let db = store.db();
    let Some(cf) = db.cf_handle(CF_RESPONSES) else {
        return true;
    };
    let mut it = db.raw_iterator_cf(cf);
    it.seek(&prefix);
    let now = now();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        if !key.starts_with(&prefix) {
            break;
        }
        let live = value
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .is_none_or(|b| u64::from_be_bytes(b) > now);
        if live {
            return true;
        }
        it.next();
    }
    it.status().is_err()
}

/// Remove the record under `k` and the note of its link to its parent
/// (`parent`: the response it continued, if it was kept linked). A parent
/// deleted earlier and kept only for the links to it goes too once this
/// was the last (and so on up the conversation): its words are not left
/// on disk until it expires. Called with `links` held.
fn remove(store: &Store, codec: &Codec, k: &[u8], parent: Option<&str>) {
    let mut k = k.to_vec();
    let mut parent = parent.map(str::to_string);
    loop {
        let pk = parent.as_deref().and_then(|p| sibling(&k, p));
        if let Some(note) = pk.as_ref().and_then(|pk| link_note_key(pk, &k)) {
            let _ = store.delete(CF_RESPONSES, &note);
        }
        if let Err(e) = store.delete(CF_RESPONSES, &k) {
            tracing::warn!(error = %e, "deleting a stored response failed");
            return;
        }
        let Some(pk) = pk else {
            return;
        };
        match read_record(store, codec, &pk) {
            Some((record, _)) if record.deleted && !has_links(store, &pk) => {
                parent = record.parent;
                k = pk;
            }
            _ => return,
        }
    }
}

/// A delete of a response not waiting to be saved: gone, unless a response
/// links to it; then kept, without its response object, for that one
/// (until it expires), and found by no one.
fn tombstone(store: &Store, codec: &Codec, shared: &Shared, k: &[u8]) {
    match store.get(CF_RESPONSES, k) {
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "deleting a stored response failed (read)");
            return;
        }
        Ok(Some(_)) => {}
    }
    let record = read_record(store, codec, k);
    let _links = shared.links();
    match record {
        Some((mut record, expires_at)) if has_links(store, k) => {
            record.response = Value::Null;
            record.deleted = true;
            put_record(store, codec, k, record, expires_at);
        }
        Some((record, _)) => remove(store, codec, k, record.parent.as_deref()),
        None => remove(store, codec, k, None),
    }
}

/// Keep `stored` under `k`: as what it adds to the response `link` names
/// when that one is kept (on disk or queued), else whole. `deleted` (a
/// delete overtook the save): kept only when a response links to it.
fn write(
    store: &Store,
    codec: &Codec,
    shared: &Shared,
    k: &[u8],
    stored: &StoredResponse,
    link: Option<&Link>,
    deleted: bool,
) {
    let bytes = stored.history_bytes();
    if bytes > MAX_BYTES {
        tracing::info!(
            id = stored.id(),
            bytes,
            "response conversation too large to keep; previous_response_id will not find it"
        );
        return;
    }
    let links = shared.links();
    if deleted && !has_links(store, k) {
        remove(store, codec, k, link.map(|l| l.parent.as_str()));
        return;
    }
    let now = now();
    let mut chain = stored_as(link, now, shared.ttl);
    let mut parent = None;
    if let Some(l) = link.filter(|_| chain.depth > 0) {
        let pk = sibling(k, &l.parent).unwrap_or_default();
        let queued = shared.pending.get(&pk).is_some_and(|p| p.stored.is_some());
        if queued || matches!(store.get(CF_RESPONSES, &pk), Ok(Some(_))) {
            parent = Some((l, pk));
        } else {
            // Its parent is not kept (its save failed, or it was deleted
            // with nothing linked to it): whole.
            chain = stored_as(None, now, shared.ttl);
        }
    }
    let messages = match &parent {
        Some((l, pk)) => {
            let mut note = chain.expires_at.to_be_bytes().to_vec();
            note.extend_from_slice(b"linked");
            let put = link_note_key(pk, k)
                .map(|nk| store.put(CF_RESPONSES, &nk, &note).is_ok())
                .unwrap_or(false);
            if !put {
                tracing::warn!("storing a response failed (its link)");
                return;
            }
            stored.messages[l.prefix..].to_vec()
        }
        None => stored.messages.clone(),
    };
    drop(links);
    let record = Record {
        response: if deleted {
            Value::Null
        } else {
            stored.response.clone()
        },
        messages,
        parent: parent.map(|(l, _)| l.parent.clone()),
        deleted,
    };
    put_record(store, codec, k, record, chain.expires_at);
}

/// Whether a kept value (a record, not a link note) is sealed with an old
/// key or not at all, while the codec has a key.
fn needs_resealing(codec: &Codec, value: &[u8]) -> bool {
    match value.get(8..) {
        None | Some(b"linked") => false,
        Some([b'{', ..]) | Some([0, ..]) => true,
        Some(rest) => matches!(codec.unseal(rest), Ok((_, smartllm_cache::Sealing::Old))),
    }
}

/// The record under `k` and when it expires, if it is there, live and readable.
fn read_record(store: &Store, codec: &Codec, k: &[u8]) -> Option<(Record, u64)> {
    let bytes = store.get(CF_RESPONSES, k).ok()??;
    let (expiry, rest) = bytes.split_at_checked(8)?;
    let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
    if expiry <= now() {
        let _ = store.delete(CF_RESPONSES, k);
        return None;
    }
    // Kept before sealing came (bare JSON, or tagged plain before the key
    // was set): read as it is until it expires.
    let json = match rest.first() {
        Some(b'{') => rest.to_vec(),
        Some(0) => rest[1..].to_vec(),
        _ => match codec.unseal(rest) {
            Ok((json, _)) => json,
            Err(e) => {
                tracing::warn!(error = %e, "a stored response cannot be opened (its key is not configured?)");
                return None;
            }
        },
    };
    // Kept before links were: a whole record, bare.
    let record = serde_json::from_slice::<Envelope>(&json)
        .map(|e| e.linked)
        .or_else(|_| serde_json::from_slice::<Record>(&json))
        .ok()?;
    Some((record, expiry))
}

/// One record as stored (its own messages only, when it is linked).
#[cfg(test)]
fn read(store: &Store, codec: &Codec, k: &[u8]) -> Option<StoredResponse> {
    read_record(store, codec, k)
        .filter(|(r, _)| !r.deleted)
        .map(|(r, _)| StoredResponse {
            response: r.response,
            messages: r.messages,
        })
}

/// `tenant`'s response `id` with its whole conversation (walking its
/// links back to a whole record; a link queued and not yet written is read
/// from `pending`), and how it is stored. None when it, or a link it needs,
/// is missing or expired.
fn read_chain(
    store: &Store,
    codec: &Codec,
    shared: &Shared,
    tenant: &str,
    id: &str,
) -> Option<(StoredResponse, Chain)> {
    let mut parts: Vec<Vec<Value>> = Vec::new();
    let mut response = None;
    let mut chain = Chain {
        depth: 0,
        expires_at: u64::MAX,
    };
    let mut next = id.to_string();
    loop {
        let k = key(tenant, &next);
        if response.is_some() {
            // A link not yet written (or rewritten) is in `pending`, whole.
            let queued = shared
                .pending
                .get(&k)
                .and_then(|p| Some((p.stored.clone()?, p.link.clone())));
            if let Some((stored, link)) = queued {
                let own = stored_as(link.as_deref(), now(), shared.ttl);
                chain.depth += own.depth;
                chain.expires_at = chain.expires_at.min(own.expires_at);
                parts.push(stored.messages.clone());
                break;
            }
        }
        let (record, expires_at) = read_record(store, codec, &k)?;
        if response.is_none() {
            if record.deleted {
                return None;
            }
            response = Some(record.response);
        }
        chain.expires_at = chain.expires_at.min(expires_at);
        parts.push(record.messages);
        match record.parent {
            None => break,
            Some(parent) => {
                chain.depth += 1;
                if chain.depth > MAX_DEPTH {
                    // Never written so deep: not a chain this store made.
                    return None;
                }
                next = parent;
            }
        }
    }
    let mut messages = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts.into_iter().rev() {
        messages.extend(part);
    }
    Some((
        StoredResponse {
            response: response?,
            messages,
        },
        chain,
    ))
}

/// The key space of `tenant`'s markers of provider-kept responses (a
/// tenant's name has no NUL, so no tenant's own conversations are here).
fn owner(tenant: &str) -> String {
    format!("{tenant}{NATIVE}")
}

/// What [`owner`] adds to a tenant's name.
const NATIVE: &str = "\0native";

/// The tenant (as keyed: with [`NATIVE`] for markers) whose key `k` is.
fn tenant_of(k: &[u8]) -> Option<&str> {
    let len = u32::from_be_bytes(k.get(..4)?.try_into().ok()?) as usize;
    std::str::from_utf8(k.get(4..4 + len)?).ok()
}

/// Where the last purge of a tenant is noted in `meta`.
const PURGE_MARK: &[u8] = b"responses.purged.";

/// Every tenant's last purge, as noted in `meta`.
fn purge_marks(store: &Store) -> HashMap<String, u64> {
    let mut marks = HashMap::new();
    let db = store.db();
    let Some(cf) = db.cf_handle(smartllm_store::CF_META) else {
        return marks;
    };
    let mut it = db.raw_iterator_cf(&cf);
    it.seek(PURGE_MARK);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let Some(tenant) = k.strip_prefix(PURGE_MARK) else {
            break;
        };
        if let (Ok(t), Ok(at)) = (std::str::from_utf8(tenant), <[u8; 8]>::try_from(v)) {
            marks.insert(t.to_string(), u64::from_be_bytes(at));
        }
        it.next();
    }
    marks
}

/// Remove every response kept for `tenant` and its markers of
/// provider-kept responses from `store` as it is (for a gateway whose
/// store is off now: `store.responses: false`); how many responses.
pub fn purge_tenant_records(
    store: &Store,
    tenant: &str,
) -> Result<u64, smartllm_store::StoreError> {
    let (own, markers) = (key(tenant, ""), key(&owner(tenant), ""));
    // A response's own record counts, not the notes of links to it
    // (`\0linked` after its id).
    let removed = store.delete_prefix(CF_RESPONSES, &own, |k| !k[own.len()..].contains(&0))?;
    store.delete_prefix(CF_RESPONSES, &markers, |_| false)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_keep_tenants_apart() {
        assert_ne!(super::key("a", "b\0c"), super::key("a\0b", "c"));
        assert_eq!(super::key("t", "resp_1"), b"\0\0\0\x01tresp_1".to_vec());
    }

    fn stored(id: &str, text: &str) -> StoredResponse {
        StoredResponse {
            response: json!({"id": id, "object": "response", "output_text": text}),
            messages: vec![json!({"role": "assistant", "content": text})],
        }
    }

    #[tokio::test]
    async fn read_your_writes_then_from_rocksdb_and_deletes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        let tasks = TaskTracker::new();
        rs.save(&tasks, "t1", stored("resp_1", "one"));
        // At once, before the writer ran: found, and only by its tenant.
        assert_eq!(
            rs.load("t1", "resp_1").await.unwrap().response["output_text"],
            "one"
        );
        assert!(rs.load("t2", "resp_1").await.is_none());
        // Written: the queue empties and RocksDB has it.
        for _ in 0..500 {
            if tasks.is_empty() && rs.pending() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(rs.pending(), 0);
        assert!(tasks.is_empty(), "the drain's tracker is released");
        assert_eq!(
            read(&store, &Codec::plain(), &key("t1", "resp_1"))
                .unwrap()
                .response["output_text"],
            "one"
        );
        // A save then a delete queued back to back: gone at once and after.
        rs.save(&tasks, "t1", stored("resp_2", "two"));
        assert!(rs.delete(&tasks, "t1", "resp_2").await);
        assert!(rs.load("t1", "resp_2").await.is_none());
        assert!(!rs.delete(&tasks, "t1", "resp_2").await);
        assert!(rs.delete(&tasks, "t1", "resp_1").await);
        for _ in 0..500 {
            if rs.pending() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Nothing links to them: their records are gone.
        assert!(store
            .get(CF_RESPONSES, &key("t1", "resp_1"))
            .unwrap()
            .is_none());
        assert!(store
            .get(CF_RESPONSES, &key("t1", "resp_2"))
            .unwrap()
            .is_none());
        assert!(rs.load("t1", "resp_1").await.is_none());
    }

    /// With `cache.encryption_key_file`, a kept conversation is sealed:
    /// its words are not on disk, and only the key opens it.
    #[tokio::test]
    async fn conversations_are_sealed_with_the_caches_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "ab".repeat(32)).unwrap();
        let codec = Codec::from_key_file(&key_file).unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let rs = ResponsesStore::start(store.clone(), codec.clone()).unwrap();
        let tasks = TaskTracker::new();
        rs.save(&tasks, "t1", stored("resp_1", "the secret plan"));
        for _ in 0..500 {
            if rs.pending() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let raw = store
            .get(CF_RESPONSES, &key("t1", "resp_1"))
            .unwrap()
            .unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"), "sealed on disk");
        assert_eq!(
            read(&store, &codec, &key("t1", "resp_1")).unwrap().response["output_text"],
            "the secret plan"
        );
        assert_eq!(rs.load("t1", "resp_1").await.unwrap().messages.len(), 1);
        assert!(read(&store, &Codec::plain(), &key("t1", "resp_1")).is_none());
        // One kept before sealing came (bare JSON) is still read.
        let mut old = (smartllm_protocol::time::now_secs() + 60)
            .to_be_bytes()
            .to_vec();
        old.extend(stored("resp_0", "older").to_bytes());
        store.put(CF_RESPONSES, &key("t1", "resp_0"), &old).unwrap();
        assert_eq!(
            read(&store, &codec, &key("t1", "resp_0")).unwrap().response["output_text"],
            "older"
        );
    }

    async fn settle(rs: &ResponsesStore) {
        for _ in 0..1000 {
            if rs.pending() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("writes did not settle");
    }

    /// The next turn after `prev` (its conversation and chain), `words`
    /// long, saved linked to it.
    fn next_turn(
        rs: &ResponsesStore,
        tasks: &TaskTracker,
        prev: Option<&(StoredResponse, Chain)>,
        id: &str,
        words: usize,
    ) {
        let mut messages = prev.map(|(p, _)| p.messages.clone()).unwrap_or_default();
        messages.push(
            json!({"role": "user", "content": format!("question {id} {}", "word ".repeat(words))}),
        );
        messages.push(json!({"role": "assistant", "content": format!("answer {id}")}));
        let stored = StoredResponse {
            response: json!({"id": id, "object": "response"}),
            messages,
        };
        let link = prev.map(|(p, chain)| Link {
            parent: p.id().to_string(),
            prefix: p.messages.len(),
            chain: *chain,
        });
        rs.save_linked(tasks, "t", stored, link, smartllm_cache::now_ms());
    }

    /// After a key rotation, kept conversations sealed with the old key, and
    /// one kept in the clear before any key, are sealed with the new one:
    /// with the old key file dropped they still open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_rotation_seals_kept_conversations_again() {
        let dir = tempfile::tempdir().unwrap();
        let (old_key, new_key) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old_key, "ab".repeat(32)).unwrap();
        std::fs::write(&new_key, "cd".repeat(32)).unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let tasks = TaskTracker::new();
        {
            let plain = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
            plain.save(&tasks, "t", stored("resp_clear", "in the clear"));
            settle(&plain).await;
            let old = ResponsesStore::start(store.clone(), Codec::from_key_file(&old_key).unwrap())
                .unwrap();
            let mut prev = None;
            for turn in 0..2u32 {
                let id = format!("resp_{turn}");
                next_turn(&old, &tasks, prev.as_ref(), &id, 3);
                settle(&old).await;
                prev = old.load_chain("t", &id).await;
            }
        }
        let rotated = Codec::from_key_files(&new_key, std::slice::from_ref(&old_key)).unwrap();
        let rs = ResponsesStore::start(store.clone(), rotated).unwrap();
        assert_eq!(tokio::task::block_in_place(|| rs.reseal()).unwrap(), 3);
        assert_eq!(tokio::task::block_in_place(|| rs.reseal()).unwrap(), 0);
        let only_new =
            ResponsesStore::start(store, Codec::from_key_file(&new_key).unwrap()).unwrap();
        assert_eq!(
            only_new.load("t", "resp_1").await.unwrap().messages.len(),
            4
        );
        assert_eq!(
            only_new.load("t", "resp_clear").await.unwrap().response["output_text"],
            "in the clear"
        );
        assert!(only_new.delete(&tasks, "t", "resp_1").await);
    }

    /// A conversation deleted oldest first: each response is kept (without
    /// its response object) while a later one links to it, and once the
    /// last goes nothing of the conversation is left on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conversation_deleted_oldest_first_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        let tasks = TaskTracker::new();
        let mut prev = None;
        for turn in 0..3u32 {
            let id = format!("resp_{turn}");
            next_turn(&rs, &tasks, prev.as_ref(), &id, 3);
            settle(&rs).await;
            prev = rs.load_chain("t", &id).await;
        }
        let records = || -> usize {
            store
                .db()
                .iterator_cf(
                    &store.db().cf_handle(CF_RESPONSES).unwrap(),
                    rocksdb::IteratorMode::Start,
                )
                .count()
        };
        assert_eq!(records(), 5, "three records and two link notes");
        for (i, id) in ["resp_0", "resp_1"].iter().enumerate() {
            assert!(rs.delete(&tasks, "t", id).await);
            settle(&rs).await;
            assert!(rs.load("t", id).await.is_none());
            assert_eq!(records(), 5, "{id} is kept for those after it");
            assert_eq!(
                rs.load("t", "resp_2").await.unwrap().messages.len(),
                6,
                "after deleting {} of them",
                i + 1
            );
        }
        assert!(rs.delete(&tasks, "t", "resp_2").await);
        settle(&rs).await;
        assert_eq!(records(), 0, "the deleted conversation's words are gone");
    }

    /// A tenant's erasure: its conversations (linked ones and their link
    /// notes, written or still queued) and its markers of provider-kept
    /// responses go; another tenant's, whose name starts the same, stay. A
    /// save after it is kept as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tenant_purge_removes_its_conversations_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        let tasks = TaskTracker::new();
        let mut prev = None;
        for turn in 0..3u32 {
            let id = format!("resp_{turn}");
            next_turn(&rs, &tasks, prev.as_ref(), &id, 3);
            settle(&rs).await;
            prev = rs.load_chain("t", &id).await;
        }
        rs.own(
            &tasks,
            "t",
            "resp_native",
            "openai",
            smartllm_cache::now_ms(),
        );
        rs.save(&tasks, "tt", stored("resp_0", "another tenant's"));
        settle(&rs).await;
        // One more, still queued when the purge comes.
        rs.save(&tasks, "t", stored("resp_queued", "queued"));
        let removed = tokio::task::block_in_place(|| rs.purge_tenant("t")).unwrap();
        assert!((3..=4).contains(&removed), "{removed}");
        settle(&rs).await;
        for id in ["resp_0", "resp_1", "resp_2", "resp_queued"] {
            assert!(rs.load("t", id).await.is_none(), "{id}");
        }
        assert!(rs.owner_of("t", "resp_native").await.is_none());
        let left: Vec<Vec<u8>> = store
            .db()
            .iterator_cf(
                &store.db().cf_handle(CF_RESPONSES).unwrap(),
                rocksdb::IteratorMode::Start,
            )
            .map(|i| i.unwrap().0.to_vec())
            .collect();
        assert_eq!(left, vec![key("tt", "resp_0")], "nothing of t's is left");
        assert_eq!(
            rs.load("tt", "resp_0").await.unwrap().response["output_text"],
            "another tenant's"
        );
        rs.save(&tasks, "t", stored("resp_new", "after"));
        settle(&rs).await;
        assert!(rs.load("t", "resp_new").await.is_some());
        // A request that started before the purge and answers after it
        // keeps nothing (its conversation would bring the erased turns
        // back); nor does its provider's marker. Still so after a restart.
        let before = smartllm_cache::now_ms() - 60_000;
        let late = |rs: &ResponsesStore| {
            rs.save_linked(
                &tasks,
                "t",
                stored("resp_late", "erased turns"),
                None,
                before,
            );
            rs.own(&tasks, "t", "resp_late_native", "openai", before);
        };
        late(&rs);
        settle(&rs).await;
        assert!(rs.load("t", "resp_late").await.is_none());
        assert!(rs.owner_of("t", "resp_late_native").await.is_none());
        let again = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        late(&again);
        settle(&again).await;
        assert!(again.load("t", "resp_late").await.is_none());
        // The fleet's record of an older purge, applied again: nothing.
        assert_eq!(
            tokio::task::block_in_place(|| again.purge_tenant_at("t", before)).unwrap(),
            None
        );
        assert!(again.load("t", "resp_new").await.is_some());
        assert_eq!(
            tokio::task::block_in_place(|| rs.purge_tenant("t")).unwrap(),
            1
        );
    }

    /// A follow-up is kept as what it adds (its input and answer) and read
    /// back whole, before and after it is written; `GET` reads only its
    /// record. Deleting one keeps it as a link for those that continue it;
    /// a link that is gone makes them unreadable (404), not partial.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follow_ups_are_kept_as_what_they_add() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        let tasks = TaskTracker::new();
        let mut prev = None;
        for turn in 0..5u32 {
            let id = format!("resp_{turn}");
            next_turn(&rs, &tasks, prev.as_ref(), &id, 3);
            if turn % 2 == 0 {
                // Every other turn follows at once: its parent is still queued.
                settle(&rs).await;
            }
            let (stored, chain) = rs.load_chain("t", &id).await.unwrap();
            assert_eq!(chain.depth, turn, "{id}");
            assert_eq!(stored.messages.len(), 2 * (turn as usize + 1));
            assert_eq!(
                stored.messages[0]["content"],
                "question resp_0 word word word "
            );
            prev = Some((stored, chain));
        }
        settle(&rs).await;
        for turn in 0..5 {
            let id = format!("resp_{turn}");
            let own = read(&store, &Codec::plain(), &key("t", &id)).unwrap();
            assert_eq!(own.messages.len(), 2, "{id} is kept as what it adds");
            assert_eq!(
                rs.load("t", &id).await.unwrap().messages.len(),
                2 * (turn + 1)
            );
        }
        assert_eq!(rs.response("t", "resp_4").await.unwrap()["id"], "resp_4");
        assert!(rs.load("t2", "resp_4").await.is_none(), "tenants apart");

        assert!(rs.delete(&tasks, "t", "resp_2").await);
        assert!(rs.load("t", "resp_2").await.is_none());
        settle(&rs).await;
        // Kept for resp_3, which links to it, without its response object.
        let (kept, _) = read_record(&store, &Codec::plain(), &key("t", "resp_2")).unwrap();
        assert!(kept.deleted && kept.response.is_null() && kept.messages.len() == 2);
        assert!(rs.load("t", "resp_2").await.is_none());
        assert!(rs.response("t", "resp_2").await.is_none());
        assert!(!rs.delete(&tasks, "t", "resp_2").await);
        let after = rs.load("t", "resp_4").await.unwrap();
        assert_eq!(
            after.messages.len(),
            10,
            "continued past a deleted response"
        );
        assert_eq!(after.messages[5]["content"], "answer resp_2");

        // A link that is gone (expired): those after it are not found.
        store.delete(CF_RESPONSES, &key("t", "resp_1")).unwrap();
        assert!(rs.load("t", "resp_4").await.is_none());
        assert!(rs.load("t", "resp_0").await.is_some());
        assert_eq!(rs.response("t", "resp_4").await.unwrap()["id"], "resp_4");
    }

    /// A delete that overtakes its response's save after another response
    /// already continued it: the continuation still reads the whole
    /// conversation, and the deleted one is found by no one. A delete of a
    /// response nothing links to removes its record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_overtaking_a_save_keeps_what_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs =
            ResponsesStore::with_queue(store.clone(), Codec::plain(), 16, 64, TTL_SECS).unwrap();
        let tasks = TaskTracker::new();
        // The writer held: every key stripe locked.
        let held: Vec<_> = rs
            .shared
            .stripes
            .iter()
            .map(|s| s.lock().unwrap())
            .collect();
        next_turn(&rs, &tasks, None, "resp_a", 3);
        let a = rs.load_chain("t", "resp_a").await.unwrap();
        next_turn(&rs, &tasks, Some(&a), "resp_b", 3);
        assert!(rs.delete(&tasks, "t", "resp_a").await);
        assert!(rs.load("t", "resp_a").await.is_none());
        assert_eq!(rs.load("t", "resp_b").await.unwrap().messages.len(), 4);
        drop(held);
        settle(&rs).await;
        assert!(rs.load("t", "resp_a").await.is_none());
        assert!(rs.response("t", "resp_a").await.is_none());
        assert_eq!(rs.load("t", "resp_b").await.unwrap().messages.len(), 4);
        let own = read(&store, &Codec::plain(), &key("t", "resp_b")).unwrap();
        assert_eq!(own.messages.len(), 2, "resp_b links to resp_a");
        // resp_b deleted (nothing links to it): its note on resp_a goes, so
        // resp_a, deleted already, holds no one's words now; deleting it
        // again finds nothing.
        assert!(rs.delete(&tasks, "t", "resp_b").await);
        settle(&rs).await;
        assert!(store
            .get(CF_RESPONSES, &key("t", "resp_b"))
            .unwrap()
            .is_none());
        assert!(!has_links(&store, &key("t", "resp_a")));
        // Nothing links to resp_c: deleted, its record goes.
        next_turn(&rs, &tasks, None, "resp_c", 3);
        settle(&rs).await;
        assert!(store
            .get(CF_RESPONSES, &key("t", "resp_c"))
            .unwrap()
            .is_some());
        assert!(rs.delete(&tasks, "t", "resp_c").await);
        settle(&rs).await;
        assert!(store
            .get(CF_RESPONSES, &key("t", "resp_c"))
            .unwrap()
            .is_none());
    }

    /// Past [`MAX_DEPTH`] links, or on links that would expire more than
    /// [`WHOLE_AFTER`] before it, a response is kept whole again.
    #[test]
    fn long_or_old_chains_start_again_whole() {
        let now = 2_000_000_000;
        let link = |depth, expires_at| Link {
            parent: "p".into(),
            prefix: 0,
            chain: Chain { depth, expires_at },
        };
        let whole = Chain {
            depth: 0,
            expires_at: now + TTL_SECS,
        };
        assert_eq!(stored_as(None, now, TTL_SECS), whole);
        let fresh = now + TTL_SECS - 3600;
        assert_eq!(
            stored_as(Some(&link(3, fresh)), now, TTL_SECS),
            Chain {
                depth: 4,
                expires_at: fresh
            }
        );
        assert_eq!(
            stored_as(Some(&link(MAX_DEPTH - 1, fresh)), now, TTL_SECS).depth,
            MAX_DEPTH
        );
        assert_eq!(
            stored_as(Some(&link(MAX_DEPTH, fresh)), now, TTL_SECS),
            whole
        );
        let old = now + TTL_SECS - WHOLE_AFTER - 1;
        assert_eq!(stored_as(Some(&link(1, old)), now, TTL_SECS), whole);
        // A shorter `store.responses_ttl` (an hour): the margin shrinks
        // with it (two minutes), so a response still lives most of its
        // hour, never the few minutes its oldest link has left.
        let hour = 3600;
        let whole = Chain {
            depth: 0,
            expires_at: now + hour,
        };
        assert_eq!(stored_as(None, now, hour), whole);
        assert_eq!(
            stored_as(Some(&link(1, now + hour - 60)), now, hour).depth,
            2
        );
        assert_eq!(stored_as(Some(&link(1, now + 600)), now, hour), whole);
    }

    /// A long conversation takes about the room of its text: 200 turns of
    /// ~1 KB each, where keeping every response whole took ~20 MB.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_conversation_takes_the_room_of_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let rs = ResponsesStore::start(store.clone(), Codec::plain()).unwrap();
        let tasks = TaskTracker::new();
        let mut prev = None;
        for turn in 0..200 {
            let id = format!("resp_{turn}");
            next_turn(&rs, &tasks, prev.as_ref(), &id, 200);
            prev = rs.load_chain("t", &id).await;
        }
        settle(&rs).await;
        let (last, chain) = prev.unwrap();
        assert_eq!(last.messages.len(), 400);
        assert!(chain.depth <= MAX_DEPTH, "{chain:?}");
        let text: usize = last.history_bytes();
        let mut stored = 0;
        for turn in 0..200 {
            stored += store
                .get(CF_RESPONSES, &key("t", &format!("resp_{turn}")))
                .unwrap()
                .unwrap()
                .len();
        }
        assert!(text > 200_000, "{text}");
        // Whole again every MAX_DEPTH turns: at most ~4x (whole every turn: ~100x).
        assert!(
            stored < 4 * text,
            "{stored} bytes kept for {text} of conversation"
        );
        assert_eq!(rs.load("t", "resp_199").await.unwrap(), last);
    }

    /// Past the queue, operations run on the blocking pool beside the
    /// writer; whichever order they run in, each key ends as its last
    /// operation left it (a save overtaken by a delete must not land after
    /// it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overflowing_operations_on_one_key_end_as_the_last_one_left_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Room past the queue for every save: this is about their order.
        let rs = ResponsesStore::with_queue(
            store.clone(),
            Codec::plain(),
            1,
            Semaphore::MAX_PERMITS,
            TTL_SECS,
        )
        .unwrap();
        let tasks = TaskTracker::new();
        const KEYS: usize = 16;
        for round in 0..400 {
            for k in 0..KEYS {
                let id = format!("resp_{k}");
                if round % 2 == 0 {
                    rs.save(&tasks, "t", stored(&id, "x"));
                } else {
                    assert!(rs.delete(&tasks, "t", &id).await);
                }
            }
        }
        // The last round (399) deleted every key; then one more save of half.
        for k in 0..KEYS / 2 {
            rs.save(&tasks, "t", stored(&format!("resp_{k}"), "last"));
        }
        tasks.close();
        tasks.wait().await;
        assert_eq!(rs.pending(), 0);
        for k in 0..KEYS {
            let got = read(&store, &Codec::plain(), &key("t", &format!("resp_{k}")));
            if k < KEYS / 2 {
                assert_eq!(got.unwrap().response["output_text"], "last", "key {k}");
            } else {
                let raw = store.get(CF_RESPONSES, &key("t", &format!("resp_{k}")));
                assert!(raw.unwrap().is_none(), "key {k} came back after its delete");
            }
        }
    }

    /// Past the queue and the overflow's room, a save is dropped (found
    /// nowhere, never half-recorded), not queued without bound; a delete is
    /// never dropped. Whatever was taken in is written in the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn saves_past_the_queue_and_the_overflow_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A queue of one and no room beyond it.
        let rs = ResponsesStore::with_queue(store.clone(), Codec::plain(), 1, 0, TTL_SECS).unwrap();
        let tasks = TaskTracker::new();
        // Every key stripe held: the writer can take one operation and then
        // waits, so the queue holds at most one more.
        let held: Vec<_> = rs
            .shared
            .stripes
            .iter()
            .map(|s| s.lock().unwrap())
            .collect();
        const SAVES: usize = 4;
        for i in 0..SAVES {
            rs.save(&tasks, "t", stored(&format!("resp_{i}"), "x"));
        }
        let mut kept = Vec::new();
        for i in 0..SAVES {
            if rs.load("t", &format!("resp_{i}")).await.is_some() {
                kept.push(i);
            }
        }
        assert!((1..=2).contains(&kept.len()), "{kept:?}");
        assert_eq!(rs.pending(), kept.len(), "a dropped save is not pending");
        // A delete, with the queue full or not: it is done.
        let gone = kept[0];
        assert!(rs.delete(&tasks, "t", &format!("resp_{gone}")).await);
        drop(held);
        tasks.close();
        tasks.wait().await;
        assert_eq!(rs.pending(), 0);
        for i in 0..SAVES {
            let got = read(&store, &Codec::plain(), &key("t", &format!("resp_{i}")));
            assert_eq!(got.is_some(), kept.contains(&i) && i != gone, "resp_{i}");
        }
    }
}
