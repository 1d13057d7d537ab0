//! The cost dashboard (`/ui` on the admin listener) in a real headless
//! Chromium, against a gateway that served real traffic: several models,
//! apps and keys, a routed alias, cache hits and budgets. The charts must
//! show the ledger's numbers, the console must stay silent, and a screenshot
//! is kept (`target/e2e/dashboard.png`, or `SMARTLLM_DASHBOARD_SCREENSHOT`).

use crate::common::*;
use serde_json::Value;
use smartllm_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "dash-admin-token-5f1c";

/// Chromium (`SMARTLLM_CHROMIUM`, else `chromium` or `chromium-browser` on
/// the PATH); None only with `SMARTLLM_SKIP_BROWSER` set.
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SMARTLLM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    });
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("SMARTLLM_SKIP_BROWSER").is_some() => {
            eprintln!("SKIPPED: the dashboard browser test (SMARTLLM_SKIP_BROWSER is set and chromium is not installed)");
            None
        }
        None => panic!(
            "chromium is not installed: `apt-get install chromium` (make test installs it), \
             point SMARTLLM_CHROMIUM at a Chromium binary, or set SMARTLLM_SKIP_BROWSER=1"
        ),
    }
}

/// Runs headless Chromium on `url` with a fresh profile (60 s at most);
/// returns (stdout, stderr).
fn browse(chromium: &Path, profile: &Path, url: &str, extra: &[&str]) -> (String, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--hide-scrollbars",
            "--disable-extensions",
            "--disable-background-networking",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1440,2000",
            // Long enough for the first refresh and one poll after it.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run chromium");
    let done = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(
        done,
        "chromium did not finish within 60 s on {url}; stderr:\n{err}"
    );
    (out, err)
}

/// Every start tag in `dom` that contains `marker`.
fn tags<'a>(dom: &'a str, marker: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find(marker) {
        let start = rest[..i].rfind('<').unwrap_or(0);
        let end = i + rest[i..].find('>').unwrap_or(rest.len() - i);
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    out
}

/// An attribute's value in a start tag.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let i = tag.find(&key)? + key.len();
    Some(&tag[i..i + tag[i..].find('"')?])
}

fn usd_attr(tag: &str) -> f64 {
    attr(tag, "data-usd")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no data-usd in {tag}"))
}

fn admin_get(gw: &Gateway, path: &str) -> Value {
    let r = request(
        &gw.admin,
        "GET",
        path,
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

fn screenshot_path() -> PathBuf {
    if let Ok(p) = std::env::var("SMARTLLM_DASHBOARD_SCREENSHOT") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("e2e/dashboard.png")
}

fn dashboard_gateway(mock: &Mock) -> Gateway {
    let providers = format!("providers:\n{}", mock_provider("mock", mock));
    // A dear, a mid and a cheap model the profiles rate about as good at chat:
    // the suggestions have something to say.
    let models = "models:
  - name: premium
    pricing: { input: 15, output: 60 }
    profile: { quality: { chat: 0.95 } }
    deployments: [{ provider: mock, model: mock-premium }]
  - name: standard
    pricing: { input: 2.5, output: 10 }
    profile: { quality: { chat: 0.93 } }
    deployments: [{ provider: mock, model: mock-standard }]
  - name: mini
    pricing: { input: 0.15, output: 0.6 }
    profile: { quality: { chat: 0.92 } }
    deployments: [{ provider: mock, model: mock-mini }]
";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\nadmin:\n  token_env: TEST_ADMIN_TOKEN\n",
        &providers,
        models,
        "routes:\n  auto:\n    candidates: [standard, mini]\n  fast:\n    model: mini\n",
    );
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:
  - {{ name: alice, sha256: {}, tenant: acme, app: web }}
  - {{ name: bob, sha256: {}, tenant: beta, app: cli }}
  - {{ name: carol, sha256: {}, tenant: acme, app: batch }}
budgets:
  - {{ scope: tenant, name: acme, daily_usd: 0.5, monthly_usd: 10 }}
  - {{ scope: key, name: bob, monthly_usd: 2, on_exceed: degrade, degrade_to: mini }}
",
            sha("sk-alice-1"),
            sha("sk-bob-2"),
            sha("sk-carol-3")
        ),
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    Gateway::start_with_env(cfg, &[("TEST_ADMIN_TOKEN", TOKEN)])
}

#[test]
fn the_cost_dashboard_renders_the_ledger_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };
    let mock = Mock::start(&["--words", "120"]);
    let gw = dashboard_gateway(&mock);

    // Real traffic: three keys (two tenants, three apps), three models, a
    // routed and a fixed alias, and repeated prompts the cache answers.
    let mut prompts: Vec<String> = Vec::new();
    let mut send = |key: &str, model: &str, prompt: String| {
        let r = ask(&gw, key, &chat_body(model, &prompt));
        assert_eq!(r.status, 200, "{}", r.text());
        prompts.push(prompt);
        r
    };
    // Answers that went upstream (a miss each): each is stored.
    let mut misses = 0u64;
    let mut miss = |r: Response| misses += u64::from(cache_header(&r) == "miss");
    for i in 0..4 {
        miss(send(
            "sk-alice-1",
            "premium",
            format!("Draft a product launch plan, part {i}"),
        ));
        miss(send(
            "sk-bob-2",
            "standard",
            format!("Summarise the changelog of release 1.{i}"),
        ));
        miss(send(
            "sk-carol-3",
            "auto",
            format!("hi, how are you today? ({i})"),
        ));
    }
    for i in 0..3 {
        miss(send(
            "sk-bob-2",
            "auto",
            format!("What is the capital of country number {i}?"),
        ));
        miss(send(
            "sk-carol-3",
            "premium",
            format!("Review this contract clause {i} carefully"),
        ));
    }
    let faq = [
        "How do I reset my password?",
        "What are your opening hours?",
    ];
    for q in faq {
        let r = send("sk-alice-1", "fast", q.to_string());
        assert_eq!(cache_header(&r), "miss");
        miss(r);
    }
    // Inserts happen off the request path: wait until every miss so far
    // (the two FAQ answers among them) is stored.
    // (Counted by the inserts counter: what was stored, whatever the
    // in-memory L1 keeps.)
    let stored = || {
        gw.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("smartllm_cache_inserts_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    assert!(
        wait_until(Duration::from_secs(5), || stored() >= Some(misses)),
        "{misses} answers, not all stored: {:?} inserts",
        stored()
    );
    // Each of the three rounds asks both stored FAQ questions again: six
    // exact hits, none of them upstream.
    let upstream = mock.requests();
    let mut hits = 0;
    for _ in 0..3 {
        for q in faq {
            let r = send("sk-alice-1", "fast", q.to_string());
            hits += u64::from(cache_header(&r) == "hit-exact");
        }
    }
    let sent = prompts.len() as u64;
    assert_eq!(hits, 6, "{hits} exact cache hits of 6 repeated questions");
    assert_eq!(mock.requests(), upstream, "a hit went upstream");

    // Every request in the ledger (it flushes every second).
    let mut costs = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            costs = admin_get(&gw, "/admin/costs?since=24h&group_by=hour,model");
            costs["total"]["requests"] == sent
        }),
        "{costs}"
    );
    let total = costs["total"]["cost_usd"].as_f64().unwrap();
    let saved = costs["total"]["saved_usd"].as_f64().unwrap();
    assert!(total > 0.0 && saved > 0.0, "{costs}");

    // The new read-only endpoints.
    let budgets = admin_get(&gw, "/admin/budgets");
    let acme = budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"] == "tenant:acme")
        .cloned()
        .expect("tenant:acme budget");
    let acme_day = &acme["periods"]["daily"];
    assert!(acme_day["spent_usd"].as_f64().unwrap() > 0.0, "{acme}");
    assert!(
        acme_day["burn_usd_per_hour"].as_f64().unwrap() > 0.0,
        "{acme}"
    );
    // A request refused before any model (a body the gateway rejects) is
    // not among them: refused clients cannot push real requests out.
    let kept = admin_get(&gw, "/admin/requests/expensive?since=1h")["kept"].clone();
    let refused = request(
        &gw.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sk-carol-3")],
        br#"{"model":"premium","messages":"not a list"}"#,
    )
    .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    let expensive = admin_get(&gw, "/admin/requests/expensive?since=1h&limit=5");
    assert_eq!(expensive["kept"], kept, "{expensive}");
    let top = expensive["requests"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0]["model"], "premium", "{expensive}");
    assert!(top
        .windows(2)
        .all(|w| w[0]["cost_usd"].as_f64() >= w[1]["cost_usd"].as_f64()));
    let body = expensive.to_string();
    assert!(
        prompts.iter().all(|p| !body.contains(p.as_str())),
        "a prompt in {body}"
    );
    let r = request(
        &gw.admin,
        "GET",
        "/admin/requests/expensive?limit=0",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());

    // The admin token is swapped for an HttpOnly cookie; the page never holds it.
    assert_eq!(get(&gw.admin, "/ui").status, 401);
    assert!(get(&gw.admin, "/ui").text().contains("<form"));
    assert_eq!(get(&gw.admin, "/ui?token=wrong").status, 401);
    let login = get(&gw.admin, &format!("/ui?token={TOKEN}"));
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/ui"));
    let set_cookie = login.header("set-cookie").unwrap().to_string();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let with_cookie = |method: &str, path: &str| {
        request(&gw.admin, method, path, &[("Cookie", &cookie)], b"")
            .unwrap()
            .status
    };
    assert_eq!(with_cookie("GET", "/ui"), 200);
    assert_eq!(with_cookie("GET", "/admin/costs?since=1h"), 200);
    // The cookie reads; it never writes.
    assert_eq!(with_cookie("POST", "/admin/reload"), 401);
    let form = request(
        &gw.admin,
        "POST",
        "/ui/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        format!("token={TOKEN}").as_bytes(),
    )
    .unwrap();
    assert_eq!(form.status, 303);
    let page = request(&gw.admin, "GET", "/ui", &[("Cookie", &cookie)], b"").unwrap();
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));
    for asset in ["/ui", "/ui/app.js", "/ui/app.css"] {
        let r = request(&gw.admin, "GET", asset, &[("Cookie", &cookie)], b"").unwrap();
        assert!(!r.text().contains(TOKEN), "{asset} holds the token");
    }

    // The browser signs in through the URL and follows the redirect.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/ui?token={TOKEN}", gw.admin);
    let (dom, log) = browse(&chromium, profile.path(), &url, &["--dump-dom"]);
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "console output:\n{}",
        console.join("\n")
    );
    let body_tag = tags(&dom, "<body").first().copied().unwrap_or("");
    let refreshes: u32 = attr(body_tag, "data-refreshes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        refreshes >= 1,
        "the page never refreshed; DOM:\n{dom}\nlog:\n{log}"
    );
    let errors = tags(&dom, "id=\"errors\"");
    assert_eq!(errors.len(), 1, "{dom}");
    assert_eq!(attr(errors[0], "data-count"), Some("0"), "{dom}");
    assert!(!dom.contains(TOKEN), "the page holds the admin token");
    // No fleet: no fleet / this gateway switch.
    let scopes = tags(&dom, "id=\"scopes\"");
    assert!(scopes[0].contains("hidden"), "{}", scopes[0]);
    assert!(
        prompts.iter().all(|p| !dom.contains(p.as_str())),
        "a prompt on the page"
    );

    // Spend over time: the stacked bars add up to the ledger's total, one
    // series per model.
    let bars = tags(&dom, "class=\"bar\"");
    assert!(!bars.is_empty(), "no bars:\n{dom}");
    let drawn: f64 = bars.iter().map(|b| usd_attr(b)).sum();
    assert!(
        (drawn - total).abs() < 1e-9 + total * 1e-9,
        "bars {drawn} vs ledger {total}"
    );
    for model in ["premium", "standard", "mini"] {
        assert!(
            bars.iter().any(|b| attr(b, "data-series") == Some(model)),
            "no {model} bar"
        );
    }
    let kpi = tags(&dom, "id=\"kpi-spend\"");
    assert!((usd_attr(kpi[0]) - total).abs() < 1e-9, "{}", kpi[0]);
    let requests = tags(&dom, "id=\"kpi-requests\"");
    assert_eq!(
        attr(requests[0], "data-count"),
        Some(sent.to_string().as_str())
    );
    let saved_kpi = tags(&dom, "id=\"kpi-saved\"");
    assert!(
        (usd_attr(saved_kpi[0]) - saved).abs() < 1e-9,
        "{}",
        saved_kpi[0]
    );
    // The entries stored: the store's count, not the in-memory layer's.
    let shown = dom.split("id=\"cache-entries\">").nth(1).unwrap_or("");
    let shown = &shown[..shown.find('<').unwrap_or(0)];
    // (An estimate: a memtable flush since the page was drawn may move it.)
    let estimated = admin_get(&gw, "/admin/cache/stats")["stats"]["estimated_entries"]
        .as_i64()
        .unwrap();
    let n: i64 = shown
        .strip_suffix(" entries")
        .and_then(|n| n.replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("{shown:?}"));
    assert!(
        n > 0 && (n - estimated).abs() <= 2,
        "{shown} vs {estimated}"
    );
    // The cache's hit rate.
    let donut = tags(&dom, "id=\"cache-donut\"");
    let rate: f64 = attr(donut[0], "data-rate").unwrap().parse().unwrap();
    assert!(rate > 0.0 && rate < 1.0, "{}", donut[0]);
    // The routing mix: both aliases and direct traffic, with costs.
    for route in ["auto", "fast", "-"] {
        let t = tags(&dom, &format!("data-route=\"{route}\""));
        assert_eq!(t.len(), 1, "route {route}:\n{dom}");
    }
    let routed: f64 = tags(&dom, "data-route=").iter().map(|t| usd_attr(t)).sum();
    assert!((routed - total).abs() < 1e-6, "routes {routed} vs {total}");
    // Budgets with their spend.
    let b = tags(&dom, "data-budget=\"tenant:acme\"");
    assert_eq!(b.len(), 2, "daily and monthly:\n{dom}");
    assert!(b.iter().all(|t| usd_attr(t) > 0.0));
    // The costliest requests, costliest first, and the suggestions' savings.
    let rows = tags(&dom, "data-request=");
    assert_eq!(rows.len(), 15, "{dom}");
    assert!((usd_attr(rows[0]) - top[0]["cost_usd"].as_f64().unwrap()).abs() < 1e-12);
    let suggestions = tags(&dom, "class=\"suggestion\"");
    assert!(!suggestions.is_empty(), "no suggestions:\n{dom}");
    assert!(suggestions.iter().all(|s| usd_attr(s) > 0.0));
    let potential = tags(&dom, "id=\"kpi-potential\"");
    assert!(usd_attr(potential[0]) > 0.0);

    // Split by app (per tenant) and by key: the same total, other series.
    // The profile keeps the session cookie of the first visit.
    for (split, series) in [
        ("app", ["acme/web", "acme/batch", "beta/cli"]),
        ("key", ["alice", "bob", "carol"]),
    ] {
        let url = format!("http://{}/ui#range=24h&by={split}", gw.admin);
        let (dom, log) = browse(&chromium, profile.path(), &url, &["--dump-dom"]);
        assert!(!log.contains(":CONSOLE"), "{log}");
        let bars = tags(&dom, "class=\"bar\"");
        let drawn: f64 = bars.iter().map(|b| usd_attr(b)).sum();
        assert!(
            (drawn - total).abs() < 1e-9 + total * 1e-9,
            "by {split}: bars {drawn} vs ledger {total}"
        );
        for name in series {
            assert!(
                bars.iter().any(|b| attr(b, "data-series") == Some(name)),
                "no {name} bar by {split}:\n{dom}"
            );
        }
    }

    // A screenshot for people (and the README).
    let shot = screenshot_path();
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let (_, log) = browse(
        &chromium,
        profile.path(),
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}):\n{log}"));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// In a fleet that shares its costs, the page shows the fleet's ledger by
/// default (it showed the serving gateway's third of it beside the fleet's
/// budgets), with a switch to this gateway's own; a gateway alone hides
/// the switch (the other test's page has no fleet).
#[test]
fn in_a_fleet_the_dashboard_shows_the_fleets_costs() {
    let Some(chromium) = chromium() else { return };
    let redis = Redis::start();
    let mock = Mock::start(&["--words", "20"]);
    let node = || {
        let providers = format!("providers:\n{}", mock_provider("mock", &mock));
        let models = "models:\n  - name: mini\n    pricing: { input: 0.15, output: 0.6 }\n    deployments: [{ provider: mock }]\n";
        let cfg = ConfigDir::new(
            "",
            &format!(
                "demo:\n  mode: off\nadmin:\n  token_env: TEST_ADMIN_TOKEN\nfleet:\n  redis: {}\n  key_prefix: e2e-dash\n  share_costs: true\n",
                redis.url()
            ),
            &providers,
            models,
            "routes:\n  auto:\n    model: mini\n",
        );
        cfg.write(
            "keys.yaml",
            &format!(
                "keys:\n  - {{ name: alice, sha256: {}, tenant: acme, app: web }}\n",
                sha("sk-alice-1")
            ),
        );
        Gateway::start_with_env(cfg, &[("TEST_ADMIN_TOKEN", TOKEN)])
    };
    let (a, b) = (node(), node());
    for (gw, n) in [(&a, 2), (&b, 3)] {
        for i in 0..n {
            let r = ask(
                gw,
                "sk-alice-1",
                &chat_body("mini", &format!("question {i}")),
            );
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let fleet_requests =
        || admin_get(&a, "/admin/costs?since=1h&scope=fleet")["total"]["requests"].clone();
    assert!(
        wait_until(Duration::from_secs(10), || fleet_requests() == 5),
        "{}",
        fleet_requests()
    );
    let count = |dom: &str| {
        attr(tags(dom, "id=\"kpi-requests\"")[0], "data-count")
            .unwrap_or("")
            .to_string()
    };
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/ui?token={TOKEN}", a.admin);
    let (dom, log) = browse(&chromium, profile.path(), &url, &["--dump-dom"]);
    let body = tags(&dom, "<body").first().copied().unwrap_or("");
    assert_eq!(attr(body, "data-scope"), Some("fleet"), "{dom}\n{log}");
    assert_eq!(count(&dom), "5", "the fleet's requests:\n{dom}");
    let scopes = tags(&dom, "id=\"scopes\"");
    assert!(!scopes[0].contains("hidden"), "{}", scopes[0]);
    // This gateway's own, by the switch (kept in the URL); the profile
    // keeps the session cookie.
    let url = format!("http://{}/ui#range=24h&by=model&scope=gateway", a.admin);
    let (dom, _) = browse(&chromium, profile.path(), &url, &["--dump-dom"]);
    assert_eq!(count(&dom), "2", "this gateway's requests:\n{dom}");
}

/// The metric names in `packaging/` (the Grafana dashboard, the alert
/// rules), without a histogram's series suffix.
fn packaged_metric_names(file: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file))
        .unwrap();
    // What the rules compute from, not what their annotations mention.
    let text: String = text
        .lines()
        .filter(|l| !l.contains("description:") && !l.contains("summary:"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("smartllm_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_string());
        rest = &tail[end..];
    }
    names
}

/// Every metric the shipped dashboard and alert rules read is one the
/// gateway defines, and those the alert rules read are on `/metrics` from
/// the start (failure counters at 0), but for the ones that need a setting
/// this gateway has not: an alert on a name that never appears never fires.
#[test]
fn the_shipped_alert_rules_and_dashboard_name_real_metrics() {
    let mut source = String::new();
    for dir in [
        "crates/smartllm-proxy/src",
        "crates/smartllm-cache/src",
        "crates/smartllm-quota/src",
        "crates/smartllm-ledger/src",
        "crates/smartllm-router/src",
        "crates/smartllm-embed/src",
        "crates/smartllm-store/src",
        "crates/smartllm/src",
    ] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    source.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    let alerts = packaged_metric_names("packaging/prometheus/smartllm-alerts.yaml");
    let dashboard = packaged_metric_names("packaging/grafana/smartllm-dashboard.json");
    assert!(
        alerts.len() >= 10 && dashboard.len() >= 10,
        "{alerts:?} {dashboard:?}"
    );
    for name in alerts.iter().chain(&dashboard) {
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{name} is in packaging/ but the gateway defines no such metric"
        );
    }
    let mock = Mock::start(&[]);
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        "models:\n  - name: small\n    deployments:\n      - provider: mock\n",
        "routes:\n  auto:\n    model: small\n",
    );
    cfg.write("cache.yaml", "cache:\n  enabled: true\n");
    let gw = Gateway::start(cfg);
    assert_eq!(gw.chat(&chat_body("small", "hello")).status, 200);
    let exported = gw.metrics();
    // Only with fleet.redis, server.tls or a cache that met a foreign key.
    let conditional = [
        "smartllm_fleet_redis_up",
        "smartllm_tls_certificate_expiry_timestamp_seconds",
    ];
    for name in alerts.iter().filter(|n| !conditional.contains(&n.as_str())) {
        assert!(
            exported.lines().any(|l| !l.starts_with('#')
                && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))),
            "{name} (read by an alert rule) is not on /metrics:\n{exported}"
        );
    }
}
