//! Test helpers shared by the modules' tests.

/// A config with two priced models: cheap (USD 1/2 per 1M tokens in/out)
/// and dear (10/40, at most 4096 tokens out).
pub(crate) fn config() -> smartllm_config::Config {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("smartllm.yaml"), "server: {}\n").unwrap();
    let mut cfg = smartllm_config::load_dir(dir.path()).unwrap();
    let model =
        |name: &str, input: f64, output: f64, max_out: Option<u64>| smartllm_config::ModelConfig {
            name: name.into(),
            owned_by: "test".into(),
            deployments: Vec::new(),
            pricing: smartllm_config::Pricing {
                input_per_1m: input,
                output_per_1m: output,
                cached_input_per_1m: input,
                per_request: 0.0,
            },
            profile: smartllm_config::ModelProfile {
                context_window: 100_000,
                max_output_tokens: max_out,
                ..Default::default()
            },
            mode: Default::default(),
            mode_explicit: false,
        };
    // USD per 1M tokens: cheap 1/2, dear 10/40 (max 4096 out).
    cfg.models = vec![
        model("cheap", 1.0, 2.0, None),
        model("dear", 10.0, 40.0, Some(4096)),
    ];
    cfg
}
