//! Profiles from evidence: `smartllm profile run` measures two mock models of
//! different skill through the running gateway, writes `profiles.yaml` into
//! its config directory, and the reloaded router routes by the measurement.

use crate::common::sha;
use smartllm_e2e::*;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// The mock's skills: probability of a right answer per model and task.
const STRONG: [(&str, f64); 3] = [("math", 0.9), ("reasoning", 0.85), ("code", 0.8)];
const WEAK: [(&str, f64); 3] = [("math", 0.2), ("reasoning", 0.5), ("code", 0.3)];

fn skill_arg(model: &str, skills: &[(&str, f64)]) -> String {
    let tasks: Vec<String> = skills.iter().map(|(t, p)| format!("{t}={p}")).collect();
    format!("{model}:{}", tasks.join(","))
}

#[test]
fn profile_run_measures_models_of_different_skill_and_the_router_follows() {
    let set = workspace_root().join("data/profile/set.jsonl");
    let mock = Mock::start(&[
        "--skill-set",
        set.to_str().unwrap(),
        "--skill",
        &skill_arg("mock-strong", &STRONG),
        "--skill",
        &skill_arg("mock-weak", &WEAK),
        "--skill-seed",
        "7",
    ]);
    // Both models profiled alike, so the cheap one wins everything until measured.
    let models = "models:
  - name: weak
    pricing: { input: 0.1, output: 0.4 }
    profile: { quality: { default: 0.9 }, latency: 50ms, tokens_per_second: 100000 }
    deployments: [ { provider: mock, model: mock-weak } ]
  - name: strong
    pricing: { input: 5, output: 20 }
    profile: { quality: { default: 0.9 }, latency: 50ms, tokens_per_second: 100000 }
    deployments: [ { provider: mock, model: mock-strong } ]
";
    let cfg = ConfigDir::new(
        "",
        "demo:\n  mode: off\n",
        &format!("providers:\n{}", mock_provider("mock", &mock)),
        models,
        "routes:\n  auto:\n    candidates: [weak, strong]\n    weights: { quality: 1, cost: 0.2, latency: 0 }\n",
    );
    let key = "sk-profile-runner";
    cfg.write(
        "keys.yaml",
        &format!(
            "keys:\n  - name: profiler\n    sha256: {}\n    tenant: evals\n",
            sha(key)
        ),
    );
    let gw = Gateway::start(cfg);
    let routed = |prompt: &str| {
        let r = request(
            &gw.addr,
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", &format!("Bearer {key}")),
                ("Cache-Control", "no-store"),
            ],
            &serde_json::to_vec(&chat_body("auto", prompt)).unwrap(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("x-smartllm-model").unwrap_or("-").to_string()
    };
    let math = "Solve the equation 3x + 7 = 22 for x.";
    let chat = "Hello there, how are you?";
    assert_eq!(routed(math), "weak");
    assert_eq!(routed(chat), "weak");

    let out = gw.config.path().join("profiles.yaml");
    let profile_run = |key: Option<&str>| {
        let mut c = Command::new(bin("smartllm"));
        c.args(["profile", "run", "--config"])
            .arg(gw.config.path())
            .arg("--set")
            .arg(&set)
            .arg("--out")
            .arg(&out)
            .args(["--models", "weak,strong"])
            .env_remove("SMARTLLM_API_KEY");
        if let Some(k) = key {
            c.env("SMARTLLM_API_KEY", k);
        }
        c.output().unwrap()
    };
    // Without the key the gateway refuses, and nothing is written.
    let refused = profile_run(None);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("the gateway refused the key (401)"), "{err}");
    assert!(!out.exists());

    let run = profile_run(Some(key));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("(the gateway reloads it)"), "{stderr}");

    // The measured shares are near the mock's probabilities (40 questions a
    // task: one standard deviation of the share is at most 0.08).
    let text = std::fs::read_to_string(&out).unwrap();
    println!("{stdout}\n{text}");
    let file = smartllm_config::parse_profiles_file(gw.config.path(), &text).unwrap();
    let mut measured: BTreeMap<(String, String), f64> = BTreeMap::new();
    for (model, skills) in [("strong", STRONG), ("weak", WEAK)] {
        for (task, p) in skills {
            let m = &file.models[model];
            let q = *m
                .quality
                .get(task)
                .unwrap_or_else(|| panic!("no {model}.{task} in\n{text}"));
            assert!((q - p).abs() <= 0.2, "{model} {task}: {q} vs {p}\n{text}");
            assert_eq!(m.answers.get(task), Some(&40), "{text}");
            measured.insert((model.into(), task.into()), q);
        }
    }
    for (task, _) in STRONG {
        let (s, w) = (
            measured[&("strong".into(), task.into())],
            measured[&("weak".into(), task.into())],
        );
        assert!(s > w + 0.2, "{task}: strong {s}, weak {w}");
    }
    // 240 questions reached the mock (and the two refused runs none).
    assert_eq!(mock.requests(), 2 + 240);

    // The watcher reloads the file: /admin/models shows the measurement.
    let reloaded = wait_until(Duration::from_secs(10), || {
        admin_model(&gw, "weak")["static"]["quality_source"]["math"] == "measured"
    });
    assert!(reloaded, "profiles.yaml not reloaded:\n{}", gw.log_text());
    for model in ["weak", "strong"] {
        let m = admin_model(&gw, model);
        for (task, _) in STRONG {
            assert_eq!(
                m["static"]["quality"][task].as_f64(),
                Some(measured[&(model.into(), task.into())]),
                "{m}"
            );
            assert_eq!(m["static"]["quality_source"][task], "measured");
        }
        assert_eq!(m["static"]["quality"]["chat"], 0.9);
        assert_eq!(m["static"]["quality_source"]["chat"], "default");
    }
    // And `auto` follows it: maths to the strong model, chat still to the cheap one.
    assert_eq!(routed(math), "strong");
    assert_eq!(routed(chat), "weak");
}
