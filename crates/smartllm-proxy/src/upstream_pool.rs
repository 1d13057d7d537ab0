//! Kept-alive HTTP/1.1 connections to providers, one idle set per proxy
//! thread.
//!
//! Pingora's connection pool watches every idle connection with a task of
//! its own: each release spawns a task that polls the connection, arms an
//! idle timer and waits on two channels, and each reuse wakes that task and
//! waits for it to let go of the connection (and checks with `getpeername`
//! that the descriptor still leads to the peer). On a gateway whose requests
//! take a few hundred microseconds of CPU, that was about a tenth of the
//! plain path's work (`bench/README.md`, "Front door"). Here an idle
//! connection just waits in a per-thread stack, most recently used on top:
//! taking one is a pop and a readiness check, giving one back a push, with
//! no lock, no task and no timer.
//!
//! What the watching task was for is done when a connection is taken: one
//! that the provider closed, or that holds bytes nobody asked for, reads as
//! ready and is dropped (the same check Pingora makes); one idle for longer
//! than the idle limit is dropped unread. A peer's stack is trimmed of expired
//! connections whenever one is given back, every peer's at most once a
//! second ([`SWEEP_EVERY`], so a provider that gets no more traffic does
//! not keep its connections), and a stack holds at most [`MAX_PER_PEER`]. HTTP/2 sessions stay with Pingora's pool (they are
//! shared by many requests, not taken by one).

use pingora_core::protocols::Stream;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Idle connections kept per peer and thread.
pub const MAX_PER_PEER: usize = 256;

struct Idle {
    stream: Stream,
    since: Instant,
}

#[derive(Default)]
struct Pool {
    /// By the peer's reuse hash (address, TLS settings, pool key).
    idle: HashMap<u64, Vec<Idle>>,
    /// When every peer's stack was last trimmed.
    swept: Option<Instant>,
}

/// How often a thread trims the stacks of all its peers (not only the one
/// it is giving a connection back to): a provider that gets no more
/// traffic, or left the config, does not keep its connections open.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static IDLE: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Drop the connections idle for `max_idle` or longer (the oldest are at
/// the bottom of a stack).
fn trim(v: &mut Vec<Idle>, now: Instant, max_idle: Duration) {
    let expired = v
        .iter()
        .take_while(|i| now.duration_since(i.since) >= max_idle)
        .count();
    v.drain(..expired);
}

/// A kept connection to the peer `key`, idle for less than `max_idle`.
pub fn take(key: u64, max_idle: Duration) -> Option<Stream> {
    loop {
        let idle = IDLE.with_borrow_mut(|p| {
            let v = p.idle.get_mut(&key)?;
            let top = v.pop()?;
            if top.since.elapsed() >= max_idle {
                // The newest expired: so did everything under it.
                v.clear();
                return None;
            }
            Some(top)
        })?;
        let mut stream = idle.stream;
        if quiet(&mut stream) {
            return Some(stream);
        }
    }
}

/// Keep `stream` (a finished HTTP/1.1 exchange with the peer `key`).
pub fn put(key: u64, mut stream: Stream, max_idle: Duration) {
    if !quiet(&mut stream) {
        return;
    }
    let now = Instant::now();
    IDLE.with_borrow_mut(|p| {
        if p.swept.is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY) {
            p.swept = Some(now);
            for v in p.idle.values_mut() {
                trim(v, now, max_idle);
            }
            p.idle.retain(|_, v| !v.is_empty());
        }
        let v = p.idle.entry(key).or_default();
        trim(v, now, max_idle);
        if v.len() >= MAX_PER_PEER {
            v.remove(0);
        }
        v.push(Idle { stream, since: now });
    });
}

/// How many connections this thread keeps for the peer `key`.
pub fn idle(key: u64) -> usize {
    IDLE.with_borrow(|p| p.idle.get(&key).map_or(0, Vec::len))
}

/// How many peers this thread keeps connections for.
pub fn peers() -> usize {
    IDLE.with_borrow(|p| p.idle.len())
}

/// Nothing to read: not closed by the peer, no stray bytes. One read that
/// must not wait (`unconstrained`: tokio's cooperative budget could make a
/// ready read look pending).
fn quiet(stream: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    let read = std::pin::pin!(tokio::task::unconstrained(stream.read(&mut buf[..])));
    read.poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (Stream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), l.accept());
        let client: pingora_core::protocols::l4::stream::Stream = client.unwrap().into();
        (Box::new(client), server.unwrap().0)
    }

    #[tokio::test]
    async fn kept_connections_come_back_newest_first_and_closed_ones_do_not() {
        let key = 7;
        let max = Duration::from_secs(60);
        assert!(take(key, max).is_none());
        let (a, mut a_server) = pair().await;
        let (b, b_server) = pair().await;
        put(key, a, max);
        put(key, b, max);
        assert_eq!(idle(key), 2);
        // The provider closes b while it is idle: taking skips it.
        drop(b_server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = take(key, max).expect("a is still open");
        assert_eq!(idle(key), 0);
        // It is a: what a's server writes arrives on it.
        a_server.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        got.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"x");
        // Stray bytes on an idle connection: never handed out.
        put(key, got, max);
        a_server.write_all(b"y").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(take(key, max).is_none());
    }

    #[tokio::test]
    async fn expired_and_surplus_connections_are_dropped() {
        let key = 8;
        let (a, _a_server) = pair().await;
        put(key, a, Duration::from_secs(60));
        assert!(take(key, Duration::ZERO).is_none(), "idle past the limit");
        assert_eq!(idle(key), 0);
        let mut servers = Vec::new();
        for _ in 0..MAX_PER_PEER + 3 {
            let (s, server) = pair().await;
            servers.push(server);
            put(key, s, Duration::from_secs(60));
        }
        assert_eq!(idle(key), MAX_PER_PEER);
    }

    #[tokio::test]
    async fn a_peer_with_no_more_traffic_loses_its_connections_to_the_sweep() {
        let (quiet_peer, _s1) = pair().await;
        put(9, quiet_peer, Duration::from_millis(100));
        assert_eq!(idle(9), 1);
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(50)).await;
        // Traffic to another peer only: the sweep drops peer 9's expired connection.
        let (busy, _s2) = pair().await;
        put(10, busy, Duration::from_millis(100));
        assert_eq!(idle(9), 0);
        assert_eq!(peers(), 1);
    }
}
