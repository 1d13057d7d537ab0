//! Helpers shared by several test files: the basic one-mock gateway, virtual
//! keys and their ledger, cache and cost look-ups, and a load worker's verdict.

use serde_json::Value;
use sha2::{Digest, Sha256};
use smartllm_e2e::*;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ANTHROPIC_MODEL: &str =
    "  - name: claude\n    deployments:\n      - provider: claude-mock\n        model: claude-x\n";

/// One gateway in front of one mock: models `small` (openai kind), `claude`
/// (anthropic kind), route alias `auto` -> small.
pub(crate) fn basic(server_extra: &str, mock_args: &[&str]) -> (Mock, Gateway) {
    let mock = Mock::start(mock_args);
    let providers = format!(
        "providers:\n{}  claude-mock:\n    kind: anthropic\n    base_url: http://{}/v1\n    api_key_env: TEST_ANTHROPIC_KEY\n",
        mock_provider("mock", &mock),
        mock.addr
    );
    let models = format!(
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n        model: mock-small\n  - name: embed\n    deployments:\n      - provider: mock\n        model: mock-embed\n{ANTHROPIC_MODEL}"
    );
    let cfg = ConfigDir::new(
        server_extra,
        "demo:\n  mode: off\n",
        &providers,
        &models,
        "routes:\n  auto:\n    model: small\n",
    );
    let gw = Gateway::start_with_env(cfg, &[("TEST_ANTHROPIC_KEY", "sk-ant-secret-1234")]);
    (mock, gw)
}

pub(crate) fn ask(gw: &Gateway, key: &str, body: &Value) -> Response {
    request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", &format!("Bearer {key}"))],
        &serde_json::to_vec(body).unwrap(),
    )
    .unwrap()
}

/// The text of a streamed chat answer: every chunk's `delta.content`, joined
/// (`[DONE]` and anything else that is not JSON is skipped).
pub(crate) fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

pub(crate) fn cache_header(r: &Response) -> &str {
    r.header("x-smartllm-cache").unwrap_or("none")
}

/// Inserts happen off the request path: wait until the entry is there.
pub(crate) fn wait_cached(gw: &Gateway, n: u64) {
    assert!(
        wait_until(Duration::from_secs(20), || get(
            &gw.admin,
            "/admin/cache/stats"
        )
        .json()["stats"]["l1_entries"]
            .as_u64()
            >= Some(n)),
        "entry not stored"
    );
}

pub(crate) fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub(crate) fn ledger_gateway(mock: &Mock, extra_main: &str) -> ConfigDir {
    let providers = format!("providers:\n{}", mock_provider("mock", mock));
    // 1000 / 2000 USD per 1M tokens: 0.001 and 0.002 USD a token.
    let models = "models:\n  - name: small\n    pricing: { input: 1000, output: 2000 }\n    deployments:\n      - provider: mock\n  - name: big\n    deployments:\n      - provider: mock\n";
    let cfg = ConfigDir::new(
        "",
        &format!("demo:\n  mode: off\n{extra_main}"),
        &providers,
        models,
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: alice\n    sha256: {}\n    tenant: acme\n    app: web\n  - name: bob\n    sha256: {}\n    tenant: beta\n    app: cli\n    models: [small, auto]\n",
            sha("sk-alice-1"),
            sha("sk-bob-2")
        ),
    );
    cfg
}

pub(crate) fn costs(gw: &Gateway, group_by: &str) -> Value {
    let r = get(
        &gw.admin,
        &format!("/admin/costs?since=1h&group_by={group_by}"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// A load worker's verdict on one chat completion: 200 and a whole answer (a
/// message, or a stream that ends with `[DONE]`), else why not.
pub(crate) fn complete_answer(res: std::io::Result<Response>, stream: bool) -> Result<(), String> {
    let r = res.map_err(|e| format!("io: {e}"))?;
    let whole = r.status == 200
        && if stream {
            r.sse_data().last().map(String::as_str) == Some("[DONE]")
        } else {
            serde_json::from_slice::<Value>(&r.body)
                .is_ok_and(|v| v["choices"][0]["message"].is_object())
        };
    if whole {
        Ok(())
    } else {
        Err(format!("{} {}", r.status, r.text()))
    }
}

/// Resident memory of a process (KiB), from /proc.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `(event name, data)` of each event of an SSE stream with named events
/// (Anthropic Messages, OpenAI Responses).
pub(crate) fn named_events(r: &Response) -> Vec<(String, Value)> {
    r.text()
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}

/// A real redis-server on a loopback port (`make test` installs it).
pub(crate) struct Redis {
    pub(crate) port: u16,
    child: Child,
    /// With TLS: its port, and the CA (`ca.pem`) that signed its
    /// certificate (for `localhost` and 127.0.0.1), in this directory.
    pub(crate) tls: Option<(u16, tempfile::TempDir)>,
}

impl Redis {
    pub(crate) fn start() -> Redis {
        Self::start_on(free_port())
    }

    /// On `port` (a restart after `stop`: empty, nothing is saved).
    pub(crate) fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[], None)
    }

    /// With TLS on a second port as well (certificates made with the
    /// `openssl` CLI, which `make deps` installs).
    pub(crate) fn start_tls() -> Redis {
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        let openssl = |args: &[&str]| openssl(d, args);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=e2e redis ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(d.join("ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ]);
        let tls_port = free_port();
        let path = |f: &str| d.join(f).display().to_string();
        let args = [
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".to_string(),
            path("srv.pem"),
            "--tls-key-file".to_string(),
            path("srv.key"),
            "--tls-ca-cert-file".to_string(),
            path("ca.pem"),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        Self::start_with(free_port(), &args, Some((tls_port, certs)))
    }

    fn start_with(port: u16, extra: &[String], tls: Option<(u16, tempfile::TempDir)>) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.path().display().to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for the fleet tests: `make test` installs it (apt-get install redis-server)");
        let r = Redis { port, child, tls };
        assert!(
            wait_until(Duration::from_secs(10), || r.cmd("PING") == "+PONG"),
            "redis-server did not start"
        );
        r
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One inline command, its first reply line.
    pub(crate) fn cmd(&self, line: &str) -> String {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if s.write_all(format!("{line}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `openssl ARGS` in `dir` (certificates made at test time; `make deps`
/// installs the CLI).
pub(crate) fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (make deps installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
