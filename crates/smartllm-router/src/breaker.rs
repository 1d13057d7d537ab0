//! Circuit breakers per deployment. Closed: traffic flows, consecutive
//! failures are counted. Open: after `failures` in a row, the deployment gets no
//! traffic for `cooldown`. Half-open: then one trial request is let through; its
//! success closes the circuit, its failure opens it again.

use crate::metric_names as m;
use smartllm_config::CircuitBreakerConfig;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug)]
struct Entry {
    state: BreakerState,
    consecutive: u32,
    opened_at: Option<Instant>,
    /// A half-open trial is in flight, since then. One whose outcome never
    /// came (its request was dropped) stops blocking after another cooldown.
    trial: Option<Instant>,
}

/// Breakers by deployment id (`model/provider/address`). They outlive config reloads.
#[derive(Default)]
pub struct Breakers {
    inner: Mutex<HashMap<String, Entry>>,
    /// Deployments that answered 429 (a rate limit, which opens no
    /// circuit), and until when they are tried after the others.
    cooling: Mutex<HashMap<String, Instant>>,
}

/// The longest a 429's `Retry-After` keeps a deployment behind the others.
pub const MAX_COOLING: Duration = Duration::from_secs(60);

fn set_state(id: &str, e: &mut Entry, to: BreakerState) {
    if e.state != to {
        tracing::warn!(
            deployment = id,
            from = e.state.as_str(),
            to = to.as_str(),
            "circuit breaker changed state"
        );
        metrics::counter!(m::CIRCUIT_TRANSITIONS, "deployment" => id.to_string(), "to" => to.as_str()).increment(1);
        e.state = to;
    }
    metrics::gauge!(m::CIRCUIT_STATE, "deployment" => id.to_string()).set(to.gauge());
}

/// A half-open trial is in flight and not yet given up on.
fn trial_pending(e: &Entry, cfg: &CircuitBreakerConfig) -> bool {
    e.trial.is_some_and(|t| t.elapsed() < cfg.cooldown)
}

/// What `Breakers::admit` grants an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The circuit is closed.
    Closed,
    /// The half-open circuit's one trial, claimed at this instant: only the
    /// attempt that holds it can give it up (`abandon`).
    Trial(Instant),
}

impl Breakers {
    /// The deployment answered 429 and said to come back `after` (its
    /// `Retry-After`, at least a second, at most [`MAX_COOLING`]): until
    /// then it is tried after every other deployment and model that can
    /// take the request, not first each time.
    pub fn cool(&self, id: &str, after: Duration) {
        let until = Instant::now() + after.clamp(Duration::from_secs(1), MAX_COOLING);
        let mut map = self.cooling.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the deployments there are: the expired go first.
        let now = Instant::now();
        map.retain(|_, t| *t > now);
        let at = map.entry(id.to_string()).or_insert(until);
        *at = (*at).max(until);
    }

    /// Whether the deployment is cooling after a 429 (see [`Breakers::cool`]).
    pub fn cooling(&self, id: &str) -> bool {
        let map = self.cooling.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).is_some_and(|t| *t > Instant::now())
    }

    /// May a request go to this deployment now? In half-open state only one
    /// trial at a time is allowed.
    pub fn allow(&self, id: &str, cfg: &CircuitBreakerConfig) -> bool {
        self.admit(id, cfg).is_some()
    }

    /// `allow`, saying whether the attempt holds the half-open trial.
    pub fn admit(&self, id: &str, cfg: &CircuitBreakerConfig) -> Option<Permit> {
        if cfg.failures == 0 {
            return Some(Permit::Closed);
        }
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = map.get_mut(id) else {
            return Some(Permit::Closed);
        };
        let claim = |e: &mut Entry| {
            let now = Instant::now();
            e.trial = Some(now);
            Some(Permit::Trial(now))
        };
        match e.state {
            BreakerState::Closed => Some(Permit::Closed),
            BreakerState::Open => {
                if e.opened_at.is_some_and(|t| t.elapsed() >= cfg.cooldown) {
                    set_state(id, e, BreakerState::HalfOpen);
                    claim(e)
                } else {
                    None
                }
            }
            BreakerState::HalfOpen => {
                if trial_pending(e, cfg) {
                    None
                } else {
                    claim(e)
                }
            }
        }
    }

    /// Would `allow` let traffic through (without claiming the trial)?
    pub fn is_available(&self, id: &str, cfg: &CircuitBreakerConfig) -> bool {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            None => true,
            Some(e) => match e.state {
                BreakerState::Closed => true,
                BreakerState::Open => e.opened_at.is_some_and(|t| t.elapsed() >= cfg.cooldown),
                BreakerState::HalfOpen => !trial_pending(e, cfg),
            },
        }
    }

    /// How long until an open circuit lets a trial through (None: not
    /// open, or its cooldown is over).
    pub fn reopens_in(&self, id: &str, cfg: &CircuitBreakerConfig) -> Option<Duration> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.get(id)?;
        match e.state {
            BreakerState::Open => e
                .opened_at
                .and_then(|t| cfg.cooldown.checked_sub(t.elapsed()))
                .filter(|d| !d.is_zero()),
            _ => None,
        }
    }

    /// An attempt whose outcome will never come (the client left before the
    /// provider answered): the half-open trial it held, if it held the one
    /// in flight, is free again; nothing is counted either way. An attempt
    /// let through before the circuit opened frees no one else's trial.
    pub fn abandon(&self, id: &str, permit: Permit) {
        let Permit::Trial(at) = permit else {
            return;
        };
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(id).filter(|e| e.trial == Some(at)) {
            e.trial = None;
        }
    }

    /// The outcome of an attempt `admit` let through with `permit`. While
    /// the circuit is open or half-open only the attempt holding the trial
    /// in flight decides it: a long stream let through while the circuit was
    /// still closed, ending well after it opened, says nothing about the
    /// deployment now and must not close it in the middle of an outage. Its
    /// failure is still counted (it is one more sign of trouble), but
    /// neither it nor its success moves the circuit or frees the trial.
    pub fn record(&self, id: &str, cfg: &CircuitBreakerConfig, permit: Permit, success: bool) {
        if cfg.failures == 0 {
            return;
        }
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if success {
            // The common case, and a no-op: a deployment with no entry is
            // closed, and so is one that is closed with nothing counted.
            match map.get(id) {
                None => return,
                Some(e)
                    if e.state == BreakerState::Closed
                        && e.consecutive == 0
                        && e.trial.is_none() =>
                {
                    return
                }
                Some(_) => {}
            }
        }
        let e = map.entry(id.to_string()).or_insert(Entry {
            state: BreakerState::Closed,
            consecutive: 0,
            opened_at: None,
            trial: None,
        });
        let holds_trial = matches!(permit, Permit::Trial(at) if e.trial == Some(at));
        if e.state != BreakerState::Closed && !holds_trial {
            if !success {
                e.consecutive = e.consecutive.saturating_add(1);
            }
            return;
        }
        e.trial = None;
        if success {
            e.consecutive = 0;
            e.opened_at = None;
            set_state(id, e, BreakerState::Closed);
        } else {
            e.consecutive = e.consecutive.saturating_add(1);
            if e.state == BreakerState::HalfOpen || e.consecutive >= cfg.failures {
                e.opened_at = Some(Instant::now());
                set_state(id, e, BreakerState::Open);
            }
        }
    }

    /// Forget the breakers of deployments `keep` rejects (gone from the
    /// running config, or an address DNS no longer gives): the map holds
    /// only current deployments. Their state gauge goes to 0 (closed, what
    /// an unknown deployment is). Returns the ids dropped.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = map.keys().filter(|id| !keep(id)).cloned().collect();
        for id in &gone {
            map.remove(id);
            metrics::gauge!(m::CIRCUIT_STATE, "deployment" => id.clone())
                .set(BreakerState::Closed.gauge());
        }
        gone
    }

    /// Breakers held.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn state(&self, id: &str) -> BreakerState {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map_or(BreakerState::Closed, |e| e.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_and_recovers_through_a_trial() {
        let cfg = CircuitBreakerConfig {
            failures: 3,
            cooldown: Duration::from_millis(50),
        };
        let b = Breakers::default();
        for _ in 0..2 {
            b.record("d", &cfg, Permit::Closed, false);
        }
        assert!(b.allow("d", &cfg));
        b.record("d", &cfg, Permit::Closed, false);
        assert_eq!(b.state("d"), BreakerState::Open);
        assert!(!b.allow("d", &cfg));
        // (When it lets a trial through: a client's Retry-After.)
        assert!(b
            .reopens_in("d", &cfg)
            .is_some_and(|d| d <= Duration::from_millis(50)));
        assert_eq!(b.reopens_in("other", &cfg), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.reopens_in("d", &cfg), None);
        let trial = b.admit("d", &cfg).expect("one trial after the cooldown");
        assert!(!b.allow("d", &cfg), "only one trial at a time");
        b.record("d", &cfg, trial, false);
        assert_eq!(
            b.state("d"),
            BreakerState::Open,
            "a failed trial opens again"
        );
        std::thread::sleep(Duration::from_millis(60));
        let trial = b.admit("d", &cfg).unwrap();
        b.record("d", &cfg, trial, true);
        assert_eq!(b.state("d"), BreakerState::Closed);
        assert!(b.allow("d", &cfg) && b.allow("d", &cfg));
    }

    /// A trial whose outcome never comes (its request dropped) blocks the
    /// deployment for one more cooldown, not for ever.
    #[test]
    fn a_lost_trial_is_given_up_after_a_cooldown() {
        let cfg = CircuitBreakerConfig {
            failures: 1,
            cooldown: Duration::from_millis(500),
        };
        let b = Breakers::default();
        b.record("d", &cfg, Permit::Closed, false);
        std::thread::sleep(Duration::from_millis(520));
        assert!(b.allow("d", &cfg), "the trial");
        assert!(!b.is_available("d", &cfg) && !b.allow("d", &cfg));
        std::thread::sleep(Duration::from_millis(520));
        assert!(b.is_available("d", &cfg));
        let trial = b.admit("d", &cfg).expect("a new trial");
        assert!(!b.allow("d", &cfg), "still one at a time");
        b.record("d", &cfg, trial, true);
        assert_eq!(b.state("d"), BreakerState::Closed);
    }

    /// Only the attempt holding the half-open trial can give it up: one let
    /// through while the circuit was closed, abandoned later, frees nothing.
    #[test]
    fn only_the_trial_gives_up_the_trial() {
        let cfg = CircuitBreakerConfig {
            failures: 1,
            cooldown: Duration::from_millis(200),
        };
        let b = Breakers::default();
        let old = b.admit("d", &cfg).unwrap();
        assert_eq!(old, Permit::Closed);
        b.record("d", &cfg, Permit::Closed, false);
        std::thread::sleep(Duration::from_millis(220));
        let trial = b.admit("d", &cfg).unwrap();
        assert!(matches!(trial, Permit::Trial(_)));
        b.abandon("d", old);
        assert!(b.admit("d", &cfg).is_none(), "the trial is still in flight");
        b.abandon("d", trial);
        assert!(matches!(b.admit("d", &cfg), Some(Permit::Trial(_))));
    }

    /// A long stream let through while the circuit was closed, ending after
    /// it opened, neither closes it nor settles the half-open trial: only the
    /// trial's own outcome does.
    #[test]
    fn only_the_trial_closes_an_open_circuit() {
        let cfg = CircuitBreakerConfig {
            failures: 1,
            cooldown: Duration::from_millis(200),
        };
        let b = Breakers::default();
        let long = b.admit("d", &cfg).unwrap();
        let other = b.admit("d", &cfg).unwrap();
        b.record("d", &cfg, other, false);
        assert_eq!(b.state("d"), BreakerState::Open);
        b.record("d", &cfg, long, true);
        assert_eq!(b.state("d"), BreakerState::Open, "the outage goes on");
        assert!(!b.allow("d", &cfg));
        std::thread::sleep(Duration::from_millis(220));
        let trial = b.admit("d", &cfg).unwrap();
        assert!(matches!(trial, Permit::Trial(_)));
        b.record("d", &cfg, long, true);
        assert_eq!(b.state("d"), BreakerState::HalfOpen);
        assert!(b.admit("d", &cfg).is_none(), "the trial is still in flight");
        b.record("d", &cfg, trial, true);
        assert_eq!(b.state("d"), BreakerState::Closed);
    }

    #[test]
    fn breakers_of_gone_deployments_are_dropped() {
        let cfg = CircuitBreakerConfig {
            failures: 1,
            cooldown: Duration::from_secs(60),
        };
        let b = Breakers::default();
        for i in 0..100 {
            b.record(&format!("p/10.0.0.{i}:443"), &cfg, Permit::Closed, false);
        }
        assert_eq!(b.len(), 100);
        let gone = b.retain(|id| id == "p/10.0.0.7:443");
        assert_eq!((gone.len(), b.len()), (99, 1));
        assert_eq!(b.state("p/10.0.0.7:443"), BreakerState::Open);
        assert_eq!(b.state("p/10.0.0.8:443"), BreakerState::Closed);
    }

    /// A 429 keeps a deployment behind the others for its Retry-After, at
    /// least a second and at most a minute; it opens no circuit.
    #[test]
    fn a_rate_limited_deployment_cools_for_its_retry_after() {
        let b = Breakers::default();
        assert!(!b.cooling("d"));
        b.cool("d", Duration::from_millis(10));
        assert!(b.cooling("d") && !b.cooling("e"));
        std::thread::sleep(Duration::from_millis(50));
        assert!(b.cooling("d"), "a second at least");
        b.cool("e", Duration::from_secs(3600));
        let until = *b.cooling.lock().unwrap().get("e").unwrap();
        assert!(until <= Instant::now() + MAX_COOLING);
        assert_eq!(b.state("d"), BreakerState::Closed);
    }
}
