//! TLS and HTTP/2 on the API listener: https with a test CA (curl and the
//! official openai SDK), HTTP/2 by ALPN with SSE streams and many concurrent
//! streams on one connection, 2 MiB bodies over h2 with and without a
//! content-length, cleartext prior-knowledge h2c, client
//! certificates (on the admin listener too, with the CLI), `smartllm check` on
//! a key that does not match its certificate, a certificate swap under load
//! that fails no request, and a graceful upgrade of a TLS listener.
//! The certificates are made at test time with the `openssl` CLI (`make deps`
//! installs it); the clients are `curl` (with nghttp2) and Python.

use crate::common::*;
use serde_json::json;
use smartllm_e2e::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A CA (`ca.pem`, `ca.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A leaf certificate `{out}.pem` with key `{out}.key`, signed by CA `ca`:
/// a server certificate for `localhost` (organisation `org`, which tells
/// certificates apart in curl's output), or a client certificate.
fn make_leaf(dir: &Path, ca: &str, out: &str, org: &str, server: bool) {
    std::fs::write(
        dir.join(format!("{out}.cnf")),
        if server {
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
        } else {
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{out}.key"),
            "-out",
            &format!("{out}.csr"),
            "-subj",
            &format!("/CN=localhost/O={org}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{out}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{out}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{out}.cnf"),
        ],
    );
}

/// A test PKI: CA `ca`, server certificate `server` (O=gen1) and `server2`
/// (O=gen2), both for localhost and signed by `ca`.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path(), "ca");
    make_leaf(dir.path(), "ca", "server", "gen1", true);
    make_leaf(dir.path(), "ca", "server2", "gen2", true);
    dir
}

fn tls_section(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n{extra}",
        cert.display(),
        key.display()
    )
}

/// A gateway whose API listener serves `pki`'s `server` certificate.
fn tls_gateway(pki: &Path, extra: &str, mock_args: &[&str]) -> (Mock, Gateway) {
    basic(
        &tls_section(&pki.join("server.pem"), &pki.join("server.key"), extra),
        mock_args,
    )
}

fn https(gw: &Gateway, path: &str) -> String {
    format!("https://localhost:{}{path}", gw.config.port)
}

/// curl with the test CA, trusting `localhost` to be the gateway.
fn curl(gw: &Gateway, pki: &Path, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(pki.join("ca.pem"))
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", gw.config.port),
        ])
        .args(args)
        .output()
        .expect("curl")
}

fn chat_args(body: &serde_json::Value) -> Vec<String> {
    vec![
        "-H".into(),
        "content-type: application/json".into(),
        "-H".into(),
        "authorization: Bearer sk-test".into(),
        "-d".into(),
        body.to_string(),
    ]
}

fn out_text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Splits curl's output of a body followed by `-w "\n%{http_version} %{http_code}"`.
fn body_and_meta(o: &Output) -> (String, String) {
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, meta) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_string(), meta.trim().to_string())
}

#[test]
fn tls_serves_https_and_h2_with_sse_streams() {
    let pki = pki();
    let (_mock, gw) = tls_gateway(pki.path(), "", &["--chunk-delay-ms", "2"]);
    let listener = &get(&gw.admin, "/readyz").json()["listener"];
    assert_eq!(listener["ready"], true, "{listener}");
    assert_eq!(listener["h2c"], false, "{listener}");
    assert_eq!(
        listener["tls"]["certificate_sha256"],
        sha256_of_cert(&pki.path().join("server.pem")),
        "{listener}"
    );
    assert_eq!(listener["tls"]["client_certificates"], false);
    let url = https(&gw, "/v1/chat/completions");
    let meta = ["-w", "\n%{http_version} %{http_code}"];
    // HTTP/1.1 over TLS, then HTTP/2 chosen by ALPN; JSON and SSE on both.
    for (version, flag) in [("1.1", "--http1.1"), ("2", "--http2")] {
        let body = chat_args(&chat_body("small", "over tls"));
        let mut args: Vec<&str> = vec![flag, &url];
        args.extend(meta);
        args.extend(body.iter().map(String::as_str));
        let o = curl(&gw, pki.path(), &args);
        let (text, m) = body_and_meta(&o);
        assert_eq!(m, format!("{version} 200"), "{}", out_text(&o));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("over tls"),
            "{text}"
        );
        let body = chat_args(&json!({"model": "small", "stream": true,
            "messages": [{"role": "user", "content": format!("stream over http {version}")}]}));
        let mut args: Vec<&str> = vec![flag, "-N", &url];
        args.extend(meta);
        args.extend(body.iter().map(String::as_str));
        let o = curl(&gw, pki.path(), &args);
        let (text, m) = body_and_meta(&o);
        assert_eq!(m, format!("{version} 200"), "{}", out_text(&o));
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert!(
            streamed_text(&data).starts_with(&format!("Mock reply to: stream over http {version}")),
            "{text}"
        );
    }
    // The admin listener stays plaintext; the API listener speaks only TLS.
    assert_eq!(get(&gw.admin, "/readyz").status, 200);
    assert!(request(&gw.addr, "GET", "/v1/models", &[], b"").map_or(true, |r| r.status != 200));
    // Without the CA the certificate is not trusted.
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve"])
        .arg(format!("localhost:{}:127.0.0.1", gw.config.port))
        .arg(https(&gw, "/v1/models"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", out_text(&o));
}

#[test]
fn many_concurrent_sse_streams_share_one_h2_connection() {
    let pki = pki();
    let (mock, gw) = tls_gateway(pki.path(), "", &["--chunk-delay-ms", "20", "--words", "30"]);
    let url = https(&gw, "/v1/chat/completions");
    let before = mock.requests();
    const N: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    // One curl, N transfers in parallel: curl waits for the first connection's
    // ALPN and multiplexes every stream on it.
    let mut args: Vec<String> = vec![
        "--http2".into(),
        "-N".into(),
        "--parallel".into(),
        "--parallel-max".into(),
        N.to_string(),
        "-w".into(),
        "%{http_version} %{http_code} %{num_connects}\\n".into(),
    ];
    for i in 0..N {
        if i > 0 {
            args.push("--next".into());
            args.extend(["--http2".into(), "-N".into()]);
            args.extend([
                "-w".into(),
                "%{http_version} %{http_code} %{num_connects}\\n".into(),
            ]);
        }
        args.push(url.clone());
        args.extend(chat_args(&json!({"model": "small", "stream": true,
            "messages": [{"role": "user", "content": format!("stream {i} of many")}]})));
        args.push("-o".into());
        args.push(dir.path().join(format!("{i}.sse")).display().to_string());
        args.extend([
            "--cacert".into(),
            pki.path().join("ca.pem").display().to_string(),
        ]);
        args.extend([
            "--resolve".into(),
            format!("localhost:{}:127.0.0.1", gw.config.port),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = curl(&gw, pki.path(), &args);
    assert!(o.status.success(), "{}", out_text(&o));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), N, "{}", out_text(&o));
    let mut connects = 0;
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(&f[..2], ["2", "200"], "{l}");
        connects += f[2].parse::<u32>().unwrap();
    }
    assert_eq!(connects, 1, "every stream on one connection: {lines:?}");
    for i in 0..N {
        let text = std::fs::read_to_string(dir.path().join(format!("{i}.sse"))).unwrap();
        let data = sse_data(&text);
        assert_eq!(
            data.last().map(String::as_str),
            Some("[DONE]"),
            "{i}: {text}"
        );
        assert!(
            streamed_text(&data).starts_with(&format!("Mock reply to: stream {i} of many")),
            "{i}: {text}"
        );
    }
    assert_eq!(mock.requests() - before, N as u64);
}

#[test]
fn h2c_prior_knowledge_when_enabled_http1_still_served() {
    let (_mock, gw) = basic("  h2c: true\n", &["--chunk-delay-ms", "2"]);
    let url = format!("http://{}/v1/chat/completions", gw.addr);
    let h2c = |body: &serde_json::Value| {
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "-N".into(),
            "--max-time".into(),
            "30".into(),
            "--http2-prior-knowledge".into(),
            url.clone(),
            "-w".into(),
            "\n%{http_version} %{http_code}".into(),
        ];
        args.extend(chat_args(body));
        Command::new("curl").args(&args).output().unwrap()
    };
    let o = h2c(&chat_body("small", "h2c hello"));
    let (text, m) = body_and_meta(&o);
    assert_eq!(m, "2 200", "{}", out_text(&o));
    assert!(text.contains("Mock reply to: h2c hello"), "{text}");
    let o = h2c(
        &json!({"model": "small", "stream": true, "messages": [{"role": "user", "content": "h2c stream"}]}),
    );
    let (text, m) = body_and_meta(&o);
    assert_eq!(m, "2 200", "{}", out_text(&o));
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(streamed_text(&data).starts_with("Mock reply to: h2c stream"));
    // HTTP/1.1 on the same port.
    assert_eq!(gw.chat(&chat_body("small", "h1 too")).status, 200);
    drop(gw);

    // A connection that says nothing, or half a preface, is closed after
    // the header timeout: the wait for the h2c preface is bounded too.
    let (_mock, gw) = basic("  h2c: true\n  client_header_timeout: 1s\n", &[]);
    for sent in [&b""[..], b"PRI * HT"] {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&gw.addr).unwrap();
        c.write_all(sent).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let t = std::time::Instant::now();
        let mut buf = [0u8; 64];
        // Closed (end of stream, or a reset) well before the 8 s read timeout.
        let r = c.read(&mut buf);
        let waited = t.elapsed();
        assert!(
            waited < Duration::from_secs(5) && matches!(r, Ok(0) | Err(_)),
            "sent {sent:?}: {r:?} after {waited:?}"
        );
    }
    drop(gw);

    // Off by default: a prior-knowledge client gets no HTTP/2.
    let (_mock, gw) = basic("", &[]);
    let url = format!("http://{}/v1/models", gw.addr);
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_version}",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() || !String::from_utf8_lossy(&o.stdout).ends_with("\n2"),
        "{}",
        out_text(&o)
    );
    assert_eq!(gw.chat(&chat_body("small", "plain")).status, 200);
}

#[test]
fn official_openai_python_sdk_over_https_and_h2_with_a_test_ca() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the openai package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let pki = pki();
    let (_mock, gw) = tls_gateway(pki.path(), "", &["--chunk-delay-ms", "2"]);
    let run = |ca: &Path| {
        Command::new(&python)
            .arg(workspace_root().join("tests/python/openai_client.py"))
            .arg(https(&gw, "/v1"))
            .env("SSL_CERT_FILE", ca)
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let out = run(&pki.path().join("ca.pem"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", out_text(&out));
    for want in ["plain ok", "stream ok", "error ok", "anthropic ok"] {
        assert!(stdout.contains(want), "{stdout}");
    }
    // Over HTTP/2 (httpx with http2=True): plain, eight concurrent streams, an error.
    let out = Command::new(&python)
        .arg(workspace_root().join("tests/python/openai_h2.py"))
        .arg(https(&gw, "/v1"))
        .arg(pki.path().join("ca.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", out_text(&out));
    for want in ["h2 plain ok", "h2 streams ok", "h2 error ok"] {
        assert!(stdout.contains(want), "{stdout}");
    }
    // Trusting another CA, the SDK refuses the gateway's certificate.
    let other = tempfile::tempdir().unwrap();
    make_ca(other.path(), "ca");
    let out = run(&other.path().join("ca.pem"));
    assert!(!out.status.success(), "{}", out_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CERTIFICATE_VERIFY_FAILED")
            || String::from_utf8_lossy(&out.stderr).contains("APIConnectionError"),
        "{}",
        out_text(&out)
    );
}

#[test]
fn official_anthropic_sdk_over_https_and_h2_with_a_test_ca() {
    let python = match std::env::var("SMARTLLM_PYTHON") {
        Ok(p) => p,
        Err(_) if std::env::var("SMARTLLM_SKIP_PYTHON").is_ok() => return,
        Err(_) => panic!("set SMARTLLM_PYTHON to a python with the anthropic package (make test does), or SMARTLLM_SKIP_PYTHON=1"),
    };
    let pki = pki();
    let (_mock, gw) = tls_gateway(pki.path(), "", &["--words", "12"]);
    let out = Command::new(&python)
        .arg(workspace_root().join("tests/python/anthropic_client.py"))
        .arg(https(&gw, ""))
        .arg(pki.path().join("ca.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", out_text(&out));
    for want in [
        "h2 ok",
        "create ok",
        "stream ok",
        "tools ok",
        "count ok",
        "models ok",
        "errors ok",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
}

#[test]
fn client_certificates_are_required_with_client_ca_file() {
    let pki = pki();
    make_ca(pki.path(), "clients");
    make_leaf(pki.path(), "clients", "alice", "alice", false);
    // A certificate the client CA did not sign.
    make_leaf(pki.path(), "ca", "mallory", "mallory", false);
    let ca_line = format!(
        "    client_ca_file: {}\n",
        pki.path().join("clients.pem").display()
    );
    let (_mock, gw) = tls_gateway(pki.path(), &ca_line, &[]);
    let url = https(&gw, "/v1/chat/completions");
    let body = chat_args(&chat_body("small", "mutual tls"));
    let with = |cert: Option<&str>| {
        let mut args: Vec<String> = vec![url.clone(), "-w".into(), "\n%{http_code}".into()];
        if let Some(c) = cert {
            args.extend([
                "--cert".into(),
                pki.path().join(format!("{c}.pem")).display().to_string(),
                "--key".into(),
                pki.path().join(format!("{c}.key")).display().to_string(),
            ]);
        }
        args.extend(body.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&gw, pki.path(), &args)
    };
    let o = with(Some("alice"));
    assert_eq!(body_and_meta(&o).1, "200", "{}", out_text(&o));
    for cert in [None, Some("mallory")] {
        let o = with(cert);
        assert_ne!(body_and_meta(&o).1, "200", "{cert:?}: {}", out_text(&o));
        assert!(!o.status.success(), "{cert:?}: {}", out_text(&o));
    }
}

#[test]
fn check_and_reload_reject_a_key_that_does_not_match_its_certificate() {
    let pki = pki();
    let (_mock, gw) = tls_gateway(pki.path(), "", &[]);
    // `smartllm check` names the setting, the line and both files.
    let bad = ConfigDir::new(
        &tls_section(
            &pki.path().join("server.pem"),
            &pki.path().join("server2.key"),
            "",
        ),
        "",
        "",
        "",
        "",
    );
    let out = Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(bad.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    assert!(
        err.contains("smartllm.yaml:")
            && err.contains("server.tls.key_file: the private key in")
            && err.contains("server2.key does not match the certificate in")
            && err.contains("server.pem"),
        "{err}"
    );
    let good = ConfigDir::new(
        &tls_section(
            &pki.path().join("server.pem"),
            &pki.path().join("server.key"),
            "",
        ),
        "",
        "",
        "",
        "",
    );
    let out = Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(good.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(
        said.contains("TLS: ")
            && said.contains("server.pem with the matching key")
            && said.contains(&sha256_of_cert(&pki.path().join("server.pem"))),
        "{said}"
    );
    let missing = ConfigDir::new(
        &tls_section(Path::new("nope.pem"), &pki.path().join("server.key"), ""),
        "",
        "",
        "",
        "",
    );
    let out = Command::new(bin("smartllm"))
        .args(["check", "--config"])
        .arg(missing.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tls.cert_file: cannot read") && err.contains("nope.pem"),
        "{err}"
    );
    // A running gateway rejects the same mistake on reload and keeps serving
    // its certificate.
    std::fs::copy(
        pki.path().join("server2.key"),
        pki.path().join("server.key"),
    )
    .unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .metric("smartllm_config_reloads_total", &[("result", "error")])
            >= 1.0),
        "{}",
        gw.log_text()
    );
    assert!(
        gw.log_text()
            .contains("server.key does not match the certificate"),
        "{}",
        gw.log_text()
    );
    let o = curl(&gw, pki.path(), &["-v", &https(&gw, "/v1/models")]);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("O=gen1"),
        "{}",
        out_text(&o)
    );
}

/// The organisation of the certificate a new handshake gets.
fn served_org(gw: &Gateway, pki: &Path) -> String {
    let o = curl(
        gw,
        pki,
        &["-v", "-o", "/dev/null", &https(gw, "/v1/models")],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{}", out_text(&o));
    ["gen1", "gen2", "gen3"]
        .into_iter()
        .find(|g| err.contains(&format!("O={g}")))
        .unwrap_or("?")
        .to_string()
}

/// The sha256 of a PEM certificate's DER, in lowercase hex (as `/readyz` shows it).
fn sha256_of_cert(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.trim().rsplit('=').next().unwrap_or_default();
    hex.replace(':', "").to_lowercase()
}

/// Replace `dst` atomically (write + rename), as certificate tools do.
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn certificate_swap_under_load_fails_no_request() {
    let pki = pki();
    // The served files live outside the config directory, where a
    // certificate tool would put them; the gateway watches their directory.
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(pki.path().join("server.pem"), &cert).unwrap();
    std::fs::copy(pki.path().join("server.key"), &key).unwrap();
    // Answers of 400 words, 10 ms apart: the long stream below spans the
    // swaps; the load's requests ask for 6 tokens.
    let (_mock, gw) = basic(
        &tls_section(&cert, &key, ""),
        &["--chunk-delay-ms", "10", "--words", "400"],
    );
    assert_eq!(served_org(&gw, pki.path()), "gen1");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let url = https(&gw, "/v1/chat/completions");
    // A long h2 stream on a connection opened before the swap: it must end
    // normally after it.
    let long = {
        let body = chat_args(&json!({"model": "small", "stream": true, "max_tokens": 400,
            "messages": [{"role": "user", "content": "a long stream across the swap"}]}));
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "-N".into(),
            "--http2".into(),
            "--max-time".into(),
            "60".into(),
            "--cacert".into(),
            pki.path().join("ca.pem").display().to_string(),
            "--resolve".into(),
            format!("localhost:{}:127.0.0.1", gw.config.port),
            url.clone(),
        ];
        args.extend(body);
        std::thread::spawn(move || Command::new("curl").args(&args).output().unwrap())
    };
    // Load: each worker runs batches of requests, each on a new connection
    // (a new handshake), alternating HTTP/1.1 and HTTP/2, streamed and not.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (stop, ok, failed, failures) =
                (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            let (url, ca, port) = (
                url.clone(),
                pki.path().join("ca.pem"),
                gw.config.port,
            );
            std::thread::spawn(move || {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let stream = (w + round) % 2 == 0;
                    let version = if w % 2 == 0 { "--http1.1" } else { "--http2" };
                    let mut args: Vec<String> = Vec::new();
                    for i in 0..8 {
                        if i > 0 {
                            args.push("--next".into());
                        }
                        args.push(version.into());
                        if version == "--http1.1" {
                            // A new connection (and handshake) for every request.
                            args.extend(["-H".into(), "connection: close".into()]);
                        }
                        args.extend([
                            "--cacert".into(),
                            ca.display().to_string(),
                            "--resolve".into(),
                            format!("localhost:{port}:127.0.0.1"),
                            "-w".into(),
                            "\\n=%{http_code}\\n".into(),
                            url.clone(),
                        ]);
                        args.extend(chat_args(&json!({"model": "small", "stream": stream, "max_tokens": 6,
                            "messages": [{"role": "user", "content": format!("load {w} {round} {i}")}]})));
                    }
                    let o = Command::new("curl")
                        .args(["-sS", "-N", "--max-time", "30"])
                        .args(&args)
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    let codes = text.lines().filter(|l| l.starts_with('=')).count();
                    let good = text.lines().filter(|l| *l == "=200").count();
                    let whole = if stream {
                        text.matches("data: [DONE]").count()
                    } else {
                        text.matches("\"chat.completion\"").count()
                    };
                    ok.fetch_add(good.min(whole), Ordering::Relaxed);
                    if !o.status.success() || codes != 8 || good != 8 || whole != 8 {
                        failed.fetch_add(8 - good.min(whole), Ordering::Relaxed);
                        failures.lock().unwrap().push(format!(
                            "{}\n{text}\n{}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr)
                        ));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    // Swap to gen2: key first, then certificate (a reload in between finds
    // them mismatched and keeps the running pair).
    replace(&pki.path().join("server2.key"), &key);
    replace(&pki.path().join("server2.pem"), &cert);
    assert!(
        wait_until(Duration::from_secs(10), || gw
            .log_text()
            .contains("TLS certificate reloaded")),
        "{}",
        gw.log_text()
    );
    assert_eq!(served_org(&gw, pki.path()), "gen2");
    let listener = &get(&gw.admin, "/readyz").json()["listener"];
    assert_eq!(
        listener["tls"]["certificate_sha256"],
        sha256_of_cert(&pki.path().join("server2.pem")),
        "{listener}"
    );
    // And a SIGHUP reload with a third certificate, under the same load.
    make_leaf(pki.path(), "ca", "server3", "gen3", true);
    std::fs::copy(pki.path().join("server3.key"), &key).unwrap();
    std::fs::copy(pki.path().join("server3.pem"), &cert).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status();
    assert!(
        wait_until(Duration::from_secs(10), || served_org(&gw, pki.path())
            == "gen3"),
        "{}",
        gw.log_text()
    );
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let long = long.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{:#?}", failures.lock().unwrap());
    assert!(ok >= 32, "only {ok} requests under load");
    let text = String::from_utf8_lossy(&long.stdout);
    assert!(long.status.success(), "{}", out_text(&long));
    assert_eq!(
        sse_data(&text).last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    eprintln!("certificate swap under load: {ok} requests, none failed");
}

#[test]
fn large_bodies_over_h2_with_and_without_a_length() {
    let pki = pki();
    let (mock, gw) = tls_gateway(pki.path(), "", &[]);
    let dir = tempfile::tempdir().unwrap();
    let prompt = "x".repeat(2 << 20);
    let body = chat_body("small", &prompt).to_string();
    let file = dir.path().join("body.json");
    std::fs::write(&file, &body).unwrap();
    let url = https(&gw, "/v1/chat/completions");
    let at = format!("@{}", file.display());
    let common = [
        "-H",
        "content-type: application/json",
        "-H",
        "authorization: Bearer sk-test",
        "-w",
        "\n%{http_version} %{http_code}",
    ];
    // With a content-length (curl -d), and streamed from standard input
    // without one (-T -: h2 DATA frames until END_STREAM).
    for upload in [["--data-binary", at.as_str()], ["-T", "-"]] {
        let mut args: Vec<&str> = vec!["--http2", "-X", "POST", &url];
        args.extend(common);
        args.extend(upload);
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(pki.path().join("ca.pem"))
            .args([
                "--resolve",
                &format!("localhost:{}:127.0.0.1", gw.config.port),
            ])
            .args(&args)
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .unwrap();
        let (text, m) = body_and_meta(&o);
        assert_eq!(m, "2 200", "{upload:?}: {}", out_text(&o));
        assert!(text.contains("chat.completion"), "{text}");
        // The whole body reached the provider (the model name rewritten).
        let got = mock.last()["body_len"].as_u64().unwrap() as usize;
        assert!(
            got > prompt.len() && got < body.len() + 64,
            "{upload:?}: {got}"
        );
    }
}

#[test]
fn admin_listener_with_tls_client_certificates_and_the_cli() {
    let pki = pki();
    make_leaf(pki.path(), "ca", "admin", "admin1", true);
    make_leaf(pki.path(), "ca", "admin2", "admin2", true);
    make_ca(pki.path(), "clients");
    make_leaf(pki.path(), "clients", "alice", "alice", false);
    let mock = Mock::start(&[]);
    let p = |f: &str| pki.path().join(f).display().to_string();
    let admin_tls = format!(
        "  admin_tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n",
        p("admin.pem"),
        p("admin.key"),
        p("clients.pem")
    );
    let cfg = ConfigDir::new(
        &admin_tls,
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "",
    );
    let admin_port = cfg.admin_port;
    let admin_curl = |args: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                &p("ca.pem"),
                "--resolve",
            ])
            .arg(format!("localhost:{admin_port}:127.0.0.1"))
            .args(args)
            .output()
            .unwrap()
    };
    let readyz = format!("https://localhost:{admin_port}/readyz");
    let with_cert = ["--cert", &p("alice.pem"), "--key", &p("alice.key")];
    let gw = Gateway::start_waiting(cfg, &[], |_| {
        let mut args = vec!["-f", readyz.as_str()];
        args.extend(with_cert);
        admin_curl(&args).status.success()
    });
    // The API listener stays plaintext; the admin listener is TLS only and
    // wants a client certificate.
    assert_eq!(gw.chat(&chat_body("small", "plain api")).status, 200);
    let mut args = vec!["-v", readyz.as_str()];
    args.extend(with_cert);
    let o = admin_curl(&args);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("O=admin1"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["admin_listener"]["tls"]["certificate_sha256"],
        sha256_of_cert(&pki.path().join("admin.pem")),
        "{v}"
    );
    assert_eq!(v["admin_listener"]["tls"]["client_certificates"], true);
    assert!(v["listener"]["tls"].is_null(), "{v}");
    assert!(!admin_curl(&[readyz.as_str()]).status.success());
    assert!(request(&gw.admin, "GET", "/readyz", &[], b"").map_or(true, |r| r.status != 200));

    // The CLI pins the configured certificate and presents the client one.
    let cli = |extra: &[&str]| {
        Command::new(bin("smartllm"))
            .args(["cache", "stats", "--config"])
            .arg(gw.config.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let cli_cert = [
        "--admin-cert",
        &p("alice.pem"),
        "--admin-key",
        &p("alice.key"),
    ];
    let o = cli(&cli_cert);
    assert!(o.status.success(), "{}", out_text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("l1_entries"),
        "{}",
        out_text(&o)
    );
    assert!(!cli(&[]).status.success());

    // A new admin certificate reloads like the API listener's.
    replace(
        &pki.path().join("admin2.key"),
        &pki.path().join("admin.key"),
    );
    replace(
        &pki.path().join("admin2.pem"),
        &pki.path().join("admin.pem"),
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut args = vec!["-v", "-o", "/dev/null", readyz.as_str()];
            args.extend(with_cert);
            String::from_utf8_lossy(&admin_curl(&args).stderr).contains("O=admin2")
        }),
        "{}",
        gw.log_text()
    );
    let o = cli(&cli_cert);
    assert!(o.status.success(), "{}", out_text(&o));
}

#[test]
fn graceful_upgrade_keeps_tls_and_h2_and_finishes_open_streams() {
    let pki = pki();
    let (_mock, mut gw) = tls_gateway(
        pki.path(),
        "",
        &["--chunk-delay-ms", "10", "--words", "400"],
    );
    let url = https(&gw, "/v1/chat/completions");
    let (ca, port) = (pki.path().join("ca.pem"), gw.config.port);
    // An h2 stream opened before the upgrade, answered by the old process.
    let open = {
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "-N".into(),
            "--http2".into(),
            "--max-time".into(),
            "60".into(),
            "--cacert".into(),
            ca.display().to_string(),
            "--resolve".into(),
            format!("localhost:{port}:127.0.0.1"),
            url.clone(),
        ];
        args.extend(chat_args(&json!({"model": "small", "stream": true,
            "messages": [{"role": "user", "content": "across the upgrade"}]})));
        std::thread::spawn(move || Command::new("curl").args(&args).output().unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    gw.upgrade();
    let o = open.join().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", out_text(&o));
    assert_eq!(
        sse_data(&text).last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    // The new process serves TLS with h2 on the inherited socket.
    let mut args: Vec<&str> = vec!["--http2", &url, "-w", "\n%{http_version} %{http_code}"];
    let body = chat_args(&chat_body("small", "after the upgrade"));
    args.extend(body.iter().map(String::as_str));
    let o = curl(&gw, pki.path(), &args);
    assert_eq!(body_and_meta(&o).1, "2 200", "{}", out_text(&o));
}
