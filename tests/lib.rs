//! End-to-end test harness: starts the real `smartllm` and `mock-llm` binaries
//! on loopback ports (stopped on drop) and talks HTTP/1.1 to them with a small
//! blocking client that can also time a streamed response chunk by chunk.

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The profile directory (`target/release`, `target/debug`, ...) this test
/// binary's `deps/` sits in: where cargo puts the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The binaries the tests start (each is also its package's name).
const BINS: [&str; 2] = ["smartllm", "mock-llm"];

/// Path of a workspace binary in [`bin_dir`], built (or brought up to date)
/// once per test process.
///
/// `CARGO_BIN_EXE_<name>` only names binaries of the test's own package, and
/// `cargo test -p smartllm-e2e` builds nothing of `smartllm` or `mock-llm` but
/// their libraries, so the harness builds them itself: the first test of this
/// process runs `$CARGO build --locked --workspace --bins` (`CARGO` is the
/// cargo that runs the tests; plain `cargo` without it) in the workspace, into
/// this test binary's target dir and profile (`--release` when it sits in
/// `release/`), behind a `OnceLock` (the other tests wait for it), and panics
/// saying why if it fails. Every time, not only when a binary is missing: a
/// stale binary would test old code; when nothing changed it is a no-op of a
/// second. The whole workspace's binaries, as `make test` builds them: the
/// same package selection resolves the same features, so the native
/// libraries (RocksDB, FAISS) are not built a second time in another feature
/// set.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = bin_dir();
    if let Err(e) = BUILT.get_or_init(|| build_bins(&dir)) {
        panic!("{e}");
    }
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found (the harness builds only {BINS:?})",
        p.display()
    );
    p
}

/// Builds [`BINS`] into `profile_dir` (`<target dir>/<profile>`); see [`bin`].
fn build_bins(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--locked", "--workspace", "--bins"])
        .arg("--target-dir")
        .arg(target_dir);
    // What cargo set for this test binary is not the build's: ring's build
    // script watches CARGO_MANIFEST_DIR, so passed on it made this build
    // redo ring, rustls, pingora and everything above them (minutes), and
    // the next `cargo build` redo them back.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .contains(&k)
        {
            cmd.env_remove(k);
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!(
        "smartllm-e2e: bringing {BINS:?} in {} up to date: {cmd:?}",
        profile_dir.display()
    );
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!(
            "building the test binaries failed ({s}): {cmd:?}; build them with `cargo build --release --bins` (make test does)"
        )),
        Err(e) => Err(format!(
            "could not run {} to build the test binaries ({e}); build them with `cargo build --release --bins` (make test does)",
            Path::new(&cargo).display()
        )),
    }
}

pub fn workspace_root() -> PathBuf {
    // CARGO_MANIFEST_DIR at run time (cargo test sets it): the test binary may
    // come from a shared target dir built in another checkout.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn assets_dir() -> PathBuf {
    std::env::var("SMARTLLM_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/smartllm-assets")
        })
}

/// A loopback port nobody listens on, never handed out twice in this process:
/// tests run in parallel, and the OS may return a port just released by one
/// test's probe to another's before the first binds it. Ports come from below
/// the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by
/// default), so no outgoing connection can take one as its source port before
/// the server it is meant for binds it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_start.max(12_000));
    for _ in 0..10_000 {
        let port = fastrand::u16(lo..hi);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port between {lo} and {hi}");
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

// ---------------------------------------------------------------- HTTP client

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// For streamed bodies: (time since the request was sent, chunk) per read.
    pub chunks: Vec<(Duration, Vec<u8>)>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    /// `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| {
                e.lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .map(str::to_string)
            })
            .collect()
    }
    /// Asserts the OpenAI error shape and returns the error object.
    pub fn api_error(&self) -> Value {
        let v = self.json();
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("no error object: {v}"))
            .clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error lacks {k}: {v}");
        }
        assert!(
            e["message"].as_str().is_some_and(|m| m.len() > 10),
            "unhelpful message: {v}"
        );
        e
    }
}

pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let mut has_ct = false;
    for (k, v) in headers {
        has_ct |= k.eq_ignore_ascii_case("content-type");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() && !has_ct {
        head.push_str("Content-Type: application/json\r\n");
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let start = Instant::now();
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    read_response(s, start)
}

fn read_response(s: TcpStream, start: Instant) -> std::io::Result<Response> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    let mut chunks = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad chunk size {line:?}"),
                    )
                })?;
            if size == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let mut chunk = vec![0; size];
            r.read_exact(&mut chunk)?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
            chunks.push((start.elapsed(), chunk.clone()));
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        // Close-delimited body: record each read as it arrives.
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            chunks.push((start.elapsed(), buf[..n].to_vec()));
            body.extend_from_slice(&buf[..n]);
        }
    }
    Ok(Response {
        status,
        headers,
        body,
        chunks,
    })
}

pub fn post_json(addr: &str, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, &[], &serde_json::to_vec(body).unwrap()).expect("request")
}

pub fn get(addr: &str, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").expect("request")
}

/// One model's entry in the gateway's `GET /admin/models`.
pub fn admin_model(gw: &Gateway, name: &str) -> serde_json::Value {
    let models = get(&gw.admin, "/admin/models").json();
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no model {name} in /admin/models: {models}"))
        .clone()
}

// ---------------------------------------------------------------- processes

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first (graceful), then make sure.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Mock {
    pub addr: String,
    _proc: Proc,
}

impl Mock {
    pub fn start(args: &[&str]) -> Mock {
        Self::start_on(free_port(), args)
    }

    pub fn start_on(port: u16, args: &[&str]) -> Mock {
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin("mock-llm"))
            .arg("--listen")
            .arg(&addr)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mock-llm");
        let m = Mock {
            addr: addr.clone(),
            _proc: Proc { child },
        };
        assert!(
            wait_until(Duration::from_secs(10), || request(
                &addr,
                "GET",
                "/health",
                &[],
                b""
            )
            .is_ok_and(|r| r.status == 200)),
            "mock-llm did not start on {addr}"
        );
        m
    }

    pub fn last(&self) -> Value {
        get(&self.addr, "/_mock/last").json()
    }

    pub fn requests(&self) -> u64 {
        get(&self.addr, "/_mock/stats").json()["requests"]
            .as_u64()
            .unwrap()
    }
}

/// A config directory for a test gateway.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    pub data: tempfile::TempDir,
}

impl ConfigDir {
    /// `extra_main` is appended to smartllm.yaml (e.g. a `demo:` section);
    /// `server_extra` lines go under `server:`.
    pub fn new(
        server_extra: &str,
        extra_main: &str,
        providers: &str,
        models: &str,
        routes: &str,
    ) -> ConfigDir {
        let dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let main = format!(
            "server:\n  listen: 127.0.0.1:{port}\n  admin_listen: 127.0.0.1:{admin_port}\n  threads: 2\n{server_extra}\ndata_dir: {}\nembedder:\n  assets_dir: {}\nreload:\n  debounce: 50ms\n{extra_main}\n",
            data.path().display(),
            assets_dir().display()
        );
        let c = ConfigDir {
            dir,
            port,
            admin_port,
            data,
        };
        c.write("smartllm.yaml", &main);
        c.write("providers.yaml", providers);
        c.write("models.yaml", models);
        c.write("routes.yaml", routes);
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Atomic replace (write + rename), the way editors and config managers do it.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }
}

pub struct Gateway {
    pub addr: String,
    pub admin: String,
    pub log: PathBuf,
    pub config: ConfigDir,
    proc: Option<Proc>,
    previous_log: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Gateway {
    pub fn start(config: ConfigDir) -> Gateway {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: ConfigDir, env: &[(&str, &str)]) -> Gateway {
        Self::start_waiting(config, env, |g| {
            request(&g.admin, "GET", "/readyz", &[], b"").is_ok_and(|r| r.status == 200)
        })
    }

    /// Starts the gateway and waits (30 s at most) until `ready` says so: for
    /// an admin listener the plain HTTP client cannot reach (TLS).
    pub fn start_waiting(
        config: ConfigDir,
        env: &[(&str, &str)],
        ready: impl Fn(&Gateway) -> bool,
    ) -> Gateway {
        let log = config.data.path().join("gateway.log");
        let child = Command::new(bin("smartllm"))
            .arg("serve")
            .arg("--config")
            .arg(config.path())
            .env_remove("SMARTLLM_DATA_DIR")
            .env_remove("SMARTLLM_REQUIRE_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("ANTHROPIC_API_KEY")
            .env("SMARTLLM_ASSETS_DIR", assets_dir())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn smartllm");
        let g = Gateway {
            addr: format!("127.0.0.1:{}", config.port),
            admin: format!("127.0.0.1:{}", config.admin_port),
            log,
            config,
            proc: Some(Proc { child }),
            previous_log: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        if !wait_until(Duration::from_secs(30), || ready(&g)) {
            panic!("gateway did not become ready; log:\n{}", g.log_text());
        }
        g
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access-log line of a request, waiting up to 5 s for it (it is
    /// written after the answer).
    pub fn access_line(&self, request_id: &str) -> serde_json::Value {
        let id = format!("\"request_id\":\"{request_id}\"");
        let find = || {
            self.log_text()
                .lines()
                .filter(|l| l.contains(&id))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["target"] == "smartllm::access")
        };
        wait_until(Duration::from_secs(5), || find().is_some());
        find()
            .unwrap_or_else(|| panic!("no access-log line for {request_id}:\n{}", self.log_text()))
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.child.id()).unwrap_or(0)
    }

    pub fn metrics(&self) -> String {
        get(&self.admin, "/metrics").text()
    }

    /// Sum of a metric's samples whose label set contains every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn chat(&self, body: &Value) -> Response {
        post_json(&self.addr, "/v1/chat/completions", body)
    }

    /// Graceful binary upgrade, the documented way: start `smartllm serve
    /// --upgrade` on the same config, wait until it listens on the upgrade
    /// socket, SIGQUIT the running process, and wait for it to exit and for
    /// the new one to be ready. Returns how long the old process took to exit
    /// after SIGQUIT; the new process's log goes to `gateway-upgraded.log`.
    pub fn upgrade(&mut self) -> Duration {
        let log = self.config.data.path().join("gateway-upgraded.log");
        let sock = self.config.data.path().join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(bin("smartllm"))
            .arg("serve")
            .arg("--upgrade")
            .arg("--config")
            .arg(self.config.path())
            .env_remove("SMARTLLM_DATA_DIR")
            .env_remove("SMARTLLM_REQUIRE_KEY")
            .env_remove("OPENAI_API_KEY")
            .env_remove("ANTHROPIC_API_KEY")
            .env("SMARTLLM_ASSETS_DIR", assets_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn smartllm --upgrade");
        let mut new = Proc { child };
        assert!(
            wait_until(Duration::from_secs(30), || sock.exists()),
            "the new process never listened on {}; log:\n{}",
            sock.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let mut old = self.proc.take().expect("a running gateway");
        let quit = Instant::now();
        Command::new("kill")
            .args(["-QUIT", &old.child.id().to_string()])
            .status()
            .unwrap();
        let exited = wait_until(Duration::from_secs(40), || {
            matches!(old.child.try_wait(), Ok(Some(_)))
        });
        let took = quit.elapsed();
        assert!(exited, "the old process did not exit after SIGQUIT");
        let old_log = std::mem::replace(&mut self.log, log);
        assert!(
            matches!(new.child.try_wait(), Ok(None)),
            "the new process died; log:\n{}",
            self.log_text()
        );
        self.proc = Some(new);
        let admin = self.admin.clone();
        assert!(
            wait_until(Duration::from_secs(30), || request(
                &admin,
                "GET",
                "/readyz",
                &[],
                b""
            )
            .is_ok_and(|r| r.status == 200)),
            "the upgraded gateway did not become ready; log:\n{}",
            self.log_text()
        );
        self.previous_log = Some(old_log);
        took
    }

    /// The log of the process an upgrade replaced.
    pub fn previous_log_text(&self) -> String {
        self.previous_log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Stop the gateway (SIGTERM, wait).
    pub fn stop(&mut self) {
        self.proc.take();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

pub fn mock_provider(name: &str, mock: &Mock) -> String {
    format!("  {name}:\n    kind: openai\n    base_url: http://{}/v1\n    health_check:\n      kind: http\n      path: /health\n      interval: 200ms\n", mock.addr)
}

pub fn chat_body(model: &str, prompt: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
}
