//! `server:` and `admin:` of `smartllm.yaml`: the listeners, client and
//! upstream timeouts, overload bounds, and the admin API's token (required
//! when the admin listener is reachable beyond loopback).

use super::{dur, relative_to};
use crate::raw::{RawAdmin, RawServer, RawTls};
use crate::{ApiKeySource, Issues, ServerConfig, TlsConfig, MAIN_FILE};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::Path;

/// An address setting, or its default when it is missing or invalid.
fn addr(v: &mut Issues<'_>, path: &str, value: Option<String>, default: &str) -> SocketAddr {
    let value = value.unwrap_or_else(|| default.to_string());
    value.parse().unwrap_or_else(|_| {
        v.push(
            MAIN_FILE,
            path,
            format!("{value:?} is not an address like 127.0.0.1:8080"),
        );
        default.parse().expect("default address")
    })
}

/// `server.tls` or `server.admin_tls` (`at`): the paths, resolved against the
/// config directory (the files themselves are checked by [`check_tls`]).
fn resolve_tls(dir: &Path, at: &str, t: RawTls, v: &mut Issues<'_>) -> Option<TlsConfig> {
    let mut ok = true;
    for (key, value) in [
        ("cert_file", Some(&t.cert_file)),
        ("key_file", Some(&t.key_file)),
        ("client_ca_file", t.client_ca_file.as_ref()),
    ] {
        if value.is_some_and(|f| f.trim().is_empty()) {
            v.push(MAIN_FILE, format!("{at}.{key}"), "must name a PEM file");
            ok = false;
        }
    }
    ok.then(|| TlsConfig {
        cert_file: relative_to(dir, &t.cert_file),
        key_file: relative_to(dir, &t.key_file),
        client_ca_file: t.client_ca_file.map(|f| relative_to(dir, &f)),
    })
}

/// Check the TLS files of both listeners (readable PEM, the key matches the
/// certificate, usable client CAs), naming the setting and the file that is
/// wrong, and return `digest` extended with their contents: a new
/// certificate is a new config, which a reload applies.
pub(super) fn check_tls(digest: &str, server: &ServerConfig, v: &mut Issues<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(digest.as_bytes());
    for (at, tls) in [
        ("server.tls", &server.tls),
        ("server.admin_tls", &server.admin_tls),
    ] {
        let Some(tls) = tls else { continue };
        if let Err(e) = crate::tls::load(tls) {
            v.push(MAIN_FILE, format!("{at}.{}", e.key()), e.to_string());
            continue;
        }
        for (key, path) in crate::tls::files(tls) {
            // Read again: what was checked is what the digest covers, unless a
            // file changed in between, which the watcher reports anyway.
            match std::fs::read(path) {
                Ok(bytes) => {
                    hasher.update(at.as_bytes());
                    hasher.update(key.as_bytes());
                    hasher.update([0]);
                    hasher.update(&bytes);
                }
                Err(e) => v.push(
                    MAIN_FILE,
                    format!("{at}.{key}"),
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
        }
    }
    if server.tls.is_none() && server.admin_tls.is_none() {
        return digest.to_string();
    }
    hex::encode(&hasher.finalize()[..8])
}

pub(super) fn resolve_server(dir: &Path, s: RawServer, v: &mut Issues<'_>) -> ServerConfig {
    let listen = addr(v, "server.listen", s.listen, "127.0.0.1:8080");
    let admin_listen = addr(v, "server.admin_listen", s.admin_listen, "127.0.0.1:9090");
    if listen == admin_listen {
        v.push(
            MAIN_FILE,
            "server.admin_listen",
            "must differ from server.listen",
        );
    }
    let threads = s.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    if threads == 0 || threads > 1024 {
        v.push(MAIN_FILE, "server.threads", "must be between 1 and 1024");
    }
    let max_body_bytes = s.max_body_size.map(|b| b.0).unwrap_or(32 << 20);
    if max_body_bytes < 1024 {
        v.push(MAIN_FILE, "server.max_body_size", "must be at least 1KiB");
    }
    let max_header_bytes = s.max_header_size.map(|b| b.0).unwrap_or(32 << 10);
    if max_header_bytes < 1024 {
        v.push(MAIN_FILE, "server.max_header_size", "must be at least 1KiB");
    }
    let upstream_attempts = s.upstream_attempts.unwrap_or(3);
    if upstream_attempts == 0 || upstream_attempts > 10 {
        v.push(
            MAIN_FILE,
            "server.upstream_attempts",
            "must be between 1 and 10",
        );
    }
    let max_in_flight = s.max_in_flight.unwrap_or(4096);
    if !(1..=1_000_000).contains(&max_in_flight) {
        v.push(
            MAIN_FILE,
            "server.max_in_flight",
            "must be between 1 and 1000000",
        );
    }
    for (key, value) in [
        ("server.client_body_timeout", &s.client_body_timeout),
        ("server.client_header_timeout", &s.client_header_timeout),
        ("server.client_body_deadline", &s.client_body_deadline),
        ("server.keepalive_timeout", &s.keepalive_timeout),
        ("server.client_write_timeout", &s.client_write_timeout),
        // Zero would fail every upstream request at once.
        (
            "server.upstream_connect_timeout",
            &s.upstream_connect_timeout,
        ),
        (
            "server.upstream_first_byte_timeout",
            &s.upstream_first_byte_timeout,
        ),
        ("server.upstream_idle_timeout", &s.upstream_idle_timeout),
    ] {
        if value.as_ref().is_some_and(|d| d.0.is_zero()) {
            v.push(MAIN_FILE, key, "must be greater than 0");
        }
    }
    ServerConfig {
        listen,
        admin_listen,
        threads: threads.clamp(1, 1024),
        max_body_bytes,
        max_header_bytes,
        client_body_timeout: dur(s.client_body_timeout, 30),
        client_header_timeout: dur(s.client_header_timeout, 10),
        client_body_deadline: dur(s.client_body_deadline, 300),
        keepalive_timeout: dur(s.keepalive_timeout, 60),
        client_write_timeout: dur(s.client_write_timeout, 60),
        http1_pipelining: s.http1_pipelining.unwrap_or(true),
        upstream_connect_timeout: dur(s.upstream_connect_timeout, 5),
        upstream_first_byte_timeout: dur(s.upstream_first_byte_timeout, 600),
        upstream_idle_timeout: dur(s.upstream_idle_timeout, 120),
        upstream_attempts: upstream_attempts.clamp(1, 10),
        max_in_flight: max_in_flight.clamp(1, 1_000_000),
        grace_period: dur(s.grace_period, 0),
        graceful_shutdown_timeout: dur(s.graceful_shutdown_timeout, 30),
        drain_delay: dur(s.drain_delay, 0),
        tls: s.tls.and_then(|t| resolve_tls(dir, "server.tls", t, v)),
        admin_tls: s
            .admin_tls
            .and_then(|t| resolve_tls(dir, "server.admin_tls", t, v)),
        h2c: s.h2c.unwrap_or(false),
    }
}

/// Where the admin API token comes from. Fails closed: without a token the
/// admin listener must be a loopback address.
pub(super) fn resolve_admin_token(
    dir: &Path,
    admin: RawAdmin,
    admin_listen: SocketAddr,
    v: &mut Issues<'_>,
) -> ApiKeySource {
    match (admin.token_env, admin.token_file) {
        (None, None) if !admin_listen.ip().is_loopback() => {
            // Fail closed: the admin API (config, costs, cache purge) is
            // never open beyond this host.
            v.push(
                MAIN_FILE,
                "server.admin_listen",
                format!(
                    "{admin_listen} is not a loopback address: set admin.token_env or admin.token_file so the admin API needs a token"
                ),
            );
            ApiKeySource::None
        }
        (Some(_), Some(_)) => {
            v.push(
                MAIN_FILE,
                "admin.token_file",
                "set admin.token_env or admin.token_file, not both",
            );
            ApiKeySource::None
        }
        (Some(e), None) => ApiKeySource::Env(e),
        (None, Some(f)) => ApiKeySource::File(relative_to(dir, &f)),
        (None, None) => ApiKeySource::None,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;
    use std::time::Duration;

    #[test]
    fn an_admin_listener_beyond_loopback_needs_a_token() {
        let main = "server:\n  admin_listen: 0.0.0.0:9090\n";
        let dir = write_dir(&[(MAIN_FILE, main)]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains(
                "smartllm.yaml:2: server.admin_listen: 0.0.0.0:9090 is not a loopback address"
            ),
            "{text}"
        );
        let with_token = format!("{main}admin:\n  token_env: SMARTLLM_ADMIN_TOKEN\n");
        let dir = write_dir(&[(MAIN_FILE, &with_token)]);
        assert!(load_dir(dir.path()).is_ok());
        // Loopback (the default) needs none.
        let dir = write_dir(&[(MAIN_FILE, "server:\n  admin_listen: '[::1]:9090'\n")]);
        assert!(load_dir(dir.path()).is_ok());
    }

    const CERT: &str = include_str!("../testdata/cert.pem");
    const KEY: &str = include_str!("../testdata/key.pem");
    const OTHER_KEY: &str = include_str!("../testdata/other-key.pem");

    #[test]
    fn tls_files_are_checked_resolved_and_in_the_digest() {
        let tls = "server:\n  h2c: true\n  tls:\n    cert_file: cert.pem\n    key_file: key.pem\n";
        let dir = write_dir(&[(MAIN_FILE, tls), ("cert.pem", CERT), ("key.pem", KEY)]);
        let c = load_dir(dir.path()).unwrap();
        let t = c.server.tls.as_ref().unwrap();
        assert_eq!(t.cert_file, dir.path().join("cert.pem"));
        assert_eq!(t.key_file, dir.path().join("key.pem"));
        assert!(t.client_ca_file.is_none());
        assert!(c.server.h2c);
        assert!(tls::load(t).is_ok());
        // New contents, same paths: a new digest (a reload applies them).
        std::fs::write(dir.path().join("key.pem"), OTHER_KEY).unwrap();
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:5: server.tls.key_file: the private key in")
                && text.contains("key.pem does not match the certificate in")
                && text.contains("cert.pem"),
            "{text}"
        );
        std::fs::write(dir.path().join("key.pem"), KEY).unwrap();
        std::fs::write(dir.path().join("cert.pem"), format!("\n{CERT}")).unwrap();
        assert_ne!(load_dir(dir.path()).unwrap().digest, c.digest);
        // Defaults: plaintext, HTTP/1.1 only.
        let plain = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert!(plain.server.tls.is_none() && !plain.server.h2c);
    }

    #[test]
    fn bad_tls_files_name_the_setting_and_the_file() {
        let main = "server:\n  tls:\n    cert_file: cert.pem\n    key_file: key.pem\n    client_ca_file: ca.pem\n";
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[], "smartllm.yaml:3: server.tls.cert_file: cannot read"),
            (
                &[("cert.pem", "junk"), ("key.pem", KEY), ("ca.pem", CERT)],
                "server.tls.cert_file: ",
            ),
            (
                &[("cert.pem", CERT), ("key.pem", CERT), ("ca.pem", CERT)],
                "smartllm.yaml:4: server.tls.key_file: ",
            ),
            (
                &[("cert.pem", CERT), ("key.pem", KEY)],
                "smartllm.yaml:5: server.tls.client_ca_file: cannot read",
            ),
            (
                &[("cert.pem", CERT), ("key.pem", KEY), ("ca.pem", KEY)],
                "smartllm.yaml:5: server.tls.client_ca_file: ",
            ),
        ];
        for (files, want) in cases {
            let mut all = vec![(MAIN_FILE, main)];
            all.extend_from_slice(files);
            let text = load_dir(write_dir(&all).path()).unwrap_err().to_string();
            assert!(text.contains(want), "{want}: {text}");
            // Every message names a file.
            assert!(text.contains(".pem"), "{text}");
        }
        let dir = write_dir(&[
            (MAIN_FILE, main),
            ("cert.pem", CERT),
            ("key.pem", KEY),
            ("ca.pem", CERT),
        ]);
        let c = load_dir(dir.path()).unwrap();
        let m = tls::load(c.server.tls.as_ref().unwrap()).unwrap();
        assert_eq!(m.client_roots.unwrap().len(), 1);
        let empty = "server:\n  tls:\n    cert_file: ''\n    key_file: key.pem\n";
        let text = load_dir(write_dir(&[(MAIN_FILE, empty)]).path())
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("smartllm.yaml:3: server.tls.cert_file: must name a PEM file"),
            "{text}"
        );
        let typo = "server:\n  tls:\n    cert: a.pem\n";
        assert!(load_dir(write_dir(&[(MAIN_FILE, typo)]).path()).is_err());
    }

    #[test]
    fn admin_tls_is_checked_like_the_api_listeners() {
        let main = "server:\n  admin_tls:\n    cert_file: cert.pem\n    key_file: key.pem\n";
        let dir = write_dir(&[
            (MAIN_FILE, main),
            ("cert.pem", CERT),
            ("key.pem", OTHER_KEY),
        ]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:4: server.admin_tls.key_file: the private key in"),
            "{text}"
        );
        std::fs::write(dir.path().join("key.pem"), KEY).unwrap();
        let c = load_dir(dir.path()).unwrap();
        assert!(c.server.tls.is_none());
        assert_eq!(
            c.server.admin_tls.as_ref().unwrap().cert_file,
            dir.path().join("cert.pem")
        );
        let plain = load_dir(write_dir(&[(MAIN_FILE, "")]).path()).unwrap();
        assert_eq!(
            plain.restart_only_changes(&c),
            ["server.admin_tls: off -> on"]
        );
        assert!(plain.with_restart_only_from(c).server.admin_tls.is_none());
    }

    #[test]
    fn tls_on_off_and_h2c_need_a_restart_new_files_do_not() {
        let files = |main: &str| {
            write_dir(&[
                (MAIN_FILE, main),
                ("cert.pem", CERT),
                ("key.pem", KEY),
                ("key2.pem", KEY),
            ])
        };
        let on = "server:\n  tls:\n    cert_file: cert.pem\n    key_file: key.pem\n";
        let (a, b) = (files(""), files(on));
        let plain = load_dir(a.path()).unwrap();
        let tls = load_dir(b.path()).unwrap();
        assert_eq!(plain.restart_only_changes(&tls), ["server.tls: off -> on"]);
        assert!(plain
            .with_restart_only_from(tls.clone())
            .server
            .tls
            .is_none());
        assert!(tls
            .with_restart_only_from(plain.clone())
            .server
            .tls
            .is_some());
        let moved = files(
            "server:\n  h2c: true\n  tls:\n    cert_file: cert.pem\n    key_file: key2.pem\n",
        );
        let moved = load_dir(moved.path()).unwrap();
        assert_eq!(
            tls.restart_only_changes(&moved),
            ["server.h2c: false -> true"]
        );
        let applied = tls.with_restart_only_from(moved);
        assert!(applied.server.tls.unwrap().key_file.ends_with("key2.pem"));
        assert!(!applied.server.h2c);
    }

    #[test]
    fn client_timeouts_are_validated_and_default_sensibly() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  client_header_timeout: 0s\n  client_body_deadline: 0ms\n  keepalive_timeout: 0s\n  http1_pipelining: false\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        for (line, key) in [
            (2, "client_header_timeout"),
            (3, "client_body_deadline"),
            (4, "keepalive_timeout"),
        ] {
            assert!(
                text.contains(&format!("smartllm.yaml:{line}: server.{key}")),
                "{text}"
            );
        }
        let c = load_dir(write_dir(&[(MAIN_FILE, "data_dir: /tmp/x\n")]).path()).unwrap();
        assert_eq!(c.server.client_header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.client_body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.client_body_deadline, Duration::from_secs(300));
        assert_eq!(c.server.keepalive_timeout, Duration::from_secs(60));
        assert!(c.server.http1_pipelining);
        assert_eq!(c.store.memory_budget, 128 << 20);
        let dir = write_dir(&[(MAIN_FILE, "store:\n  memory_budget: 1MiB\n")]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:2: store.memory_budget"),
            "{text}"
        );
    }

    #[test]
    fn upstream_timeouts_of_zero_are_refused() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "server:\n  upstream_connect_timeout: 0s\n  upstream_first_byte_timeout: 0ms\n  upstream_idle_timeout: 0\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        for (line, key) in [
            (2, "upstream_connect_timeout"),
            (3, "upstream_first_byte_timeout"),
            (4, "upstream_idle_timeout"),
        ] {
            assert!(
                text.contains(&format!(
                    "smartllm.yaml:{line}: server.{key}: must be greater than 0"
                )),
                "{text}"
            );
        }
        let ok = "server:\n  upstream_connect_timeout: 1s\n  upstream_first_byte_timeout: 30s\n  upstream_idle_timeout: 1m\n";
        let c = load_dir(write_dir(&[(MAIN_FILE, ok)]).path()).unwrap();
        assert_eq!(c.server.upstream_connect_timeout, Duration::from_secs(1));
        assert_eq!(c.server.upstream_idle_timeout, Duration::from_secs(60));
    }

    /// A duration past ten years (or past what `Duration` holds) is refused
    /// at its key and line, not a panic or an overflow later.
    #[test]
    fn huge_durations_are_refused_with_their_line() {
        for value in [
            "18446744073709551615",
            "1e20",
            "'99999999999999999999s'",
            "'6000000000000000h'",
        ] {
            let main = format!("data_dir: /tmp/x\nserver:\n  grace_period: {value}\n");
            let text = load_dir(write_dir(&[(MAIN_FILE, &main)]).path())
                .unwrap_err()
                .to_string();
            assert!(
                text.contains("smartllm.yaml:3: server.grace_period: invalid duration"),
                "{value}: {text}"
            );
        }
        let main = "server:\n  grace_period: 87600h\n";
        let c = load_dir(write_dir(&[(MAIN_FILE, main)]).path()).unwrap();
        assert_eq!(c.server.grace_period, Duration::from_secs(315_360_000));
    }
}
