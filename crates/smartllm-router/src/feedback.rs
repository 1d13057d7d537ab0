//! Quality learned online from what users say about answers.
//!
//! `POST /v1/feedback` names a request (its `x-request-id`) and a score
//! (0-1, or thumbs up / down). The gateway remembers which model answered
//! the last [`REMEMBERED`] requests, for which tenant and on what task, so a
//! score lands on that model and task. For that tenant's requests the router
//! then uses, in place of a model's profile quality for a task, the
//! posterior mean of the tenant's scores with the profile as the prior,
//! worth [`PRIOR_VOTES`] votes: a handful of votes moves it a little,
//! hundreds move it to what the tenant's users report. Tenants are kept
//! apart throughout: a tenant's votes steer only its own requests, and
//! request ids (which clients may set) are remembered per tenant. A request
//! is scored once (a later score replaces the earlier one). [`MAX_TALLIES`]
//! bounds the tally, half of it for the callers of an open gateway (a
//! tenant per key they present).
//!
//! Outcomes count without anyone voting: a model that fails a request
//! ([`FeedbackBook::failure`]), and a model whose answer was asked for again
//! (a *regenerate*: the same question from the same tenant, in the same
//! conversation and settings, with `Cache-Control: no-cache`, within
//! [`REGENERATE_WINDOW_SECS`]: [`FeedbackBook::regenerated`]).

use arc_swap::ArcSwap;
use serde::Serialize;
use smartllm_config::Task;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

/// Requests remembered for feedback (about 150 bytes each).
pub const REMEMBERED: usize = 100_000;
/// How many votes the profile's quality is worth.
pub const PRIOR_VOTES: f64 = 20.0;
/// A question asked again for a fresh answer this soon after its answer
/// counts against the model that gave it.
pub const REGENERATE_WINDOW_SECS: u64 = 600;

/// Scores of one model on one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Votes {
    /// Scores counted: users' and outcomes'.
    pub votes: u64,
    pub sum: f64,
    /// Of `votes`, those from outcomes (an answer the model failed to give):
    /// zeros, at most [`IMPLICIT_CAP`], forgotten [`IMPLICIT_TTL_SECS`] after
    /// the last one.
    pub implicit: u64,
    /// When the last outcome was counted (seconds since the epoch).
    #[serde(skip)]
    pub implicit_at: u64,
}

/// Outcome zeros kept per tenant, model and task: an outage lowers a model's
/// expected quality to at most half way to 0 (with the prior's 20 votes).
pub const IMPLICIT_CAP: u64 = 20;
/// Outcome zeros are forgotten an hour after the last one, so a model that
/// was down is expected as before once it is back (the circuit breakers keep
/// traffic off it while it is down).
pub const IMPLICIT_TTL_SECS: u64 = 3600;
/// Outcome zeros weigh half as much this long after the last one.
pub const IMPLICIT_HALF_LIFE_SECS: u64 = 300;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Votes {
    /// These votes as of `now`: outcomes older than the TTL no longer count.
    pub fn at(mut self, now: u64) -> Votes {
        if self.implicit > 0 && now.saturating_sub(self.implicit_at) > IMPLICIT_TTL_SECS {
            self.votes -= self.implicit;
            self.implicit = 0;
        }
        self
    }

    /// How many votes these count for at `now`: outcome zeros weigh less
    /// as they age, halving every [`IMPLICIT_HALF_LIFE_SECS`] after the last
    /// one, so a model one failure moved comes back without traffic of its
    /// own (a router that stopped sending it any would never learn it
    /// recovered); a new failure weighs them all in full again.
    pub fn weight_at(&self, now: u64) -> f64 {
        let age = now.saturating_sub(self.implicit_at) as f64;
        let keep = 0.5f64.powf(age / IMPLICIT_HALF_LIFE_SECS as f64);
        self.votes as f64 - self.implicit as f64 * (1.0 - keep)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.votes > 0).then(|| self.sum / self.votes as f64)
    }
}

/// Who a remembered request was served to, by which model, on what task.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub tenant: String,
    pub model: String,
    pub task: Task,
    /// The score given so far, if any.
    pub score: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeedbackError {
    #[error("no request {0:?} among this tenant's recent requests (the gateway remembers the last 100,000 answered by a model)")]
    Unknown(String),
}

/// A keyed hash of (tenant, request id): remembering a request costs no
/// allocation beyond its `Served`, and a key two requests could share by
/// chance (about 1 in 10^9 among the remembered) is told apart by the tenant.
type RequestKey = u64;

#[derive(Default)]
struct Remembered {
    /// Keys the hashes (random per process).
    keys: RandomState,
    by_id: HashMap<RequestKey, Served>,
    order: VecDeque<RequestKey>,
}

impl Remembered {
    fn key(&self, tenant: &str, request_id: &str) -> RequestKey {
        self.keys.hash_one((tenant, request_id))
    }
}

/// Votes by (tenant, model, task).
type Tally = HashMap<(String, String, Task), Votes>;

/// The most (tenant, model, task) tallies kept: the configured tenants'
/// fit many times over; beyond it new ones are not counted (each vote
/// copies the tally, which must stay small).
pub const MAX_TALLIES: usize = 50_000;

/// Whether a vote on `key` may start a tally (one already kept always
/// counts). The callers of an open gateway each get a tenant of their own
/// per key they present (`key:<hash>`), as many as anyone makes up: theirs
/// start only while the tally is under half its bound, so they never take
/// the configured tenants' room.
fn has_room(tally: &Tally, key: &(String, String, Task)) -> bool {
    let bound = if key.0.starts_with("key:") {
        MAX_TALLIES / 2
    } else {
        MAX_TALLIES
    };
    tally.len() < bound || tally.contains_key(key)
}

#[derive(Default)]
pub struct FeedbackBook {
    /// Read by every routed decision without a lock; replaced (copy on
    /// write) by each score, which are rare.
    votes: ArcSwap<Tally>,
    /// Who each recent request was served to: `remember` only ever
    /// `try_lock`s it (a busy book skips one request), `score` holds it for a
    /// map lookup.
    requests: Mutex<Remembered>,
    /// The last answer to each recent question (by the cache's exact key),
    /// for regenerates; bounded like `requests`.
    questions: Mutex<Answered>,
}

#[derive(Default)]
struct Answered {
    by_question: HashMap<u64, (Served, u64)>,
    order: VecDeque<u64>,
}

impl FeedbackBook {
    /// Remember who a request was served to (never waits: a busy book skips it).
    pub fn remember(&self, request_id: &str, served: Served) {
        let Ok(mut r) = self.requests.try_lock() else {
            return;
        };
        let key = r.key(&served.tenant, request_id);
        if r.by_id.insert(key, served).is_none() {
            r.order.push_back(key);
        }
        while r.order.len() > REMEMBERED {
            if let Some(old) = r.order.pop_front() {
                r.by_id.remove(&old);
            }
        }
    }

    /// `question` (the cache's exact key of a request: tenant, model or
    /// route, conversation, settings and the question itself) was just
    /// answered as `served` (never waits: a busy book skips it).
    pub fn answered(&self, question: u64, served: Served) {
        self.answered_at(question, served, now_secs());
    }

    fn answered_at(&self, question: u64, served: Served, now: u64) {
        let Ok(mut q) = self.questions.try_lock() else {
            return;
        };
        if q.by_question.insert(question, (served, now)).is_none() {
            q.order.push_back(question);
        }
        while q.order.len() > REMEMBERED {
            if let Some(old) = q.order.pop_front() {
                q.by_question.remove(&old);
            }
        }
    }

    /// `tenant` asks `question` again for a fresh answer: if its last answer
    /// came within [`REGENERATE_WINDOW_SECS`], that answer's model gets an
    /// outcome of 0 (as a [`Self::failure`]) and is returned. One regenerate
    /// counts once: the new answer replaces the old (`answered`). Called on
    /// the proxy's threads, so it never waits: a busy book counts nothing.
    pub fn regenerated(&self, question: u64, tenant: &str) -> Option<Served> {
        self.regenerated_at(question, tenant, now_secs())
    }

    fn regenerated_at(&self, question: u64, tenant: &str, now: u64) -> Option<Served> {
        let served = {
            let mut q = self.questions.try_lock().ok()?;
            let (served, at) = q.by_question.get(&question)?;
            if served.tenant != tenant || now.saturating_sub(*at) > REGENERATE_WINDOW_SECS {
                return None;
            }
            let served = served.clone();
            q.by_question.remove(&question);
            served
        };
        self.failure_at(tenant, &served.model, served.task, now);
        Some(served)
    }

    /// Score a remembered request of `tenant` (0-1); what it was.
    pub fn score(
        &self,
        request_id: &str,
        tenant: &str,
        score: f64,
    ) -> Result<Served, FeedbackError> {
        let score = score.clamp(0.0, 1.0);
        let (served, previous) = {
            let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let key = r.key(tenant, request_id);
            let s = r
                .by_id
                .get_mut(&key)
                .filter(|s| s.tenant == tenant)
                .ok_or_else(|| FeedbackError::Unknown(request_id.to_string()))?;
            let previous = s.score.replace(score);
            (s.clone(), previous)
        };
        if previous == Some(score) {
            // The same score again changes nothing: no copy of the tally.
            return Ok(served);
        }
        let key = (served.tenant.clone(), served.model.clone(), served.task);
        if !has_room(&self.votes.load(), &key) {
            return Ok(served);
        }
        self.votes.rcu(|tally| {
            let mut tally = Tally::clone(tally);
            let e = tally.entry(key.clone()).or_default();
            match previous {
                Some(p) => e.sum += score - p,
                None => {
                    e.votes += 1;
                    e.sum += score;
                }
            }
            tally
        });
        Ok(served)
    }

    /// An outcome the gateway saw itself: `model` failed to answer one of
    /// `tenant`'s requests on `task` (an error, or a fallback away from it),
    /// counted as a score of 0 (up to [`IMPLICIT_CAP`], for an hour).
    pub fn failure(&self, tenant: &str, model: &str, task: Task) {
        self.failure_at(tenant, model, task, now_secs());
    }

    fn failure_at(&self, tenant: &str, model: &str, task: Task, now: u64) {
        // Every failure copies the tally (copy on write): once a key holds its
        // cap, refresh its time at most once a minute, so an outage does not
        // copy the map on every failed request.
        let key = (tenant.to_string(), model.to_string(), task);
        let tally = self.votes.load();
        if !has_room(&tally, &key)
            || tally.get(&key).is_some_and(|v| {
                v.at(now).implicit >= IMPLICIT_CAP && now.saturating_sub(v.implicit_at) < 60
            })
        {
            return;
        }
        drop(tally);
        self.votes.rcu(|tally| {
            let mut tally = Tally::clone(tally);
            let e = tally.entry(key.clone()).or_default();
            *e = e.at(now);
            if e.implicit < IMPLICIT_CAP {
                e.votes += 1;
                e.implicit += 1;
            }
            e.implicit_at = now;
            tally
        });
    }

    /// The quality the router uses for `tenant`'s requests: `prior` (the
    /// profile's) moved towards the tenant's scores of this model on this task.
    pub fn quality(&self, tenant: &str, model: &str, task: Task, prior: f64) -> f64 {
        self.quality_at(tenant, model, task, prior, now_secs())
    }

    fn quality_at(&self, tenant: &str, model: &str, task: Task, prior: f64, now: u64) -> f64 {
        let votes = self.votes_for_at(tenant, model, task, now);
        if votes.votes == 0 {
            return prior;
        }
        (prior * PRIOR_VOTES + votes.sum) / (PRIOR_VOTES + votes.weight_at(now))
    }

    /// How many votes the tenant's scores of `model` on `task` count for
    /// now (outcome zeros fading with age, as in [`FeedbackBook::quality`]).
    pub fn weight_for(&self, tenant: &str, model: &str, task: Task) -> f64 {
        let now = now_secs();
        self.votes_for_at(tenant, model, task, now).weight_at(now)
    }

    /// The tenant's scores of `model` on `task`.
    pub fn votes_for(&self, tenant: &str, model: &str, task: Task) -> Votes {
        self.votes_for_at(tenant, model, task, now_secs())
    }

    fn votes_for_at(&self, tenant: &str, model: &str, task: Task, now: u64) -> Votes {
        let tally = self.votes.load();
        if tally.is_empty() {
            return Votes::default();
        }
        tally
            .get(&(tenant.to_string(), model.to_string(), task))
            .map(|v| v.at(now))
            .unwrap_or_default()
    }

    /// Votes per model and task, all tenants together, for `/admin/models`.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<&'static str, Votes>> {
        let mut out: BTreeMap<String, BTreeMap<&'static str, Votes>> = BTreeMap::new();
        let now = now_secs();
        for ((_, model, task), votes) in self.votes.load().iter() {
            let votes = votes.at(now);
            let v = out
                .entry(model.clone())
                .or_default()
                .entry(task.as_str())
                .or_default();
            v.votes += votes.votes;
            v.sum += votes.sum;
            v.implicit += votes.implicit;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(tenant: &str, model: &str) -> Served {
        Served {
            tenant: tenant.into(),
            model: model.into(),
            task: Task::Code,
            score: None,
        }
    }

    /// A question asked again for a fresh answer soon after counts a 0 for
    /// the model that answered it, once; not another tenant's, not after the
    /// window, and a new answer is what the next regenerate counts against.
    #[test]
    fn a_regenerate_counts_against_the_answer_it_replaces() {
        let book = FeedbackBook::default();
        let votes = |model: &str| {
            book.votes
                .load()
                .get(&("acme".to_string(), model.to_string(), Task::Code))
                .map_or(0, |v| v.implicit)
        };
        book.answered_at(7, served("acme", "big"), 1_000);
        assert_eq!(book.regenerated_at(7, "other", 1_010), None);
        assert_eq!(book.regenerated_at(8, "acme", 1_010), None);
        assert_eq!(votes("big"), 0);
        let r = book.regenerated_at(7, "acme", 1_010).unwrap();
        assert_eq!(r.model, "big");
        assert_eq!(votes("big"), 1);
        // Counted once; the fresh answer is the next one regenerates count against.
        assert_eq!(book.regenerated_at(7, "acme", 1_011), None);
        book.answered_at(7, served("acme", "small"), 1_020);
        assert_eq!(
            book.regenerated_at(7, "acme", 1_020 + REGENERATE_WINDOW_SECS + 1),
            None
        );
        assert_eq!((votes("big"), votes("small")), (1, 0));
        book.answered_at(7, served("acme", "small"), 5_000);
        assert!(book.regenerated_at(7, "acme", 5_030).is_some());
        assert_eq!(votes("small"), 1);
    }

    /// Outcome zeros count at most IMPLICIT_CAP and are forgotten an hour
    /// after the last one; users' votes stay.
    #[test]
    fn outcome_zeros_are_capped_and_forgotten() {
        let book = FeedbackBook::default();
        book.remember("r1", served("acme", "m"));
        book.score("r1", "acme", 1.0).unwrap();
        for _ in 0..50 {
            book.failure_at("acme", "m", Task::Code, 1_000);
        }
        let v = book.votes.load()[&("acme".to_string(), "m".to_string(), Task::Code)];
        assert_eq!(
            (v.votes, v.implicit, v.sum),
            (1 + IMPLICIT_CAP, IMPLICIT_CAP, 1.0)
        );
        // (0.8 * 20 + 1) / (20 + 21): an outage costs at most about half.
        let q = (0.8 * PRIOR_VOTES + 1.0) / (PRIOR_VOTES + 21.0);
        let during = v.at(1_000 + IMPLICIT_TTL_SECS);
        assert!((during.votes, during.implicit) == (21, 20) && q > 0.4);
        let after = v.at(1_001 + IMPLICIT_TTL_SECS);
        assert_eq!((after.votes, after.implicit, after.sum), (1, 0, 1.0));
        // A later failure starts a new count.
        book.failure_at("acme", "m", Task::Code, 10_000);
        let v = book.votes.load()[&("acme".to_string(), "m".to_string(), Task::Code)].at(10_000);
        assert_eq!((v.votes, v.implicit), (2, 1));
        // It weighs in full at once, half five minutes on, and the model's
        // quality comes back towards what it was without a request.
        let q = |at| book.quality_at("acme", "m", Task::Code, 0.8, at);
        let before = (0.8 * PRIOR_VOTES + 1.0) / (PRIOR_VOTES + 1.0);
        assert!((q(10_000) - (0.8 * PRIOR_VOTES + 1.0) / (PRIOR_VOTES + 2.0)).abs() < 1e-9);
        assert!(
            (q(10_000 + IMPLICIT_HALF_LIFE_SECS) - (0.8 * PRIOR_VOTES + 1.0) / (PRIOR_VOTES + 1.5))
                .abs()
                < 1e-9
        );
        assert!(q(10_000) < q(10_300) && q(10_300) < q(11_000) && q(11_000) < before);
        assert!(before - q(10_000 + 6 * IMPLICIT_HALF_LIFE_SECS) < 1e-3);
    }

    /// The tally never grows past its bound; keys made up on an open
    /// gateway (a tenant each) take at most half of it, so the configured
    /// tenants always have room.
    #[test]
    fn the_tally_is_bounded() {
        let book = FeedbackBook::default();
        let full = |n: usize, prefix: &str| -> Tally {
            (0..n)
                .map(|i| {
                    (
                        (format!("{prefix}{i}"), "m".to_string(), Task::Code),
                        Votes::default(),
                    )
                })
                .collect()
        };
        book.votes
            .store(std::sync::Arc::new(full(MAX_TALLIES / 2, "key:")));
        book.failure("key:new", "m", Task::Code);
        assert_eq!(book.votes_for("key:new", "m", Task::Code).votes, 0);
        book.remember("r1", served("key:new", "m"));
        book.score("r1", "key:new", 0.0).unwrap();
        assert_eq!(book.votes.load().len(), MAX_TALLIES / 2);
        // A configured tenant still has room; a kept tally still counts.
        book.failure("acme", "m", Task::Code);
        assert_eq!(book.votes_for("acme", "m", Task::Code).votes, 1);
        book.failure("key:7", "m", Task::Code);
        assert_eq!(book.votes_for("key:7", "m", Task::Code).votes, 1);
        // At the whole bound, no new tally at all.
        book.votes
            .store(std::sync::Arc::new(full(MAX_TALLIES, "t")));
        book.failure("beta", "m", Task::Code);
        assert_eq!(book.votes.load().len(), MAX_TALLIES);
        assert_eq!(book.votes_for("beta", "m", Task::Code).votes, 0);
    }

    #[test]
    fn scores_move_the_prior_by_their_weight() {
        let book = FeedbackBook::default();
        assert_eq!(book.quality("acme", "m", Task::Code, 0.8), 0.8);
        for i in 0..20 {
            book.remember(&format!("r{i}"), served("acme", "m"));
            book.score(&format!("r{i}"), "acme", 0.0).unwrap();
        }
        // 20 zero votes against a prior worth 20: halfway.
        assert!((book.quality("acme", "m", Task::Code, 0.8) - 0.4).abs() < 1e-9);
        let untouched = [
            book.quality("acme", "m", Task::Math, 0.8),
            book.quality("acme", "other", Task::Code, 0.8),
            book.quality("beta", "m", Task::Code, 0.8),
        ];
        assert_eq!(untouched, [0.8; 3], "other tasks, models and tenants");
        let snap = book.snapshot();
        assert_eq!(snap["m"]["code"].votes, 20);
    }

    #[test]
    fn only_the_tenant_scores_its_requests_once() {
        let book = FeedbackBook::default();
        book.remember("r1", served("acme", "m"));
        assert_eq!(
            book.score("r1", "evil", 0.0),
            Err(FeedbackError::Unknown("r1".into()))
        );
        // A client reusing another tenant's request id gets its own record.
        book.remember("r1", served("evil", "other"));
        assert_eq!(book.score("r1", "evil", 0.0).unwrap().model, "other");
        assert!(book.score("nope", "acme", 1.0).is_err());
        book.score("r1", "acme", 0.0).unwrap();
        let s = book.score("r1", "acme", 1.0).unwrap();
        assert_eq!((s.model.as_str(), s.score), ("m", Some(1.0)));
        // One vote, replaced: 1.0.
        let v = book.snapshot()["m"]["code"];
        assert_eq!(book.snapshot()["other"]["code"].votes, 1);
        assert_eq!((v.votes, v.sum), (1, 1.0));
    }

    #[test]
    fn the_book_is_bounded() {
        let book = FeedbackBook::default();
        for i in 0..REMEMBERED + 10 {
            book.remember(&i.to_string(), served("t", "m"));
        }
        assert!(
            book.score("0", "t", 1.0).is_err(),
            "the oldest are forgotten"
        );
        assert!(book.score(&(REMEMBERED + 9).to_string(), "t", 1.0).is_ok());
        assert_eq!(book.requests.lock().unwrap().by_id.len(), REMEMBERED);
    }
}
