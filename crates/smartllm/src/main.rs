//! `smartllm`: the SmartLLM Router daemon and its tools. Wiring only: the work
//! lives in the library crates.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use smartllm_cache::{Codec, SemanticCache, VectorIndex};
use smartllm_embed::{cosine, Embedder};
use smartllm_proxy::admin::AdminApp;
use smartllm_proxy::alerts::AlertService;
use smartllm_proxy::cache_sweeper::CacheSweeper;
use smartllm_proxy::health::HealthService;
use smartllm_proxy::reload::ReloadService;
use smartllm_proxy::{Components, Gateway, Runtime, SelfTest, Shared};
use smartllm_store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod admin_client;
mod admin_tls;
mod cache_calibrate;
mod cache_cli;
mod check;
mod config_write;
mod costs_cli;
mod keys_cli;
mod prices_cli;
mod printers;
mod profile_cli;
mod routing_cli;

use admin_client::AdminTarget;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "smartllm",
    version,
    about = "SmartLLM Router: an OpenAI-compatible LLM gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway in the foreground.
    Serve {
        /// The config directory (smartllm.yaml, providers.yaml, models.yaml, routes.yaml).
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config directory: print every error with file, key path and line.
    Check {
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// The config is for this host: files `serve` needs that are not
        /// here (the embedder's) are errors, not warnings (the systemd unit
        /// checks so before each start).
        #[arg(long)]
        local: bool,
    },
    /// Inspect and manage the semantic cache.
    Cache {
        #[command(subcommand)]
        action: CacheCmd,
    },
    /// Costs from the ledger of the running gateway (`costs suggest`: how to
    /// spend less; the admin options and --since may come before or after
    /// `suggest`).
    Costs {
        #[command(subcommand)]
        action: Option<CostsCmd>,
        #[command(flatten)]
        target: AdminTarget,
        /// How far back: 30m, 24h, 7d (or a unix timestamp).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Group by: any of hour, day, tenant, app, key, model, provider, route, tag (comma separated).
        #[arg(long, default_value = "model")]
        by: String,
        /// CSV instead of a table.
        #[arg(long)]
        csv: bool,
        /// The whole fleet's ledger (fleet.share_costs), not this gateway's.
        #[arg(long)]
        fleet: bool,
        /// Only this tenant's rows.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this app's rows (TENANT/APP, or an app's name in every tenant).
        #[arg(long)]
        app: Option<String>,
        /// Only this key name's rows.
        #[arg(long)]
        key: Option<String>,
    },
    /// Routing decisions, explained without a running gateway.
    Route {
        #[command(subcommand)]
        action: RouteCmd,
    },
    /// Train the learned router: per-model quality from the prompt embedding.
    TrainRouter {
        /// JSONL: {"prompt", "model", "score" (0-1)} per line.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the router (use it with strategy: learned in routes.yaml).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// Ridge regularisation (a finite number above 0).
        #[arg(long, default_value_t = 1.0, value_parser = routing_cli::parse_lambda)]
        lambda: f64,
    },
    /// Cost/quality curves of the learned router, the rule router and random
    /// routing on labelled prompts (.jsonl with measured scores); on
    /// task-labelled prompts (.tsv), the task classifier's accuracy and the
    /// route's cost/quality next to every single model, random routing and
    /// the per-task oracle, simulated from the configured profiles.
    Eval {
        /// Labelled prompts. JSONL (`{"prompt", "model", "score"[, "cost"]}`
        /// per line, measured answers): the cost/quality curves of the
        /// learned router, the rule router and random routing. TSV
        /// (`task<TAB>prompt[<TAB>source]`): the task classifier's accuracy,
        /// and the route's cost/quality simulated from the profiles.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// The learned router (default: the one a route of the config uses).
        #[arg(long)]
        router: Option<PathBuf>,
        /// With a .tsv of task-labelled prompts: the routed alias whose
        /// cost/quality is simulated from the configured profiles.
        #[arg(long, default_value = "auto")]
        route: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The built-in price catalog (USD per 1M tokens), searched by words of
    /// the model or provider name; with --config, the price of each
    /// configured model and where it comes from.
    Prices {
        /// Words to look for (all must match), e.g. `claude sonnet`.
        #[arg(default_value = "")]
        query: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// CSV instead of a table.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Rows shown at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Show the models of this config directory instead (a table, or
        /// --json; every configured model, so no QUERY, --csv or --limit).
        #[arg(long, short, conflicts_with_all = ["query", "csv", "limit"])]
        config: Option<PathBuf>,
    },
    /// Virtual key helpers.
    Keys {
        #[command(subcommand)]
        action: KeysCmd,
    },
    /// Model profiles measured on a labelled set.
    Profile {
        #[command(subcommand)]
        action: ProfileCmd,
    },
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Ask every configured model (or --models) each question of a labelled
    /// set through the running gateway, score the answers and write the
    /// share right per task to a profiles file (the config directory's
    /// profiles.yaml is hot-reloaded and replaces models.yaml's quality for
    /// the tasks it names).
    Run {
        /// Config directory of the running gateway (its models and listen address).
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// The labelled set: JSONL {"id", "task", "kind": "exact"|"choice", "question", "choices"?, "answer"}.
        #[arg(long)]
        set: PathBuf,
        /// Where to write the measured profiles (e.g. CONFIG/profiles.yaml); models and tasks already there and not measured now are kept.
        #[arg(long)]
        out: PathBuf,
        /// Only these models (comma separated; default: every chat model).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// The gateway's API address (default: http(s)://server.listen of the config).
        #[arg(long)]
        url: Option<String>,
        /// A virtual key of keys.yaml, when the gateway asks for one.
        #[arg(long, env = "SMARTLLM_API_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Questions in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// max_tokens of each answer.
        #[arg(long, default_value_t = 1024)]
        max_tokens: u64,
    },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Show which model a prompt goes to and why (static profiles, no live data).
    Explain {
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// The routed alias.
        #[arg(long, default_value = "auto")]
        route: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        prompt: String,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a new random virtual key: print it once (the only time it is
    /// shown) and add only its sha256 to the config directory's keys.yaml.
    Create {
        /// The key's name (unique; shown in the ledger, logs and metrics).
        name: String,
        /// The tenant the key's requests belong to (default: the key's name).
        #[arg(long)]
        tenant: Option<String>,
        /// The application within the tenant.
        #[arg(long)]
        app: Option<String>,
        /// A model or route alias the key may use (repeat; none = all).
        #[arg(long = "model")]
        models: Vec<String>,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
    },
    /// Remove a key from keys.yaml (the rest of the file kept as it is): a
    /// running gateway refuses it from its next reload.
    Revoke {
        /// The key's name.
        name: String,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
    },
    /// A new key for a key, which keeps its name and so its tenant, app,
    /// models, limits and budgets: printed once. The old key keeps working
    /// until `--finish` (give clients the new one in between); `--now`
    /// refuses it from the next reload.
    Rotate {
        /// The key's name.
        name: String,
        /// End a rotation under way: the old key is refused from the next reload.
        #[arg(long, conflicts_with = "now")]
        finish: bool,
        /// Replace the key at once: no overlap.
        #[arg(long)]
        now: bool,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
    },
    /// List the keys of keys.yaml: name, tenant, app, models and the start
    /// of each sha256 (the keys themselves are never stored).
    List {
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
    },
    /// Print the sha256 to put in keys.yaml for a key read from standard
    /// input (never from the command line, where history and ps keep it).
    Hash {
        /// Refused: pass the key on standard input.
        #[arg(hide = true)]
        key: Option<String>,
    },
}

#[derive(Subcommand)]
enum CostsCmd {
    /// What cheaper models for simple traffic and more cache coverage would
    /// have saved, from the ledger and the router's features.
    Suggest {
        #[command(flatten)]
        target: AdminTarget,
        /// How far back: 24h, 7d, 30d (or a unix timestamp).
        #[arg(long, default_value = "7d")]
        since: String,
        /// The admin API's JSON instead of a list.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Entry and index counts of the running gateway's cache.
    Stats {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Remove entries: all of them, one namespace, or one route (or model).
    Purge {
        #[command(flatten)]
        target: AdminTarget,
        /// Every entry of every tenant.
        #[arg(long, conflicts_with_all = ["route", "namespace", "tenant"])]
        all: bool,
        /// The entries stored under a route alias, or every answer a model
        /// gave (under any alias) when NAME is a model's name.
        #[arg(long, conflicts_with_all = ["namespace", "tenant"])]
        route: Option<String>,
        /// The entries of one namespace (64 hex digits).
        #[arg(long, conflicts_with = "tenant")]
        namespace: Option<String>,
        /// Every entry stored for one tenant's requests (all its keys, apps,
        /// routes and APIs): what to run when a tenant leaves or asks for
        /// its data to be erased.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Rebuild the vector index from RocksDB (the source of truth).
    Rebuild {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Duplicates served (recall), traps served (overall and per category) and
    /// precision over labelled pairs for thresholds 0.80-0.99 and the
    /// configured one, with the real embedding model, precision guard and
    /// verifier.
    Eval {
        /// TSV: text_a, text_b, label (1 duplicate / 0 trap)[, category, source].
        #[arg(long)]
        pairs: PathBuf,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// Judge with the verifier at this pass score (0-1), whatever
        /// cache.yaml says (default: the config's cache.verifier setting).
        #[arg(long)]
        verifier_threshold: Option<f32>,
        /// Write each pair's verifier features and label as TSV here (what
        /// data/cache-eval/train_verifier.py trains on).
        #[arg(long)]
        features_out: Option<PathBuf>,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// The loosest similarity threshold (0.70-0.99) that keeps the traps
    /// served at or under --max-trap-rate on labelled pairs (a tuning set,
    /// not the held-out one), for the default or one route; --write sets it
    /// in the config dir's cache.yaml, which a running gateway reloads.
    Calibrate {
        /// TSV: text_a, text_b, label (1 duplicate / 0 trap)[, category, source].
        #[arg(long)]
        pairs: PathBuf,
        #[arg(long, short, default_value = "/etc/smartllm", env = "SMARTLLM_CONFIG")]
        config: PathBuf,
        /// The share of traps that may be served (0.01 = 1%).
        #[arg(long, default_value_t = 0.01)]
        max_trap_rate: f64,
        /// Calibrate this route (or model) instead of the default.
        #[arg(long)]
        route: Option<String>,
        /// Choose the verifier's pass score (0.05-0.95) together with the
        /// threshold: the pair that serves the most duplicates within the
        /// target (written as verifier_threshold beside it).
        #[arg(long)]
        verifier: bool,
        /// Write the threshold into cache.yaml (comments and other keys kept).
        #[arg(long)]
        write: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A CLI command whose reader went away (`smartllm check | head -1`) stops
/// quietly with the shell's SIGPIPE status, 141, instead of panicking in
/// `println!`. Other panics keep the default report.
fn exit_quietly_on_broken_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            // The panic hook cannot return to main: this is the one place a
            // CLI command ends the process (nothing to flush: the server
            // never installs this hook).
            #[allow(clippy::disallowed_methods)]
            std::process::exit(141);
        }
        default(info);
    }));
}

/// The CPU features the build assumes (`.cargo/config.toml` compiles FAISS
/// for x86-64-v3): say so plainly rather than die of an illegal instruction.
fn cpu_supported() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        let missing: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
            ("bmi2", std::arch::is_x86_feature_detected!("bmi2")),
            (
                "pclmulqdq",
                std::arch::is_x86_feature_detected!("pclmulqdq"),
            ),
            ("sse4.2", std::arch::is_x86_feature_detected!("sse4.2")),
        ]
        .iter()
        .filter(|(_, has)| !has)
        .map(|(name, _)| *name)
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "this CPU lacks {} (smartllm needs an x86-64-v3 CPU with PCLMUL: AVX2, FMA, F16C, BMI2)",
                missing.join(", ")
            ));
        }
    }
    Ok(())
}

/// The `costs` options given before `suggest` that it takes (`smartllm
/// costs --config DIR --since 30d suggest`), as if given after it.
#[derive(Debug, Default, PartialEq, Eq)]
struct SuggestFrom {
    /// The admin options (--config, --admin, --admin-token, --admin-cert,
    /// --admin-key) come from before `suggest`.
    target_before: bool,
    /// --since comes from before `suggest`.
    since_before: bool,
}

/// The ids of `AdminTarget`'s options.
const ADMIN_OPTIONS: [&str; 5] = ["config", "admin", "admin_token", "admin_cert", "admin_key"];

/// Where `costs ... suggest ...` takes its options from, by what the
/// command line gave on each side of `suggest` (`costs`: the `costs`
/// subcommand's matches). No option given is dropped: the admin options
/// and --since given before `suggest` apply to it (given on both sides,
/// they are refused, as are --by, --csv and --fleet, which `suggest` has
/// not).
fn suggest_from(costs: &clap::ArgMatches) -> Result<SuggestFrom, String> {
    let Some(("suggest", suggest)) = costs.subcommand() else {
        return Ok(SuggestFrom::default());
    };
    fn given(m: &clap::ArgMatches, id: &str) -> bool {
        m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    }
    fn flags(m: &clap::ArgMatches, ids: &[&str]) -> Vec<String> {
        ids.iter()
            .filter(|id| given(m, id))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect()
    }
    let costs_only = flags(costs, &["by", "csv", "fleet", "tenant", "app", "key"]);
    if !costs_only.is_empty() {
        return Err(format!(
            "not options of `costs suggest` (only of `smartllm costs`): {}",
            costs_only.join(", ")
        ));
    }
    let (before, after) = (flags(costs, &ADMIN_OPTIONS), flags(suggest, &ADMIN_OPTIONS));
    if !before.is_empty() && !after.is_empty() {
        return Err(format!(
            "the admin options go either before `suggest` or after it, not both (before: {}; after: {})",
            before.join(", "),
            after.join(", ")
        ));
    }
    let since_before = given(costs, "since");
    if since_before && given(suggest, "since") {
        return Err("--since is given both before and after `suggest`: give it once".into());
    }
    Ok(SuggestFrom {
        target_before: !before.is_empty(),
        since_before,
    })
}

/// `costs suggest`'s admin target and --since: those given after `suggest`,
/// or before it (see [`suggest_from`]).
fn suggest_args(
    before: (AdminTarget, String),
    after: (AdminTarget, String),
    costs: Option<&clap::ArgMatches>,
) -> Result<(AdminTarget, String), String> {
    let from = costs.map_or(Ok(SuggestFrom::default()), suggest_from)?;
    Ok((
        if from.target_before {
            before.0
        } else {
            after.0
        },
        if from.since_before { before.1 } else { after.1 },
    ))
}

fn main() -> ExitCode {
    // The matches are kept: `costs ... suggest` looks at which options the
    // command line gave on each side of `suggest`.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.format(&mut Cli::command()).exit(),
    };
    if let Err(e) = cpu_supported() {
        eprintln!("smartllm: {e}");
        return ExitCode::from(1);
    }
    if !matches!(cli.command, Command::Serve { .. }) {
        exit_quietly_on_broken_stdout();
    }
    match cli.command {
        Command::Check { config, local } => check::check(&config, local),
        Command::Prices {
            query,
            json,
            csv,
            limit,
            config,
        } => {
            let r = match config {
                Some(dir) => prices_cli::configured_cmd(&dir, json),
                None => prices_cli::prices_cmd(&query.join(" "), json, csv, limit),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Keys {
            action: KeysCmd::Hash { key },
        } => {
            if key.is_some() {
                eprintln!("smartllm: a key on the command line ends up in shell history and ps; pass it on standard input: smartllm keys hash < key-file");
                return ExitCode::from(2);
            }
            match keys_cli::hash_stdin() {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => exit("keys hash", Err(e)),
            }
        }
        Command::Keys {
            action: KeysCmd::Revoke { name, config },
        } => match keys_cli::revoke(&config, &name) {
            Ok(()) => {
                eprintln!(
                    "smartllm: removed key '{name}' from {}; a running gateway refuses it from its next reload (file watch or SIGHUP).",
                    config.join(smartllm_config::KEYS_FILE).display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => exit("keys revoke", Err(e)),
        },
        Command::Keys {
            action:
                KeysCmd::Rotate {
                    name,
                    finish,
                    now,
                    config,
                },
        } => {
            let how = if finish {
                keys_cli::Rotation::Finish
            } else if now {
                keys_cli::Rotation::Now
            } else {
                keys_cli::Rotation::Start
            };
            let file = config.join(smartllm_config::KEYS_FILE);
            match keys_cli::rotate(&config, &name, how) {
                Ok(key) => {
                    if let Some(key) = key {
                        println!("{key}");
                    }
                    eprintln!(
                        "smartllm: {} ({}); a running gateway picks it up on its next reload (file watch or SIGHUP).",
                        match how {
                            keys_cli::Rotation::Start => format!("new key for '{name}', shown this once; the old one still works until `smartllm keys rotate {name} --finish`"),
                            keys_cli::Rotation::Now => format!("new key for '{name}', shown this once; the old one is refused"),
                            keys_cli::Rotation::Finish => format!("the rotation of '{name}' is finished: its old key is refused"),
                        },
                        file.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => exit("keys rotate", Err(e)),
            }
        }
        Command::Keys {
            action: KeysCmd::List { config },
        } => match keys_cli::list(&config) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => exit("keys list", Err(e)),
        },
        Command::Keys {
            action:
                KeysCmd::Create {
                    name,
                    tenant,
                    app,
                    models,
                    config,
                },
        } => {
            let new = keys_cli::NewKey {
                name: &name,
                tenant: tenant.as_deref().unwrap_or(&name),
                app: app.as_deref().unwrap_or("default"),
                models: &models,
            };
            match keys_cli::create(&config, &new) {
                Ok(key) => {
                    println!("{key}");
                    eprintln!(
                        "smartllm: created key '{}' (tenant '{}', app '{}'); only its sha256 is in {}. This is the only time the key is shown. A running gateway picks it up on its next reload (file watch or SIGHUP).",
                        new.name,
                        new.tenant,
                        new.app,
                        config.join(smartllm_config::KEYS_FILE).display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => exit("keys create", Err(e)),
            }
        }
        Command::Costs {
            action:
                Some(CostsCmd::Suggest {
                    target,
                    since,
                    json,
                }),
            target: target_before,
            since: since_before,
            ..
        } => {
            let args = suggest_args(
                (target_before, since_before),
                (target, since),
                matches.subcommand_matches("costs"),
            );
            let (target, since) = match args {
                Ok(args) => args,
                Err(e) => {
                    eprintln!("smartllm costs suggest: {e}");
                    return ExitCode::from(2);
                }
            };
            match costs_cli::suggest_cmd(&target, &since, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("smartllm costs suggest: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Costs {
            action: None,
            target,
            since,
            by,
            csv,
            fleet,
            tenant,
            app,
            key,
        } => match costs_cli::costs_cmd(
            &target,
            &since,
            &by,
            csv,
            fleet,
            &costs_cli::Only { tenant, app, key },
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("smartllm costs: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Route {
            action:
                RouteCmd::Explain {
                    config,
                    route,
                    json,
                    prompt,
                },
        } => exit(
            "smartllm route explain",
            routing_cli::explain(&config, &route, &prompt, json),
        ),
        Command::TrainRouter {
            data,
            out,
            config,
            lambda,
        } => exit(
            "smartllm train-router",
            routing_cli::train(&config, &data, &out, lambda),
        ),
        Command::Eval {
            data,
            config,
            router,
            route,
            json,
        } => exit(
            "smartllm eval",
            routing_cli::evaluate(&config, &data, router.as_deref(), &route, json),
        ),
        Command::Profile {
            action:
                ProfileCmd::Run {
                    config,
                    set,
                    out,
                    models,
                    url,
                    key,
                    concurrency,
                    max_tokens,
                },
        } => exit(
            "smartllm profile run",
            profile_cli::run(profile_cli::RunArgs {
                config,
                set,
                out,
                models,
                url,
                key,
                concurrency,
                max_tokens,
            }),
        ),
        Command::Cache { action } => match cache_cli::cache_cmd(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("smartllm cache: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Serve { config, upgrade } => match serve(&config, upgrade) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("smartllm: {e:#}");
                // (A start that failed after the cache opened may have an
                // index training: no exit handler may wait on it.)
                end_process(1)
            }
        },
    }
}

fn exit(what: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SMARTLLM_LOG").unwrap_or_else(|_| {
        // Pingora's health checks log each failure with the peer's whole
        // options (1.5 KB a line); the gateway logs the transition itself,
        // with the error ("upstream failed its health check"). notify warns
        // at every Kubernetes ConfigMap update (the kubelet's symlink swap
        // removes a watched path before notify does: WatchNotFound); the
        // watcher's own errors reach the reload service and are logged there.
        tracing_subscriber::EnvFilter::new(format!(
            "{level},pingora_core=warn,pingora_proxy=warn,pingora_load_balancing=error,notify=error"
        ))
    });
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Prove the native path end to end: the model embeds, and FAISS finds the
/// paraphrase as nearest neighbour.
fn self_test(embedder: &Embedder) -> anyhow::Result<SelfTest> {
    let texts = vec![
        "How do I reset my password?".to_string(),
        "What is the way to reset my password?".to_string(),
        "The stock market fell sharply today.".to_string(),
    ];
    let t = Instant::now();
    // Not a request: the self-test is not shed. On a busy host the first job
    // can wait past a small `embedder.max_queue_wait` while the workers warm
    // up, so an overloaded answer is retried (for up to 10 s).
    let v = loop {
        match embedder.embed_blocking(texts.clone()) {
            Err(smartllm_embed::EmbedError::Overloaded(_))
                if t.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.context("embedding the self-test sentences")?,
        }
    };
    let embed_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut index = VectorIndex::new_flat(embedder.info().dim).context("creating a FAISS index")?;
    index.add(1, &v[1]).context("adding to the FAISS index")?;
    index.add(2, &v[2]).context("adding to the FAISS index")?;
    let hits = index
        .search(&v[0], 1)
        .context("searching the FAISS index")?;
    Ok(SelfTest {
        embed_ms,
        paraphrase_cosine: cosine(&v[0], &v[1]),
        unrelated_cosine: cosine(&v[0], &v[2]),
        nearest_ok: hits.first().is_some_and(|h| h.0 == 1),
    })
}

/// SIGTERM or SIGINT while the gateway starts: nothing is served or
/// written yet that a stop would have to finish, so the process ends at once
/// (128 + the signal, as the default action would report). Once the drain's
/// handlers are installed this one, still called after them, does nothing.
extern "C" fn stop_while_starting(sig: libc::c_int) {
    if !smartllm_proxy::shutdown::SIGNALS_HANDLED.load(std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and ends the process at once.
        #[allow(unsafe_code)]
        unsafe {
            libc::_exit(128 + sig)
        }
    }
}

/// Handle SIGTERM and SIGINT from the first moment: as a container's PID 1
/// the process has no default action for them, and one sent while it
/// starts (a pod deleted then) would be lost, leaving it to run until
/// SIGKILL.
#[allow(unsafe_code)]
fn stop_on_signals_while_starting() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only reads an atomic and calls `_exit`.
        unsafe {
            libc::signal(sig, stop_while_starting as *const () as libc::sighandler_t);
        }
    }
}

fn serve(dir: &Path, upgrade: bool) -> anyhow::Result<()> {
    stop_on_signals_while_starting();
    let prep_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // SIGHUP's default action ends the process. Caught from the first
    // moment (tokio's handler stays installed for the process's life once
    // registered), one sent while the gateway starts (a config manager's
    // reload) is harmless: the reload service, once it runs, looks at the
    // directory once, so a change made meanwhile is not lost.
    prep_rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(drop)
        })
        .context("installing the SIGHUP handler")?;
    let config = smartllm_config::load_dir(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    init_logging(&config.logging.level);
    // Tables built on first use (the token counter's, the keyword
    // automata, the guard's regexes and dictionary: about 0.1 s together)
    // are built now, beside the rest of the start, and waited for before the
    // listeners open: otherwise the first request pays for them.
    let warm_up = std::thread::Builder::new()
        .name("smartllm-warm-up".into())
        .spawn(|| {
            smartllm_router::features::warm_up();
            smartllm_cache::guard::warm_up();
        })
        .context("starting the warm-up thread")?;
    if !upgrade {
        // A port another process holds: Pingora would retry, then its
        // listener threads panic and leave this process up with nothing to
        // serve (a supervisor sees it running). Wait a while for it (an old
        // instance still draining), then refuse with an exit status.
        // (With --upgrade, the running instance hands its sockets over.)
        for (key, addr) in [
            ("server.listen", config.server.listen),
            ("server.admin_listen", config.server.admin_listen),
        ] {
            let mut tries = 0;
            loop {
                match std::net::TcpListener::bind(addr) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < PORT_WAIT_TRIES => {
                        tries += 1;
                        tracing::warn!(%addr, tries, "{key}: address in use; waiting for it");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                        "{key}: cannot listen on {addr}: {e} (another smartllm, or another server, holds it; waited {PORT_WAIT_TRIES} s)"
                    ),
                    Err(e) => anyhow::bail!("{key}: cannot listen on {addr}: {e}"),
                }
            }
        }
    }
    let metrics = smartllm_proxy::metrics::install();

    let embedder =
        Arc::new(Embedder::load(&config.embedder).context("loading the embedding model")?);
    let test = self_test(&embedder)?;
    if !test.nearest_ok {
        anyhow::bail!(
            "embedding self-test failed: FAISS did not find the paraphrase as nearest ({test:?})"
        );
    }
    tracing::info!(
        model = %embedder.info().model.display(), device = %embedder.info().device, load_ms = embedder.info().load_ms,
        embed_ms = test.embed_ms, paraphrase_cosine = test.paraphrase_cosine, "embedding model loaded and self-tested"
    );

    let runtime = prep_rt
        .block_on(Runtime::prepare(
            config.clone(),
            1,
            Some(embedder.clone()),
            None,
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(prep_rt);
    smartllm_proxy::tls::note_validity(&runtime);

    // Pingora's server comes before the data dir: with --upgrade, bootstrap()
    // takes the listening sockets from the running instance (which keeps
    // serving until it has handed them over), and only then does this process
    // wait for that instance to drain and release RocksDB. Connections that
    // arrive in between wait in the kernel's accept queue, none is refused.
    let drain_timeout = config.server.graceful_shutdown_timeout;
    let mut conf = ServerConf {
        threads: config.server.threads,
        // Pingora sleeps this long after it stops accepting and before it
        // cancels what still runs; the finisher below exits as soon as the
        // in-flight requests are done, so this is only the upper bound.
        grace_period_seconds: Some(
            (config.server.grace_period + drain_timeout + BACKGROUND_WAIT).as_secs() + 5,
        ),
        graceful_shutdown_timeout_seconds: Some(drain_timeout.as_secs()),
        pid_file: config.data_dir.join("smartllm.pid").display().to_string(),
        upgrade_sock: config.data_dir.join("upgrade.sock").display().to_string(),
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = 256;
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        // (The OS says "File exists" for a file standing where it should be.)
        let file = config
            .data_dir
            .ancestors()
            .find(|p| p.is_file())
            .map(|p| format!(" ({} is a file, not a directory)", p.display()))
            .unwrap_or_default();
        format!("creating the data dir {}{file}", config.data_dir.display())
    })?;
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    if upgrade {
        tracing::info!(socket = %config.data_dir.join("upgrade.sock").display(),
            "graceful upgrade: waiting for the running instance's listening sockets (send it SIGQUIT)");
    }
    server.bootstrap();

    let store = open_store(
        &config.data_dir,
        config.store.memory_budget,
        upgrade.then(|| config.server.grace_period + drain_timeout + Duration::from_secs(15)),
    )?;
    tracing::info!(path = %store.info().path.display(), memory_budget = config.store.memory_budget, "RocksDB open");

    if runtime.demo_mode {
        let u = &runtime.config.demo.upstream;
        tracing::warn!(
            upstream = %format!("{}://{}{}", if u.tls { "https" } else { "http" }, u.authority(), u.path),
            "DEMO MODE: no provider API key is set; provider traffic goes to the bundled mock LLM"
        );
    }

    let codec = match &config.cache.encryption_key_file {
        Some(path) => Codec::from_key_files(path, &config.cache.encryption_old_key_files)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Codec::plain(),
    };
    for w in check::key_file_warnings(&config) {
        tracing::warn!("{w}");
    }
    let cache = SemanticCache::open_with_pq(
        store.clone(),
        embedder.clone(),
        codec,
        config.cache.l1_entries,
        config.cache.ivf_threshold,
        config.cache.pq_threshold,
        Some(&config.data_dir),
    )
    .context("opening the semantic cache")?;
    let stats = cache.stats();
    tracing::info!(
        enabled = config.cache.enabled,
        index_vectors = stats.index_vectors,
        index_kind = stats.index_kind,
        estimated_entries = stats.estimated_entries,
        live_data_bytes = stats.live_data_bytes,
        encrypted = stats.encrypted,
        "semantic cache open"
    );

    let ledger = smartllm_ledger::Ledger::start(store.clone(), config.ledger.flush_interval)
        .context("starting the cost ledger writer")?;
    for w in smartllm_config::layout_warnings(dir, config.keys.require_key) {
        tracing::warn!("{w}");
    }
    for w in config.keys.unmatched() {
        tracing::warn!("{w}");
    }
    for w in config
        .unpriced_warnings()
        .into_iter()
        .chain(config.capability_warnings())
        .chain(config.budget_warnings())
    {
        tracing::warn!("{w}");
    }
    if !config.keys.require_key && dir.join(smartllm_config::KEYS_FILE).exists() {
        tracing::warn!("keys.yaml requires no key: the gateway is open to anyone who can reach it");
    } else if config.keys.require_key && config.keys.keys.is_empty() {
        tracing::warn!("keys.yaml lists no key: every request is refused (401) until one is made with `smartllm keys create NAME`");
    }

    let shared = Shared::new(
        runtime,
        metrics,
        Components {
            embedder: Some(embedder),
            self_test: Some(test),
            store: Some(store.clone()),
        },
        Some(cache.clone()),
        Some(ledger.clone()),
        dir.to_path_buf(),
    );

    {
        let rt = shared.runtime.load();
        shared.quotas.warm(&ledger, &rt.config.keys.budgets);
    }

    if warm_up.join().is_err() {
        anyhow::bail!("the warm-up thread panicked");
    }
    let mut proxy = Service::new(
        "smartllm proxy".to_string(),
        smartllm_proxy::frontend::Frontend::new(
            &server.configuration,
            Gateway {
                shared: shared.clone(),
            },
        ),
    );
    use smartllm_proxy::tls::Listener;
    match tls_settings(&shared, Listener::Api, config.server.tls.as_ref())? {
        Some(settings) => {
            proxy.add_tls_with_settings(&config.server.listen.to_string(), None, settings)
        }
        None => proxy.add_tcp(&config.server.listen.to_string()),
    }
    let mut admin = Service::new(
        "smartllm admin".to_string(),
        AdminApp {
            shared: shared.clone(),
        },
    );
    match tls_settings(&shared, Listener::Admin, config.server.admin_tls.as_ref())? {
        Some(settings) => {
            admin.add_tls_with_settings(&config.server.admin_listen.to_string(), None, settings)
        }
        None => admin.add_tcp(&config.server.admin_listen.to_string()),
    }
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service(
        "config reloader",
        ReloadService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "upstream health",
        HealthService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "budget alerts",
        AlertService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "fleet sync",
        smartllm_proxy::fleet_sync::FleetSyncService {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "cache sweeper",
        CacheSweeper {
            shared: shared.clone(),
            every: std::time::Duration::from_secs(30),
        },
    ));

    tracing::info!(
        listen = %config.server.listen, tls = config.server.tls.is_some(), h2c = config.server.h2c,
        admin = %config.server.admin_listen, admin_tls = config.server.admin_tls.is_some(), config_dir = %dir.display(),
        version = env!("CARGO_PKG_VERSION"), "smartllm starting"
    );
    let finisher = Arc::new(Finisher {
        cache,
        ledger,
        store,
        shared: shared.clone(),
        done: std::sync::Once::new(),
    });
    // Whichever ends first ends the process, by returning from here: Pingora's
    // run (SIGINT, or a graceful stop after its fixed grace period) or the
    // finisher (a graceful stop as soon as the in-flight requests are done).
    let (stopped, wait_stopped) = std::sync::mpsc::channel::<&'static str>();
    spawn_finisher(
        &server,
        &shared,
        finisher.clone(),
        config.server.grace_period,
        drain_timeout,
        stopped.clone(),
    );
    let (drain_shared, drain_timeout) = (shared.clone(), config.server.graceful_shutdown_timeout);
    std::thread::Builder::new()
        .name("smartllm-server".into())
        .spawn(move || {
            server.run(RunArgs {
                // SIGTERM drains in-flight requests (streams included) before Pingora stops.
                shutdown_signal: Box::new(smartllm_proxy::shutdown::DrainingShutdown {
                    shared: drain_shared,
                    drain_timeout,
                }),
            });
            let _ = stopped.send("server");
        })
        .context("starting the server thread")?;
    let by = wait_stopped.recv().unwrap_or("server");
    // Saved and flushed once, whoever got here first; the other threads end
    // with the process when main returns.
    finisher.finish();
    tracing::debug!(by, "process ends");
    end_process(0)
}

/// End the process now that everything is saved and flushed, without the
/// C libraries' exit handlers: a cache index still being trained (FAISS on
/// OpenBLAS and OpenMP threads) would hold OpenBLAS's exit handler forever,
/// waiting on its busy workers, and a stop must not hang until systemd
/// kills it. The index is built again at the next start.
#[allow(unsafe_code)]
fn end_process(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; every file the gateway
    // writes was flushed by `Finisher::finish`, and nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Pingora's rustls settings for a listener with TLS (`None`: plaintext). The
/// certificate (and client CAs) come from the running config at every
/// handshake, so a reload swaps them without a restart. ALPN offers h2 and
/// http/1.1 on the API listener, http/1.1 on the admin listener.
fn tls_settings(
    shared: &Arc<Shared>,
    listener: smartllm_proxy::tls::Listener,
    tls: Option<&smartllm_config::TlsConfig>,
) -> anyhow::Result<Option<pingora::listeners::tls::TlsSettings>> {
    use smartllm_proxy::tls::{CertResolver, ClientVerifier, Listener, Sessions};
    let Some(tls) = tls else { return Ok(None) };
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
        .map_err(|e| anyhow::anyhow!("{}: {e}", listener.setting()))?;
    settings.set_cert_resolver(Arc::new(CertResolver::new(shared.clone(), listener)));
    settings.set_client_cert_verifier(Arc::new(ClientVerifier::new(shared.clone(), listener)));
    // Resumed sessions are kept per client-CA setting (see `Sessions`).
    let sessions = Arc::new(Sessions::new(shared.clone(), listener));
    settings.set_config_hook(Box::new(move |c| c.session_storage = sessions));
    let alpn = match listener {
        Listener::Api => {
            settings.enable_h2();
            "h2, http/1.1"
        }
        Listener::Admin => {
            settings.set_alpn(pingora::protocols::ALPN::H1);
            "http/1.1"
        }
    };
    tracing::info!(setting = listener.setting(), cert = %tls.cert_file.display(), key = %tls.key_file.display(),
        client_ca = ?tls.client_ca_file.as_ref().map(|p| p.display().to_string()), alpn, "listener with TLS");
    Ok(Some(settings))
}

/// Opens RocksDB. With `wait` (graceful upgrade), a lock still held by the
/// previous instance is retried until it exits or the deadline passes.
fn open_store(
    data_dir: &Path,
    memory_budget: u64,
    wait: Option<Duration>,
) -> anyhow::Result<Arc<Store>> {
    let started = Instant::now();
    let mut logged = false;
    loop {
        match Store::open_with_budget(data_dir, memory_budget as usize) {
            Ok(store) => {
                if logged {
                    tracing::info!(
                        waited_ms = started.elapsed().as_millis() as u64,
                        "the previous instance released the data dir"
                    );
                }
                return Ok(store);
            }
            Err(smartllm_store::StoreError::Open { message, .. })
                if message.contains("/LOCK") && wait.is_some_and(|w| started.elapsed() < w) =>
            {
                if !logged {
                    tracing::info!(%message, "waiting for the previous instance to drain and release the data dir");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // (RocksDB's words for it: "While lock file: .../LOCK: ...".)
            Err(smartllm_store::StoreError::Open { path, message }) if message.contains("/LOCK") => {
                return Err(anyhow::anyhow!(
                    "opening the data dir: another process holds {} (a smartllm already running on this data dir? each gateway needs its own `data_dir`; a graceful upgrade starts the new binary with --upgrade): {message}",
                    path.display()
                ))
            }
            Err(e) => return Err(anyhow::Error::new(e).context("opening the data dir")),
        }
    }
}

/// Saves the cache index and flushes the ledger and RocksDB, once.
struct Finisher {
    cache: Arc<SemanticCache>,
    ledger: smartllm_ledger::Ledger,
    store: Arc<Store>,
    shared: Arc<Shared>,
    done: std::sync::Once,
}

/// How long a stop waits for background work requests left behind (cache
/// inserts, fleet writes) before it saves state without them.
const BACKGROUND_WAIT: Duration = Duration::from_secs(5);
/// How long a stop waits for the last spans to reach the OTLP endpoint.
const TRACE_FLUSH: Duration = Duration::from_secs(3);

impl Finisher {
    fn finish(&self) {
        self.done.call_once(|| {
            // Tracked background work first: cache inserts write RocksDB,
            // fleet writes carry spend to Redis and may raise alerts, whose
            // webhooks are then delivered. In that order, within one bound.
            let shared = &self.shared;
            let started = Instant::now();
            let wait = |done: &dyn Fn() -> bool| {
                while !done() && started.elapsed() < BACKGROUND_WAIT {
                    std::thread::sleep(Duration::from_millis(10));
                }
            };
            wait(&|| shared.tasks.is_empty() && shared.quotas.tasks().is_empty());
            // Purges and version bumps to the fleet (their publisher gives
            // them one more try at the stop, within 8 x fleet.timeout).
            if let Some(fleet) = shared.fleet_sync.as_ref() {
                wait(&|| !fleet.control_pending());
            }
            wait(&|| shared.quotas.alerts_queued() == 0);
            wait(&|| shared.alert_deliveries.is_empty());
            let left = shared.tasks.len()
                + shared.fleet_sync.as_ref().map_or(0, |f| f.control_unsent() as usize)
                + shared.quotas.tasks().len()
                + shared.quotas.alerts_queued()
                + shared.alert_deliveries.len();
            if left > 0 {
                tracing::warn!(left, "stopping with background work unfinished (cache inserts, fleet writes, alert webhooks)");
            }
            if let Err(e) = self.cache.persist() {
                tracing::error!(error = %e, "saving the cache index failed; it will be rebuilt at the next start");
            }
            // The last counters to the fleet's cost view, while its sender
            // still runs (it keeps going for a few seconds after a stop).
            if let Some(fleet) = shared.fleet_sync.as_ref().filter(|f| f.shares_costs()) {
                self.ledger.flush();
                wait(&|| fleet.costs_unsent() == 0);
            }
            // What Redis never took (it was unreachable until the stop) is
            // lost to the fleet: its budgets, cost view and cache.
            let (periods, most_usd) = shared.quotas.spend_unsent();
            let (cost_batches, cache_inserts) = shared
                .fleet_sync
                .as_ref()
                .map_or((0, 0), |f| (f.costs_unsent(), f.inserts_queued()));
            if periods > 0 || cost_batches > 0 || cache_inserts > 0 {
                tracing::warn!(
                    budget_periods = periods,
                    budget_usd_most = most_usd,
                    cost_batches,
                    cache_inserts,
                    "stopping with fleet state Redis never took (it was unreachable): the fleet's budgets miss this spend (this gateway's ledger keeps it), its cost view these batches, and these cache entries are not shared"
                );
            }
            self.ledger.shutdown();
            if let Some(t) = &shared.tracing {
                t.shutdown(TRACE_FLUSH);
            }
            match self.store.flush() {
                Ok(()) => tracing::info!("smartllm stopped"),
                Err(e) => tracing::error!(error = %e, "flushing RocksDB failed; the WAL replays it at the next start"),
            }
        });
    }
}

/// Seconds a start waits for a listen address another process holds.
const PORT_WAIT_TRIES: u32 = 10;

/// After the drain timeout, how long the streams it ended have to write
/// their last event before the stop goes on without them.
const STREAM_END_WAIT: Duration = Duration::from_secs(2);

/// Pingora stops accepting, then sleeps a fixed grace period before it cancels
/// whatever still runs. After a graceful upgrade (SIGQUIT) that would cut the
/// requests the old instance still serves, and would hold RocksDB's lock (which
/// the new instance waits for) the whole period. This thread ends the process
/// as soon as those requests have finished instead: it waits for in-flight to
/// reach zero (bounded by the drain timeout), then `server.grace_period`, then
/// saves and flushes state and tells main to end the process, releasing the
/// lock. After SIGTERM the drain has already happened in the shutdown
/// watcher, so it ends at once.
fn spawn_finisher(
    server: &Server,
    shared: &Arc<Shared>,
    finisher: Arc<Finisher>,
    grace: Duration,
    drain_timeout: Duration,
    stopped: std::sync::mpsc::Sender<&'static str>,
) {
    use pingora::server::ExecutionPhase;
    use std::sync::atomic::Ordering;
    let mut phases = server.watch_execution_phase();
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("smartllm-finisher".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    // After a SIGTERM drain, the same deadline (one
                    // `drain_timeout` in all, within the unit's stop timeout).
                    let started = *shared.drain_started.get_or_init(Instant::now);
                    loop {
                        let n = shared.in_flight.load(Ordering::SeqCst);
                        if n == 0 {
                            break;
                        }
                        if started.elapsed() >= drain_timeout + STREAM_END_WAIT {
                            tracing::warn!(in_flight = n, "stopping with requests still in flight");
                            break;
                        }
                        if started.elapsed() >= drain_timeout {
                            // Streams still open end with the gateway's
                            // error event; a moment to write it.
                            shared.drain_expired.send_replace(true);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if shared.in_flight.load(Ordering::SeqCst) == 0 {
                        tracing::info!(
                            drain_ms = started.elapsed().as_millis() as u64,
                            "listeners closed and in-flight requests done"
                        );
                    }
                    std::thread::sleep(grace);
                    finisher.finish();
                    let _ = stopped.send("finisher");
                    return;
                }
                Ok(ExecutionPhase::Terminated)
                | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                _ => {}
            }
        })
        .expect("spawning the finisher thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("smartllm").chain(args.iter().copied()))
    }

    fn costs_suggest(args: &[&str]) -> Result<(SuggestFrom, String), String> {
        let argv = || std::iter::once("smartllm").chain(args.iter().copied());
        let matches = Cli::command().try_get_matches_from(argv()).unwrap();
        let from = suggest_from(matches.subcommand_matches("costs").unwrap())?;
        let Ok(Cli {
            command:
                Command::Costs {
                    action: Some(CostsCmd::Suggest { target, since, .. }),
                    target: target_before,
                    since: since_before,
                    ..
                },
        }) = Cli::try_parse_from(argv())
        else {
            panic!("{args:?}: not costs suggest");
        };
        let (_, since) = suggest_args(
            (target_before, since_before),
            (target, since),
            matches.subcommand_matches("costs"),
        )?;
        Ok((from, since))
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn costs_options_before_suggest_apply_to_it() {
        let both = SuggestFrom {
            target_before: true,
            since_before: true,
        };
        assert_eq!(
            costs_suggest(&["costs", "--config", "/srv/gw", "--since", "30d", "suggest"]),
            Ok((both, "30d".to_string()))
        );
        assert_eq!(
            costs_suggest(&[
                "costs",
                "--admin",
                "10.0.0.1:9090",
                "suggest",
                "--since",
                "1h"
            ]),
            Ok((
                SuggestFrom {
                    target_before: true,
                    since_before: false,
                },
                "1h".to_string()
            ))
        );
        // After `suggest`, or nowhere: suggest's own (and its 7d default).
        assert_eq!(
            costs_suggest(&["costs", "suggest", "--config", "/srv/gw", "--since", "2d"]),
            Ok((SuggestFrom::default(), "2d".to_string()))
        );
        assert_eq!(
            costs_suggest(&["costs", "suggest"]),
            Ok((SuggestFrom::default(), "7d".to_string()))
        );
    }

    #[test]
    fn costs_options_suggest_cannot_take_are_refused() {
        for (args, want) in [
            (
                &["costs", "--by", "tenant", "suggest"][..],
                "not options of `costs suggest` (only of `smartllm costs`): --by",
            ),
            (
                &["costs", "--csv", "--fleet", "suggest"][..],
                "--csv, --fleet",
            ),
            (
                &["costs", "--config", "/a", "suggest", "--admin", "h:1"][..],
                "before: --config; after: --admin",
            ),
            (
                &["costs", "--since", "1d", "suggest", "--since", "2d"][..],
                "--since is given both",
            ),
        ] {
            let e = costs_suggest(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn prices_refuses_options_it_would_ignore() {
        for args in [
            &["prices", "--json", "--csv"][..],
            &["prices", "--config", "/etc/smartllm", "--csv"][..],
            &["prices", "--config", "/etc/smartllm", "--limit", "3"][..],
            &["prices", "--config", "/etc/smartllm", "claude"][..],
        ] {
            let e = parse(args).err().expect("refused");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{args:?}"
            );
        }
        for args in [
            &["prices", "--config", "/etc/smartllm", "--json"][..],
            &["prices", "claude", "sonnet", "--csv", "--limit", "3"][..],
            &["prices", "--json"][..],
        ] {
            assert!(parse(args).is_ok(), "{args:?}");
        }
    }
}
