//! The per-request cost cap (`max_request_usd` of a budget): the models of a
//! chain whose prompt alone would pass it are dropped, and the request's max
//! tokens lowered so that the prompt (at an upper bound of its tokens) plus
//! the whole answer cannot cost more than the cap on any model left.

use crate::{metrics, Refusal, Scope};
use serde_json::{Map, Value};
use smartllm_config::{Budget, Config};

/// What the cost cap makes of a request's model chain.
#[derive(Debug, PartialEq)]
pub enum CostCap {
    /// No per-request cap applies to this scope.
    Uncapped,
    /// These models may serve. `max_output`: the output tokens to allow
    /// (None: no model of the chain can pass the cap anyway).
    Fits {
        chain: Vec<String>,
        max_output: Option<u64>,
        /// The cap, the budget it comes from and the prompt's token bound.
        cap: f64,
        budget: String,
        prompt_bound: u64,
    },
    /// Even the cheapest prompt alone would pass the cap.
    Reject(Refusal),
    /// The request continues a conversation its provider keeps (a
    /// `previous_response_id` the gateway knows only the owner of): the
    /// provider bills the whole history as input, and the gateway cannot
    /// see how long it is, so no bound of the prompt holds. `message` says
    /// so to the client (400 `request_cost_cap_unbounded`).
    HiddenHistory { message: String },
}

/// Apply the tightest per-request cap of the budgets that apply to `scope`
/// to `chain` (the chosen model, then its fallbacks) for a request `body` of
/// `request_bytes` (`raw`: the body as the client sent it, when it goes
/// upstream as such). `provider_history`: the request continues a
/// conversation the provider keeps, which `body` does not hold.
pub async fn plan(
    config: &Config,
    scope: Scope<'_>,
    chain: &[String],
    body: &Map<String, Value>,
    raw: Option<&[u8]>,
    request_bytes: usize,
    provider_history: bool,
) -> CostCap {
    let Some((cap, budget)) = request_cap(&config.keys.budgets, scope) else {
        return CostCap::Uncapped;
    };
    // The client's own body (a Messages request's server tools have no
    // place in the canonical one), read only when a tool's name is in it.
    let native = || {
        let r = raw?;
        // Quoted, as a type's value starts: base64 image data has no quote,
        // so a large body is not parsed again by chance.
        let named = SERVER_TOOLS.iter().any(|s| {
            let quoted = format!("\"{s}");
            r.windows(quoted.len()).any(|w| w == quoted.as_bytes())
        });
        named
            .then(|| serde_json::from_slice::<Map<String, Value>>(r).ok())
            .flatten()
            .and_then(|b| server_tool(&b))
    };
    if let Some(tool) = server_tool(body).or_else(native) {
        metrics::cost_cap(&budget.id(), "reject");
        return CostCap::Reject(Refusal::CostCapUnbounded {
            tool,
            cap,
            scope: budget.scope.as_str(),
            name: budget.name.clone(),
        });
    }
    // The provider bills the history it keeps as input on every turn, and
    // the gateway (which keeps only whose the response is) cannot count it:
    // a bound of this body's few tokens would not bound the cost.
    if provider_history {
        metrics::cost_cap(&budget.id(), "reject");
        return CostCap::HiddenHistory {
            message: hidden_history_message(cap, budget),
        };
    }
    let bound = prompt_with_images_bound(config, chain, body, request_bytes).await;
    // Every answer written (`n`, `best_of`, each prompt of a batch) is up
    // to max tokens long, and each is billed.
    let choices = smartllm_protocol::openai::answers_written(body);
    // Prompt caching asked for: the prompt may be billed as cache writes.
    let marker = b"cache_control";
    let cache_writes = match raw {
        Some(r) => r.windows(marker.len()).any(|w| w == marker),
        None => body
            .iter()
            .any(|(k, v)| k == "cache_control" || has_key(v, "cache_control")),
    };
    // Audio in (`input_audio` parts) or asked for out (`modalities`):
    // tokens may be billed at audio prices.
    let marker = b"input_audio";
    let audio_in = match raw {
        Some(r) => r.windows(marker.len()).any(|w| w == marker),
        None => body.values().any(|v| has_key(v, "input_audio")),
    };
    let audio_out = body
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "audio"));
    let need = Need {
        prompt_tokens: bound,
        choices,
        cache_writes,
        audio: audio_in || audio_out,
        priority: body.get("service_tier").and_then(Value::as_str) == Some("priority"),
    };
    match fit_cap(config, chain, need, cap) {
        CapFit::TooExpensive { cheapest } => {
            metrics::cost_cap(&budget.id(), "reject");
            CostCap::Reject(Refusal::CostCapExceeded {
                bound,
                cheapest,
                model: chain.first().map_or("-", String::as_str).to_string(),
                cap,
                scope: budget.scope.as_str(),
                name: budget.name.clone(),
            })
        }
        CapFit::Fits { chain, max_output } => CostCap::Fits {
            chain,
            max_output,
            cap,
            budget: budget.id(),
            prompt_bound: bound,
        },
    }
}

/// Why a follow-up of a conversation the provider keeps cannot be held to
/// `budget`'s per-request cap `cap`, and what the client can do instead.
fn hidden_history_message(cap: f64, budget: &Budget) -> String {
    format!(
        "This request continues, through previous_response_id, a conversation its provider keeps, and the provider bills the whole conversation as input again; the gateway does not hold that conversation and cannot see how long it is, so it cannot hold the request to the ${cap} per-request cap of {} '{}'. Send the earlier turns as items in 'input' instead of previous_response_id, or use a key without max_request_usd.",
        budget.scope.as_str(),
        budget.name
    )
}

/// The tightest per-request cost cap (`max_request_usd`) of the budgets that
/// apply to this request, and the budget it comes from.
pub fn request_cap<'a>(budgets: &'a [Budget], scope: Scope<'_>) -> Option<(f64, &'a Budget)> {
    if budgets.iter().all(|b| b.max_request_usd.is_none()) {
        return None;
    }
    let ids = scope.budget_ids();
    budgets
        .iter()
        .filter(|b| ids.contains(&b.id()))
        .filter_map(|b| Some((b.max_request_usd?, b)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

/// [`prompt_token_bound`] of the text, plus the images (see [`crate::images`])
/// at the most any provider of the chain counts them.
pub async fn prompt_with_images_bound(
    config: &Config,
    chain: &[String],
    body: &Map<String, Value>,
    request_bytes: usize,
) -> u64 {
    let (images, stripped) = crate::images::scan(body);
    let Some(stripped) = stripped else {
        return prompt_token_bound(body, request_bytes).await;
    };
    let text_bytes = serde_json::to_string(&stripped).map_or(request_bytes, |t| t.len());
    let text = prompt_token_bound(&stripped, text_bytes.min(request_bytes)).await;
    let mut rules: Vec<crate::images::ImageRule> = chain
        .iter()
        .filter_map(|m| config.model(m))
        .flat_map(|m| &m.deployments)
        .filter_map(|d| config.providers.get(&d.provider))
        .map(|p| match p.kind {
            smartllm_config::ProviderKind::Anthropic => crate::images::ImageRule::Anthropic,
            smartllm_config::ProviderKind::OpenAi => crate::images::ImageRule::OpenAi,
        })
        .collect();
    if rules.is_empty() {
        rules = vec![
            crate::images::ImageRule::OpenAi,
            crate::images::ImageRule::Anthropic,
        ];
    }
    let image_tokens = rules
        .iter()
        .map(|r| images.iter().map(|i| i.tokens(*r)).sum::<u64>())
        .max()
        .unwrap_or(0);
    text + image_tokens
}

/// An upper bound of the prompt's tokens as a provider counts them: the
/// whole request body (JSON syntax, tools and all) in o200k tokens plus a
/// quarter for other tokenizers and the chat template's tokens per message.
/// Bodies over 1 MiB are bounded by their size (a token is at least a byte).
/// Tokenizing more than 4 KiB (about half a millisecond) runs on the blocking pool.
pub async fn prompt_token_bound(body: &Map<String, Value>, request_bytes: usize) -> u64 {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(1, Vec::len) as u64;
    let overhead = 4 * messages + 16;
    if request_bytes > 1 << 20 {
        return request_bytes as u64 + overhead;
    }
    let text = serde_json::to_string(body).unwrap_or_default();
    let tokens = if text.len() <= 4 << 10 {
        smartllm_ledger::estimate_tokens(&text)
    } else {
        let len = text.len() as u64;
        tokio::task::spawn_blocking(move || smartllm_ledger::estimate_tokens(&text))
            .await
            .unwrap_or(len)
    };
    (tokens as f64 * 1.25).ceil() as u64 + overhead
}

/// What a per-request cost cap leaves of a model chain.
#[derive(Debug, PartialEq)]
pub enum CapFit {
    /// These models can serve; `max_output`: the output tokens to allow so
    /// that none of them can pass the cap (None: none can anyway).
    Fits {
        chain: Vec<String>,
        max_output: Option<u64>,
    },
    /// No model can: the cheapest prompt alone would cost this much.
    TooExpensive { cheapest: f64 },
}

/// Tool types a provider runs itself and bills per use (searches, container
/// time, images) and for the content they bring into the conversation.
const SERVER_TOOLS: [&str; 7] = [
    "web_search",
    "web_fetch",
    "code_execution",
    "code_interpreter",
    "file_search",
    "image_generation",
    "mcp",
];

/// The first server-side tool a request asks for: a `tools` entry whose
/// `type` is one of [`SERVER_TOOLS`], with or without a version
/// (`web_search_20250305`, `web_search_preview`), or Chat Completions'
/// `web_search_options`. Function and custom tools, and Anthropic's tools
/// the client runs (`bash`, `text_editor`, `computer`), are billed as
/// tokens only.
fn server_tool(body: &Map<String, Value>) -> Option<String> {
    if body.contains_key("web_search_options") {
        return Some("web_search_options".into());
    }
    body.get("tools")?
        .as_array()?
        .iter()
        .filter_map(|t| t.get("type").and_then(Value::as_str))
        .find(|t| {
            SERVER_TOOLS.iter().any(|s| {
                t.strip_prefix(s)
                    .is_some_and(|r| r.is_empty() || r.starts_with('_'))
            })
        })
        .map(str::to_string)
}

/// Whether `key` names a field anywhere in `v`.
fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(o) => o.iter().any(|(k, v)| k == key || has_key(v, key)),
        Value::Array(a) => a.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

/// What a request may be billed for, at most.
#[derive(Debug, Clone, Copy)]
pub struct Need {
    /// An upper bound of its prompt tokens.
    pub prompt_tokens: u64,
    /// Answers asked for (`n`), each billed.
    pub choices: u64,
    /// It asks for prompt caching: prompt tokens may be billed as cache writes.
    pub cache_writes: bool,
    /// It carries or asks for audio: tokens may be billed at audio prices.
    pub audio: bool,
    /// It asks for the priority tier: every token at its multiplier.
    pub priority: bool,
}

impl Need {
    pub fn prompt(prompt_tokens: u64) -> Need {
        Need {
            prompt_tokens,
            choices: 1,
            cache_writes: false,
            audio: false,
            priority: false,
        }
    }
}

/// The dearest a prompt token and an output token of `need` can be billed
/// at (USD per 1M): the long-context tier's prices when the prompt may pass
/// it, cache writes' when prompt caching is asked for, audio's when the
/// request carries or asks for audio, reasoning's where it is priced apart
/// from output.
fn worst_prices(
    flat: &smartllm_config::Pricing,
    full: Option<&smartllm_config::ModelPrice>,
    need: Need,
) -> (f64, f64) {
    let Some(f) = full else {
        return (flat.input_per_1m, flat.output_per_1m);
    };
    let (mut input, mut output) = (f.input_per_1m, f.output_per_1m);
    let (mut w5, mut w1) = (f.cache_write_5m_per_1m, f.cache_write_1h_per_1m);
    if let Some(l) = f
        .long_context
        .as_ref()
        .filter(|l| need.prompt_tokens > l.above_tokens)
    {
        (input, output) = (l.input_per_1m, l.output_per_1m);
        (w5, w1) = (l.cache_write_5m_per_1m, l.cache_write_1h_per_1m);
    }
    if need.cache_writes {
        input = input.max(w5).max(w1);
    }
    if need.audio {
        input = input.max(f.audio_input_per_1m.unwrap_or(0.0));
        output = output.max(f.audio_output_per_1m.unwrap_or(0.0));
    }
    let output = output.max(f.reasoning_per_1m.unwrap_or(0.0));
    let tier = if need.priority {
        f.service_tiers.priority.max(1.0)
    } else {
        1.0
    };
    (
        input.max(flat.input_per_1m) * tier,
        output.max(flat.output_per_1m) * tier,
    )
}

/// Keep the models of `chain` under which the prompt and at least one
/// output token per choice cost no more than `cap`, at the dearest prices
/// `need` can be billed at, and the output tokens to allow each of its
/// answers: what every kept model can afford, never more than a model may
/// answer (its max output or what its context window leaves; a window the
/// prompt's bound fills limits nothing).
pub fn fit_cap(config: &smartllm_config::Config, chain: &[String], need: Need, cap: f64) -> CapFit {
    let (prompt_tokens, choices) = (need.prompt_tokens, need.choices);
    let mut kept = Vec::new();
    let mut allow = u64::MAX;
    let mut needed = false;
    let mut cheapest = f64::INFINITY;
    for name in chain {
        let Some(m) = config.model(name) else {
            continue;
        };
        let p = &m.pricing;
        let (input, output) = worst_prices(p, config.price(name), need);
        let prompt_cost = prompt_tokens as f64 * input / 1e6 + p.per_request;
        cheapest = cheapest.min(prompt_cost);
        let per_output = output / 1e6 * choices.max(1) as f64;
        let affordable = if per_output > 0.0 {
            ((cap - prompt_cost) / per_output).floor()
        } else if prompt_cost <= cap {
            f64::MAX
        } else {
            -1.0
        };
        if affordable < 1.0 {
            continue;
        }
        // What the context window leaves an answer, when it holds the
        // prompt's bound. The bound is an over-estimate: a window it passes
        // may still hold the prompt itself, so the model stays (its provider
        // says when it does not), but leaves no figure to go by; a limit of
        // one token would cut every model's answer to one.
        let max_out = m.profile.max_output_tokens.unwrap_or(u64::MAX);
        let window = m.profile.context_window;
        let room = window.checked_sub(prompt_tokens).filter(|r| *r > 0);
        let limit = room.unwrap_or(u64::MAX).min(max_out);
        let affordable = affordable.min(u64::MAX as f64) as u64;
        // Whether the cap binds: no answer is longer than the window, so a
        // model that can afford a whole window's worth needs no limit.
        needed |= affordable < room.unwrap_or(window).min(max_out);
        allow = allow.min(affordable.min(limit));
        kept.push(name.clone());
    }
    if kept.is_empty() {
        CapFit::TooExpensive { cheapest }
    } else {
        CapFit::Fits {
            chain: kept,
            max_output: needed.then_some(allow),
        }
    }
}
#[cfg(test)]
mod server_tool_tests {
    use super::*;

    #[test]
    fn server_side_tools_are_told_from_client_tools() {
        let tools = |t: Value| {
            let b = serde_json::json!({"tools": t});
            server_tool(b.as_object().unwrap())
        };
        use serde_json::json;
        assert_eq!(
            tools(
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "web_search_20250305", "name": "web_search", "max_uses": 20}])
            ),
            Some("web_search_20250305".into())
        );
        assert_eq!(
            tools(json!([{"type": "web_search_preview"}])),
            Some("web_search_preview".into())
        );
        assert_eq!(
            tools(json!([{"type": "code_interpreter", "container": {"type": "auto"}}])),
            Some("code_interpreter".into())
        );
        assert_eq!(
            tools(json!([{"type": "mcp", "server_url": "https://x"}])),
            Some("mcp".into())
        );
        // Tools the client runs, or that merely share a prefix.
        assert_eq!(
            tools(json!([{"name": "get_weather", "input_schema": {}}])),
            None
        );
        assert_eq!(
            tools(
                json!([{"type": "bash_20250124", "name": "bash"}, {"type": "text_editor_20250429", "name": "t"}, {"type": "custom", "name": "c"}])
            ),
            None
        );
        assert_eq!(
            tools(json!([{"type": "mcpx"}, {"type": "web_searcher"}])),
            None
        );
        let b = json!({"web_search_options": {}});
        assert_eq!(
            server_tool(b.as_object().unwrap()),
            Some("web_search_options".into())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::config;

    fn chain(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_cap_prices_the_dearest_tokens_a_request_can_be_billed() {
        let flat = smartllm_config::Pricing {
            input_per_1m: 1.25,
            output_per_1m: 10.0,
            cached_input_per_1m: 0.31,
            per_request: 0.0,
        };
        let full = smartllm_config::ModelPrice {
            input_per_1m: 1.25,
            output_per_1m: 10.0,
            cache_read_per_1m: 0.31,
            cache_write_5m_per_1m: 1.5,
            cache_write_1h_per_1m: 2.5,
            reasoning_per_1m: Some(12.0),
            audio_input_per_1m: Some(40.0),
            audio_output_per_1m: Some(80.0),
            per_request: 0.0,
            long_context: Some(smartllm_config::LongContextPrice {
                above_tokens: 200_000,
                input_per_1m: 2.5,
                output_per_1m: 15.0,
                cache_read_per_1m: 0.62,
                cache_write_5m_per_1m: 3.0,
                cache_write_1h_per_1m: 5.0,
            }),
            service_tiers: Default::default(),
            web_search_per_1k: 10.0,
            source: smartllm_config::PriceSource::Configured,
        };
        let short = Need::prompt(1_000);
        // Reasoning priced apart is the dearer output.
        assert_eq!(worst_prices(&flat, Some(&full), short), (1.25, 12.0));
        // A prompt that may pass the tier: every token at the tier's prices.
        assert_eq!(
            worst_prices(&flat, Some(&full), Need::prompt(300_000)),
            (2.5, 15.0)
        );
        // Prompt caching asked for: the prompt may be 1-hour cache writes.
        let cached = Need {
            cache_writes: true,
            ..short
        };
        assert_eq!(worst_prices(&flat, Some(&full), cached), (2.5, 12.0));
        assert_eq!(worst_prices(&flat, None, cached), (1.25, 10.0));
        // Audio in or out: audio's prices; a text request never pays them.
        let audio = Need {
            audio: true,
            ..short
        };
        assert_eq!(worst_prices(&flat, Some(&full), audio), (40.0, 80.0));
        // The priority tier asked for: every token at its multiplier (1.75).
        let priority = Need {
            priority: true,
            ..short
        };
        assert_eq!(
            worst_prices(&flat, Some(&full), priority),
            (1.25 * 1.75, 12.0 * 1.75)
        );
        // Asked for anywhere in a chat body (a content part's cache_control).
        let body = serde_json::json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}]});
        assert!(has_key(&body, "cache_control"));
        assert!(!has_key(
            &serde_json::json!({"messages": [{"content": "cache_control"}]}),
            "cache_control"
        ));
    }

    #[test]
    fn cost_cap_lowers_max_tokens_to_what_every_model_affords() {
        let cfg = config();
        // 1000 prompt tokens, $0.05 cap: dear pays $0.01 for the prompt and
        // affords 1000 output tokens; cheap pays $0.001 and affords 24500.
        let fit = fit_cap(&cfg, &chain(&["dear", "cheap"]), Need::prompt(1000), 0.05);
        assert_eq!(
            fit,
            CapFit::Fits {
                chain: chain(&["dear", "cheap"]),
                // 999.99… in binary floating point: rounded down, never up.
                max_output: Some(999)
            }
        );
        // The bound holds: prompt + max output on the dearest model = the cap.
        let worst = 1000.0 * 10.0 / 1e6 + 999.0 * 40.0 / 1e6;
        assert!(worst <= 0.05 + 1e-12, "{worst}");
        // n = 4 answers, each billed: a quarter of the output each.
        let four = Need {
            choices: 4,
            ..Need::prompt(1000)
        };
        match fit_cap(&cfg, &chain(&["dear", "cheap"]), four, 0.05) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, Some(249)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cost_cap_drops_models_whose_prompt_alone_passes_it() {
        let cfg = config();
        // 10k prompt tokens at $0.11 cap: dear's prompt costs $0.10 (+1 token
        // at 40/M fits: 250 tokens), so both stay; at $0.09 only cheap does.
        match fit_cap(&cfg, &chain(&["dear", "cheap"]), Need::prompt(10_000), 0.09) {
            CapFit::Fits {
                chain: c,
                max_output,
            } => {
                assert_eq!(c, chain(&["cheap"]));
                // 0.08 / 2e-6 = 40000 tokens, but the context leaves 90000: capped.
                assert_eq!(max_output, Some(40_000));
            }
            other => panic!("{other:?}"),
        }
        match fit_cap(
            &cfg,
            &chain(&["dear", "cheap"]),
            Need::prompt(100_000),
            0.05,
        ) {
            CapFit::TooExpensive { cheapest } => assert!((cheapest - 0.1).abs() < 1e-9),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cost_cap_never_asks_more_than_a_model_may_answer() {
        let cfg = config();
        // A generous cap: dear affords 24750 tokens but answers at most 4096,
        // so the cap cannot be passed and max tokens stays as asked.
        match fit_cap(&cfg, &chain(&["dear"]), Need::prompt(1000), 1.0) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, None),
            other => panic!("{other:?}"),
        }
        // With cheap in the chain too (it could answer 99000 tokens for
        // $0.198 < $1): nothing to cap either.
        match fit_cap(&cfg, &chain(&["cheap", "dear"]), Need::prompt(1000), 1.0) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, None),
            other => panic!("{other:?}"),
        }
        // At $0.1 cheap affords 49500 tokens and dear 2250 (below its 4096
        // limit): both are capped at 2250.
        match fit_cap(&cfg, &chain(&["cheap", "dear"]), Need::prompt(1000), 0.1) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, Some(2250)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_window_the_prompt_bound_fills_does_not_cut_every_answer() {
        let mut cfg = config();
        // A chain mixing windows: "long" (1M) with cheap (100k) to fall back on.
        let mut long = cfg.model("cheap").unwrap().clone();
        long.name = "long".into();
        long.profile.context_window = 1_000_000;
        cfg.models.push(long);
        // 150k prompt tokens (a bound, over the truth) pass cheap's window:
        // cheap leaves no figure to go by, and does not limit long's answer.
        match fit_cap(
            &cfg,
            &chain(&["long", "cheap"]),
            Need::prompt(150_000),
            0.55,
        ) {
            CapFit::Fits {
                chain: c,
                max_output,
            } => {
                assert_eq!(c, chain(&["long", "cheap"]));
                // $0.40 left at $2 per 1M output: about 200000 tokens, not 1.
                let m = max_output.unwrap();
                assert!((199_999..=200_000).contains(&m), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // A generous cap: nothing to lower (long's window leaves 850k).
        match fit_cap(
            &cfg,
            &chain(&["long", "cheap"]),
            Need::prompt(150_000),
            100.0,
        ) {
            CapFit::Fits { max_output, .. } => assert_eq!(max_output, None),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_conversation_the_provider_keeps_cannot_be_held_to_a_cap() {
        let mut cfg = config();
        cfg.keys.budgets = vec![Budget {
            scope: smartllm_config::BudgetScope::App,
            name: "acme/web".into(),
            daily_usd: None,
            monthly_usd: None,
            max_request_usd: Some(0.05),
            alert_at: vec![],
            on_exceed: smartllm_config::OnExceed::Reject,
            webhook: None,
        }];
        let scope = Scope {
            tenant: "acme",
            app: "web",
            key: "k",
        };
        let body = serde_json::json!({"model": "cheap", "messages": [{"role": "user", "content": "And another?"}]});
        let body = body.as_object().unwrap();
        let bytes = serde_json::to_string(body).unwrap().len();
        // A few bytes of new input fit the cap...
        assert!(matches!(
            plan(&cfg, scope, &chain(&["cheap"]), body, None, bytes, false).await,
            CostCap::Fits { .. }
        ));
        // ...but a follow-up of a conversation the provider keeps is billed
        // for all of it, which the gateway cannot see: refused, saying why.
        match plan(&cfg, scope, &chain(&["cheap"]), body, None, bytes, true).await {
            CostCap::HiddenHistory { message } => {
                assert!(message.contains("previous_response_id"), "{message}");
                assert!(message.contains("app 'acme/web'"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // No cap applies: nothing to hold it to.
        cfg.keys.budgets.clear();
        assert_eq!(
            plan(&cfg, scope, &chain(&["cheap"]), body, None, bytes, true).await,
            CostCap::Uncapped
        );
    }

    #[test]
    fn the_tightest_applicable_cap_wins() {
        let b = |scope, name: &str, cap| Budget {
            scope,
            name: name.into(),
            daily_usd: None,
            monthly_usd: None,
            max_request_usd: Some(cap),
            alert_at: vec![],
            on_exceed: smartllm_config::OnExceed::Reject,
            webhook: None,
        };
        use smartllm_config::BudgetScope::*;
        let budgets = vec![
            b(Tenant, "acme", 0.5),
            b(App, "acme/web", 0.2),
            b(Key, "other", 0.01),
        ];
        let mut scope = Scope {
            tenant: "acme",
            app: "web",
            key: "k",
        };
        let (cap, from) = request_cap(&budgets, scope).unwrap();
        assert_eq!((cap, from.id().as_str()), (0.2, "app:acme/web"));
        scope.tenant = "beta";
        assert!(request_cap(&budgets, scope).is_none());
    }
}
