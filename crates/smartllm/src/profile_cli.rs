//! `smartllm profile run`: measure each configured model's quality per task
//! on a labelled set, through the running gateway, and write it to a
//! `profiles.yaml` the router hot-reloads.
//!
//! The set is JSONL, one question a line: `{"id", "task", "kind", "question",
//! "choices"?, "answer"}`; `kind` is `exact` (the final answer must equal
//! `answer`: numbers compare as numbers, text case-insensitively) or `choice`
//! (`choices` are the options, shown as A, B, C...; `answer` is the right
//! option's letter). Each question goes to each model by name over the
//! gateway's OpenAI Chat Completions API (with the cache skipped), asking for
//! the final answer on a last line `Answer: ...`; the answers are scored and
//! the share right per task is the model's measured quality.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use smartllm_config::{Config, ModelMode, Task, PROFILES_FILE};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How a question's answer is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Exact,
    Choice,
}

/// One labelled question.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub task: Task,
    pub kind: Kind,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: String,
}

const LETTERS: &str = "ABCDEFGHIJ";

/// Parses a labelled set; every bad line is an error naming the line.
pub fn parse_set(text: &str) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {n}"))?;
        let s = |k: &str| -> anyhow::Result<String> {
            match v.get(k) {
                Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(Value::Number(x)) if k == "answer" => Ok(x.to_string()),
                _ => bail!("line {n}: {k:?} must be a non-empty string"),
            }
        };
        let id = s("id")?;
        if !ids.insert(id.clone()) {
            bail!("line {n}: id {id:?} is used twice");
        }
        let task_name = s("task")?;
        let task = Task::parse(&task_name).with_context(|| {
            format!(
                "line {n}: unknown task {task_name:?} (known: {})",
                Task::ALL.map(Task::as_str).join(", ")
            )
        })?;
        let kind = match s("kind")?.as_str() {
            "exact" => Kind::Exact,
            "choice" => Kind::Choice,
            other => bail!("line {n}: unknown kind {other:?} (exact or choice)"),
        };
        let choices: Vec<String> = match v.get("choices") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .with_context(|| format!("line {n}: \"choices\" must be strings"))?,
            Some(_) => bail!("line {n}: \"choices\" must be a list of strings"),
        };
        let answer = s("answer")?.trim().to_string();
        match kind {
            Kind::Choice => {
                if !(2..=LETTERS.len()).contains(&choices.len()) {
                    bail!(
                        "line {n}: a choice question needs 2 to {} choices",
                        LETTERS.len()
                    );
                }
                let ok = answer.len() == 1
                    && LETTERS[..choices.len()].contains(answer.to_ascii_uppercase().as_str());
                if !ok {
                    bail!(
                        "line {n}: \"answer\" must be the letter of one of the {} choices",
                        choices.len()
                    );
                }
            }
            Kind::Exact => {
                if !choices.is_empty() {
                    bail!("line {n}: an exact question has no choices");
                }
            }
        }
        items.push(Item {
            id,
            task,
            kind,
            question: s("question")?,
            choices,
            answer: if kind == Kind::Choice {
                answer.to_ascii_uppercase()
            } else {
                answer
            },
        });
    }
    if items.is_empty() {
        bail!("the set has no questions");
    }
    Ok(items)
}

/// The prompt a question is asked with.
pub fn prompt(item: &Item) -> String {
    match item.kind {
        Kind::Exact => format!(
            "{}\n\nWork it out, then give the final answer alone on the last line as \"Answer: <answer>\".",
            item.question
        ),
        Kind::Choice => {
            let options: Vec<String> = item
                .choices
                .iter()
                .zip(LETTERS.chars())
                .map(|(c, l)| format!("{l}. {c}"))
                .collect();
            format!(
                "{}\n\nOptions:\n{}\n\nGive the letter of the correct option alone on the last line as \"Answer: <letter>\".",
                item.question,
                options.join("\n")
            )
        }
    }
}

/// The final answer in a model's reply: what follows the last `Answer:` (its
/// line), else the last line; markdown emphasis, quotes and a final period removed.
fn final_answer(reply: &str) -> String {
    let lower = reply.to_ascii_lowercase();
    let tail = match lower.rfind("answer:") {
        Some(i) => &reply[i + "answer:".len()..],
        None => reply.trim().lines().last().unwrap_or(""),
    };
    let line = tail.trim().lines().next().unwrap_or("");
    line.trim()
        .trim_start_matches(|c: char| "*_`\"'$\\ ".contains(c))
        .trim_end_matches(|c: char| "*_`\"'$\\ .".contains(c))
        .to_string()
}

/// A number as written in an answer: `1,234`, `-7`, `3.50`, `\boxed{12}`.
fn number(s: &str) -> Option<f64> {
    let s = s
        .trim_start_matches('\\')
        .trim_start_matches("boxed{")
        .trim_end_matches('}')
        .replace([',', ' '], "");
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// Whether `reply` answers `item` right.
pub fn score(item: &Item, reply: &str) -> bool {
    let given = final_answer(reply);
    match item.kind {
        Kind::Exact => match (number(&given), number(&item.answer)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            _ => given.eq_ignore_ascii_case(&item.answer),
        },
        Kind::Choice => {
            // "B", "(B)", "B.", "B) text" or the option's text itself.
            let g = given.trim_start_matches('(');
            let mut chars = g.chars();
            let letter = chars.next().map(|c| c.to_ascii_uppercase());
            let rest = chars.as_str();
            let by_letter = letter.is_some_and(|l| l.to_string() == item.answer)
                && rest
                    .chars()
                    .next()
                    .is_none_or(|c| !c.is_ascii_alphanumeric());
            let right_text = LETTERS
                .find(item.answer.as_str())
                .and_then(|i| item.choices.get(i));
            by_letter || right_text.is_some_and(|t| t.trim().eq_ignore_ascii_case(&given))
        }
    }
}

/// Where and how to reach the running gateway's API listener.
pub struct Target {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// A virtual key (keys.yaml), if the gateway asks for one.
    pub key: Option<String>,
    /// The API listener's TLS (its certificate is pinned, as for the admin CLI).
    pub tls: Option<smartllm_config::TlsConfig>,
}

/// Options of `smartllm profile run`.
pub struct RunArgs {
    pub config: PathBuf,
    pub set: PathBuf,
    pub out: PathBuf,
    pub models: Option<Vec<String>>,
    pub url: Option<String>,
    pub key: Option<String>,
    pub concurrency: usize,
    pub max_tokens: u64,
}

/// Right answers and questions asked, per model and task, and failed requests.
#[derive(Debug, Default)]
struct Tally {
    scores: BTreeMap<String, BTreeMap<Task, (u64, u64)>>,
    errors: BTreeMap<String, (u64, String)>,
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let cfg = smartllm_config::load_dir(&a.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let set_text = std::fs::read_to_string(&a.set)
        .with_context(|| format!("reading the set {}", a.set.display()))?;
    let items = parse_set(&set_text).with_context(|| format!("the set {}", a.set.display()))?;
    let models = models_to_measure(&cfg, a.models.as_deref())?;
    // Before the first question, not after the last: a --out that cannot
    // take the result stops the run while nothing has been asked yet.
    let old = existing_profiles(&a.out)?;
    let target = Target {
        url: a.url.clone().unwrap_or_else(|| {
            let scheme = if cfg.server.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", cfg.server.listen)
        }),
        key: a.key.clone(),
        tls: cfg.server.tls.clone(),
    };
    let jobs: Vec<(&str, &Item)> = models
        .iter()
        .flat_map(|m| items.iter().map(move |i| (m.as_str(), i)))
        .collect();
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    eprintln!(
        "asking {} {} each through {}",
        plural(models.len(), "model", "models"),
        plural(items.len(), "question", "questions"),
        target.url
    );
    let tally = Mutex::new(Tally::default());
    let next = AtomicUsize::new(0);
    let fatal: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    // Whether the gateway has been reached: until then a connection that
    // fails is a wrong address or a stopped gateway, after it one request's
    // failure.
    let reached = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..a.concurrency.clamp(1, 64) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((model, item)) = jobs.get(i) else {
                    return;
                };
                if fatal.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let outcome = ask(&target, model, &prompt(item), a.max_tokens, &reached);
                let Ok(mut t) = tally.lock() else { return };
                match outcome {
                    Ok(reply) => {
                        let e = t
                            .scores
                            .entry(model.to_string())
                            .or_default()
                            .entry(item.task)
                            .or_default();
                        e.0 += u64::from(score(item, &reply));
                        e.1 += 1;
                    }
                    Err(AskError::Refused(msg)) => {
                        if let Ok(mut f) = fatal.lock() {
                            f.get_or_insert(anyhow::anyhow!("{msg}"));
                        }
                    }
                    Err(AskError::Failed(msg)) => {
                        let e = t.errors.entry(model.to_string()).or_insert((0, msg));
                        e.0 += 1;
                    }
                }
            });
        }
    });
    let tally = tally
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a worker panicked"))?;
    if let Some(e) = fatal.into_inner().ok().flatten() {
        if !tally.scores.is_empty() {
            print_table(&tally, &models);
        }
        return Err(e.context(format!("{} not written", a.out.display())));
    }
    print_table(&tally, &models);
    if tally.scores.is_empty() {
        bail!("no question got an answer: nothing to write");
    }
    let set_name = a.set.display().to_string();
    let text = merged_profiles(old, &tally, &set_name, &items);
    write_profiles(&cfg, &a.out, &text)?;
    eprintln!(
        "wrote {}{}",
        a.out.display(),
        if is_config_profiles(&cfg, &a.out) {
            " (the gateway reloads it)"
        } else {
            ""
        }
    );
    Ok(())
}

fn models_to_measure(cfg: &Config, wanted: Option<&[String]>) -> anyhow::Result<Vec<String>> {
    let chat: Vec<String> = cfg
        .models
        .iter()
        .filter(|m| m.mode == ModelMode::Chat)
        .map(|m| m.name.clone())
        .collect();
    let Some(wanted) = wanted else {
        if chat.is_empty() {
            bail!("the config has no chat models");
        }
        return Ok(chat);
    };
    for m in wanted {
        if !chat.contains(m) {
            bail!(
                "--models: {m:?} is not a chat model of the config (it defines: {})",
                chat.join(", ")
            );
        }
    }
    Ok(wanted.to_vec())
}

fn print_table(t: &Tally, models: &[String]) {
    println!(
        "{:<28} {:<14} {:>9} {:>8}",
        "model", "task", "right", "quality"
    );
    for m in models {
        for (task, (right, asked)) in t.scores.get(m).into_iter().flatten() {
            println!(
                "{:<28} {:<14} {:>9} {:>8.3}",
                m,
                task.as_str(),
                format!("{right}/{asked}"),
                *right as f64 / *asked as f64
            );
        }
        if let Some((n, first)) = t.errors.get(m) {
            println!("{m:<28} {n} requests failed (not scored), first: {first}");
        }
    }
}

#[derive(Debug)]
enum AskError {
    /// The gateway refuses our key, or it was never reached (a wrong
    /// address, a gateway not running, a certificate that is not the
    /// pinned one): stop at once.
    Refused(String),
    /// This request failed (upstream error, unknown model, timeout, reset,
    /// a broken answer): count it, go on.
    Failed(String),
}

/// Why a request got no HTTP answer.
#[derive(Debug)]
enum PostError {
    /// No connection was made (a bad --url, TCP connect, the TLS
    /// handshake): nothing was sent.
    Connect(anyhow::Error),
    /// Connected, then sending, reading or parsing the answer failed.
    Request(anyhow::Error),
}

/// What a request without an answer means for the run: one that fails
/// before the gateway ever answered stops it (nothing listens, a port that
/// speaks another protocol or never answers); once the gateway has
/// answered, any failure (a restart, a reset, a timeout) is this request's,
/// reported and not scored.
fn no_answer(e: PostError, reached: &AtomicBool) -> AskError {
    let (PostError::Connect(e) | PostError::Request(e)) = e;
    if reached.load(Ordering::Relaxed) {
        AskError::Failed(format!("{e:#}"))
    } else {
        AskError::Refused(format!("{e:#}"))
    }
}

fn ask(
    t: &Target,
    model: &str,
    prompt: &str,
    max_tokens: u64,
    reached: &AtomicBool,
) -> Result<String, AskError> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    });
    let (status, text) = match post(t, "/v1/chat/completions", &body.to_string()) {
        Ok(answer) => {
            reached.store(true, Ordering::Relaxed);
            answer
        }
        Err(e) => return Err(no_answer(e, reached)),
    };
    answer_of(model, status, &text)
}

/// The reply's text, or why there is none: 401 and 403 (the key) stop the
/// run; any other status is this request's failure.
fn answer_of(model: &str, status: u16, text: &str) -> Result<String, AskError> {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let message = || {
        v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(200).collect())
    };
    match status {
        200 => v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AskError::Failed(format!("an answer without text from {model}"))),
        401 | 403 => Err(AskError::Refused(format!(
            "the gateway refused the key ({status}): {} (pass a virtual key with --key or SMARTLLM_API_KEY)",
            message()
        ))),
        s => Err(AskError::Failed(format!("{s}: {}", message()))),
    }
}

/// One HTTP/1.1 POST to the API listener (a connection per request).
fn post(t: &Target, path: &str, body: &str) -> Result<(u16, String), PostError> {
    use PostError::{Connect, Request};
    let (tls, hostport) = match t.url.split_once("://") {
        Some(("http", rest)) => (false, rest.trim_end_matches('/')),
        Some(("https", rest)) => (true, rest.trim_end_matches('/')),
        _ => {
            return Err(Connect(anyhow::anyhow!(
                "--url {:?}: expected http://HOST:PORT or https://HOST:PORT",
                t.url
            )))
        }
    };
    let tcp = std::net::TcpStream::connect(hostport)
        .with_context(|| format!("connecting to the gateway at {hostport} (is smartllm running?)"))
        .map_err(Connect)?;
    tcp.set_read_timeout(Some(Duration::from_secs(600)))
        .context("setting the read timeout")
        .map_err(Connect)?;
    let auth = t
        .key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Content-Type: application/json\r\nCache-Control: no-store\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut raw = Vec::new();
    if tls {
        let settings = t
            .tls
            .as_ref()
            .context("an https --url needs server.tls in the config (its certificate is pinned)")
            .map_err(Connect)?;
        let mut s = crate::admin_tls::connect(tcp, settings, None).map_err(Connect)?;
        // The handshake first, on its own: a certificate that is not the
        // pinned one is a connection that failed, not a request.
        if s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .context("TLS handshake with the gateway")
                .map_err(Connect)?;
        }
        s.write_all(request.as_bytes())
            .context("sending the request over TLS")
            .map_err(Request)?;
        if let Err(e) = s.read_to_end(&mut raw) {
            if raw.is_empty() {
                return Err(Request(
                    anyhow::Error::new(e).context("reading the gateway's answer over TLS"),
                ));
            }
        }
    } else {
        let mut s = tcp;
        s.write_all(request.as_bytes())
            .context("sending the request")
            .map_err(Request)?;
        s.read_to_end(&mut raw)
            .context("reading the gateway's answer")
            .map_err(Request)?;
    }
    parse_response(&raw).map_err(Request)
}

/// Status and body of an HTTP/1.1 response read to its end (chunked or not).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the gateway's answer has no HTTP head")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the gateway's answer has no status")?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let mut body = &raw[end + 4..];
    if !chunked {
        return Ok((status, String::from_utf8_lossy(body).into_owned()));
    }
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size without its line end")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            break;
        }
        if body.len() < size {
            bail!("the gateway's answer ended inside a chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}

/// Quality and answer count per model and task (the answer count 0 where
/// the file names none).
type Measured = BTreeMap<String, BTreeMap<String, (f64, u64)>>;

/// What `out` holds already (nothing when it does not exist), read before
/// any question is asked so that an --out that is not a profiles file, or
/// that cannot be written, stops the run before it starts.
fn existing_profiles(out: &Path) -> anyhow::Result<Measured> {
    out.file_name().context("--out must name a file")?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--out {}: the directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    let mut models = Measured::new();
    match std::fs::read_to_string(out) {
        Ok(text) => {
            let old = smartllm_config::parse_profiles_file(dir, &text)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("{} exists but is not a profiles file", out.display()))?;
            for (m, p) in old.models {
                let e = models.entry(m).or_default();
                for (task, q) in p.quality {
                    let n = p.answers.get(&task).copied().unwrap_or(0);
                    e.insert(task, (q, n));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    }
    Ok(models)
}

/// The new file's text: the models measured now replace the tasks they were
/// measured on; other models and tasks of `old` (the file's) stay.
fn merged_profiles(old: Measured, t: &Tally, set: &str, items: &[Item]) -> String {
    let mut models = old;
    for (m, by_task) in &t.scores {
        let e = models.entry(m.clone()).or_default();
        for (task, (right, asked)) in by_task {
            e.insert(
                task.as_str().to_string(),
                (*right as f64 / *asked as f64, *asked),
            );
        }
    }
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut text = format!(
        "# Written by `smartllm profile run`: the share of answers scored right per\n\
         # task, measured through the gateway on a labelled set ({} questions in the\n\
         # last run). For the tasks named here it replaces models.yaml's quality.\n\
         set: {}\nmeasured_at: {}\nmodels:\n",
        items.len(),
        q(set),
        q(&smartllm_ledger::format_rfc3339(
            smartllm_protocol::time::now_secs(),
        ))
    );
    for (m, by_task) in &models {
        let quality: Vec<String> = by_task
            .iter()
            .map(|(k, (v, _))| format!("{k}: {}", round3(*v)))
            .collect();
        let answers: Vec<String> = by_task
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(k, (_, n))| format!("{k}: {n}"))
            .collect();
        text.push_str(&format!(
            "  {}:\n    quality: {{ {} }}\n",
            q(m),
            quality.join(", ")
        ));
        if !answers.is_empty() {
            text.push_str(&format!("    answers: {{ {} }}\n", answers.join(", ")));
        }
    }
    text
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn is_config_profiles(cfg: &Config, out: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    out.file_name().and_then(|n| n.to_str()) == Some(PROFILES_FILE)
        && out
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .and_then(canon)
            == canon(&cfg.dir)
}

/// Writes `out` atomically; when it is the config directory's `profiles.yaml`,
/// only if the directory still loads with it (a measurement never breaks a reload).
fn write_profiles(cfg: &Config, out: &Path, text: &str) -> anyhow::Result<()> {
    if is_config_profiles(cfg, out) {
        let mut texts: BTreeMap<&'static str, String> = BTreeMap::new();
        for file in smartllm_config::FILES {
            if file == PROFILES_FILE {
                continue;
            }
            match std::fs::read_to_string(cfg.dir.join(file)) {
                Ok(t) => {
                    texts.insert(file, t);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {}", cfg.dir.join(file).display()))
                }
            }
        }
        texts.insert(PROFILES_FILE, text.to_string());
        smartllm_config::load_texts(&cfg.dir, texts).map_err(|e| {
            anyhow::anyhow!("the measured profiles would make the config invalid:\n{e}")
        })?;
    }
    out.file_name().context("--out must name a file")?;
    crate::config_write::replace(out, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: Kind, answer: &str, choices: &[&str]) -> Item {
        Item {
            id: "x".into(),
            task: Task::Math,
            kind,
            question: "q".into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            answer: answer.into(),
        }
    }

    #[test]
    fn exact_answers_are_scored_on_the_final_answer() {
        let i = item(Kind::Exact, "187017", &[]);
        assert!(score(&i, "323 x 579 = 187,017\nAnswer: 187017"));
        assert!(score(&i, "Answer: **187,017**."));
        assert!(score(&i, "so the result is\n187017"));
        assert!(score(&i, "Answer: \\boxed{187017}"));
        assert!(!score(&i, "Answer: 187018"));
        assert!(!score(&i, "187017 is close, but Answer: 187016"));
        assert!(!score(&i, ""));
        let d = item(Kind::Exact, "2.5", &[]);
        assert!(score(&d, "answer: 2.50"));
        let w = item(Kind::Exact, "three", &[]);
        assert!(score(&w, "Answer: Three"));
    }

    #[test]
    fn choices_are_scored_by_letter_or_text() {
        let i = item(Kind::Choice, "B", &["prints 1 to 10", "prints 0 to 22"]);
        for right in [
            "Answer: B",
            "answer: (B)",
            "Answer: B. prints 0 to 22",
            "Answer: prints 0 to 22",
            "B",
        ] {
            assert!(score(&i, right), "{right}");
        }
        for wrong in ["Answer: A", "Answer: Because", "Answer: BA", "no idea"] {
            assert!(!score(&i, wrong), "{wrong}");
        }
    }

    #[test]
    fn the_shipped_set_parses_and_its_gold_answers_score_right() {
        let text = include_str!("../../../data/profile/set.jsonl");
        let items = parse_set(text).unwrap();
        assert_eq!(items.len(), 120);
        for t in [Task::Math, Task::Reasoning, Task::Code] {
            assert_eq!(items.iter().filter(|i| i.task == t).count(), 40);
        }
        for i in &items {
            let p = prompt(i);
            assert!(p.contains(&i.question));
            assert!(score(i, &format!("Answer: {}", i.answer)), "{}", i.id);
        }
    }

    #[test]
    fn bad_sets_are_refused_with_their_line() {
        let ok = r#"{"id": "a", "task": "math", "kind": "exact", "question": "1+1?", "answer": 2}"#;
        assert_eq!(parse_set(ok).unwrap()[0].answer, "2");
        for (bad, want) in [
            ("", "no questions"),
            ("not json", "line 1"),
            (
                r#"{"id": "a", "task": "cooking", "kind": "exact", "question": "q", "answer": "1"}"#,
                "unknown task \"cooking\"",
            ),
            (
                r#"{"id": "a", "task": "math", "kind": "essay", "question": "q", "answer": "1"}"#,
                "unknown kind",
            ),
            (
                r#"{"id": "a", "task": "math", "kind": "choice", "question": "q", "choices": ["x", "y"], "answer": "C"}"#,
                "letter of one of the 2 choices",
            ),
            (
                r#"{"id": "a", "task": "math", "kind": "exact", "question": "", "answer": "1"}"#,
                "\"question\" must be a non-empty string",
            ),
        ] {
            let e = format!("{:#}", parse_set(bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
        let twice = format!("{ok}\n{ok}\n");
        assert!(format!("{:#}", parse_set(&twice).unwrap_err()).contains("line 2: id \"a\""));
    }

    #[test]
    fn chunked_and_plain_answers_are_read() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".to_string()));
        let chunked =
            b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (502, "abcde".to_string()));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab")
                .is_err()
        );
    }

    #[test]
    fn merged_file_keeps_other_models_and_loads() {
        let dir =
            std::env::temp_dir().join(format!("smartllm-profile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("profiles.yaml");
        std::fs::write(
            &out,
            "models:\n  old:\n    quality: { chat: 0.5, math: 0.1 }\n    answers: { math: 3 }\n",
        )
        .unwrap();
        let mut t = Tally::default();
        t.scores
            .entry("old".into())
            .or_default()
            .insert(Task::Math, (3, 4));
        t.scores
            .entry("org/new:1b".into())
            .or_default()
            .insert(Task::Code, (1, 3));
        let items = parse_set(include_str!("../../../data/profile/set.jsonl")).unwrap();
        let old = existing_profiles(&out).unwrap();
        let text = merged_profiles(old, &t, "set.jsonl", &items);
        let p = smartllm_config::parse_profiles_file(&dir, &text).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(p.models["old"].quality["math"], 0.75);
        assert_eq!(p.models["old"].quality["chat"], 0.5, "kept");
        assert_eq!(p.models["old"].answers["math"], 4);
        assert_eq!(p.models["org/new:1b"].quality["code"], 0.333);
        assert_eq!(p.set.as_deref(), Some("set.jsonl"));
    }

    #[test]
    fn a_bad_out_stops_the_run_before_any_question() {
        let dir = std::env::temp_dir().join(format!("smartllm-profile-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("profiles.yaml");
        std::fs::write(&bad, "models: [this is not, a profiles file\n").unwrap();
        let e = format!("{:#}", existing_profiles(&bad).unwrap_err());
        assert!(e.contains("exists but is not a profiles file"), "{e}");
        assert!(existing_profiles(&dir.join("new.yaml")).unwrap().is_empty());
        let e = format!(
            "{:#}",
            existing_profiles(&dir.join("missing/profiles.yaml")).unwrap_err()
        );
        assert!(e.contains("does not exist"), "{e}");
        assert!(existing_profiles(Path::new("/")).is_err());
        // The whole command: refused on --out, with the gateway never asked
        // (nothing listens on port 1).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let r = run(RunArgs {
            config: root.join("conf"),
            set: root.join("data/profile/set.jsonl"),
            out: bad.clone(),
            models: None,
            url: Some("http://127.0.0.1:1".into()),
            key: None,
            concurrency: 1,
            max_tokens: 16,
        });
        std::fs::remove_dir_all(&dir).unwrap();
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("exists but is not a profiles file"), "{e}");
    }

    #[test]
    fn only_the_key_or_an_unreachable_gateway_stops_the_run() {
        use std::net::TcpListener;
        let target = |port: u16| Target {
            url: format!("http://127.0.0.1:{port}"),
            key: None,
            tls: None,
        };
        // A gateway that answers the first request, then closes the second
        // connection without an answer.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // The whole request is read (its head and Content-Length bytes of
        // body), so that closing the connection is a clean end, not a reset.
        let complete = |request: &[u8]| {
            let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                return false;
            };
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            request.len() >= end + 4 + len
        };
        let server = std::thread::spawn(move || {
            for (i, conn) in listener.incoming().take(2).enumerate() {
                let mut conn = conn.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !complete(&request) {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                if i == 0 {
                    let body = r#"{"choices": [{"message": {"content": "Answer: 4"}}]}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    conn.write_all(answer.as_bytes()).unwrap();
                }
            }
        });
        // Before the gateway was reached, a refused connection stops the run.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let reached = AtomicBool::new(false);
        match ask(&target(closed), "m", "q", 16, &reached) {
            Err(AskError::Refused(m)) => assert!(m.contains("connecting"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ask(&target(port), "m", "q", 16, &reached).unwrap(),
            "Answer: 4"
        );
        // An answer that never comes is this request's failure.
        match ask(&target(port), "m", "q", 16, &reached) {
            Err(AskError::Failed(m)) => assert!(m.contains("no HTTP head"), "{m}"),
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        // The gateway gone after it was reached: counted, not fatal.
        match ask(&target(port), "m", "q", 16, &reached) {
            Err(AskError::Failed(m)) => assert!(m.contains("connecting"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Before any answer, a request that was sent and then failed (a
        // port that speaks TLS, or never answers) stops the run too.
        let fresh = AtomicBool::new(false);
        let failed = no_answer(PostError::Request(anyhow::anyhow!("reset")), &fresh);
        assert!(matches!(failed, AskError::Refused(_)));
        assert!(matches!(
            no_answer(PostError::Connect(anyhow::anyhow!("refused")), &fresh),
            AskError::Refused(_)
        ));
    }

    #[test]
    fn statuses_other_than_a_refused_key_are_failed_requests() {
        let ok = r#"{"choices": [{"message": {"content": "Answer: B"}}]}"#;
        assert_eq!(answer_of("m", 200, ok).unwrap(), "Answer: B");
        assert!(matches!(
            answer_of("m", 200, "{}"),
            Err(AskError::Failed(_))
        ));
        for status in [401, 403] {
            match answer_of("m", status, r#"{"error": {"message": "no key"}}"#) {
                Err(AskError::Refused(m)) => {
                    assert!(m.contains("refused the key") && m.contains("no key"), "{m}")
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        for status in [400, 404, 429, 500, 502, 504] {
            match answer_of("m", status, r#"{"error": {"message": "upstream"}}"#) {
                Err(AskError::Failed(m)) => assert_eq!(m, format!("{status}: upstream")),
                other => panic!("{status}: {other:?}"),
            }
        }
    }
}
