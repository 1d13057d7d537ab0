//! Request features: what the router knows about a prompt before choosing.

use crate::classifier::TaskClassifier;
use crate::language;
use aho_corasick::{AhoCorasick, Input, MatchKind};
use serde::Serialize;
use serde_json::{Map, Value};
use smartllm_config::Task;
use std::sync::OnceLock;

#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub task: Task,
    /// How sure the classifier is (share of the neighbours' vote, 0-1).
    pub task_confidence: f32,
    /// `embedding` (nearest labelled examples), `embedding+keywords` (the
    /// prompt's words asked for some tasks and the vote chose among them;
    /// the confidence is then the chosen task's share of the whole vote,
    /// 0 when its words alone chose it) or `keywords` (no embedding);
    /// `-translation` after either: a prompt in another language than
    /// English that asked for no translation, voted on with the
    /// translation examples left out (the confidence is then a share of
    /// the others' votes).
    pub task_source: &'static str,
    /// 0 (trivial) to 1 (hard): length, structure, reasoning markers, task.
    pub complexity: f64,
    /// Tokens of every message (o200k estimate).
    pub prompt_tokens: u64,
    pub language: &'static str,
    pub has_code: bool,
    pub has_math: bool,
    pub has_tools: bool,
    pub has_images: bool,
    /// `max_completion_tokens` / `max_tokens` as asked.
    pub max_tokens: Option<u64>,
    /// Expected completion tokens (max_tokens, else typical for the task).
    pub expected_output_tokens: u64,
    /// Capabilities the request needs (tools, vision, json, streaming, audio).
    pub needs: Vec<&'static str>,
    /// Set by the gateway for an Anthropic Messages request with extended
    /// thinking (or thinking blocks in its history): an OpenAI-compatible
    /// provider takes it only with `drop_thinking`.
    pub thinking: bool,
    /// Set by the gateway for a Messages request with what only an
    /// Anthropic provider takes (a server tool, a document block): its path.
    pub anthropic_only: Option<String>,
    /// Set by the gateway for a Responses request with built-in tools
    /// (`web_search`, ...) that only they keep from translation: their
    /// types. A provider takes it when it speaks Responses (it runs them)
    /// or is set to drop them (`drop_builtin_tools`).
    pub builtin_tools: Option<String>,
    /// What only an OpenAI-compatible provider gives (`logprobs`,
    /// `logit_bias`): a model served only through Anthropic is no
    /// candidate.
    pub openai_only: Option<&'static str>,
    /// What an OpenAI reasoning model (one listed with `reasoning`) cannot
    /// give and answers 400 to: `stop` (Anthropic's `stop_sequences`),
    /// `logprobs`, `logit_bias`. Such a model is no candidate.
    pub reasoning_refused: Option<&'static str>,
    /// `response_format` is `json_schema`: a model served only through
    /// Anthropic must take structured outputs (`structured_outputs`).
    pub json_schema: bool,
    /// Turns in the conversation.
    pub turns: usize,
}

fn text_of(content: &Value, out: &mut String, images: &mut bool, audio: &mut bool) {
    match content {
        Value::String(s) => out.push_str(s),
        Value::Array(parts) => {
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                            out.push('\n');
                        }
                    }
                    Some("image_url") | Some("image") | Some("input_image") => *images = true,
                    Some("input_audio") | Some("audio") => *audio = true,
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// The last user turn (what is classified and embedded) and every message's text.
pub fn prompt_texts(body: &Map<String, Value>) -> (String, String, bool, usize) {
    let p = Prompt::read(body, true);
    (p.last.into_owned(), p.all, p.images, p.turns)
}

/// What [`extract_with`] reads of a request's messages.
struct Prompt<'a> {
    /// The last user turn: borrowed from the body when it is one string.
    last: std::borrow::Cow<'a, str>,
    /// Every message's text and the names and arguments of the tool calls
    /// it makes, one per line (only when asked for).
    all: String,
    /// The length `all` has (or would have).
    all_len: usize,
    images: bool,
    /// An audio part in any message.
    audio: bool,
    turns: usize,
}

impl<'a> Prompt<'a> {
    fn read(body: &'a Map<String, Value>, with_all: bool) -> Self {
        use std::borrow::Cow;
        let mut p = Prompt {
            last: Cow::Borrowed(""),
            all: String::new(),
            all_len: 0,
            images: false,
            audio: false,
            turns: 0,
        };
        if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
            p.turns = msgs.len();
            for m in msgs {
                let content = m.get("content").unwrap_or(&Value::Null);
                let text: Cow<'a, str> = match content {
                    Value::String(s) => Cow::Borrowed(s.as_str()),
                    _ => {
                        let mut t = String::new();
                        text_of(content, &mut t, &mut p.images, &mut p.audio);
                        Cow::Owned(t)
                    }
                };
                p.all_len += text.len() + 1;
                if with_all {
                    p.all.push_str(&text);
                    p.all.push('\n');
                }
                // An agent's tool calls go back to the model with every
                // turn: their arguments (whole files written, long queries)
                // take room in its context window like any text.
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
                    for s in calls
                        .iter()
                        .filter_map(|c| c.get("function"))
                        .flat_map(|f| [f.get("name"), f.get("arguments")])
                        .filter_map(|v| v.and_then(Value::as_str))
                    {
                        p.all_len += s.len() + 1;
                        if with_all {
                            p.all.push_str(s);
                            p.all.push('\n');
                        }
                    }
                }
                if m.get("role").and_then(Value::as_str) == Some("user") {
                    p.last = text;
                }
            }
        } else if let Some(prompt) = body.get("prompt") {
            let mut all = String::new();
            match prompt {
                Value::String(s) => all.push_str(s),
                Value::Array(items) => {
                    for i in items {
                        if let Some(s) = i.as_str() {
                            all.push_str(s);
                            all.push('\n');
                        }
                    }
                }
                _ => {}
            }
            p.all_len = all.len();
            p.last = Cow::Owned(all.clone());
            if with_all {
                p.all = all;
            }
            p.turns = 1;
        }
        p
    }
}

const CODE_MARKERS: [&str; 24] = [
    "```",
    "def ",
    "fn ",
    "function ",
    "class ",
    "#include",
    "import ",
    "=>",
    "console.log",
    "public static",
    "return ",
    "let ",
    "const ",
    "SELECT ",
    "for (",
    "while (",
    "println",
    "std::",
    "async ",
    "#!/",
    "</",
    "();",
    "self.",
    "var ",
];
/// The code markers that are also English words ("function ", "class ",
/// "import ", "return ", "let ", "const ", "async ", "var "), as bits of
/// [`CODE_MARKERS`]: prose holds two of them easily ("import goods and
/// return them").
const ENGLISH_MARKERS: u64 =
    1 << 3 | 1 << 4 | 1 << 6 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 18 | 1 << 23;
const CODE_WORDS: [&str; 22] = [
    "python",
    "rust",
    "javascript",
    "typescript",
    "java ",
    "golang",
    "c++",
    "sql",
    "bash",
    "regex",
    "function",
    "compile",
    "debug",
    "refactor",
    "bug",
    "stack trace",
    "api",
    "unit test",
    "algorithm",
    "implement",
    "code",
    "script",
];
const MATH_MARKERS: [&str; 12] = [
    "\\frac", "\\int", "\\sum", "\\sqrt", "$$", "∫", "√", "≤", "≥", "∑", "^2", "x^",
];
const MATH_WORDS: [&str; 20] = [
    "integral",
    "derivative",
    "equation",
    "solve for",
    "matrix",
    "probability",
    "theorem",
    "prime",
    "calculate",
    "compute the",
    "polynomial",
    "eigen",
    "factorial",
    "geometric",
    "arithmetic",
    "percent",
    "how many",
    "sum of",
    "prove that",
    "square root",
];
const REASONING_MARKERS: [&str; 32] = [
    "step by step",
    "prove",
    "derive",
    "explain why",
    "analy",
    "compare",
    "trade-off",
    "tradeoff",
    "design",
    "architecture",
    "optimi",
    "complexity",
    "concurren",
    "distributed",
    "edge case",
    "rigorous",
    "justify",
    "evaluate",
    "critique",
    "formal",
    "lock-free",
    "consisten",
    "scalab",
    "in depth",
    "thread-safe",
    "memory order",
    "invariant",
    "o(1)",
    "o(n",
    "correctness",
    "race condition",
    "why does",
];

/// The first two and those from the seventh on ask for a translation (the
/// word in other languages: French, Spanish, Portuguese and Italian
/// "tradu…", German, Dutch, Swedish, Danish, Norwegian, Polish, Czech,
/// Russian, Ukrainian, Japanese, Chinese, Korean, Arabic, Hebrew, Thai,
/// Hindi, Finnish, Greek, Indonesian, Turkish); the rest only name a
/// language (`Keywords::asks_translation`). Words that also mean something
/// else are left out or taken with what follows: Polish "tłumacz" is in
/// "wytłumacz" (explain), Russian "перевод" is a money transfer, Turkish
/// "çevir" is to turn, Czech "překlad" is in "překladač" (compiler).
const TRANSLATION_WORDS: [&str; 38] = [
    "translate",
    "translation",
    "in french",
    "in spanish",
    "in german",
    "into english",
    "tradu",
    "tradú",
    "übersetz",
    "uebersetz",
    "vertaal",
    "vertal",
    "översätt",
    "oversæt",
    "oversett",
    "przetłumacz",
    "přelož",
    "переведи на",
    "перевод на",
    "перевести на",
    "перекла",
    "翻訳",
    "訳して",
    "翻译",
    "翻譯",
    "번역",
    "ترجم",
    "תרגם",
    "แปลเป็น",
    "अनुवाद",
    "käännä",
    "käännös",
    "μετάφρ",
    "μεταφρ",
    "terjemah",
    "tercüme",
    "çevirir misin",
    "çevirin",
];
/// Languages' names (lower case): in English (code ""), counted as whole
/// words ("italian", not "italiano"); and in other languages, as stems,
/// with the code [`language::detect`] gives the language itself, whose own
/// prompts they do not count in ("Deutschland", "用中文回答"). A prompt in
/// another language than English that names a language may be about
/// translating ("Vad betyder det på engelska?", "Swedish proverb: …").
const LANGUAGE_NAMES: [(&str, &str); 52] = [
    ("english", ""),
    ("french", ""),
    ("german", ""),
    ("spanish", ""),
    ("italian", ""),
    ("portuguese", ""),
    ("dutch", ""),
    ("swedish", ""),
    ("norwegian", ""),
    ("danish", ""),
    ("finnish", ""),
    ("polish", ""),
    ("czech", ""),
    ("russian", ""),
    ("ukrainian", ""),
    ("chinese", ""),
    ("japanese", ""),
    ("korean", ""),
    ("arabic", ""),
    ("hindi", ""),
    ("turkish", ""),
    ("greek", ""),
    ("hebrew", ""),
    ("latin", ""),
    ("anglais", "en"),
    ("englisch", "en"),
    ("inglés", "en"),
    ("ingles", "en"),
    ("inglês", "en"),
    ("inglese", "en"),
    ("engels", "en"),
    ("engelsk", "en"),
    ("angielsk", "en"),
    ("angličtin", "en"),
    ("angol", "en"),
    ("ingilizce", "en"),
    ("английск", "en"),
    ("англій", "en"),
    ("αγγλικ", "en"),
    ("אנגלית", "en"),
    ("إنجليز", "en"),
    ("انجليز", "en"),
    ("अंग्रेज", "en"),
    ("อังกฤษ", "en"),
    ("英語", "en"),
    ("英语", "en"),
    ("英文", "en"),
    ("영어", "en"),
    ("deutsch", "de"),
    ("français", "fr"),
    ("francés", "fr"),
    ("中文", "zh"),
];

/// Whether `text` names a language other than `lang` (the text's own), or
/// holds one of [`TRANSLATION_WORDS`]' names.
fn names_other_language(text: &str, lang: &str) -> bool {
    let lower = text.to_lowercase();
    LANGUAGE_NAMES.iter().any(|(name, code)| {
        if code.is_empty() {
            lower.match_indices(name).any(|(at, _)| {
                !lower[at + name.len()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphabetic)
            })
        } else {
            *code != lang && lower.contains(name)
        }
    })
}

/// [`TRANSLATION_WORDS`] that ask for a translation: not a language's name.
const TRANSLATION_ASKS: u64 = !0b11_1100;
/// The first three ask for a summary; the rest can be a format ("explain in
/// one sentence", "the key points to consider") (`Keywords::asks_summary`).
const SUMMARY_WORDS: [&str; 5] = ["summar", "tl;dr", "tldr", "key points", "in one sentence"];
/// "extract", "parse the following" and "fill in the fields" ask for an
/// extraction; the others also occur in other requests ("list all the
/// countries", "pull out a splinter", "a recipe as JSON")
/// (`Keywords::asks_extraction`).
const EXTRACTION_WORDS: [&str; 6] = [
    "extract",
    "list all the",
    "pull out",
    "parse the following",
    "as json",
    "fill in the fields",
];
const CREATIVE_WORDS: [&str; 8] = [
    "poem", "story", "haiku", "lyrics", "slogan", "imagine", "creative", "fiction",
];
const PUZZLE_WORDS: [&str; 4] = ["why ", "puzzle", "riddle", "logic"];

/// The keyword lists [`Keywords`] counts on the lower-cased prompt.
const FOLDED_LISTS: [&[&str]; 9] = [
    &CODE_WORDS,
    &MATH_MARKERS,
    &MATH_WORDS,
    &REASONING_MARKERS,
    &TRANSLATION_WORDS,
    &SUMMARY_WORDS,
    &EXTRACTION_WORDS,
    &CREATIVE_WORDS,
    &PUZZLE_WORDS,
];
const CODE_WORDS_LIST: usize = 0;
const MATH_MARKERS_LIST: usize = 1;
const MATH_WORDS_LIST: usize = 2;
const REASONING_LIST: usize = 3;
const TRANSLATION_LIST: usize = 4;
const SUMMARY_LIST: usize = 5;
const EXTRACTION_LIST: usize = 6;
const CREATIVE_LIST: usize = 7;
const PUZZLE_LIST: usize = 8;

/// Searchers over a set of keyword lists: each needle found sets its bit in
/// every list that holds it. Needles are split into groups in which none is a
/// prefix of another, at most [`GROUP`] each (so the SIMD prefilter takes
/// them); a group is searched leftmost-first and resumed one byte after each
/// match's start, which finds every needle that occurs: two needles of a
/// group cannot start at the same byte.
struct Automaton {
    groups: Vec<(AhoCorasick, Vec<Owners>)>,
    /// Needles that start with a letter count only at the start of a word
    /// ("let " in "let x", not in "tablet "; "class " in "class Foo", not in
    /// "subclass ").
    word_start: bool,
}

/// The (list, index) pairs of one needle.
type Owners = Vec<(usize, usize)>;

const GROUP: usize = 12;

impl Automaton {
    fn new(lists: &[&[&str]], word_start: bool) -> Self {
        let mut needles: Vec<&str> = Vec::new();
        let mut owners: Vec<Owners> = Vec::new();
        for (l, list) in lists.iter().enumerate() {
            assert!(list.len() <= 64, "a keyword list holds at most 64 needles");
            assert!(
                lists.len() <= MAX_LISTS,
                "at most {MAX_LISTS} keyword lists"
            );
            for (i, n) in list.iter().enumerate() {
                match needles.iter().position(|m| m == n) {
                    Some(p) => owners[p].push((l, i)),
                    None => {
                        needles.push(n);
                        owners.push(vec![(l, i)]);
                    }
                }
            }
        }
        let mut groups: Vec<(Vec<&str>, Vec<Owners>)> = Vec::new();
        for (n, o) in needles.into_iter().zip(owners) {
            let fits = |g: &Vec<&str>| {
                g.len() < GROUP && g.iter().all(|m| !m.starts_with(n) && !n.starts_with(m))
            };
            match groups.iter_mut().find(|(g, _)| fits(g)) {
                Some((g, os)) => {
                    g.push(n);
                    os.push(o);
                }
                None => groups.push((vec![n], vec![o])),
            }
        }
        let groups = groups
            .into_iter()
            .map(|(g, os)| {
                let ac = AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&g)
                    .expect("the keyword lists build a searcher");
                (ac, os)
            })
            .collect();
        Self { groups, word_start }
    }

    /// Which needles of each list occur in `text` (bit i: the list's needle i).
    fn found(&self, text: &str) -> [u64; MAX_LISTS] {
        let mut seen = [0u64; MAX_LISTS];
        for (ac, owners) in &self.groups {
            let mut at = 0;
            while at < text.len() {
                let Some(m) = ac.find(Input::new(text).range(at..)) else {
                    break;
                };
                let inside_word = self.word_start
                    && text.as_bytes()[m.start()].is_ascii_alphabetic()
                    && m.start() > 0
                    && {
                        let b = text.as_bytes()[m.start() - 1];
                        b.is_ascii_alphanumeric() || b == b'_'
                    };
                if !inside_word {
                    for &(l, i) in &owners[m.pattern().as_usize()] {
                        seen[l] |= 1 << i;
                    }
                }
                at = m.start() + 1;
            }
        }
        seen
    }
}

/// The most keyword lists one [`Automaton`] searches.
const MAX_LISTS: usize = 16;

/// Keyword counts of one prompt (code markers by case, the rest on the
/// lower-cased text): the same counts as a `contains` per needle, from a few
/// SIMD-prefiltered passes instead of ~140, which every request on a fixed
/// model pays for the traffic mix.
pub struct Keywords {
    code_markers: usize,
    /// A code fence (CODE_MARKERS[0]) occurs.
    fence: bool,
    /// A code marker that is no English word ("=>", "();", "def ", "std::"
    /// …) occurs: with another marker, structural evidence of code.
    code_symbols: bool,
    /// "translate" or "translation" occurs, or the word in another language
    /// (not only a language's name).
    asks_translation: bool,
    /// A translation word occurs, or one of the English phrases naming a
    /// language ("in french"); other names: [`names_other_language`].
    names_language: bool,
    /// One of the summary words that only a request for one uses.
    asks_summary: bool,
    /// One of the extraction words that only a request for one uses.
    asks_extraction: bool,
    folded: [usize; FOLDED_LISTS.len()],
}

impl Keywords {
    pub fn scan(text: &str) -> Self {
        static CASED: OnceLock<Automaton> = OnceLock::new();
        static FOLDED: OnceLock<Automaton> = OnceLock::new();
        let cased = CASED.get_or_init(|| Automaton::new(&[&CODE_MARKERS], true));
        let folded = FOLDED.get_or_init(|| Automaton::new(&FOLDED_LISTS, false));
        let code = cased.found(text)[0];
        let found = folded.found(&text.to_lowercase());
        Self {
            code_markers: code.count_ones() as usize,
            fence: code & 1 != 0,
            code_symbols: code & !(ENGLISH_MARKERS | 1) != 0,
            asks_translation: found[TRANSLATION_LIST] & TRANSLATION_ASKS != 0,
            names_language: found[TRANSLATION_LIST] != 0,
            asks_summary: found[SUMMARY_LIST] & 0b111 != 0,
            asks_extraction: found[EXTRACTION_LIST] & 0b10_1001 != 0,
            folded: std::array::from_fn(|l| found[l].count_ones() as usize),
        }
    }

    fn any(&self, list: usize) -> bool {
        self.folded[list] > 0
    }
}

/// Classify a prompt's task from keywords (used when there is no embedding).
pub fn keyword_task(k: &Keywords, has_code: bool, has_math: bool) -> Task {
    if k.any(TRANSLATION_LIST) {
        Task::Translation
    } else if k.any(SUMMARY_LIST) {
        Task::Summarisation
    } else if k.any(EXTRACTION_LIST) {
        Task::Extraction
    } else if has_code || k.folded[CODE_WORDS_LIST] >= 2 {
        Task::Code
    } else if has_math {
        Task::Math
    } else if k.any(CREATIVE_LIST) {
        Task::Creative
    } else if k.any(REASONING_LIST) || k.any(PUZZLE_LIST) {
        Task::Reasoning
    } else {
        Task::Chat
    }
}

/// The tasks a prompt's words name, in [`keyword_task`]'s priority order,
/// that narrow the embedding vote ([`TaskClassifier::classify_among`]),
/// each with whether it may be chosen without a vote of its own:
/// - words that only a request for a translation, a summary or an
///   extraction uses ("translate", "summar…", "tl;dr", "extract", "parse
///   the following", "fill in the fields"; not a language's name, "key
///   points", "in one sentence", "list all the", "pull out" or "as json",
///   which other requests use too): may;
/// - code: a fence, or two code markers of which one is no English word
///   ("=>", "();", "def ", "std::" …), may; other markers and two code words
///   (which ordinary questions also hold: "import goods and return them",
///   "a description of the capital") narrow only among tasks the vote gave
///   something.
///
/// Math, creative and reasoning words are left to the vote: naming them
/// too scored lower by leave-one-collection-out on the training
/// collections (data/router/tasks/keywords_vote.py).
pub fn named_tasks(k: &Keywords) -> Vec<(Task, bool)> {
    let mut out = Vec::new();
    if k.asks_translation {
        out.push((Task::Translation, true));
    }
    if k.asks_summary {
        out.push((Task::Summarisation, true));
    }
    if k.asks_extraction {
        out.push((Task::Extraction, true));
    }
    let structural = k.fence || (k.code_markers >= 2 && k.code_symbols);
    if structural || k.code_markers >= 2 || k.folded[CODE_WORDS_LIST] >= 2 {
        out.push((Task::Code, structural));
    }
    out
}

/// The task words of a long question's end: an instruction after a pasted
/// document ("... Summarize the above.") that the first 16 KiB, which the
/// keywords are read from, and the embedding's window both miss.
const TAIL_BYTES: usize = 2 << 10;

/// A typical answer's length in tokens for a task, when the request does
/// not cap it (routing's expected cost and latency, budget holds).
pub fn typical_output(task: Task, prompt_tokens: u64) -> u64 {
    match task {
        Task::Code | Task::Reasoning | Task::Creative => 500,
        Task::Math => 400,
        Task::Summarisation => 200,
        Task::Extraction => 150,
        Task::Translation => prompt_tokens.clamp(50, 2000),
        Task::Chat => 200,
    }
}

/// What [`extract_with`] extracts features for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extraction {
    /// A routing decision: the prompt's tokens counted with the o200k
    /// tokenizer (cost, context window, rules on prompt size) and its
    /// language detected (rules).
    Routing,
    /// The ledger's traffic mix of a request on a fixed model (task and
    /// complexity; no decision depends on it): tokens from the text's length
    /// at about four bytes a token, no language detection (`language` is
    /// "-"). Tokenizing costs more than the rest of the plain path.
    TrafficMix,
}

/// Builds the lazily made tables of feature extraction (the keyword
/// automata, the token counter's tables) now, so that the first request does
/// not pay for them.
pub fn warm_up() {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Warm up: translate `let x = 1;` and summarize it."}]
    });
    if let Some(body) = body.as_object() {
        extract(body, None, None);
    }
    smartllm_ledger::warm_up();
}

/// Extract the features of a chat (or completion) request. `embedding` is the
/// last user turn's embedding when the embedder produced one.
pub fn extract(
    body: &Map<String, Value>,
    embedding: Option<&[f32]>,
    classifier: Option<&TaskClassifier>,
) -> Features {
    extract_with(body, embedding, classifier, Extraction::Routing)
}

/// [`extract`], for `purpose`.
pub fn extract_with(
    body: &Map<String, Value>,
    embedding: Option<&[f32]>,
    classifier: Option<&TaskClassifier>,
    purpose: Extraction,
) -> Features {
    // The traffic mix needs every message's length, not its text.
    let prompt = Prompt::read(body, purpose == Extraction::Routing);
    let (all, has_images, turns) = (&prompt.all, prompt.images, prompt.turns);
    // Routing runs on the proxy's threads: bound the work on huge prompts.
    // Markers are read from the first 16 KiB of the question; tokens are
    // counted on the first 64 KiB and extrapolated by size.
    let last = &prompt.last[..floor_char_boundary(&prompt.last, 16 << 10)];
    let k = Keywords::scan(last);
    // CODE_MARKERS[0] is the fence: one is enough.
    let has_code = k.fence || k.code_markers >= 2;
    let has_math = k.any(MATH_MARKERS_LIST) || k.any(MATH_WORDS_LIST) || has_arithmetic(last);
    let has_tools = body
        .get("tools")
        .or_else(|| body.get("functions"))
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64);
    let sample = &all[..floor_char_boundary(all, 64 << 10)];
    let text_tokens = if purpose == Extraction::TrafficMix {
        (prompt.all_len as u64).div_ceil(4)
    } else if sample.len() == all.len() {
        smartllm_ledger::estimate_tokens(all)
    } else {
        (smartllm_ledger::estimate_tokens(sample) as f64 * all.len() as f64
            / sample.len().max(1) as f64) as u64
    };
    // Tool definitions go to the model with the prompt and take room in its
    // context window (an agent's run to thousands of tokens): estimated
    // from their JSON's size at about four bytes a token, and serialised
    // only when the request has some.
    let tool_tokens: u64 = ["tools", "functions"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_array))
        .filter(|t| !t.is_empty())
        .map(|t| (serde_json::to_vec(t).map_or(0, |v| v.len()) as u64).div_ceil(4))
        .sum();
    let prompt_tokens = text_tokens.saturating_add(tool_tokens);
    let lang = match purpose {
        Extraction::Routing => language::detect(last),
        Extraction::TrafficMix => "-",
    };
    let (task, task_confidence, task_source) = match (embedding, classifier) {
        (Some(e), Some(c)) if !c.is_empty() => {
            let mut named = named_tasks(&k);
            if prompt.last.len() > last.len() {
                let from = floor_char_boundary(&prompt.last, prompt.last.len() - TAIL_BYTES);
                for (t, strong) in
                    named_tasks(&Keywords::scan(&prompt.last[from.max(last.len())..]))
                {
                    match named.iter_mut().find(|(n, _)| *n == t) {
                        Some((_, s)) => *s |= strong,
                        None => named.push((t, strong)),
                    }
                }
            }
            // In another language than English, with no word of
            // translation and no other language named, a prompt is no
            // request for one: the English-only model puts any foreign text
            // near the translation examples (a French question about the
            // piano, a Russian request for a poem, a Chinese one for a
            // Python function all read as translation at confidence 1.0).
            let foreign = !matches!(lang, "en" | "und" | "-");
            let without = (foreign
                && !k.names_language
                && !named.iter().any(|(t, _)| *t == Task::Translation)
                && !names_other_language(last, lang))
            .then_some(Task::Translation);
            let (t, conf) = c.classify_without(e, &named, without);
            let source = match (named.is_empty(), without.is_some()) {
                (true, false) => "embedding",
                (false, false) => "embedding+keywords",
                (true, true) => "embedding-translation",
                (false, true) => "embedding+keywords-translation",
            };
            (t, conf, source)
        }
        _ => (keyword_task(&k, has_code, has_math), 1.0, "keywords"),
    };
    let reasoning = k.folded[REASONING_LIST] as f64;
    let questions = last.matches('?').count() as f64;
    let list_items = last
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- ")
                || t.starts_with("* ")
                || t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.contains('.')
        })
        .count() as f64;
    let task_prior = match task {
        Task::Reasoning => 0.3,
        Task::Code | Task::Math => 0.25,
        Task::Extraction | Task::Summarisation | Task::Creative => 0.1,
        Task::Translation => 0.05,
        Task::Chat => 0.0,
    };
    // The conversation's length, not the tool definitions': an agent's
    // toolbox says nothing of how hard its question is.
    let length =
        ((1.0 + text_tokens as f64 / 40.0).ln() / (1.0 + 2000.0 / 40.0f64).ln()).clamp(0.0, 1.0);
    let complexity = (task_prior
        + 0.3 * length
        + (0.08 * reasoning).min(0.3)
        + (0.05 * ((questions - 1.0).max(0.0) + list_items)).min(0.15)
        + if has_code { 0.1 } else { 0.0 }
        + if has_math { 0.05 } else { 0.0 }
        + (0.02 * turns.saturating_sub(1) as f64).min(0.1))
    .clamp(0.0, 1.0);
    let mut needs = Vec::new();
    if has_tools {
        needs.push("tools");
    }
    if has_images {
        needs.push("vision");
    }
    // Audio in (a part) or out (`modalities`, `audio`).
    let audio_out = body.get("audio").is_some_and(|a| !a.is_null())
        || body
            .get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x.as_str() == Some("audio")));
    if prompt.audio || audio_out {
        needs.push("audio");
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        needs.push("streaming");
    }
    let json_schema = body
        .get("response_format")
        .and_then(|r| r.get("type"))
        .and_then(Value::as_str)
        == Some("json_schema");
    // What only an OpenAI-compatible provider gives (Claude refuses them).
    let openai_only = if body.get("logprobs").and_then(Value::as_bool) == Some(true)
        || body
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 0)
    {
        Some("logprobs")
    } else if body
        .get("logit_bias")
        .and_then(Value::as_object)
        .is_some_and(|b| !b.is_empty())
    {
        Some("logit_bias")
    } else {
        None
    };
    let stops = match body.get("stop") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        _ => false,
    };
    let reasoning_refused = openai_only.or(stops.then_some("stop"));
    if body
        .get("response_format")
        .and_then(|r| r.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t == "json_schema" || t == "json_object")
    {
        needs.push("json");
    }
    let typical = typical_output(task, text_tokens);
    Features {
        task,
        task_confidence,
        task_source,
        complexity,
        prompt_tokens,
        language: lang,
        has_code,
        has_math,
        has_tools,
        has_images,
        max_tokens,
        // A limit is a ceiling, not a length: Claude Code asks 32,000 for
        // every turn. The answer is expected at its task's typical length,
        // or shorter when the limit is.
        expected_output_tokens: max_tokens.map_or(typical, |m| m.min(typical)),
        needs,
        thinking: false,
        anthropic_only: None,
        builtin_tools: None,
        openai_only,
        reasoning_refused,
        json_schema,
        turns,
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(0)
}

/// `12 * 7`, `3+4=`, `x = 5`: digits around an arithmetic operator.
fn has_arithmetic(s: &str) -> bool {
    let b = s.as_bytes();
    (1..b.len().saturating_sub(1)).any(|i| {
        matches!(b[i], b'+' | b'*' | b'/' | b'^' | b'=')
            && (b[i - 1].is_ascii_digit()
                || b[i - 1] == b' ' && i >= 2 && b[i - 2].is_ascii_digit())
            && (b[i + 1].is_ascii_digit()
                || b[i + 1] == b' ' && i + 2 < b.len() && b[i + 2].is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn translation_asked_in_other_languages_and_languages_named() {
        for asks in [
            "Traduis ce texte en anglais",
            "Traduce esta frase",
            "Übersetze bitte",
            "请把这句话翻译成英文",
            "この文を英語に翻訳して",
            "이 문장을 번역해 주세요",
            "Переведи на английский",
            "Kun je dit vertalen naar het Engels?",
            "Tradúcelo al francés",
            "Przetłumacz to zdanie",
            "תרגם את זה",
        ] {
            assert!(Keywords::scan(asks).asks_translation, "{asks}");
        }
        // Words that look like a request for one but mean something else.
        for other in [
            "Wytłumacz co robi ten kod",
            "Сделай перевод денег на карту",
            "Sağa çevir ve devam et",
            "Jak funguje překladač jazyka C?",
        ] {
            assert!(!Keywords::scan(other).asks_translation, "{other}");
        }
        assert!(names_other_language("Vad betyder det på engelska?", "sv"));
        assert!(names_other_language("Réponds en anglais", "fr"));
        assert!(names_other_language(
            "Swedish proverb: Bränt barn skyr elden.",
            "sv"
        ));
        // A language's name for itself, in its own prompts, names no other.
        assert!(!names_other_language("Wo liegt Deutschland?", "de"));
        assert!(!names_other_language("请用中文回答", "zh"));
        assert!(!names_other_language("Parli italiano?", "it"));
        for plain in [
            "Wie kann ich meine Wohnung günstiger heizen?",
            "Quelle est la meilleure façon d'apprendre le piano ?",
            "東京でおすすめのラーメン屋はどこですか？",
        ] {
            let k = Keywords::scan(plain);
            assert!(!k.asks_translation && !k.names_language, "{plain}");
            assert!(
                !names_other_language(plain, language::detect(plain)),
                "{plain}"
            );
        }
    }

    #[test]
    fn simple_chat_is_simple() {
        let f = extract(
            &body(json!({"messages": [{"role": "user", "content": "Hi! How are you today?"}]})),
            None,
            None,
        );
        assert_eq!(f.task, Task::Chat);
        assert!(f.complexity < 0.2, "{}", f.complexity);
        assert_eq!(f.language, "en");
        assert!(!f.has_code && !f.has_math && !f.has_tools && !f.has_images);
        assert!(f.prompt_tokens > 3 && f.prompt_tokens < 20);
    }

    #[test]
    fn code_and_reasoning_are_complex() {
        let f = extract(
            &body(
                json!({"messages": [{"role": "user", "content": "Implement a lock-free concurrent queue in Rust:\n```rust\nstruct Queue<T> { head: AtomicPtr<T> }\n```\nExplain why it is correct, analyse the edge cases and the complexity."}], "max_tokens": 800}),
            ),
            None,
            None,
        );
        assert_eq!(f.task, Task::Code);
        assert!(f.has_code);
        assert!(f.complexity > 0.5, "{}", f.complexity);
        assert_eq!(f.max_tokens, Some(800));
    }

    #[test]
    fn tools_images_json_and_math() {
        let f = extract(
            &body(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Solve for x: 3x + 4 = 19"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}],
                "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}),
            ),
            None,
            None,
        );
        assert!(f.has_math && f.has_tools && f.has_images);
        assert_eq!(f.needs, vec!["tools", "vision", "json"]);
        assert_eq!(f.task, Task::Math);
    }

    /// A streamed request needs a model that streams; audio in (a part) or
    /// out (`modalities`) one that takes audio.
    #[test]
    fn streaming_and_audio_are_needs() {
        let needs = |b: Value| extract(&body(b), None, None).needs;
        assert_eq!(
            needs(json!({"stream": true, "messages": [{"role": "user", "content": "Hi"}]})),
            vec!["streaming"]
        );
        assert!(
            needs(json!({"stream": false, "messages": [{"role": "user", "content": "Hi"}]}))
                .is_empty()
        );
        assert_eq!(
            needs(
                json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is said?"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
            ),
            vec!["audio"]
        );
        assert_eq!(
            needs(
                json!({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}, "messages": [{"role": "user", "content": "Say hi"}]})
            ),
            vec!["audio"]
        );
    }

    /// An agent's prompt is more than its messages' text: the tool
    /// definitions and the arguments of its earlier tool calls go to the
    /// model too, and count against its context window.
    #[test]
    fn tool_definitions_and_tool_call_arguments_are_counted() {
        let plain = json!({"messages": [
            {"role": "user", "content": "Write the file."},
            {"role": "assistant", "content": null},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}
        ]});
        let mut agent = plain.clone();
        agent["messages"][1]["tool_calls"] = json!([{"id": "c1", "type": "function",
            "function": {"name": "write_file", "arguments": "word ".repeat(8_000)}}]);
        agent["tools"] = json!([{"type": "function", "function": {"name": "write_file",
            "description": "Write a file. ".repeat(2_000), "parameters": {"type": "object"}}}]);
        for purpose in [Extraction::Routing, Extraction::TrafficMix] {
            let count =
                |b: &Value| extract_with(b.as_object().unwrap(), None, None, purpose).prompt_tokens;
            let (few, many) = (count(&plain), count(&agent));
            // About 8,000 tokens of arguments and 7,000 of definitions.
            assert!(few < 50, "{purpose:?}: {few}");
            assert!(many > 12_000, "{purpose:?}: {many}");
        }
    }

    #[test]
    fn huge_prompts_are_bounded_and_extrapolated() {
        let text = "word ".repeat(400_000); // 2 MB
        let f = extract(
            &body(json!({"messages": [{"role": "user", "content": text}]})),
            None,
            None,
        );
        assert!(
            f.prompt_tokens > 300_000 && f.prompt_tokens < 500_000,
            "{}",
            f.prompt_tokens
        );
        let multi = "é".repeat(40_000);
        assert!(
            extract(
                &body(json!({"messages": [{"role": "user", "content": multi}]})),
                None,
                None
            )
            .prompt_tokens
                > 0
        );
    }

    /// The automata count exactly what a `contains` per needle counts (on
    /// the lower-cased text for the case-folded lists), overlaps and
    /// needles shared by two lists included.
    #[test]
    fn keyword_counts_match_one_contains_per_needle() {
        let naive =
            |text: &str, needles: &[&str]| needles.iter().filter(|n| text.contains(*n)).count();
        for text in [
            "",
            "Prove that the sum of the first n odd numbers is n^2; why does it hold? Explain step by step.",
            "SELECT name FROM users; def f(x): return x => console.log(x); let y = std::mem::take(&mut z);",
            "Translate into English and summarise: la traduction d'un POÈME, in French. Key Points: TL;DR",
            "A thread-safe, lock-free design: O(1) push, O(n log n) sort. Analyse the trade-off, compare.",
            "∫ x² dx ≤ √2 ≥ ∑ — imagine a story; a riddle of logic; fill in the fields as JSON",
            "whywhy why prove prove that prove",
            "```rust\nfn main() {}\n```",
        ] {
            let k = Keywords::scan(text);
            assert_eq!(k.code_markers, naive(text, &CODE_MARKERS), "{text}");
            assert_eq!(k.fence, text.contains(CODE_MARKERS[0]), "{text}");
            let lower = text.to_lowercase();
            for (l, list) in FOLDED_LISTS.iter().enumerate() {
                assert_eq!(k.folded[l], naive(&lower, list), "list {l}: {text}");
            }
        }
    }

    #[test]
    fn keyword_tasks() {
        for (text, task) in [
            (
                "Translate this sentence into French: good morning",
                Task::Translation,
            ),
            (
                "Summarize the following article in three bullet points",
                Task::Summarisation,
            ),
            (
                "Extract every date and amount from this invoice as JSON",
                Task::Extraction,
            ),
            ("Write a short poem about autumn leaves", Task::Creative),
            ("Why does ice float? Explain step by step", Task::Reasoning),
        ] {
            let f = extract(
                &body(json!({"messages": [{"role": "user", "content": text}]})),
                None,
                None,
            );
            assert_eq!(f.task, task, "{text}");
        }
    }

    #[test]
    fn task_words_name_the_tasks_that_narrow_the_vote() {
        let named = |text: &str| {
            named_tasks(&Keywords::scan(text))
                .into_iter()
                .map(|(t, _)| t)
                .collect::<Vec<_>>()
        };
        // Code words name code, but only code markers let it win unvoted.
        assert_eq!(
            named_tasks(&Keywords::scan("Give a short description of the capital")),
            [(Task::Code, false)]
        );
        assert_eq!(
            named_tasks(&Keywords::scan("let x = f();")),
            [(Task::Code, true)]
        );
        assert_eq!(
            named_tasks(&Keywords::scan("Can I import goods and return them later?")),
            [(Task::Code, false)]
        );
        // Markers count at the start of a word only: "tablet " holds no "let ".
        assert!(named("How do I return a tablet I bought online?").is_empty());

        // The vote says chat; the words decide among what they name.
        let c = TaskClassifier::new(
            vec![Task::Chat, Task::Code],
            vec![vec![0.0, 1.0], vec![1.0, 0.0]],
            1,
        )
        .unwrap();
        let task = |text: &str| {
            let f = extract(
                &body(json!({"messages": [{"role": "user", "content": text}]})),
                Some(&[0.0, 1.0]),
                Some(&c),
            );
            (f.task, f.task_source)
        };
        assert_eq!(task("Hello there"), (Task::Chat, "embedding"));
        assert_eq!(
            task("Give a short description of the capital"),
            (Task::Chat, "embedding+keywords")
        );
        assert_eq!(
            task("Summarize: hello there"),
            (Task::Summarisation, "embedding+keywords")
        );
        // An instruction after a long document is read from its end.
        let doc = "The council met on Tuesday and voted on the budget. ".repeat(400);
        assert!(doc.len() > 16 << 10);
        assert_eq!(task(&doc).0, Task::Chat);
        assert_eq!(
            task(&format!(
                "{doc}\n\nSummarize the above in three bullet points."
            )),
            (Task::Summarisation, "embedding+keywords")
        );
        assert_eq!(
            named("Translate this paragraph and summarize it"),
            [Task::Translation, Task::Summarisation]
        );
        assert_eq!(
            named("Extract the names, then write a Python function that sorts them in code"),
            [Task::Extraction, Task::Code]
        );
        assert_eq!(
            named("```\nlet x = 1;\n```\nWhat does this do?"),
            [Task::Code]
        );
        // A language's name alone asks for no translation (the keyword
        // classifier still reads it as one when there is no embedding).
        assert!(named("What's a good dish to order in French restaurants?").is_empty());
        assert!(named("How do I pull out a splinter? Explain in one sentence.").is_empty());
        assert!(named("List all the key points to consider when buying a car").is_empty());
        assert_eq!(named("TL;DR please"), [Task::Summarisation]);
        assert_eq!(
            named("Fill in the fields from this form"),
            [Task::Extraction]
        );
        // Creative, maths and reasoning words are left to the vote.
        assert!(
            named("Write a poem: prove that the sum of two odd numbers is even, step by step")
                .is_empty()
        );
    }

    #[test]
    fn estimated_tokens_are_close_to_counted_ones() {
        let body = serde_json::json!({"messages": [{"role": "user", "content":
            "Summarise the following meeting notes in three bullet points: the team agreed to ship the billing dashboard on Friday, postpone the mobile release, and hire two more engineers."}]});
        let body = body.as_object().unwrap();
        let counted = extract_with(body, None, None, Extraction::Routing);
        let estimated = extract_with(body, None, None, Extraction::TrafficMix);
        assert_eq!(counted.task, estimated.task);
        let (c, e) = (counted.prompt_tokens as f64, estimated.prompt_tokens as f64);
        assert!((e / c - 1.0).abs() < 0.35, "counted {c}, estimated {e}");
        assert!((counted.complexity - estimated.complexity).abs() < 0.1);
    }
}
