//! Precision guard and privacy exclusions.
//!
//! Sentence embeddings put "How do I enable X?" and "How do I not enable X?", or
//! "Convert 5 miles" and "Convert 50 miles", very close together. A semantic hit
//! must therefore also agree on negation, on every number and on every named
//! entity; otherwise it is a near-miss and the upstream answers.

use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::props::GeneralCategory;
use icu_properties::CodePointMapData;
use regex::Regex;
use smartllm_config::Detector;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

const NEGATIONS: [&str; 14] = [
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without", "cannot",
    "can't", "don't", "doesn't", "isn't",
];

/// Words that say "not" without the word: "failed to" is "did not manage
/// to", "impossible" is "not possible", "refused" is "would not", "lacks"
/// is "does not have". They count as negations, so a paraphrase that moves
/// the "not" into one of them keeps its parity, and "possible" against
/// "impossible" (or "did not fail" against "failed") still differs.
const IMPLICIT_NEGATIONS: [&str; 27] = [
    "fail",
    "fails",
    "failed",
    "failing",
    "refuse",
    "refuses",
    "refused",
    "refusing",
    "refrain",
    "refrains",
    "refrained",
    "refraining",
    "impossible",
    "unable",
    "lack",
    "lacks",
    "lacked",
    "lacking",
    "devoid",
    "avoid",
    "avoids",
    "avoided",
    "avoiding",
    "absent",
    "unless",
    "nowhere",
    "noone",
];

const NUMBER_WORDS: [&str; 21] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million",
    "billion",
];

/// Spelled numbers and ordinals that have one digit form: "four", "fourth"
/// and "4th" are the same number as "4". ("first" is left out: "who first
/// ..." is seldom a count.)
const SPELLED_DIGITS: [(&str, &str); 23] = [
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("second", "2"),
    ("third", "3"),
    ("fourth", "4"),
    ("fifth", "5"),
    ("sixth", "6"),
    ("seventh", "7"),
    ("eighth", "8"),
    ("ninth", "9"),
    ("tenth", "10"),
    ("twelfth", "12"),
];

/// Words that start sentences or questions, and function words (pronouns,
/// determiners, prepositions, conjunctions, auxiliaries): capitalised
/// without being names.
const COMMON_CAPITALISED: [&str; 209] = [
    "i",
    "a",
    "an",
    "the",
    "what",
    "how",
    "why",
    "when",
    "where",
    "who",
    "which",
    "can",
    "could",
    "should",
    "would",
    "is",
    "are",
    "do",
    "does",
    "did",
    "please",
    "tell",
    "give",
    "write",
    "explain",
    "list",
    "show",
    "describe",
    "in",
    "on",
    "for",
    "to",
    "of",
    "and",
    "or",
    "my",
    "your",
    "it",
    "this",
    "that",
    "will",
    "was",
    "were",
    "has",
    "have",
    "had",
    "if",
    "according",
    "at",
    "from",
    "with",
    "by",
    "as",
    "after",
    "before",
    "during",
    "name",
    "find",
    "calculate",
    "compute",
    "convert",
    "summarize",
    "summarise",
    "translate",
    "define",
    "compare",
    "there",
    "here",
    "these",
    "those",
    "some",
    "many",
    "most",
    "all",
    "each",
    "every",
    "any",
    "no",
    "none",
    "one",
    "both",
    "either",
    "neither",
    "few",
    "several",
    "other",
    "another",
    "such",
    "its",
    "it's",
    "they",
    "them",
    "their",
    "we",
    "our",
    "you",
    "he",
    "she",
    "his",
    "her",
    "him",
    "i'm",
    "i've",
    "i'd",
    "you're",
    "we're",
    "they're",
    "what's",
    "who's",
    "that's",
    "there's",
    "here's",
    "let's",
    "not",
    "also",
    "so",
    "then",
    "now",
    "but",
    "yet",
    "because",
    "since",
    "while",
    "although",
    "though",
    "once",
    "than",
    "more",
    "less",
    "much",
    "very",
    "only",
    "just",
    "even",
    "still",
    "already",
    "again",
    "never",
    "always",
    "often",
    "usually",
    "sometimes",
    "perhaps",
    "maybe",
    "about",
    "above",
    "across",
    "against",
    "along",
    "among",
    "around",
    "behind",
    "below",
    "beneath",
    "beside",
    "between",
    "beyond",
    "despite",
    "down",
    "except",
    "inside",
    "into",
    "like",
    "near",
    "off",
    "onto",
    "out",
    "outside",
    "over",
    "past",
    "per",
    "through",
    "throughout",
    "toward",
    "towards",
    "under",
    "underneath",
    "unlike",
    "until",
    "up",
    "upon",
    "via",
    "within",
    "without",
    "be",
    "been",
    "being",
    "can't",
    "cannot",
    "might",
    "must",
    "shall",
    "yes",
    "hi",
    "hey",
    "hello",
    "thanks",
    "thank",
    "okay",
    "ok",
    "um",
    "uh",
    "erm",
    "hmm",
    "oh",
    "ah",
    "well",
    "hm",
    "quick",
];

/// Openers that do not change a question ("Quick question: ...", "Hey, ..."),
/// lower-case, longest first.
const FILLER_OPENERS: [&str; 14] = [
    "quick question:",
    "quick question,",
    "quick question",
    "question:",
    "hey there,",
    "hi there,",
    "hello,",
    "hey,",
    "hi,",
    "hello",
    "hey",
    "hi",
    "ok so",
    "so,",
];

/// Closers that do not change a question ("... Thanks!").
const FILLER_CLOSERS: [&str; 9] = [
    "thank you so much",
    "thanks in advance",
    "thank you",
    "thanks a lot",
    "many thanks",
    "thanks",
    "thx",
    "cheers",
    "ty",
];

/// Words whose change alters who or what a question is about ("my" vs
/// "all users", "this report" vs "every report").
const SCOPE_WORDS: [&str; 26] = [
    "my",
    "your",
    "our",
    "their",
    "his",
    "her",
    "every",
    "each",
    "all",
    "any",
    "some",
    "both",
    "either",
    "only",
    "most",
    "few",
    "many",
    "whole",
    "entire",
    "single",
    "mine",
    "yours",
    "everyone",
    "anyone",
    "everybody",
    "anybody",
];

/// The asker's own: a question about them is not one about others' data.
const MINE: [&str; 4] = ["my", "mine", "own", "myself"];

/// Others', or everyone's.
const WIDER: [&str; 12] = [
    "all",
    "every",
    "everyone",
    "everybody",
    "another",
    "other",
    "others",
    "whole",
    "entire",
    "anyone",
    "anybody",
    "their",
];

/// Function words: swapping one for another ("do" -> "can", "a" -> "the")
/// keeps a question's meaning; swapping a content word rarely does.
const FUNCTION_WORDS: [&str; 73] = [
    "that", "this", "these", "those", "its", "where", "when", "why", "whose", "a", "an", "the",
    "is", "are", "was", "were", "be", "been", "being", "am", "do", "does", "did", "can", "could",
    "should", "would", "will", "shall", "may", "might", "must", "i", "me", "we", "us", "you", "it",
    "he", "she", "they", "them", "to", "of", "in", "on", "at", "for", "with", "by", "from",
    "about", "as", "into", "onto", "and", "or", "but", "so", "if", "then", "than", "what", "which",
    "who", "whom", "how", "there", "here", "please", "just", "really", "also",
];

/// Whether `x` and `y`, the `i`-th words of two texts, phrase the same
/// question either way: "what" / "which", "a" / "an" / "the", and "do" /
/// "does" / "can" right after "how" and before a person ("How do I ..." /
/// "How can I ..."; elsewhere "do" and "can" differ: "What do you do?").
fn interchangeable(x: &str, y: &str, i: usize, a: &[String]) -> bool {
    fn class(w: &str) -> &str {
        match w {
            "which" => "what",
            "a" | "an" => "the",
            w => w,
        }
    }
    if class(x) == class(y) {
        return true;
    }
    let modal = |w: &str| matches!(w, "do" | "does" | "can");
    modal(x)
        && modal(y)
        && i > 0
        && a[i - 1] == "how"
        && a.get(i + 1)
            .is_some_and(|n| matches!(n.as_str(), "i" | "you" | "we" | "one"))
}

/// A text's words for [`same_wording`]: split on whitespace, lowercased,
/// without the sentence punctuation that ends a word; every other
/// character kept ("C++", "x^2", "-5", "(!done)", "'a'", "fifth").
fn wording(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_end_matches([',', '.', '?', '!', ';', ':'])
                .replace('\u{2019}', "'")
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Words two prompts must share in whole sentences around what they differ
/// in before [`differing_parts`] sets them aside.
pub const MIN_FRAME_WORDS: usize = 12;

/// What two prompts differ in when they share a frame: whole sentences (or
/// lines, or segments ending in ":" or ";") at the start and/or the end,
/// of [`MIN_FRAME_WORDS`] words or more, such as a context or template
/// before the question ("Context: ... Question: How do I ...?"). The
/// verifier judges these parts ([`crate::score_differing_parts`]): on the
/// whole texts the shared words align perfectly and make two different
/// questions look alike. `None` when the texts share no such frame, or
/// when one of them is all frame (an added or dropped sentence, judged
/// on the whole texts). Segments are compared by their words, ignoring
/// case and spacing.
pub fn differing_parts<'a>(a: &'a str, b: &'a str) -> Option<(&'a str, &'a str)> {
    let (sa, sb) = (segments(a), segments(b));
    let same = |x: &(usize, usize), t: &str, y: &(usize, usize), u: &str| {
        let (x, y) = (&t[x.0..x.1], &u[y.0..y.1]);
        x.split_whitespace()
            .map(str::to_lowercase)
            .eq(y.split_whitespace().map(str::to_lowercase))
    };
    let n = sa.len().min(sb.len());
    let mut head = 0;
    while head < n && same(&sa[head], a, &sb[head], b) {
        head += 1;
    }
    let mut tail = 0;
    while tail < n - head && same(&sa[sa.len() - 1 - tail], a, &sb[sb.len() - 1 - tail], b) {
        tail += 1;
    }
    if head + tail == 0 || head + tail >= sa.len() || head + tail >= sb.len() {
        return None;
    }
    let shared: usize = sa[..head]
        .iter()
        .chain(&sa[sa.len() - tail..])
        .map(|&(i, j)| a[i..j].split_whitespace().count())
        .sum();
    if shared < MIN_FRAME_WORDS {
        return None;
    }
    let middle = |t: &'a str, s: &[(usize, usize)]| t[s[head].0..s[s.len() - 1 - tail].1].trim();
    Some((middle(a, &sa), middle(b, &sb)))
}

/// The byte ranges of a text's segments: each ends after ".", "?", "!",
/// ":" or ";" followed by whitespace, or after a line break; segments of
/// whitespace alone are dropped.
fn segments(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let ends = c == b'\n'
            || (matches!(c, b'.' | b'?' | b'!' | b':' | b';')
                && bytes.get(i + 1).is_some_and(u8::is_ascii_whitespace));
        if ends {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    out.push((start, text.len()));
    out.retain(|&(i, j)| !text[i..j].trim().is_empty());
    out
}

/// Whether two prompts are the same words in the same order but for
/// interchangeable wording ([`interchangeable`]): a near-repeat that the
/// verifier need not judge. Its token states see "do" swapped for "can"
/// in place, which has the shape of a swapped content word, and the
/// default model's verifier scored such pairs under its pass score.
pub fn same_wording(a: &str, b: &str) -> bool {
    let (wa, wb) = (wording(strip_fillers(a)), wording(strip_fillers(b)));
    !wa.is_empty()
        && wa.len() == wb.len()
        && wa
            .iter()
            .zip(&wb)
            .enumerate()
            .all(|(i, (x, y))| x == y || interchangeable(x, y, i, &wa))
}

/// The question without the openers and closers that do not change it, and
/// without trailing punctuation; case kept.
pub fn strip_fillers(text: &str) -> &str {
    // Fillers are short: only a window at each end is lowercased, and a
    // text of nothing but greetings stops after a few passes (a megabyte of
    // "hi, " would otherwise lowercase the whole text once per greeting, on
    // the proxy's thread).
    const WINDOW: usize = 64;
    const PASSES: usize = 16;
    let mut t = text.trim();
    for _ in 0..PASSES {
        let before = t.len();
        let lower = head(t, WINDOW).to_lowercase();
        for f in FILLER_OPENERS {
            // Only on a word boundary, and only when something is left. A
            // bare greeting must be set off by punctuation ("Hi, how ...",
            // "Hello! ..."): in "Hello in Japanese?" it is the question.
            let bare_greeting = ["hello", "hey", "hi"].contains(&f);
            if lower.starts_with(f)
                && lower.is_char_boundary(f.len())
                && lower[f.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| !(c.is_alphanumeric() || bare_greeting && c.is_whitespace()))
                && t.is_char_boundary(f.len())
            {
                t = t[f.len()..].trim_start_matches(|c: char| {
                    c.is_whitespace() || c == ',' || c == ':' || c == '!'
                });
                break;
            }
        }
        t = trim_closing_punctuation(t, &['!', '.', ',', ';', ':']);
        let lower = tail(t, WINDOW).to_lowercase();
        for f in FILLER_CLOSERS {
            if lower.ends_with(f) && f.len() <= t.len() {
                let cut = t.len() - f.len();
                // Set off from the question by punctuation ("...? thanks",
                // "... - thanks in advance") or as a sentence of its own
                // ("... torrs Thanks"): in "How do you say thank you" or
                // "Translate into Spanish: Thank you" it is the question.
                let boundary = t.is_char_boundary(cut)
                    && t[..cut].ends_with(|c: char| !c.is_alphanumeric())
                    && t[..cut].trim_end().chars().next_back().is_some_and(|c| {
                        matches!(
                            c,
                            '?' | '.' | '!' | ',' | ';' | '-' | '\u{2013}' | '\u{2014}'
                        ) || (t[cut..].starts_with(char::is_uppercase)
                            && !matches!(c, ':' | '"' | '\'' | '\u{201c}'))
                    });
                if boundary && cut > 0 {
                    t = t[..cut].trim_end();
                    // The dash that set it off (" - thanks"), not one that
                    // belongs to the question ("x--").
                    let undashed = t.trim_end_matches(['-', '\u{2013}', '\u{2014}']);
                    if undashed.ends_with(char::is_whitespace) {
                        t = undashed.trim_end();
                    }
                    break;
                }
            }
        }
        if t.len() == before || t.is_empty() {
            break;
        }
    }
    let stripped = trim_closing_punctuation(t, &['?', '!', '.', ',', ';', ':']);
    if stripped.is_empty() {
        text.trim()
    } else {
        stripped
    }
}

/// `t` without trailing whitespace, nor the punctuation in `marks` that
/// closes a sentence: a `?`, `.` or `,` always, a `!`, `;` or `:` after a
/// word ("Thanks!"). After a digit, symbol or bracket a `!`, `;` or `:` may
/// be the question itself ("Compute 20!", "Is `int x = 5;` valid C"), so it
/// stays.
/// The first `n` bytes of `t` or fewer (cut at a character's start).
fn head(t: &str, n: usize) -> &str {
    let mut end = n.min(t.len());
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    &t[..end]
}

/// The last `n` bytes of `t` or fewer (cut at a character's start).
fn tail(t: &str, n: usize) -> &str {
    let mut start = t.len().saturating_sub(n);
    while !t.is_char_boundary(start) {
        start += 1;
    }
    &t[start..]
}

fn trim_closing_punctuation<'a>(t: &'a str, marks: &[char]) -> &'a str {
    let mut t = t.trim_end();
    loop {
        let before = t.len();
        t = t.trim_end_matches(|c: char| {
            c.is_whitespace() || (matches!(c, '?' | '.' | ',') && marks.contains(&c))
        });
        let bare = t.trim_end_matches(|c: char| c.is_whitespace() || marks.contains(&c));
        if bare.len() < t.len() && bare.ends_with(char::is_alphabetic) {
            t = bare;
        }
        if t.len() == before {
            return t;
        }
    }
}

/// The numbers a text follows with `!` (factorials): "20!" is not "20".
fn factorials(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '!'))
        .filter(|w| w.len() > 1 && w.ends_with('!') && w.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    out.sort_unstable();
    out
}

/// Lower-case words of a text, punctuation dropped and contractions
/// spelled out ("what's" -> "what is", "can't" -> "can not"), for the edit rule.
fn plain_words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lower = text.to_lowercase().replace('\u{2019}', "'");
    for w in lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
    {
        if let Some(base) = w.strip_suffix("n't") {
            out.push(
                match base {
                    "ca" => "can",
                    "wo" => "will",
                    "sha" => "shall",
                    b => b,
                }
                .to_string(),
            );
            out.push("not".into());
            continue;
        }
        match w.split_once('\'') {
            Some((base, suffix)) => {
                out.push(base.to_string());
                let full = match suffix {
                    "s" => "is",
                    "re" => "are",
                    "ll" => "will",
                    "ve" => "have",
                    "d" => "would",
                    "m" => "am",
                    other => other,
                };
                out.push(full.to_string());
            }
            None => out.push(same_number(w).to_string()),
        }
    }
    out
}

/// The digit form of a spelled number or ordinal ("five", "fifth", "5th"
/// -> "5"), or the word itself.
fn same_number(w: &str) -> &str {
    if let Some(d) = spelled_digit(w) {
        return d;
    }
    let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &w[digits.len()..];
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && matches!(suffix, "st" | "nd" | "rd" | "th")
    {
        return digits;
    }
    w
}

/// The digit form of a spelled number or ordinal ("five", "fifth" -> "5").
fn spelled_digit(w: &str) -> Option<&'static str> {
    SPELLED_DIGITS
        .iter()
        .find(|(name, _)| *name == w)
        .map(|(_, d)| *d)
}

/// What one text has that the other lacks, word by word (multisets), in
/// linear time: a long prompt compared with a long cached one costs a
/// count of each, never a search of one for every word of the other.
fn word_diff(a: &[String], b: &[String]) -> (Vec<String>, Vec<String>) {
    let mut left: HashMap<&str, usize> = HashMap::with_capacity(b.len());
    for w in b {
        *left.entry(w.as_str()).or_default() += 1;
    }
    let mut only_a = Vec::new();
    for w in a {
        match left.get_mut(w.as_str()) {
            Some(n) if *n > 0 => *n -= 1,
            _ => only_a.push(w.clone()),
        }
    }
    // What is left of b, in b's order.
    let mut only_b = Vec::new();
    for w in b {
        if let Some(n) = left.get_mut(w.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            only_b.push(w.clone());
        }
    }
    (only_a, only_b)
}

/// A small edit of the same question that swaps a content word ("too
/// wide" / "too narrow", "add" / "remove", "feet" / "meters") or changes its
/// scope ("this report" / "every report"): the shape of a different question
/// rather than a rewording.
fn edit_rule(a: &str, b: &str) -> Option<&'static str> {
    let (wa, wb) = (plain_words(a), plain_words(b));
    let (only_a, only_b) = word_diff(&wa, &wb);
    // The same words in another order, around a word that gives them a
    // direction: "5 miles to kilometers" / "5 kilometers to miles", "from
    // Paris to London" / "from London to Paris", "Is 7 greater than 9?" /
    // "Is 9 greater than 7?", "Does Alice report to Bob?" / "Does Bob
    // report to Alice?" (but "sort a list in Python" / "in Python, sort a
    // list" and "TCP and UDP" / "UDP and TCP" keep their meaning).
    if only_a.len() <= 2 && only_b.len() <= 2 && inverted_across_direction(&wa, &wb) {
        return Some("direction");
    }
    if only_a.is_empty() && only_b.is_empty() {
        return None;
    }
    // From the asker's own data to others' or everyone's ("my password" /
    // "all users' passwords", "my own password" / "another user's
    // password", "my API usage" / "the whole team's API usage"), within a
    // small edit.
    let widened = |mine: &[String], theirs: &[String]| {
        mine.iter().any(|w| MINE.contains(&w.as_str()))
            && theirs.iter().any(|w| WIDER.contains(&w.as_str()))
    };
    if only_a.len() <= 4
        && only_b.len() <= 4
        && (widened(&only_a, &only_b) || widened(&only_b, &only_a))
    {
        return Some("scope");
    }
    let scope = |w: &String| SCOPE_WORDS.contains(&w.as_str());
    // Only a small edit of one question: a rewording changes many words,
    // and its cosine decides.
    if only_a.len() > 2 || only_b.len() > 2 {
        return None;
    }
    if only_a.iter().chain(&only_b).any(scope) {
        return Some("scope");
    }
    // One direction swapped for its opposite ("shipped to Germany" /
    // "shipped from Germany").
    if only_a.len() == 1 && only_b.len() == 1 && opposite_directions(&only_a[0], &only_b[0]) {
        return Some("direction");
    }
    // A swap within an otherwise identical question.
    let swapped = !only_a.is_empty() && !only_b.is_empty();
    let content = |w: &String| !FUNCTION_WORDS.contains(&w.as_str());
    if swapped && (only_a.iter().any(content) || only_b.iter().any(content)) {
        return Some("substitution");
    }
    None
}

/// Words that give the words around them a direction or an order: what is
/// converted to what, who reports to whom, which is greater than which.
const DIRECTIONAL_WORDS: [&str; 14] = [
    "to", "from", "into", "onto", "than", "toward", "towards", "over", "under", "above", "below",
    "before", "after", "against",
];

/// Whether `x` and `y` are a direction and its opposite.
fn opposite_directions(x: &str, y: &str) -> bool {
    const PAIRS: [(&str, &str); 8] = [
        ("to", "from"),
        ("into", "from"),
        ("onto", "from"),
        ("toward", "from"),
        ("towards", "from"),
        ("above", "below"),
        ("over", "under"),
        ("up", "down"),
    ];
    PAIRS
        .iter()
        .any(|&(p, q)| (x == p && y == q) || (x == q && y == p))
}

/// Whether two content words that each text has once come in the opposite
/// order, with the same directional word ([`DIRECTIONAL_WORDS`]) between
/// them, at most three words apart, in both texts ("X to Y" / "Y to X"). Texts of more than 64 words are left to the other rules
/// (and the embedding).
fn inverted_across_direction(a: &[String], b: &[String]) -> bool {
    const MOST: usize = 64;
    if a.len() > MOST || b.len() > MOST {
        return false;
    }
    let content = |w: &str| !FUNCTION_WORDS.contains(&w) && !DIRECTIONAL_WORDS.contains(&w);
    let once = |ws: &[String], w: &str| ws.iter().filter(|x| x.as_str() == w).count() == 1;
    let shared: Vec<(usize, usize)> = a
        .iter()
        .enumerate()
        .filter(|(_, w)| content(w) && once(a, w) && once(b, w))
        .filter_map(|(i, w)| Some((i, b.iter().position(|x| x == w)?)))
        .collect();
    // Close around the directional word ("miles to kilometers", "greater
    // than 9", "report to Bob"): a clause moved across an infinitive's "to"
    // ("Wanting to scare ..., Jonny put ..." / "Jonny put ... to scare")
    // puts more words between them.
    let between = |ws: &[String], from: usize, to: usize| -> Vec<String> {
        if to - from > 4 {
            return Vec::new();
        }
        ws[from + 1..to]
            .iter()
            .filter(|w| DIRECTIONAL_WORDS.contains(&w.as_str()))
            .cloned()
            .collect()
    };
    shared.iter().enumerate().any(|(k, &(ia, ib))| {
        shared[k + 1..].iter().any(|&(ja, jb)| {
            // a has x before y (ia < ja, by construction); b the other way,
            // across the same directional word ("from Paris to London" /
            // "to London from Paris" keeps its meaning).
            jb < ib && {
                let (da, db) = (between(a, ia, ja), between(b, jb, ib));
                da.iter().any(|w| db.contains(w))
            }
        })
    })
}

fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '.' || c == ','))
        .map(|w| w.trim_matches(|c: char| c == '.' || c == ',' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect()
}

fn negation_count(text: &str) -> usize {
    // "can’t" is "can't".
    let lower = text.to_lowercase().replace('\u{2019}', "'");
    words(&lower)
        .iter()
        .filter(|w| NEGATIONS.contains(w) || IMPLICIT_NEGATIONS.contains(w) || w.ends_with("n't"))
        .count()
}

/// The numbers a text states, sorted, and how many times it says "one"
/// where that may be a pronoun or stand for "a" ("one of the", "why would
/// one", "one way to"). "one" after a preposition ("in one sentence", "to
/// one decimal place", "more than one") is a count, and is in the list.
fn numbers(text: &str) -> (Vec<String>, usize) {
    let lower = text.to_lowercase();
    let ws = words(&lower);
    let mut soft_ones = 0;
    let mut out: Vec<String> = ws
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            if *w == "one" && !counted_one(&ws, i) {
                soft_ones += 1;
                None
            } else if w.chars().any(|c| c.is_ascii_digit()) {
                Some(
                    w.chars()
                        .filter(|c| c.is_ascii_digit() || *c == '.')
                        .collect::<String>(),
                )
            } else if let Some(d) = spelled_digit(w) {
                Some(d.to_string())
            } else if NUMBER_WORDS.contains(w) {
                Some((*w).to_string())
            } else {
                None
            }
        })
        .collect();
    out.sort();
    (out, soft_ones)
}

/// Whether the "one" at `ws[i]` is a count: after a preposition or
/// "than", and not before "of" or "another" ("in one sentence", "more
/// than one"; not "in one of the cases", "with one another").
fn counted_one(ws: &[&str], i: usize) -> bool {
    const BEFORE: [&str; 12] = [
        "in", "into", "to", "for", "by", "with", "on", "at", "than", "within", "per", "under",
    ];
    !matches!(ws.get(i + 1), Some(&"of" | &"another"))
        && i.checked_sub(1).is_some_and(|j| BEFORE.contains(&ws[j]))
}

/// A word without its possessive or contracted ending: "FCC's" and "FCC"
/// name the same, and "Who'd" is "who".
fn unpossessed(w: &str) -> &str {
    match w.find(['\'', '\u{2019}']) {
        Some(i) => {
            let ending = w[i..].trim_start_matches(['\'', '\u{2019}']);
            if matches!(ending, "" | "s" | "d" | "ll" | "re" | "ve" | "m") {
                &w[..i]
            } else {
                w
            }
        }
        None => w,
    }
}

/// The capitalised words of a text that may be names, lowercased and
/// without their possessive ending: those inside a sentence, and those
/// that open one (split as `(inside, opening)`). An opening word is
/// capitalised by position, so it is only taken for a name when the pair
/// shows it is one (see [`names`]).
fn entities(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut inside, mut opening) = (BTreeSet::new(), BTreeSet::new());
    for (w, starts) in words_with_starts(text) {
        if !(w.chars().next().is_some_and(char::is_uppercase) && w.chars().count() > 1) {
            continue;
        }
        let name = unpossessed(w);
        let lower = name.to_lowercase();
        if lower.is_empty() || COMMON_CAPITALISED.contains(&lower.as_str()) {
            continue;
        }
        // "NASA", "iPhone", "McDonald": capitals past the first letter
        // make a name wherever it stands.
        if starts && !name.chars().skip(1).any(char::is_uppercase) {
            opening.insert(lower);
        } else {
            inside.insert(lower);
        }
    }
    (inside, opening)
}

/// The names of each of two texts: every capitalised word inside a
/// sentence, and a sentence's capitalised first word when the other text
/// lacks it, unless it reads as an ordinary word capitalised by position:
/// a word in "-ing" ("Burning paper produces heat" / "Heat is produced when
/// paper is burned"), or one whose stem the other text has ("Studies of
/// earthquake waves ..." / "... scientists who study ..."). "Tesla stock
/// price today" / "Stock price today" names Tesla. An opening word the
/// other text has passes whatever it is. `wa`, `wb`: each text's lowercase
/// words.
fn names(
    a: &str,
    b: &str,
    wa: &BTreeSet<String>,
    wb: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let named = |text: &str, other: &BTreeSet<String>| {
        let (mut out, opening) = entities(text);
        out.extend(
            opening
                .into_iter()
                .filter(|w| !other.contains(w) && !ordinary_opening(w, other)),
        );
        out
    };
    (named(a, wb), named(b, wa))
}

/// Whether a capitalised word that opens a sentence reads as an ordinary
/// word there (see [`names`]): a word English dictionaries give only in
/// lower case ([`ordinary_word`]: "Show ...", "Rewrite ...", "List ..."),
/// a verb in "-ing" ("Burning ...") or an adverb in "-ly" of six letters
/// or more ("Normally, ..."), or, five letters or longer, one that shares
/// its first four letters with a word of `other`.
fn ordinary_opening(w: &str, other: &BTreeSet<String>) -> bool {
    if ordinary_word(w) {
        return true;
    }
    let chars: Vec<char> = w.chars().collect();
    if (chars.len() >= 5 && w.ends_with("ing")) || (chars.len() >= 6 && w.ends_with("ly")) {
        return true;
    }
    chars.len() >= 5 && {
        let stem: String = chars[..4].iter().collect();
        other.iter().any(|o| o.starts_with(&stem))
    }
}

/// Whether SCOWL's American and British English word lists give `w`
/// (lower case) only in lower case: "show", "rewrite", "rust", but not
/// "apple" (also "Apple"), "python" ("Python") or "kubernetes" (in
/// neither). Such a word opening a sentence is capitalised by its place,
/// not as a name. The list (`ordinary-words.txt`, 64,369 words, sorted) is
/// made by `data/cache-eval/make_ordinary_words.py`; it is read once, on
/// first use, on the thread that runs the guard (never a proxy thread).
fn ordinary_word(w: &str) -> bool {
    static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        include_str!("ordinary-words.txt")
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect()
    });
    WORDS.binary_search(&w).is_ok()
}

/// Abbreviations whose full stop does not end a sentence.
const ABBREVIATIONS: [&str; 16] = [
    "vs", "etc", "approx", "mr", "mrs", "ms", "dr", "st", "no", "fig", "inc", "ltd", "jr", "sr",
    "cf", "al",
];

/// [`words`], each with whether it opens a sentence: the text's first
/// word, or the first after a full stop, question or exclamation mark
/// followed by a space or line break. The full stop of an abbreviation
/// ("vs.", "etc.", "e.g.", "U.S.": a word with a stop inside) ends no
/// sentence, and neither does a colon or a line break alone, so the items
/// of a list ("Compare: Rust, Go", one per line) are inside their
/// sentence.
fn words_with_starts(text: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut starts = true;
    // The last word ended a sentence if whitespace follows.
    let mut ended = false;
    let mut rest = text;
    while !rest.is_empty() {
        let Some(begin) = rest.find(|c: char| c.is_alphanumeric() || c == '\'') else {
            break;
        };
        let gap = &rest[..begin];
        if (ended && gap.starts_with(char::is_whitespace))
            || gap.char_indices().any(|(i, c)| {
                matches!(c, '?' | '!') && gap[i + 1..].starts_with(char::is_whitespace)
            })
        {
            starts = true;
        }
        let tail = &rest[begin..];
        let len = tail
            .find(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '.' || c == ','))
            .unwrap_or(tail.len());
        let raw = &tail[..len];
        let w = raw.trim_matches(|c: char| c == '.' || c == ',' || c == '\'');
        if !w.is_empty() {
            out.push((w, starts));
            starts = false;
        }
        // "Paris. Lyon": a word whose full stop ends it, unless it is an
        // abbreviation; decided once the next gap shows whitespace.
        ended = raw.ends_with('.')
            && !w.contains('.')
            && !ABBREVIATIONS.contains(&w.to_lowercase().as_str());
        rest = &tail[len..];
    }
    out
}

/// The indentation of each non-blank line of a text whose layout carries
/// meaning: a line of it is indented by a tab or two spaces or more (code,
/// YAML, nested lists), where moving a line in or out changes what it says.
/// None for prose (a stray space at a line's start is no layout).
pub(crate) fn layout(text: &str) -> Option<Vec<&str>> {
    let indents: Vec<&str> = text
        .trim()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| &l[..l.len() - l.trim_start().len()])
        .collect();
    indents
        .iter()
        .any(|i| i.contains('\t') || i.chars().count() >= 2)
        .then_some(indents)
}

/// Why two texts must not share an answer, if they must not.
pub fn near_miss(a: &str, b: &str) -> Option<&'static str> {
    let (a, b) = (strip_fillers(a), strip_fillers(b));
    // Code that differs only in its indentation is different code (the
    // embedding does not see whitespace).
    if layout(a) != layout(b) {
        return Some("layout");
    }
    if negation_count(a) % 2 != negation_count(b) % 2 {
        return Some("negation");
    }
    // A "one" that may be a pronoun counts only if that makes the two agree
    // ("1 apple" / "add one apple"; "one of the three" / "three").
    let ((na, sa), (nb, sb)) = (numbers(a), numbers(b));
    let with_ones = |mut n: Vec<String>, k: usize| {
        n.extend(std::iter::repeat_n("1".to_string(), k));
        n.sort();
        n
    };
    if !(na == nb || with_ones(na.clone(), sa) == with_ones(nb.clone(), sb))
        || factorials(a) != factorials(b)
    {
        return Some("numbers");
    }
    let (la, lb) = (a.to_lowercase(), b.to_lowercase());
    let plain = |t: &str| -> BTreeSet<String> {
        words(t)
            .iter()
            .map(|w| unpossessed(w).to_string())
            .collect()
    };
    let (wa, wb) = (plain(&la), plain(&lb));
    let (ea, eb) = names(a, b, &wa, &wb);
    // Every name in one must appear (in any case) in the other.
    if ea.iter().any(|e| !wb.contains(e)) || eb.iter().any(|e| !wa.contains(e)) {
        return Some("entities");
    }
    edit_rule(a, b)
}

// The detectors read the folded text (`privacy_folded`: every digit and
// look-alike already ASCII), so they are ASCII-only (`(?-u)`): Unicode word
// boundaries and digit classes would push the regex engine off its DFA on
// any non-ASCII prompt (a 170 KB Japanese prompt took 14 ms of the proxy
// thread; ASCII classes keep it on the DFA).
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i-u)\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b").expect("email regex")
});
/// International (+CC ...), (AAA) BBB-CCCC, or AAA-BBB-CCCC / AAA.BBB.CCCC.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u)\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}\b|\(\d{3}\)\s?\d{3}[\s.-]\d{4}\b|\b\d{3}[.-]\d{3}[.-]\d{4}\b")
        .expect("phone regex")
});
/// Runs of digit groups, each separated by one space, dash or dot.
static DIGIT_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u)\d+(?:[ .-]\d+)*").expect("digit run regex"));
static API_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u)\b(?:(?:sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})")
        .expect("api key regex")
});

/// A US Social Security number written 3-2-4, with dashes or spaces.
static SSN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u)\b(\d{3})([- ])(\d{2})([- ])(\d{4})\b").expect("ssn regex"));

/// An IBAN: country, check digits, then groups of four letters or digits
/// (spaced or not) and a last shorter one.
static IBAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u)(?i)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
        .expect("iban regex")
});

/// An SSN the Social Security Administration could have issued: one
/// separator throughout; not area 000, 666 or 900-999, group 00 or serial
/// 0000 (which rules out most dates and part numbers that look alike).
fn has_ssn(text: &str) -> bool {
    SSN.captures_iter(text).any(|c| {
        let n = |i: usize| c.get(i).map_or("", |m| m.as_str());
        let area: u32 = n(1).parse().unwrap_or(0);
        n(2) == n(4) && area != 0 && area != 666 && area < 900 && n(3) != "00" && n(5) != "0000"
    })
}

/// IBAN lengths by country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

/// An IBAN whose check digits hold: as long as its country's, and with the
/// country and check digits moved to the end and letters as 10-35, the
/// number modulo 97 is 1. The pattern may take a word after it ("...3201
/// and"), so the IBAN is read up to the length its country gives.
fn has_iban(text: &str) -> bool {
    IBAN.find_iter(text).any(|m| {
        let compact: Vec<u8> = m
            .as_str()
            .bytes()
            .filter(|b| *b != b' ')
            .map(|b| b.to_ascii_uppercase())
            .collect();
        let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| c[..] == compact[..2]) else {
            return false;
        };
        let Some(iban) = compact.get(..len) else {
            return false;
        };
        let mut rem = 0u32;
        for b in iban[4..].iter().chain(&iban[..4]) {
            rem = match b {
                b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
                b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A' + 10)) % 97,
                _ => return false,
            };
        }
        rem == 1
    })
}

/// Builds the guard's lazily made tables (the privacy detectors' regexes,
/// the dictionary of ordinary words) now, so that the first request that
/// needs one does not wait for it.
pub fn warm_up() {
    for re in [&EMAIL, &PHONE, &DIGIT_RUN, &API_KEY, &SSN, &IBAN] {
        LazyLock::force(re);
    }
    ordinary_word("warm");
}

fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `text` holds a payment card number: 13 to 19 digits passing the
/// Luhn check, written as one group or in up to five groups of 2 to 8
/// digits (4-4-4-4, Amex's 4-6-5, 8-8, 4-8-4, ...). Every such span of a
/// run of digit groups is checked, so a card followed by its expiry or CVV
/// ("4111 1111 1111 1111 12/26"), or after another number, is still found.
fn has_card(text: &str) -> bool {
    let shaped =
        |g: &[&str]| g.len() == 1 || (g.len() <= 5 && g.iter().all(|x| (2..=8).contains(&x.len())));
    DIGIT_RUN.find_iter(text).any(|m| {
        let groups: Vec<&str> = m.as_str().split([' ', '-', '.']).collect();
        (0..groups.len()).any(|i| {
            let mut digits = 0;
            for j in i..groups.len() {
                digits += groups[j].len();
                if digits > 19 {
                    return false;
                }
                if digits >= 13 && shaped(&groups[i..=j]) && luhn(&groups[i..=j].concat()) {
                    return true;
                }
            }
            false
        })
    })
}

/// The text as the privacy rules read it. A prompt can spell what they look
/// for with characters that read the same to a person (and to a model) but
/// not to an ASCII pattern: full-width or mathematical digits and letters
/// ("４１１１ １１１１ …", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ"), digits of
/// another script ("٤١١١"), no-break or ideographic spaces, or invisible
/// characters inside a number ("4111\u{200b}1111…"). So: compatibility
/// normalisation (NFKC: full-width, mathematical, circled and superscript
/// forms to their plain ones, every space to a space), format characters
/// (zero-width spaces and joiners, soft hyphens, direction marks, the BOM)
/// dropped, and every decimal digit written as its ASCII digit. An ASCII
/// text (most prompts) is returned as it is, with no copy.
pub fn privacy_folded(text: &str) -> Cow<'_, str> {
    if text.is_ascii() {
        return Cow::Borrowed(text);
    }
    const NFKC: ComposingNormalizerBorrowed<'static> = ComposingNormalizerBorrowed::new_nfkc();
    let gc = CodePointMapData::<GeneralCategory>::new();
    let normal = NFKC.normalize(text);
    let mut out = String::with_capacity(normal.len());
    for c in normal.chars() {
        match gc.get(c) {
            GeneralCategory::Format => {}
            // Unicode keeps every script's decimal digits as runs of ten
            // consecutive code points from zero (mathematical digits are
            // five such runs back to back), so a digit's value is its
            // distance from the start of its run, modulo ten.
            GeneralCategory::DecimalNumber if !c.is_ascii_digit() => {
                let mut start = c as u32;
                while let Some(p) = start.checked_sub(1).and_then(char::from_u32) {
                    if gc.get(p) != GeneralCategory::DecimalNumber {
                        break;
                    }
                    start -= 1;
                }
                out.push(char::from(b'0' + ((c as u32 - start) % 10) as u8));
            }
            _ => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Compiled exclusion rules: a prompt matching any is never cached.
#[derive(Debug, Clone, Default)]
pub struct Exclusions {
    patterns: Vec<Regex>,
    detectors: Vec<Detector>,
}

impl Exclusions {
    pub fn new(patterns: &[String], detectors: &[Detector]) -> Result<Self, regex::Error> {
        Ok(Exclusions {
            patterns: patterns
                .iter()
                .map(|p| Regex::new(p))
                .collect::<Result<_, _>>()?,
            detectors: detectors.to_vec(),
        })
    }

    /// The name of the first rule the text trips, if any.
    ///
    /// The operator's patterns are tried on the text as sent and on its
    /// folded form ([`privacy_folded`]); the detectors on the folded form,
    /// so a card number, address, phone number or key written in
    /// full-width, foreign or padded characters is still found.
    pub fn matches(&self, text: &str) -> Option<&'static str> {
        if self.patterns.is_empty() && self.detectors.is_empty() {
            return None;
        }
        let folded = privacy_folded(text);
        let plain = folded.as_ref();
        if self
            .patterns
            .iter()
            .any(|r| r.is_match(text) || (plain != text && r.is_match(plain)))
        {
            return Some("pattern");
        }
        let text = plain;
        // Most specific first, so the reported reason is the precise one.
        for d in [
            Detector::ApiKey,
            Detector::Iban,
            Detector::Card,
            Detector::Ssn,
            Detector::Email,
            Detector::Phone,
        ]
        .iter()
        .filter(|d| self.detectors.contains(d))
        {
            let hit = match d {
                Detector::Email => EMAIL.is_match(text),
                Detector::Phone => PHONE.is_match(text),
                Detector::Card => has_card(text),
                Detector::ApiKey => API_KEY.is_match(text),
                Detector::Ssn => has_ssn(text),
                Detector::Iban => has_iban(text),
            };
            if hit {
                return Some(match d {
                    Detector::Email => "email",
                    Detector::Phone => "phone",
                    Detector::Card => "card",
                    Detector::ApiKey => "api_key",
                    Detector::Ssn => "ssn",
                    Detector::Iban => "iban",
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn interchangeable_wording_is_the_same_question() {
        assert!(same_wording(
            "How do I reset my password?",
            "How can I reset my password?"
        ));
        assert!(same_wording(
            "Which port does PostgreSQL listen on?",
            "Quick question: what port does PostgreSQL listen on"
        ));
        assert!(same_wording("Is an apple red?", "Is the apple red?"));
        // Any other word, another order, or a word more: not the same wording.
        for (a, b) in [
            ("When was the tower built?", "Where was the tower built?"),
            (
                "How do I reset my password?",
                "How should I reset my password?",
            ),
            (
                "How did I reset my password?",
                "How can I reset my password?",
            ),
            (
                "How do I reset my password?",
                "How do I reset my own password?",
            ),
            ("Can I reset it?", "I can reset it?"),
            (
                "How do I reverse a string in C++?",
                "How can I reverse a string in C#?",
            ),
            ("Differentiate x^2", "Differentiate x*2"),
            ("Is a < b?", "Is a > b?"),
            ("Convert 100 $ to yen", "Convert 100 € to yen"),
            ("Is -5 less than 3?", "Is 5 less than -3?"),
            ("What does if (!done) mean?", "What does if (done) mean?"),
            ("Explain print('a')", "Explain print(a)"),
            ("What is user?.name", "What is user.name"),
            (
                "What is the income of the top five?",
                "What is the income of the top fifth?",
            ),
            ("What do you do?", "What can you do?"),
            ("Could women vote in 1900?", "Can women vote in 1900?"),
            ("", ""),
        ] {
            assert!(!same_wording(a, b), "{a} / {b}");
        }
    }

    #[test]
    fn word_diff_is_a_multiset_difference_in_linear_time() {
        let w = |t: &str| t.split(' ').map(str::to_string).collect::<Vec<_>>();
        let (a, b) = word_diff(&w("the cat saw the dog"), &w("the dog saw a cat a"));
        assert_eq!(a, w("the"));
        assert_eq!(b, w("a a"));
        // 200,000 distinct words each side: a count, not a search per word
        // (about 2 x 10^10 comparisons, minutes, before).
        let long: Vec<String> = (0..200_000).map(|i| format!("w{i}")).collect();
        let mut other = long.clone();
        other[7] = "changed".into();
        let (a, b) = word_diff(&long, &other);
        assert_eq!(
            (a, b),
            (vec!["w7".to_string()], vec!["changed".to_string()])
        );
    }

    #[test]
    fn a_text_of_greetings_is_stripped_a_bounded_number_of_times() {
        // Each pass strips one greeting; a few passes at most, whatever
        // the length (the passes lowercase only a window at each end).
        let text = format!("{}why is the sky blue?", "Hi, ".repeat(20));
        assert_eq!(strip_fillers(&text), &text[16 * 4..text.len() - 1]);
        let long = "hi, ".repeat(250_000);
        assert_eq!(strip_fillers(&long).len(), long.len() - 16 * 4 - 2);
        assert_eq!(head("h\u{e9}llo", 2), "h");
        assert_eq!(tail("h\u{e9}llo", 4), "llo");
    }

    use super::*;
    use crate::test_support::embedder;

    const MAX_SEQ: usize = 128;

    #[test]
    fn guard_catches_near_misses_and_lets_paraphrases_through() {
        assert_eq!(
            near_miss(
                "How do I enable dark mode?",
                "How do I not enable dark mode?"
            ),
            Some("negation")
        );
        assert_eq!(
            near_miss("Why can I log in?", "Why can't I log in?"),
            Some("negation")
        );
        assert_eq!(
            near_miss("Convert 5 miles to km", "Convert 50 miles to km"),
            Some("numbers")
        );
        assert_eq!(
            near_miss("What is two plus two?", "What is two plus three?"),
            Some("numbers")
        );
        assert_eq!(
            near_miss(
                "What is the capital of France?",
                "What is the capital of Spain?"
            ),
            Some("entities")
        );
        assert_eq!(
            near_miss(
                "How do I reset my password?",
                "What is the way to reset my password?"
            ),
            None
        );
        assert_eq!(
            near_miss(
                "What is the capital of France?",
                "Tell me the capital city of France"
            ),
            None
        );
        assert_eq!(
            near_miss(
                "Explain Python decorators",
                "explain python decorators please"
            ),
            None
        );
    }

    #[test]
    fn implicit_negations_opening_words_and_the_pronoun_one() {
        // A "not" moved into a word that means it keeps the parity ...
        for (a, b) in [
            (
                "Astrid did not manage to prepare the fest this year.",
                "Astrid failed to prepare the fest this year.",
            ),
            (
                "It is impossible to predict the weather with this little data.",
                "There is no chance of predicting the weather with this little data.",
            ),
            (
                "The manager refused to discuss his decision further.",
                "The manager was not open to discuss his decision further.",
            ),
        ] {
            assert_eq!(near_miss(a, b), None, "{a:?} / {b:?}");
        }
        // ... and still tells the question from its opposite.
        for (a, b) in [
            (
                "Is it possible to undo a commit?",
                "Is it impossible to undo a commit?",
            ),
            ("Why did the deploy fail?", "Why did the deploy not fail?"),
            (
                "Why does my build lack symbols?",
                "Why does my build have symbols?",
            ),
        ] {
            assert_eq!(near_miss(a, b), Some("negation"), "{a:?} / {b:?}");
        }
        // A sentence's capitalised first word is no name unless the pair
        // writes it capitalised inside a sentence too.
        assert_eq!(
            near_miss(
                "Heat is produced when paper is burned.",
                "Burning paper produces heat."
            ),
            None
        );
        assert_eq!(
            near_miss(
                "Wanting to scare his housemates, Jonny put a lobster in the bathtub.",
                "Jonny put a lobster in the bathtub to scare his housemates."
            ),
            None
        );
        assert_eq!(
            near_miss(
                "Mitosis actually occurs in four phases.",
                "There are four phases to Mitosis."
            ),
            None
        );
        // An opening verb the dictionaries give only in lower case is an
        // ordinary word; a word they also capitalise, or do not know, may
        // be a name.
        for (a, b) in [
            (
                "Show the names of all singers older than 30.",
                "What are the names of the singers who are older than 30?",
            ),
            (
                "Rewrite this email so it sounds polite.",
                "make this email sound polite",
            ),
        ] {
            assert_eq!(near_miss(a, b), None, "{a:?} / {b:?}");
        }
        for (a, b) in [
            (
                "Python list comprehension examples",
                "list comprehension examples",
            ),
            ("Berlin weather this weekend", "weather this weekend"),
            ("Kubernetes pod keeps restarting", "my pod keeps restarting"),
        ] {
            assert_eq!(near_miss(a, b), Some("entities"), "{a:?} / {b:?}");
        }
        assert!(ordinary_word("show") && ordinary_word("summarise") && ordinary_word("rewrite"));
        assert!(!ordinary_word("apple") && !ordinary_word("tesla") && !ordinary_word("Show"));
        // A name inside a sentence, or an opening one the pair names
        // elsewhere, or one written with inner capitals, is still a name.
        for (a, b) in [
            ("Who founded Google?", "Who was the founder of Microsoft?"),
            (
                "Paris hosted the games. Who won in Paris?",
                "Lyon hosted the games. Who won there?",
            ),
            (
                "NASA launched which probe first?",
                "Which probe was launched first?",
            ),
            ("Tesla stock price today", "Apple share price now"),
        ] {
            assert_eq!(near_miss(a, b), Some("entities"), "{a:?} / {b:?}");
        }
        // "one" is a pronoun or an article unless reading it as 1 makes
        // the two agree; another number still differs.
        for (a, b) in [
            (
                "One function of the cardiovascular system is to transport gases.",
                "The cardiovascular system serves to transport gases.",
            ),
            (
                "Why would one want to give a speech?",
                "What makes a person want to give a speech?",
            ),
            ("Add 1 apple to the basket", "Add one apple to the basket"),
        ] {
            assert_eq!(near_miss(a, b), None, "{a:?} / {b:?}");
        }
        assert_eq!(
            near_miss(
                "Add one apple to the basket",
                "Add two apples to the basket"
            ),
            Some("numbers")
        );
        assert_eq!(
            words_with_starts(
                "Paris. it's e.g. Lyon? yes: Rome\nOslo vs. Bern!\nBonn in 2020. Then"
            ),
            vec![
                ("Paris", true),
                ("it's", true),
                ("e.g", false),
                ("Lyon", false),
                ("yes", true),
                ("Rome", false),
                ("Oslo", false),
                ("vs", false),
                ("Bern", false),
                ("Bonn", true),
                ("in", false),
                ("2020", false),
                ("Then", true),
            ]
        );
        // The items of a list, an abbreviation's next word and a name that
        // opens one text only are names.
        for (a, b) in [
            (
                "Which of these are EU members?\nFrance\nNorway\nSpain",
                "Which of these are EU members?\nFrance\nSpain",
            ),
            (
                "Compare these languages: Rust, Go, Zig",
                "Compare these languages: Go, Zig",
            ),
            (
                "Compare Rust vs. Go for web servers",
                "Compare Rust for web servers",
            ),
            ("Tesla stock price today", "Stock price today"),
            (
                "Tesla stock price today",
                "what is apple's share price right now",
            ),
        ] {
            assert_eq!(near_miss(a, b), Some("entities"), "{a:?} / {b:?}");
        }
        // "one" counts where it is a count, and "can’t" is "can't".
        for (a, b, why) in [
            (
                "Explain quantum computing in one sentence",
                "Explain quantum computing",
                "numbers",
            ),
            (
                "Round 3.14159 to one decimal place",
                "Round 3.14159 to the nearest integer",
                "numbers",
            ),
            (
                "Why can\u{2019}t I log in?",
                "Why can I log in?",
                "negation",
            ),
        ] {
            assert_eq!(near_miss(a, b), Some(why), "{a:?} / {b:?}");
        }
    }

    #[test]
    fn possessives_and_spelled_numbers_are_the_same_name_and_number() {
        // The same name, possessive or not.
        for (a, b) in [
            (
                "When was the FCC's sixth report released?",
                "When did the FCC release its sixth report?",
            ),
            ("Who is Methodism's founder?", "Who founded Methodism?"),
            (
                "Who was the 4th ruler of the Yuan dynasty?",
                "Who was the Yuan dynasty's fourth ruler?",
            ),
            (
                "Which channel did the 5 applicants want?",
                "Which channel did the five applicants want?",
            ),
            (
                "Who'd have guessed the world had zones?",
                "Who would have guessed the world had zones?",
            ),
        ] {
            assert_eq!(near_miss(a, b), None, "{a} / {b}");
        }
        // Another name or another number is still another question.
        assert_eq!(
            near_miss("Who is France's president?", "Who is Spain's president?"),
            Some("entities")
        );
        assert_eq!(
            near_miss("Who was the fourth ruler?", "Who was the fifth ruler?"),
            Some("numbers")
        );
        assert_eq!(
            near_miss("Who was the 4th ruler?", "Who was the fifth ruler?"),
            Some("numbers")
        );
        assert_eq!(
            near_miss(
                "What is the second largest city?",
                "What is the largest city?"
            ),
            Some("numbers")
        );
    }

    /// Written for this rule (synthetic; a user trial's traps): the same
    /// words in another order around a direction, a direction swapped for
    /// its opposite, and whose data a question is about, in a few words.
    #[test]
    fn directions_and_wider_scopes_are_different_questions() {
        for (a, b, why) in [
            (
                "Convert 5 miles to kilometers",
                "Convert 5 kilometers to miles",
                "direction",
            ),
            (
                "Find flights from Paris to London",
                "Find flights from London to Paris",
                "direction",
            ),
            (
                "Transfer money from checking to savings",
                "Transfer money from savings to checking",
                "direction",
            ),
            ("Convert USD to EUR", "Convert EUR to USD", "direction"),
            ("Is 7 greater than 9?", "Is 9 greater than 7?", "direction"),
            (
                "Does Alice report to Bob?",
                "Does Bob report to Alice?",
                "direction",
            ),
            (
                "Show me orders shipped to Germany",
                "Show me orders shipped from Germany",
                "direction",
            ),
            (
                "How do I reset my password in the admin console?",
                "How do I reset all users' passwords in the admin console?",
                "scope",
            ),
            (
                "How do I reset my own password?",
                "How do I reset another user's password?",
                "scope",
            ),
        ] {
            assert_eq!(near_miss(a, b), Some(why), "{a:?} / {b:?}");
            assert_eq!(near_miss(b, a), Some(why), "{b:?} / {a:?}");
        }
        // The same question, its words moved: left to the embedding.
        for (a, b) in [
            (
                "How do I sort a list in Python?",
                "In Python, how do I sort a list?",
            ),
            (
                "What is the difference between TCP and UDP?",
                "What is the difference between UDP and TCP?",
            ),
            (
                "Convert 5 miles to kilometers",
                "Convert 5 miles into kilometers",
            ),
            (
                "Find flights from Paris to London",
                "Find flights to London from Paris",
            ),
            ("Compare Rust versus Go", "Compare Go versus Rust"),
            (
                "What is the cost per user per month?",
                "What is the cost per month per user?",
            ),
            (
                "Wanting to scare his housemates, Jonny put a lobster in the bathtub.",
                "Jonny put a lobster in the bathtub to scare his housemates.",
            ),
        ] {
            assert_eq!(near_miss(a, b), None, "{a:?} / {b:?}");
        }
    }

    #[test]
    fn one_word_edits_of_a_question_are_different_questions() {
        for (a, b, why) in [
            // A content word swapped: another question.
            (
                "The stick did not fit, as the hole was too wide.",
                "The stick did not fit, as the hole was too narrow.",
                "substitution",
            ),
            (
                "How many litres if I add 93L to 59L?",
                "How many litres if I remove 93L to 59L?",
                "substitution",
            ),
            (
                "If I add 5196 feet to 3101 feet how many feet?",
                "If I add 5196 meters to 3101 feet how many feet?",
                "substitution",
            ),
            (
                "Would the academy reject an applicant?",
                "Would the academy accept an applicant?",
                "substitution",
            ),
            // Its scope changed.
            (
                "What did this report warn about?",
                "What did every report warn about?",
                "scope",
            ),
            (
                "Do all cancer patients get disability?",
                "Do some cancer patients get disability?",
                "scope",
            ),
            (
                "What did children do that day?",
                "What did all children do that day?",
                "scope",
            ),
        ] {
            assert_eq!(near_miss(a, b), Some(why), "{a} / {b}");
        }
        for (a, b) in [
            // Function words swapped, fillers, case and punctuation: the same question.
            (
                "How do I reset my password?",
                "How can I reset my password?",
            ),
            (
                "963 torrs - 101 torrs = ____ torrs",
                "Quick question: 963 torrs - 101 torrs = ____ torrs Thanks!",
            ),
            (
                "If you add water to rice pudding is it horchata?",
                "Quick question: if you add water to rice pudding is it horchata",
            ),
            (
                "Was John Lennon a friend of Sasha Obama?",
                "was  john lennon a friend of sasha obama?",
            ),
            (
                "What land does Link serve to protect?",
                "What land does Link serve to protect?!!",
            ),
            (
                "Hey, what is the capital of Spain?",
                "What is the capital of Spain? Thank you",
            ),
            // A rewording changes many words: the cosine decides, not this rule.
            (
                "The element hydrogen is the most abundant in the universe.",
                "The element that is most abundant in the universe is hydrogen.",
            ),
        ] {
            assert_eq!(near_miss(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn code_indented_differently_is_different_code() {
        let a = "Why does this loop print once?\nfor x in xs:\n    print(x)\n    break";
        let b = "Why does this loop print once?\nfor x in xs:\n    print(x)\nbreak";
        assert_eq!(near_miss(a, b), Some("layout"));
        // The same code, tabs kept, trailing spaces and line ends aside.
        let c = "Why does this loop print once?\r\nfor x in xs:  \r\n    print(x)\r\n    break\r\n";
        assert_eq!(near_miss(a, c), None);
        // Prose laid out on lines has no layout to compare, nor has a
        // stray space at a line's start.
        assert_eq!(layout("Summarise this:\nThe cat sat.\nThe dog ran."), None);
        assert_eq!(layout("Hello,\n I need help"), None);
        assert_eq!(
            near_miss("Hello,\n I need help", "Hello,\nI need help"),
            None
        );
        assert_eq!(near_miss("What is Rust?", "What is Rust?"), None);
    }

    #[test]
    fn fillers_are_stripped_but_never_the_whole_question() {
        assert_eq!(
            strip_fillers("Quick question: what is 2+2? Thanks!"),
            "what is 2+2"
        );
        assert_eq!(strip_fillers("Hey, hi, what is Rust?!"), "what is Rust");
        assert_eq!(strip_fillers("  What is Rust  "), "What is Rust");
        // Words that merely start like a filler stay.
        assert_eq!(strip_fillers("History of Rome"), "History of Rome");
        assert_eq!(strip_fillers("Thanksgiving date"), "Thanksgiving date");
        assert_eq!(strip_fillers("Thanks!"), "Thanks");
        assert_eq!(strip_fillers("hi"), "hi");
        // Punctuation that may be the question's own stays: a factorial, a
        // statement's semicolon.
        assert_eq!(strip_fillers("Compute 20!"), "Compute 20!");
        assert_eq!(strip_fillers("Compute 20."), "Compute 20");
        assert_eq!(
            strip_fillers("Is this valid C: int x = 5;"),
            "Is this valid C: int x = 5;"
        );
        assert_eq!(strip_fillers("Compute 20! Thanks"), "Compute 20!");
        assert_eq!(strip_fillers("What is C++?"), "What is C++");
        assert_eq!(strip_fillers("What is 2+2?"), "What is 2+2");
        // And the guard tells a factorial from the number.
        assert_eq!(near_miss("Compute 20!", "Compute 20"), Some("numbers"));
        assert_eq!(near_miss("Compute 20!", "compute 20!"), None);
        // Set off by punctuation, a filler goes; as part of the question it stays.
        assert_eq!(strip_fillers("Hi! What is Rust? thx"), "What is Rust");
        assert_eq!(
            strip_fillers("What is Rust - thanks in advance"),
            "What is Rust"
        );
        for question in [
            "Hello in Japanese",
            "Hi in Japanese",
            "How do you say thank you",
            "Translate into Spanish: thank you",
            "Translate into Spanish: cheers",
            "Translate into Spanish: Thank you",
            "What does ty mean",
        ] {
            assert_eq!(strip_fillers(&format!("{question}?")), question);
        }
    }

    #[test]
    fn detectors() {
        let ex = Exclusions::new(
            &["(?i)confidential".into()],
            &[
                Detector::Email,
                Detector::Phone,
                Detector::Card,
                Detector::ApiKey,
            ],
        )
        .unwrap();
        assert_eq!(ex.matches("mail me at jane.doe@example.com"), Some("email"));
        assert_eq!(ex.matches("call +1 415-555-0134 now"), Some("phone"));
        assert_eq!(ex.matches("call (415) 555-0134"), Some("phone"));
        assert_eq!(ex.matches("call 415.555.0134"), Some("phone"));
        assert_eq!(ex.matches("the years 1990 2000 2010"), None);
        assert_eq!(ex.matches("my card is 4111 1111 1111 1111"), Some("card"));
        // With its expiry or CVV after it, or a number before it.
        for text in [
            "card 4111 1111 1111 1111 12/26",
            "4242424242424242 12/27 thanks",
            "4111-1111-1111-1111-123",
            "qty 2 4111 1111 1111 1111",
            "ref 1234 4111 1111 1111 1111 exp 0427",
            "amex 3782 822463 10005",
            "41111111 11111111",
            "4111 11111111 1111",
        ] {
            assert_eq!(ex.matches(text), Some("card"), "{text}");
        }
        assert_eq!(
            ex.matches("order 1234 5678 9012 3456 7"),
            None,
            "not a Luhn number"
        );
        assert_eq!(
            ex.matches("key sk-abcdefghijklmnopqrstuvwx"),
            Some("api_key")
        );
        assert_eq!(ex.matches("this is CONFIDENTIAL"), Some("pattern"));
        assert_eq!(ex.matches("What is the capital of France?"), None);
        // A JWT is a credential too.
        assert_eq!(
            ex.matches("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
            Some("api_key")
        );
        // Only when asked for: SSNs and IBANs.
        assert_eq!(ex.matches("my SSN is 078-05-1120"), None);
        let more = Exclusions::new(&[], &[Detector::Ssn, Detector::Iban]).unwrap();
        for text in [
            "my SSN is 078-05-1120",
            "ssn 219 09 9999 please",
            "IBAN DE89 3704 0044 0532 0130 00",
            "pay to gb82west12345698765432 today",
            "NL91ABNA0417164300",
            "IBAN AT61 1904 3002 3457 3201 and more",
            "BE68539007547034 is mine",
        ] {
            assert!(more.matches(text).is_some(), "{text}");
        }
        for text in [
            "part 000-12-3456",
            "area 666-12-3456",
            "serial 123-45-0000",
            "mixed 123-45 6789",
            "phone 415-555-0134",
            "DE89 3704 0044 0532 0130 01",
            "SKU AB12CDEF34567890",
            "What is the capital of France?",
        ] {
            assert_eq!(more.matches(text), None, "{text}");
        }
        assert_eq!(more.matches("078-05-1120"), Some("ssn"));
        assert_eq!(more.matches("DE89370400440532013000"), Some("iban"));
    }

    #[test]
    fn look_alike_characters_do_not_hide_what_the_detectors_look_for() {
        let ex = Exclusions::new(
            &["(?i)confidential".into()],
            &[
                Detector::Email,
                Detector::Phone,
                Detector::Card,
                Detector::ApiKey,
            ],
        )
        .unwrap();
        for (text, rule) in [
            // Full-width digits, one group and four.
            ("my card is ４１１１１１１１１１１１１１１１", "card"),
            ("my card is ４１１１ １１１１ １１１１ １１１１", "card"),
            // Arabic-Indic and Devanagari digits.
            ("بطاقتي ٤١١١١١١١١١١١١١١١", "card"),
            ("कार्ड ४१११ ११११ ११११ ११११", "card"),
            // Mathematical bold digits (a run of fifty: values modulo ten).
            ("card 𝟒𝟏𝟏𝟏 𝟏𝟏𝟏𝟏 𝟏𝟏𝟏𝟏 𝟏𝟏𝟏𝟏", "card"),
            // Invisible characters and odd spaces inside the number.
            ("card 4111\u{200b}1111\u{200b}1111\u{200b}1111", "card"),
            ("card 4111\u{ad}1111\u{2060}1111\u{feff}1111", "card"),
            ("card 4111\u{a0}1111\u{3000}1111\u{202f}1111", "card"),
            ("card 4111.1111.1111.1111", "card"),
            ("ｍａｉｌ ｊａｎｅ．ｄｏｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "email"),
            ("jane.doe\u{200b}@example.com", "email"),
            ("call ＋１ ４１５-５５５-０１３４", "phone"),
            (
                "key ｓｋ-ａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘ",
                "api_key",
            ),
            ("ｃｏｎｆｉｄｅｎｔｉａｌ report", "pattern"),
        ] {
            assert_eq!(ex.matches(text), Some(rule), "{text}");
        }
        // Text in other scripts with no such thing in it stays cacheable,
        // and a number that fails the Luhn check in any digits is no card.
        for text in [
            "東京の人口は？",
            "Wie viele Einwohner hat München?",
            "order ４１１１ １１１１ １１１１ １１１２",
            "¿Cuántos años tiene la Tierra?",
        ] {
            assert_eq!(ex.matches(text), None, "{text}");
        }
        assert!(matches!(privacy_folded("plain ascii"), Cow::Borrowed(_)));
        assert_eq!(privacy_folded("x\u{200d}１２\u{a0}٣"), "x12 3");
    }

    /// The crate's directory as `cargo test` runs it (set at run time, so a
    /// test binary reused from a shared target dir built in another checkout
    /// reads this checkout's files).
    fn crate_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(Into::into)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
    }

    #[test]
    fn labelled_pairs_precision_at_the_default_threshold() {
        let text = std::fs::read_to_string(crate_dir().join("testdata/pairs.tsv")).unwrap();
        let pairs = parse_pairs(&text).unwrap();
        assert!(pairs.len() >= 60);
        let emb = embedder(MAX_SEQ);
        let cosines: Vec<f32> = pairs
            .iter()
            .map(|p| {
                let v = emb.embed_blocking(vec![p.a.clone(), p.b.clone()]).unwrap();
                smartllm_embed::cosine(&v[0], &v[1])
            })
            .collect();
        let rows = evaluate(&pairs, &cosines, &default_thresholds());
        let at = |t: f32| {
            rows.iter()
                .find(|r| (r.threshold - t).abs() < 1e-6)
                .unwrap()
                .clone()
        };
        let d = at(0.95);
        assert!(
            d.precision >= 0.98,
            "precision {:.3} at 0.95: {d:?}",
            d.precision
        );
        assert!(d.recall > 0.2, "the cache must still hit: {d:?}");
        // The guard alone keeps every trap out, even at a loose threshold.
        assert!(at(0.80).precision >= 0.9, "{:?}", at(0.80));
    }
}

/// One labelled pair: `text_a<TAB>text_b<TAB>label[<TAB>category<TAB>source]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledPair {
    pub a: String,
    pub b: String,
    /// True: the two prompts may share an answer (a hit is right); false: a trap.
    pub duplicate: bool,
    /// `paraphrase`, `near-repeat`, `negation`, ... (3-column files:
    /// `duplicate` or `trap`).
    pub category: String,
    /// Where the pair comes from (empty in 3-column files).
    pub source: String,
}

/// Served / total for one category of pairs at one threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryRate {
    pub category: String,
    pub duplicate: bool,
    pub served: usize,
    pub total: usize,
}

impl CategoryRate {
    pub fn rate(&self) -> f64 {
        self.served as f64 / self.total.max(1) as f64
    }
}

/// One row of a threshold sweep over labelled pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub threshold: f32,
    /// Served duplicates / served pairs (1.0 when nothing is served).
    pub precision: f64,
    /// Served duplicates / duplicates: the hit rate on true duplicates.
    pub recall: f64,
    /// Served traps / traps.
    pub trap_rate: f64,
    /// Served pairs / all pairs.
    pub hit_rate: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    /// Pairs with cosine >= threshold that the precision guard turned away.
    pub guard_blocked: usize,
    /// Pairs with cosine >= threshold that passed the guard and that the
    /// verifier turned away (0 without a verifier).
    pub verifier_blocked: usize,
    /// Per category, in first-seen order of the file.
    pub categories: Vec<CategoryRate>,
}

/// Parse labelled pairs, one per line: `text_a<TAB>text_b<TAB>label` or
/// `text_a<TAB>text_b<TAB>label<TAB>category<TAB>source`; label is 1/true
/// (duplicate) or 0/false (trap). `#` comments and blank lines are skipped.
pub fn parse_pairs(text: &str) -> Result<Vec<LabelledPair>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        let (a, b, label, category, source) = match cols[..] {
            [a, b, label] => (a, b, label, None, ""),
            [a, b, label, category, source] => (a, b, label, Some(category.trim()), source.trim()),
            _ => {
                return Err(format!(
                    "line {}: expected text_a<TAB>text_b<TAB>label[<TAB>category<TAB>source], got {} columns",
                    i + 1,
                    cols.len()
                ))
            }
        };
        let duplicate = match label.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            other => {
                return Err(format!(
                    "line {}: label must be 0 or 1, got {other:?}",
                    i + 1
                ))
            }
        };
        if a.trim().is_empty() || b.trim().is_empty() {
            return Err(format!("line {}: empty text", i + 1));
        }
        let category = match category {
            Some("") => return Err(format!("line {}: empty category", i + 1)),
            Some(c) => c.to_string(),
            None if duplicate => "duplicate".to_string(),
            None => "trap".to_string(),
        };
        out.push(LabelledPair {
            a: a.to_string(),
            b: b.to_string(),
            duplicate,
            category,
            source: source.to_string(),
        });
    }
    Ok(out)
}

/// Precision, recall (duplicates served), trap rate and hit rate of the
/// cache's decision (cosine >= threshold and no near-miss) for each threshold,
/// overall and per category, given each pair's cosine similarity.
pub fn evaluate(pairs: &[LabelledPair], cosines: &[f32], thresholds: &[f32]) -> Vec<EvalRow> {
    evaluate_verified(pairs, cosines, None, thresholds)
}

/// [`evaluate`] with the verifier: `verifier` = (each pair's verifier
/// score, the score a pair needs); a pair is served when cosine >=
/// threshold, the guard passes and the score is at least the pass score.
pub fn evaluate_verified(
    pairs: &[LabelledPair],
    cosines: &[f32],
    verifier: Option<(&[f32], f32)>,
    thresholds: &[f32],
) -> Vec<EvalRow> {
    evaluate_gated(
        pairs,
        cosines,
        verifier,
        thresholds,
        &vec![false; pairs.len()],
    )
}

/// [`evaluate_verified`] as a lookup decides for prompts longer than the
/// embedding model's window: `beyond_window[i]` when pair `i`'s texts
/// differ past it (`unread_tails_differ`), which no lookup serves, so the
/// pair counts as blocked before the verifier, like a guard verdict.
pub fn evaluate_gated(
    pairs: &[LabelledPair],
    cosines: &[f32],
    verifier: Option<(&[f32], f32)>,
    thresholds: &[f32],
    beyond_window: &[bool],
) -> Vec<EvalRow> {
    assert_eq!(pairs.len(), cosines.len(), "one cosine per pair");
    assert_eq!(
        pairs.len(),
        beyond_window.len(),
        "one window verdict per pair"
    );
    let verified: Vec<bool> = match verifier {
        Some((scores, pass)) => {
            assert_eq!(scores.len(), pairs.len(), "one verifier score per pair");
            scores.iter().map(|&s| s >= pass).collect()
        }
        None => vec![true; pairs.len()],
    };
    let guard_ok: Vec<bool> = pairs
        .iter()
        .zip(beyond_window)
        .map(|(p, &unread)| !unread && near_miss(&p.a, &p.b).is_none())
        .collect();
    // The exact stage answers these before any embedding (see `key::exact_text`).
    let exact: Vec<bool> = pairs
        .iter()
        .map(|p| crate::key::exact_text(&p.a) == crate::key::exact_text(&p.b))
        .collect();
    let positives = pairs.iter().filter(|p| p.duplicate).count();
    let negatives = pairs.len() - positives;
    let mut order: Vec<(&str, bool)> = Vec::new();
    for p in pairs {
        if !order
            .iter()
            .any(|(c, d)| *c == p.category && *d == p.duplicate)
        {
            order.push((&p.category, p.duplicate));
        }
    }
    thresholds
        .iter()
        .map(|&t| {
            let (mut tp, mut fp, mut blocked, mut vetoed) = (0, 0, 0, 0);
            let mut categories: Vec<CategoryRate> = order
                .iter()
                .map(|(c, d)| CategoryRate {
                    category: (*c).to_string(),
                    duplicate: *d,
                    served: 0,
                    total: 0,
                })
                .collect();
            for (i, p) in pairs.iter().enumerate() {
                let close = cosines[i] >= t;
                let served = exact[i] || (close && guard_ok[i] && verified[i]);
                blocked += usize::from(!exact[i] && close && !guard_ok[i]);
                vetoed += usize::from(!exact[i] && close && guard_ok[i] && !verified[i]);
                if served {
                    if p.duplicate {
                        tp += 1;
                    } else {
                        fp += 1;
                    }
                }
                let c = categories
                    .iter_mut()
                    .find(|c| c.category == p.category && c.duplicate == p.duplicate)
                    .expect("every category is listed");
                c.total += 1;
                c.served += usize::from(served);
            }
            EvalRow {
                threshold: t,
                precision: if tp + fp == 0 {
                    1.0
                } else {
                    tp as f64 / (tp + fp) as f64
                },
                recall: tp as f64 / positives.max(1) as f64,
                trap_rate: fp as f64 / negatives.max(1) as f64,
                hit_rate: (tp + fp) as f64 / pairs.len().max(1) as f64,
                true_positives: tp,
                false_positives: fp,
                guard_blocked: blocked,
                verifier_blocked: vetoed,
                categories,
            }
        })
        .collect()
}

/// 0.80, 0.81, ... 0.99
pub fn default_thresholds() -> Vec<f32> {
    (80..=99).map(|t| t as f32 / 100.0).collect()
}

#[cfg(test)]
mod eval_tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn parse_pairs_reads_three_and_five_columns() {
        let text = "# comment\n\nHow far is Paris?\thow far is paris\t1\n\
                    Is it hot?\tIs it cold?\t0\n\
                    a b\ta  b\t1\tnear-repeat\tsynthetic:x\r\n\
                    Is it on?\tIs it not on?\tfalse\tnegation\tsynthetic:y\n";
        let p = parse_pairs(text).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(
            (p[0].duplicate, p[0].category.as_str(), p[0].source.as_str()),
            (true, "duplicate", "")
        );
        assert_eq!((p[1].duplicate, p[1].category.as_str()), (false, "trap"));
        assert_eq!(
            (
                p[2].category.as_str(),
                p[2].source.as_str(),
                p[2].b.as_str()
            ),
            ("near-repeat", "synthetic:x", "a  b")
        );
        assert_eq!(
            (p[3].duplicate, p[3].category.as_str()),
            (false, "negation")
        );
    }

    #[test]
    fn parse_pairs_rejects_malformed_lines() {
        for (bad, why) in [
            ("a\tb\n", "columns"),
            ("a\tb\t1\tcat\n", "columns"),
            ("a\tb\t2\n", "label"),
            ("a\tb\t1\t\tsrc\n", "empty category"),
            ("a\t \t1\n", "empty text"),
        ] {
            let err = parse_pairs(bad).unwrap_err();
            assert!(
                err.contains(why) && err.starts_with("line 1"),
                "{bad:?}: {err}"
            );
        }
    }

    fn pair(a: &str, b: &str, duplicate: bool, category: &str) -> LabelledPair {
        LabelledPair {
            a: a.into(),
            b: b.into(),
            duplicate,
            category: category.into(),
            source: String::new(),
        }
    }

    #[test]
    fn differing_parts_set_aside_a_shared_context_or_template() {
        let context = "Context: you answer customers of an accounting application \
            that keeps invoices and receipts in one ledger. Be short.";
        let a = format!("{context} Question: How do I reset my password?");
        let b = format!("{context}\nQuestion:  how do I delete my account?");
        assert_eq!(
            differing_parts(&a, &b),
            Some(("How do I reset my password?", "how do I delete my account?"))
        );
        // A frame at the end counts too.
        let rules = "Answer in one short paragraph. Use plain words and no lists at all, please.";
        let a = format!("What is a monad? {rules}");
        let b = format!("Explain monads to me. {rules}");
        assert_eq!(
            differing_parts(&a, &b),
            Some(("What is a monad?", "Explain monads to me."))
        );
        // Too few shared words, no shared sentence, or one text all frame.
        assert_eq!(
            differing_parts("Hi there. What is a monad?", "Hi there. What is a functor?"),
            None
        );
        assert_eq!(
            differing_parts("How do I reset my password?", "How do I reset my PIN?"),
            None
        );
        assert_eq!(
            differing_parts(&format!("{context} Thanks."), context),
            None
        );
    }

    #[test]
    fn evaluate_reports_recall_trap_rate_and_categories() {
        let pairs = vec![
            pair(
                "How do I boil an egg?",
                "how do I boil an egg",
                true,
                "near-repeat",
            ),
            pair("What is a cat?", "what's a cat", true, "paraphrase"),
            // A trap reworded beyond the guard's edit rule: only the cosine decides.
            pair(
                "Name a red fruit.",
                "Which fruit is green? Give me an example.",
                false,
                "antonym",
            ),
            // The guard turns this one away whatever the cosine.
            pair("Is rust safe?", "Is rust not safe?", false, "negation"),
            pair(
                "What is my balance?",
                "What is everyone's balance?",
                false,
                "scope",
            ),
        ];
        let cosines = [0.99, 0.85, 0.97, 0.99, 0.90];
        let rows = evaluate(&pairs, &cosines, &[0.80, 0.95]);
        let loose = &rows[0];
        assert_eq!((loose.true_positives, loose.false_positives), (2, 1));
        // A pair whose texts differ past the model's window is never
        // served, whatever its cosine: blocked before the verifier.
        let unread = [false, false, true, false, false];
        let gated = &evaluate_gated(&pairs, &cosines, None, &[0.80], &unread)[0];
        assert_eq!(
            (
                gated.true_positives,
                gated.false_positives,
                gated.guard_blocked
            ),
            (2, 0, 3)
        );
        assert_eq!(loose.guard_blocked, 2, "negation and scope");
        assert!((loose.recall - 1.0).abs() < 1e-9);
        assert!((loose.trap_rate - 1.0 / 3.0).abs() < 1e-9);
        assert!((loose.precision - 2.0 / 3.0).abs() < 1e-9);
        assert!((loose.hit_rate - 0.6).abs() < 1e-9);
        let cats: Vec<(&str, bool, usize, usize)> = loose
            .categories
            .iter()
            .map(|c| (c.category.as_str(), c.duplicate, c.served, c.total))
            .collect();
        assert_eq!(
            cats,
            [
                ("near-repeat", true, 1, 1),
                ("paraphrase", true, 1, 1),
                ("antonym", false, 1, 1),
                ("negation", false, 0, 1),
                ("scope", false, 0, 1),
            ]
        );
        let strict = &rows[1];
        assert_eq!((strict.true_positives, strict.false_positives), (1, 1));
        assert!((strict.recall - 0.5).abs() < 1e-9);
        assert!((strict.trap_rate - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(strict.categories[2].rate(), 1.0);
        assert_eq!(strict.categories[4].rate(), 0.0);
        // Nothing served: precision is 1 by convention, rates are 0.
        let none = &evaluate(&pairs, &cosines, &[1.1])[0];
        assert_eq!(
            (none.precision, none.recall, none.trap_rate),
            (1.0, 0.0, 0.0)
        );
    }

    fn yardstick(name: &str) -> (Vec<LabelledPair>, usize) {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
        let path = dir.join("../../data/cache-eval").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        (
            parse_pairs(&text).unwrap_or_else(|e| panic!("{name}: {e}")),
            text.len(),
        )
    }

    /// data/cache-eval (the yardstick of issue #16): both splits parse, hold
    /// both labels and every category, and share nothing.
    #[test]
    fn cache_eval_yardstick_is_well_formed_and_split_by_source() {
        let (tuning, tuning_bytes) = yardstick("tuning.tsv");
        let (heldout, heldout_bytes) = yardstick("heldout.tsv");
        assert!(tuning.len() + heldout.len() >= 1000);
        assert!(tuning_bytes + heldout_bytes < 5 << 20);
        assert!(
            heldout.len() * 10 >= (tuning.len() + heldout.len()) * 4,
            "held-out is {} of {}",
            heldout.len(),
            tuning.len() + heldout.len()
        );
        let traps = [
            "negation", "antonym", "entity", "number", "date", "unit", "scope",
        ];
        for (name, split) in [("tuning", &tuning), ("heldout", &heldout)] {
            for p in split.iter() {
                assert!(!p.source.is_empty(), "{name}: no source for {p:?}");
                let synthetic = p.source.starts_with("synthetic:");
                match p.category.as_str() {
                    "paraphrase" => assert!(p.duplicate && !synthetic, "{name}: {p:?}"),
                    "near-repeat" => assert!(p.duplicate && synthetic, "{name}: {p:?}"),
                    "twin" => assert!(!p.duplicate && !synthetic, "{name}: {p:?}"),
                    // Different real questions that read alike (Spider's in
                    // held-out, SQuAD's in tuning).
                    "related" => assert!(!p.duplicate && !synthetic, "{name}: {p:?}"),
                    c if traps.contains(&c) => assert!(!p.duplicate && synthetic, "{name}: {p:?}"),
                    c => panic!("{name}: unknown category {c:?}"),
                }
                assert_ne!(p.a.to_lowercase(), p.b.to_lowercase(), "{name}: {p:?}");
            }
            for c in traps
                .iter()
                .chain(&["paraphrase", "near-repeat", "twin", "related"])
            {
                let n = split.iter().filter(|p| p.category == *c).count();
                assert!(n >= 20, "{name}: only {n} pairs of {c}");
            }
            assert!(split.iter().any(|p| p.duplicate) && split.iter().any(|p| !p.duplicate));
        }
        let key = |p: &LabelledPair| {
            let (a, b) = (p.a.to_lowercase(), p.b.to_lowercase());
            if a <= b {
                (a, b)
            } else {
                (b, a)
            }
        };
        let tuning_pairs: HashSet<_> = tuning.iter().map(key).collect();
        let tuning_texts: HashSet<String> = tuning
            .iter()
            .flat_map(|p| [p.a.to_lowercase(), p.b.to_lowercase()])
            .collect();
        for p in &heldout {
            assert!(!tuning_pairs.contains(&key(p)), "in both splits: {p:?}");
            assert!(
                !tuning_texts.contains(&p.a.to_lowercase()),
                "held-out text_a also in tuning: {p:?}"
            );
        }
        // Split by source collection: no collection feeds both splits.
        let collection = |p: &LabelledPair| p.source.trim_start_matches("synthetic:").to_string();
        let tuning_sources: HashSet<String> = tuning.iter().map(collection).collect();
        for p in &heldout {
            assert!(!tuning_sources.contains(&collection(p)), "{p:?}");
        }
    }

    /// The verifier's training pairs (train.tsv) hold no text of either
    /// split and nothing from a held-out collection.
    #[test]
    fn verifier_training_pairs_stay_out_of_both_splits() {
        let (train, _) = yardstick("train.tsv");
        let (tuning, _) = yardstick("tuning.tsv");
        let (heldout, _) = yardstick("heldout.tsv");
        assert!(train.len() >= 1000);
        let texts = |s: &[LabelledPair]| -> HashSet<String> {
            s.iter()
                .flat_map(|p| [p.a.to_lowercase(), p.b.to_lowercase()])
                .collect()
        };
        let taken: HashSet<String> = texts(&tuning).union(&texts(&heldout)).cloned().collect();
        let collection = |p: &LabelledPair| p.source.trim_start_matches("synthetic:").to_string();
        let held: HashSet<String> = heldout.iter().map(collection).collect();
        for p in &train {
            assert!(!taken.contains(&p.a.to_lowercase()), "{p:?}");
            assert!(!taken.contains(&p.b.to_lowercase()), "{p:?}");
            assert!(!held.contains(&collection(p)), "{p:?}");
        }
        assert!(train.iter().any(|p| p.category == "related"));
    }
}
