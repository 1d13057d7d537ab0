#!/usr/bin/env python3
"""Build the semantic-cache yardstick: data/cache-eval/{tuning,heldout}.tsv.

Standard library only. The one input is the sdist of the PyPI package
`bigbench==1.0.0` (Google's BIG-bench, which ships its task data inside the
package), fetched with `python3 -m pip download --no-deps` and checked against
a pinned sha256. Nothing is installed.

    python3 data/cache-eval/make_pairs.py              # downloads the sdist (~360 MB) to a temp dir
    python3 data/cache-eval/make_pairs.py --sdist PATH # reuse a downloaded bigbench-1.0.0.tar.gz

Output columns: text_a<TAB>text_b<TAB>label<TAB>category<TAB>source
  label 1 = the two prompts may share an answer (a cache hit is right),
  label 0 = a trap (serving text_a's answer to text_b is wrong).
  source `synthetic:<collection>` = generated here from that collection's real
  questions; a bare `<collection>` = a pair labelled by the source itself.

The split is by source collection: nothing in heldout.tsv comes from a
collection used in tuning.tsv, and traps in each split are made only from
that split's own questions. See SOURCES.md and README.md beside this file.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "bigbench==1.0.0"
SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
NI = TASKS + "natural_instructions/"
SEED = 16
HERE = os.path.dirname(os.path.abspath(__file__))

# Per split: how many generated pairs of each kind to keep (fewer if the
# split's questions do not allow that many).
NEAR_REPEATS = 120
TRAPS_PER_CATEGORY = 60
TWINS = 60
# Held-out only: different questions that read alike (real: Spider, by SQL).
RELATED = 60
TRAP_CATEGORIES = ["negation", "antonym", "entity", "number", "date", "unit", "scope"]


# ---------------------------------------------------------------- reading


def fetch_sdist(path: str | None) -> str:
    if path is None:
        out = tempfile.mkdtemp(prefix="bigbench-")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", out, PACKAGE],
            check=True,
        )
        path = os.path.join(out, SDIST)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != SDIST_SHA256:
        sys.exit(f"{path}: sha256 {h.hexdigest()} is not the pinned {SDIST_SHA256}")
    return path


class Tasks:
    def __init__(self, sdist: str):
        self.tar = tarfile.open(sdist, "r:gz")
        self.names = set(self.tar.getnames())

    def examples(self, member: str) -> list[dict]:
        f = self.tar.extractfile(member + "/task.json")
        return json.load(f)["examples"]


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\t", " ")).strip()


def targets(e: dict) -> list[str]:
    t = e.get("target", [])
    return [t] if isinstance(t, str) else list(t)


# Each loader returns (real pairs [(a, b, label, category)], questions [str]).


def spider(t: Tasks):
    """Spider dev questions (BIG-bench semantic_parsing_spider): two questions
    written for the same SQL on the same database are paraphrases."""
    groups = collections.defaultdict(list)
    for e in t.examples(TASKS + "semantic_parsing_spider"):
        q, schema = e["input"].split(" | ", 1)
        groups[(schema, targets(e)[0])].append(clean(q))
    pairs, questions = [], []
    for qs in groups.values():
        qs = list(dict.fromkeys(qs))
        questions.extend(qs)
        for i in range(len(qs)):
            for j in range(i + 1, len(qs)):
                pairs.append((qs[i], qs[j], 1, "paraphrase"))
    return pairs, questions


def spider_related(t: Tasks, n: int):
    """Spider dev questions on the same database whose SQL differs: different
    questions that often read alike ("How many singers are there?" / "How
    many concerts are there?"). The pairs with the most words in common are
    kept, each question at most once: the traps a loose threshold serves."""
    by_schema = collections.defaultdict(lambda: collections.defaultdict(list))
    for e in t.examples(TASKS + "semantic_parsing_spider"):
        q, schema = e["input"].split(" | ", 1)
        sql = " ".join(targets(e)[0].lower().split())
        by_schema[schema][sql].append(clean(q))
    words = lambda q: set(re.findall(r"[a-z0-9]+", q.lower()))
    scored = []
    for schema in sorted(by_schema):
        groups = [sorted(set(qs)) for _, qs in sorted(by_schema[schema].items())]
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                for a in groups[i]:
                    for b in groups[j]:
                        wa, wb = words(a), words(b)
                        if wa == wb:
                            continue  # the same words in another order: not told apart by text
                        jac = len(wa & wb) / len(wa | wb)
                        scored.append((-jac, a, b))
    return most_alike(scored, n)


def most_alike(scored: list[tuple[float, str, str]], n: int) -> list[tuple]:
    """The `n` pairs with the most words in common (`scored`: (-jaccard, a,
    b)), each question at most once, as `related` traps."""
    scored.sort()
    used, out = set(), []
    for _, a, b in scored:
        if len(out) >= n:
            break
        if a.lower() in used or b.lower() in used:
            continue
        used.update((a.lower(), b.lower()))
        out.append((a, b, 0, "related"))
    return out


SQUAD_DEV = "squad_shifts/squaddev_v1.1.json"
SQUAD_REWRITES = 300
SQUAD_RELATED = 120


def squad_dev(t: Tasks) -> list[dict]:
    """SQuAD v1.1 dev paragraphs ({context, qas}) as BIG-bench ships them
    (squad_shifts' reference set)."""
    f = t.tar.extractfile(TASKS + SQUAD_DEV)
    return [p for art in json.load(f)["data"] for p in art["paragraphs"]]


def recase(rewrite: str, *sources: str) -> str:
    """Give a lower-cased rewrite back the capitals its sources use
    mid-sentence ("who recorded walking in fresno?" -> "... Walking in
    Fresno?"; "abc is owned by ..." -> "ABC is owned by ...")."""
    caps = {}
    for src in sources:
        for m in re.finditer(r"(?<![.?!]\s)(?<!^)\b([A-Z][\w&]+)", src):
            caps.setdefault(m.group(1).lower(), m.group(1))
    out = re.sub(r"\b[\w&]+", lambda m: caps.get(m.group(0).lower(), m.group(0)), rewrite)
    return out[:1].upper() + out[1:]


def squad_rewrites(t: Tasks, paragraphs: list[dict]) -> list[tuple]:
    """(SQuAD dev question, its rewrite in BIG-bench's question_selection):
    a rewrite is paired with the paragraph's one original question whose
    annotators gave the rewrite's short answer; rewrites whose answer two or
    more originals share are skipped."""
    by_context = {clean(p["context"]): p for p in paragraphs}
    out = []
    for e in t.examples(TASKS + "question_selection"):
        m = re.match(r"Short Answer: (.*?) Context: (.*)", e["input"], re.S)
        if not m:
            continue
        answer, context = m.group(1).strip().lower(), clean(m.group(2))
        p = by_context.get(context)
        rewrite = [q for q, v in e["target_scores"].items() if v == 1]
        if p is None or len(rewrite) != 1:
            continue
        originals = [q for q in p["qas"] if answer in {a["text"].strip().lower() for a in q["answers"]}]
        if len(originals) != 1:
            continue
        a = clean(originals[0]["question"])
        b = recase(clean(rewrite[0]), a, p["context"])
        if a.lower() != b.lower():
            out.append((a, b, 1, "paraphrase"))
    return list(dict.fromkeys(out))


def squad_related(paragraphs: list[dict], n: int) -> list[tuple]:
    """Two questions on one SQuAD dev paragraph whose answers (every
    annotator's) share no word, most words in common first: real different
    questions that read alike."""
    words = lambda q: set(re.findall(r"[a-z0-9]+", q.lower()))
    norm = lambda a: set(re.findall(r"[a-z0-9]+", a.lower()))
    scored = []
    for p in paragraphs:
        qs = p["qas"]
        for i in range(len(qs)):
            for j in range(i + 1, len(qs)):
                a, b = clean(qs[i]["question"]), clean(qs[j]["question"])
                wa, wb = words(a), words(b)
                if wa == wb or not wa or not wb or not (a.endswith("?") and b.endswith("?")):
                    continue
                ga = norm(" ".join(x["text"] for x in qs[i]["answers"]))
                gb = norm(" ".join(x["text"] for x in qs[j]["answers"]))
                if not ga or not gb or ga & gb:
                    continue
                scored.append((-len(wa & wb) / len(wa | wb), a, b))
    return most_alike(scored, n)


def snips(t: Tasks):
    """SNIPS user utterances (BIG-bench intent_recognition)."""
    qs = [clean(e["input"].removeprefix("Utterance:")) for e in t.examples(TASKS + "intent_recognition")]
    return [], qs


def bb_questions(t: Tasks, task: str):
    """Plain question tasks (known_unknowns, general_knowledge, strategyqa)."""
    return [], [clean(e["input"]) for e in t.examples(TASKS + task)]


def squad_questions(t: Tasks):
    """SQuAD questions as quoted by Natural Instructions v1 subtask046."""
    qs = []
    for e in t.examples(NI + "subtask046_miscellaenous_question_typing"):
        m = re.match(r"Question:\s*(.*?)\s*\(Answer:", e["input"], re.S)
        if m:
            qs.append(clean(m.group(1)))
    return [], qs


def qasc_paraphrases(t: Tasks, rng: random.Random):
    """Natural Instructions v1 subtask045: crowd-written paraphrases of QASC
    fact sentences (two per sentence kept, picked at random)."""
    pairs = []
    for e in t.examples(NI + "subtask045_miscellaneous_sentence_paraphrasing"):
        m = re.search(r"Sentence:\s*(.*)$", e["input"], re.S)
        if not m:
            continue
        a = clean(m.group(1))
        cands = [clean(x) for x in targets(e) if clean(x) and clean(x) != a]
        for b in rng.sample(cands, min(2, len(cands))):
            pairs.append((a, b, 1, "paraphrase"))
    return pairs, []


def bb_rephrase(t: Tasks):
    """BIG-bench rephrase: a sentence and rewrites that keep its meaning."""
    pairs = []
    for e in t.examples(TASKS + "rephrase"):
        a = clean(e["input"].split("\nKeyword:")[0])
        for b in targets(e):
            if clean(b) != a:
                pairs.append((a, clean(b), 1, "paraphrase"))
    return pairs, []


def unit_questions(t: Tasks, sub: str):
    return [], [clean(e["input"]) for e in t.examples(TASKS + "unit_conversion/" + sub)]


def winogrande_twins(t: Tasks, sub: str):
    """Winogrande twin sentences (Natural Instructions v1 subtask034/035): a
    crowd worker changed one or two words so that the answer flips."""
    pairs = []
    for e in t.examples(NI + sub):
        m = re.search(r"Question:\s*(.*?)\s*\nAnswer:", e["input"], re.S)
        tg = targets(e)
        if m and tg and clean(tg[0]) != clean(m.group(1)):
            pairs.append((clean(m.group(1)), clean(tg[0]), 0, "twin"))
    return pairs, []


# ---------------------------------------------------------------- traps

WORD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z][A-Za-z'’]*")


def match_case(src: str, dst: str) -> str:
    if src.isupper() and len(src) > 1:
        return dst.upper()
    if src[:1].isupper():
        return dst[:1].upper() + dst[1:]
    return dst


def replace_first(text: str, table: dict[str, str], skip_capitalised: bool = False) -> str | None:
    """Replace the first whole word (case-insensitive) found in `table`."""
    for m in WORD.finditer(text):
        w = m.group(0)
        key = w.lower()
        if key in table:
            if skip_capitalised and w[:1].isupper() and m.start() > 0:
                continue
            return text[: m.start()] + match_case(w, table[key]) + text[m.end():]
    return None


CONTRACTED = {
    "can't": "can", "cannot": "can", "won't": "will", "don't": "do", "doesn't": "does",
    "didn't": "did", "isn't": "is", "aren't": "are", "wasn't": "was", "weren't": "were",
    "haven't": "have", "hasn't": "has", "hadn't": "had", "shouldn't": "should",
    "wouldn't": "would", "couldn't": "could", "mustn't": "must",
}
NEGATE_AUX = {
    "is": "isn't", "are": "aren't", "was": "wasn't", "were": "weren't", "do": "don't",
    "does": "doesn't", "did": "didn't", "can": "can't", "could": "couldn't",
    "should": "shouldn't", "will": "won't", "would": "wouldn't", "must": "mustn't",
}
MAIN_HAVE = {"has": "does not have", "have": "do not have", "had": "did not have"}
WH = {"what", "which", "who", "whose", "how", "where", "when", "why"}
PRONOUNS = {"it", "they", "he", "she", "you", "i", "we", "there", "this", "that"}


def negation(q: str, rng: random.Random) -> str | None:
    # Remove a negation that is there ...
    for m in WORD.finditer(q):
        w = m.group(0).replace("’", "'").lower()
        if w in CONTRACTED:
            return q[: m.start()] + match_case(m.group(0), CONTRACTED[w]) + q[m.end():]
        if w in ("not", "never"):
            return clean(q[: m.start()] + q[m.end():])
        if w == "no" and m.start() > 0 and re.match(r"no\s+[a-z]", q[m.start():]):
            return clean(q[: m.start()] + q[m.end():])
    # ... or add one.
    words = list(WORD.finditer(q))
    for i, m in enumerate(words):
        w = m.group(0).lower()
        nxt = words[i + 1].group(0).lower() if i + 1 < len(words) else ""
        if i == 0 and w in NEGATE_AUX:
            # "Will it snow ..." -> "Will it not snow ..."
            if nxt in PRONOUNS:
                e = words[1].end()
                return q[:e] + " not" + q[e:]
            return None
        if i > 0 and w in MAIN_HAVE and words[0].group(0).lower() in WH and not (nxt.endswith("ed") or nxt.endswith("en") or nxt == "been"):
            return q[: m.start()] + MAIN_HAVE[w] + q[m.end():]
        if i > 0 and w in NEGATE_AUX and nxt not in ("not", "n't"):
            return q[: m.start()] + match_case(m.group(0), NEGATE_AUX[w]) + q[m.end():]
    m = re.search(r"\b(I|we|you|they)\s+(want|need|like|know|think|have)\b", q)
    if m:
        neg = "don't"
        return q[: m.start(2)] + neg + " " + q[m.start(2):]
    return None


ANTONYM_PAIRS = """
oldest youngest|older younger|newest oldest|highest lowest|higher lower|high low|largest smallest
larger smaller|biggest smallest|bigger smaller|big small|large small|longest shortest|longer shorter
long short|most least|more fewer|less more|fewest most|maximum minimum|max min|above below
before after|first last|best worst|better worse|ascending descending|increase decrease
increasing decreasing|earliest latest|early late|male female|men women|man woman|hot cold
warmest coldest|warm cold|cheapest costliest|cheap expensive|win lose|won lost|wins losses
winner loser|buy sell|bought sold|add remove|true false|positive negative|north south|east west
northern southern|eastern western|top bottom|inside outside|rich poor|strong weak|safe dangerous
legal illegal|possible impossible|heavier lighter|heaviest lightest|fast slow|faster slower
fastest slowest|wet dry|happy sad|good bad|easy difficult|same different|similar different
majority minority|import export|arrival departure|arrive leave|accept reject|enable disable
upload download|open closed|public private|full empty|alive dead|living dead|love hate
success failure|successful unsuccessful|allowed forbidden|inner outer|internal external
entering leaving|rise fall|raise lower|minimum maximum|least most|under over|over under
""".replace("\n", "|")


def antonym_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for pair in ANTONYM_PAIRS.split("|"):
        pair = pair.split()
        if len(pair) != 2:
            continue
        a, b = pair
        table.setdefault(a, b)
        table.setdefault(b, a)
    return table


ANTONYMS = antonym_table()


def antonym(q: str, rng: random.Random) -> str | None:
    return replace_first(q, ANTONYMS, skip_capitalised=True)


ENTITY_POOLS = [
    # countries
    "France Germany Italy Spain Japan China India Brazil Canada Mexico Australia Russia Egypt "
    "Nigeria Kenya Argentina Sweden Norway Poland Greece Turkey Portugal Ireland England Scotland "
    "Wales Netherlands Belgium Switzerland Austria Denmark Finland Chile Peru Colombia Cuba Vietnam "
    "Thailand Indonesia Pakistan Iran Iraq Israel Korea Ukraine Romania Hungary Morocco Ghana "
    "Ethiopia Seychelles Jamaica Iceland",
    # demonyms and languages
    "French German Italian Spanish Japanese Chinese American British Canadian Mexican Brazilian "
    "Russian Australian Greek Turkish Portuguese Irish Dutch Swedish Polish Egyptian Korean "
    "Arabic English Hindi Latin",
    # US states
    "Alabama Alaska Arizona Arkansas California Colorado Connecticut Delaware Florida Georgia "
    "Hawaii Idaho Illinois Indiana Iowa Kansas Kentucky Louisiana Maine Maryland Massachusetts "
    "Michigan Minnesota Mississippi Missouri Montana Nebraska Nevada Ohio Oklahoma Oregon "
    "Pennsylvania Tennessee Texas Utah Vermont Virginia Washington Wisconsin Wyoming",
    # cities
    "Paris London Berlin Tokyo Chicago Boston Seattle Rome Madrid Sydney Toronto Moscow Beijing "
    "Delhi Cairo Dublin Vienna Amsterdam Lisbon Athens Istanbul Dallas Houston Miami Denver "
    "Atlanta Phoenix Portland Detroit Oslo Stockholm Prague Warsaw Mumbai Shanghai Seoul",
    # companies and products
    "Apple Google Microsoft Amazon Netflix Spotify Tesla Toyota Ford Samsung Facebook Twitter "
    "YouTube Intel Nvidia Oracle Sony Nintendo Disney Boeing Airbus Nike Adidas Coca-Cola Pepsi "
    "iPhone Android Windows Linux Python Java Excel",
]
NOT_ENTITIES = set(
    "I A An The What Which Who Whom Whose When Where Why How Is Are Was Were Do Does Did Can Could "
    "Should Would Will Show List Find Give Return Count Please Play Add Put Book Rate Tell Get "
    "January February March April May June July August September October November December "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday PersonX PersonY".split()
)


def capitalised_spans(q: str) -> list[tuple[int, int, str]]:
    """Runs of Capitalised words (not the first word, not question words)."""
    spans = []
    for m in re.finditer(r"\b[A-Z][a-zA-Z0-9.\-]*(?:\s+(?:of\s+|the\s+|de\s+)?[A-Z][a-zA-Z0-9.\-]*)*", q):
        s = m.group(0).rstrip(".")
        if m.start() == 0 or s in NOT_ENTITIES or len(s) < 3:
            continue
        spans.append((m.start(), m.start() + len(s), s))
    return spans


GIVEN_NAMES = set(
    "Aaron Adam Alan Albert Alex Alexander Alice Amy Andreas Andrew Angela Ann Anna Anne Anthony "
    "Barack Ben Benjamin Bill Billy Bob Brian Bruce Carl Carlos Charles Charlie Chris Christopher "
    "Daniel David Dean Diana Donald Edward Elizabeth Elvis Emily Emma Eric Frank Fred Frederick "
    "George Harry Helen Henry Isaac Jack Jacob James Jane Jennifer Jessica Jim Jimmy Joe Johann John "
    "Johnny Jon Jonathan Joseph Julia Justin Karl Kate Katy Kelly Kevin Kim Larry Laura Lisa Louis "
    "Lucy Marie Mark Martin Mary Matt Michael Mike Nancy Nicholas Nick Oliver Patrick Paul Peter "
    "Richard Rick Robert Ron Ronald Sam Sarah Sean Steve Steven Susan Taylor Thomas Tim Tom Tony "
    "Victoria Will William Wolfgang Sabrina Lindsey Elton Frank Ludwig Leonardo Vincent Pablo "
    "Winston Abraham Theodore Franklin Martin Neil Stephen Oprah Madonna Bob Kanye Kurt".split()
)


def person_spans(q: str) -> list[tuple[int, int, str]]:
    """Names that start with a known given name: "Mike Tyson", "Julia Roberts"."""
    out = []
    for m in re.finditer(r"(?<![A-Za-z])([A-Z][a-z]+)((?:\s+[A-Z][a-z]+){1,2})\b", q):
        if m.group(1) in GIVEN_NAMES:
            out.append((m.start(), m.end(), m.group(0)))
    return out


def make_entity(split_questions: list[str]):
    pool_of = {}
    for pool in ENTITY_POOLS:
        names = pool.split()
        for n in names:
            pool_of[n] = names
    people = sorted({s for q in split_questions for _, _, s in person_spans(q)})

    def entity(q: str, rng: random.Random) -> str | None:
        for m in re.finditer(r"\b[A-Z][a-zA-Z\-]+\b", q):
            w = m.group(0)
            if w in pool_of:
                other = rng.choice([x for x in pool_of[w] if x != w])
                return q[: m.start()] + other + q[m.end():]
        spans = person_spans(q)
        if not spans:
            return None
        s0, s1, s = spans[0]
        others = [x for x in people if x != s and x not in q and s not in x]
        if not others:
            return None
        return q[:s0] + rng.choice(others) + q[s1:]

    return entity


SPELLED = "zero one two three four five six seven eight nine ten eleven twelve".split()
ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth".split()


def is_year(tok: str) -> bool:
    return tok.isdigit() and len(tok) == 4 and 1000 <= int(tok) <= 2100


def number(q: str, rng: random.Random) -> str | None:
    for m in re.finditer(r"(?<![\d/.:])\d+(?:\.\d+)?(?![\d/:])", q):
        tok = m.group(0)
        if is_year(tok):
            continue
        if "." in tok:
            new = f"{float(tok) + rng.choice([1, 2, 5]):g}"
        else:
            n = int(tok)
            new = str(rng.choice([n + 1, n * 2 if n > 1 else n + 2, n + 10]))
        return q[: m.start()] + new + q[m.end():]
    for m in WORD.finditer(q):
        w = m.group(0).lower()
        if w[:1].isupper() and m.start() > 0:
            continue  # part of a name: "Nine Inch Nails"
        if w in SPELLED[2:]:  # "one" is too often a pronoun
            i = SPELLED.index(w)
            new = SPELLED[i + 1] if i + 1 < len(SPELLED) else SPELLED[i - 1]
            return q[: m.start()] + match_case(m.group(0), new) + q[m.end():]
        if w in ORDINALS[1:]:
            i = ORDINALS.index(w)
            new = ORDINALS[i + 1] if i + 1 < len(ORDINALS) else ORDINALS[i - 1]
            return q[: m.start()] + match_case(m.group(0), new) + q[m.end():]
    return None


MONTHS = "January February March April May June July August September October November December".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
RELATIVE = {"yesterday": "tomorrow", "tomorrow": "yesterday", "today": "tomorrow", "tonight": "tomorrow night"}


def date(q: str, rng: random.Random) -> str | None:
    for m in re.finditer(r"\b(" + "|".join(MONTHS) + r")\b", q):
        if m.group(0) == "May" and not re.search(r"May\s+\d", q[m.start():]):
            continue  # the verb "may"
        other = MONTHS[(MONTHS.index(m.group(0)) + rng.choice([1, 2, 3, 6])) % 12]
        return q[: m.start()] + other + q[m.end():]
    m = re.search(r"\b(\d{1,2})/(\d{1,2})/(\d{2,4})\b", q)
    if m:
        day = int(m.group(2)) % 28 + 1
        return q[: m.start(2)] + str(day) + q[m.end(2):]
    for m in re.finditer(r"\b\d{4}\b(?!\s*[A-Za-z°]+)|\b\d{4}\b(?=\s+[A-Z][a-z]{2,})", q):
        if is_year(m.group(0)) and int(m.group(0)) >= 1500:
            y = int(m.group(0)) + rng.choice([-10, -1, 1, 10])
            return q[: m.start()] + str(y) + q[m.end():]
    m = re.search(r"\b(" + "|".join(DAYS) + r")\b", q)
    if m:
        other = DAYS[(DAYS.index(m.group(0)) + rng.choice([1, 2, 3])) % 7]
        return q[: m.start()] + other + q[m.end():]
    return replace_first(q, RELATIVE)


UNIT_PAIRS = """
km miles|kilometers miles|kilometres miles|kilometer mile|kilometre mile|miles kilometers
mile kilometer|meters feet|metres feet|meter foot|metre foot|feet meters|foot meter|cm inches
centimeters inches|centimetres inches|inches centimeters|inch centimeter|kg lb|kilograms pounds
kilogram pound|pounds kilograms|pound kilogram|lb kg|lbs kg|grams ounces|gram ounce|ounces grams
ounce gram|g oz|oz g|mg g|milligrams grams|milligram gram|celsius fahrenheit|fahrenheit celsius
°c °f|°f °c|kelvin celsius|mb gb|gb mb|kb mb|tb gb|megabytes gigabytes|gigabytes megabytes
liters gallons|litres gallons|liter gallon|litre gallon|gallons liters|gallon liter|ml cups
milliliters cups|cups milliliters|cup milliliter|pints quarts|pint quart|quarts pints|qt pt
pt qt|minutes hours|minute hour|hours minutes|hour minute|seconds minutes|second minute
days weeks|day week|weeks days|mph km/h|dollars euros|euros dollars|atm bar|atms bars|bar atm
torr psi|torrs psi|psi torr|pascals psi|joules calories|calories joules|watts horsepower
volts amps|amps volts|hertz kilohertz|newtons pounds-force|tons tonnes|tonnes tons|acres hectares
hectares acres|yards meters|yard meter
""".replace("\n", "|")
UNITS = {}
for _pair in UNIT_PAIRS.split("|"):
    _p = _pair.split()
    if len(_p) == 2:
        UNITS.setdefault(_p[0], _p[1])


def unit(q: str, rng: random.Random) -> str | None:
    # A unit right after a number ("5km", "8 km"), else a unit word after
    # "in", "many", "of", "per", "to" ("in grams", "how many inches").
    found = []
    for m in re.finditer(r"(?<=[\d\s(])(°?[A-Za-z][A-Za-z/\-]*)", q):
        key = m.group(1).lower()
        if key not in UNITS:
            continue
        before = q[: m.start()].rstrip()
        if before and before[-1].isdigit():
            found.append((0, m.start(), m))
        elif len(key) > 2 and re.search(r"\b(in|many|of|per|to|much)$", before, re.I):
            found.append((1, m.start(), m))
    for _, _, m in sorted(found, key=lambda f: (f[0], f[1]))[:1]:
        w = m.group(1)
        key = w.lower()
        if True:
            new = UNITS[key]
            if w.isupper() and len(w) > 1:
                new = new.upper()
            elif w[:1].isupper():
                new = new[:1].upper() + new[1:]
            return q[: m.start()] + new + q[m.end():]
    return None


SCOPE = {
    "my": None, "our": "everyone's", "me": "everyone", "mine": "everyone's",
    "this": "every", "these": "all", "every": "this", "all": "some", "here": "everywhere",
}


def scope(q: str, rng: random.Random) -> str | None:
    for m in WORD.finditer(q):
        w = m.group(0)
        key = w.lower()
        if key not in SCOPE:
            continue
        if key == "all" and re.match(r"all\s+(the|these|those|of|my|our|his|her|their)\b", q[m.start():], re.I):
            continue
        if key == "this" and re.match(r"this\s+(is|was|one)\b", q[m.start():], re.I):
            continue
        new = SCOPE[key] or rng.choice(["all users'", "everyone's", "all our customers'"])
        return q[: m.start()] + match_case(w, new) + q[m.end():]
    return None


FILLER_PREFIX = ["Hey, ", "Hi! ", "Quick question: ", "Please, ", "Um, ", "OK so ", "Hello. "]
FILLER_SUFFIX = [" please", " Thanks!", " thx", " ??", "!!", " - thanks in advance"]


def near_repeat(q: str, rng: random.Random) -> str:
    edits = rng.sample(["lower", "punct", "prefix", "suffix", "spaces", "upper"], 2)
    out = q
    for e in edits:
        if e == "lower":
            out = out.lower()
        elif e == "upper" and out[:1].islower():
            out = out[:1].upper() + out[1:]
        elif e == "punct":
            out = out.rstrip("?.! ") if out[-1:] in "?.!" else out + "?"
        elif e == "prefix":
            out = rng.choice(FILLER_PREFIX) + out[:1].lower() + out[1:]
        elif e == "suffix":
            out = out + rng.choice(FILLER_SUFFIX)
        elif e == "spaces":
            out = out.replace(", ", " , ").replace(" ", "  ", 1)
    if out == q:
        out = q + " please"
    return out


# ---------------------------------------------------------------- building


def build_split(name, real, question_sets, rng):
    """real: [(a, b, label, category, source)]; question_sets: [(source, [q])]."""
    rows = list(real)
    pool = []
    for src, qs in question_sets:
        for q in dict.fromkeys(qs):
            if 8 <= len(q) <= 300:
                pool.append((q, src))
    rng.shuffle(pool)
    # near-repeats, spread across the split's question sets
    by_src = collections.defaultdict(list)
    for q, s in pool:
        by_src[s].append(q)
    picked = []
    while len(picked) < NEAR_REPEATS and any(by_src.values()):
        for s in sorted(by_src):
            if by_src[s] and len(picked) < NEAR_REPEATS:
                picked.append((by_src[s].pop(), s))
    for q, s in picked:
        rows.append((q, near_repeat(q, rng), 1, "near-repeat", "synthetic:" + s))
    makers = {
        "negation": negation, "antonym": antonym, "entity": make_entity([q for q, _ in pool]),
        "number": number, "date": date, "unit": unit, "scope": scope,
    }
    for cat in TRAP_CATEGORIES:
        made, per_src = [], collections.Counter()
        # round-robin over sources so one collection does not fill a category
        n_src = len({s for _, s in pool})
        cap = max(TRAPS_PER_CATEGORY // max(n_src, 1), 1)
        for rounds in (cap, TRAPS_PER_CATEGORY):
            for q, s in pool:
                if len(made) >= TRAPS_PER_CATEGORY:
                    break
                if per_src[s] >= rounds or any(q == m[0] for m in made):
                    continue
                t = makers[cat](q, rng)
                if t and clean(t) != q and clean(t).lower() != q.lower():
                    made.append((q, clean(t), 0, cat, "synthetic:" + s))
                    per_src[s] += 1
        rows.extend(made)
    # dedupe on the unordered pair
    seen, out = set(), []
    for r in rows:
        key = frozenset((r[0].lower(), r[1].lower()))
        if key in seen or r[0].lower() == r[1].lower():
            continue
        seen.add(key)
        out.append(r)
    print(f"{name}: {len(out)} pairs " + str(collections.Counter(r[3] for r in out)), file=sys.stderr)
    return out


def write(path, rows, header):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header)
        f.write("# text_a\ttext_b\tlabel\tcategory\tsource\n")
        for a, b, label, cat, src in rows:
            for x in (a, b):
                assert "\t" not in x and "\n" not in x
            f.write(f"{a}\t{b}\t{label}\t{cat}\t{src}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist", help="a downloaded bigbench-1.0.0.tar.gz")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    t = Tasks(fetch_sdist(args.sdist))

    def tag(pairs, src):
        return [p + (src,) for p in pairs]

    # Tuning: QASC paraphrases (NI subtask045), BIG-bench rephrase, StrategyQA,
    # SQuAD questions (NI subtask046), unit_addition_same, Winogrande objects.
    rng = random.Random(SEED)
    tun_real = (
        tag(qasc_paraphrases(t, rng)[0], "qasc-ni045")
        + tag(bb_rephrase(t)[0], "bigbench-rephrase")
    )
    twins = winogrande_twins(t, "subtask034_winogrande_question_modification_object")[0]
    tun_real += tag(rng.sample(twins, TWINS), "winogrande-ni034")
    tun_q = [
        ("strategyqa", bb_questions(t, "strategyqa")[1]),
        ("squad-ni046", squad_questions(t)[1]),
        ("bigbench-unit-addition", unit_questions(t, "unit_addition_same")[1]),
    ]
    tuning = build_split("tuning", tun_real, tun_q, rng)
    # Added 2026-11-30, after everything above (their own generator, so every
    # earlier pair stays as it was): real SQuAD question rewrites and real
    # SQuAD look-alike questions, so that calibration on this split meets
    # real different questions that read alike, as held-out has (Spider's).
    paragraphs = squad_dev(t)
    rewrites = squad_rewrites(t, paragraphs)
    extra = tag(random.Random(SEED + 2).sample(rewrites, SQUAD_REWRITES), "squad-rewrites")
    extra += tag(squad_related(paragraphs, SQUAD_RELATED), "squad-dev")
    seen = {x.lower() for r in tuning for x in r[:2]}
    tuning += [r for r in extra if r[0].lower() not in seen and r[1].lower() not in seen]

    # Held-out: Spider, SNIPS, known_unknowns + general_knowledge,
    # unit_conversion_with_relative_error, Winogrande persons.
    rng = random.Random(SEED + 1)
    sp_pairs, sp_q = spider(t)
    held_real = tag(sp_pairs, "spider")
    held_real += tag(spider_related(t, RELATED), "spider")
    twins = winogrande_twins(t, "subtask035_winogrande_question_modification_person")[0]
    held_real += tag(rng.sample(twins, TWINS), "winogrande-ni035")
    held_q = [
        ("spider", sp_q),
        ("snips", snips(t)[1]),
        ("bigbench-knowledge", bb_questions(t, "known_unknowns")[1] + bb_questions(t, "general_knowledge")[1]),
        ("bigbench-unit-conversion", unit_questions(t, "unit_conversion_with_relative_error")[1]),
    ]
    heldout = build_split("heldout", held_real, held_q, rng)

    # Nothing of held-out may be in tuning.
    tun_texts = {x.lower() for r in tuning for x in r[:2]}
    heldout = [r for r in heldout if r[0].lower() not in tun_texts and r[1].lower() not in tun_texts]

    header = (
        "# SmartLLM semantic-cache yardstick, built by data/cache-eval/make_pairs.py from the PyPI\n"
        f"# package {PACKAGE} (sha256 {SDIST_SHA256[:16]}...). Sources and licences: SOURCES.md.\n"
        "# label 1 = duplicate (a hit is right), 0 = trap. source 'synthetic:X' = generated here\n"
        "# from collection X's real questions; a bare source = a pair labelled by that source.\n"
    )
    write(os.path.join(args.out, "tuning.tsv"), tuning, "# split: tuning (tune on this)\n" + header)
    write(os.path.join(args.out, "heldout.tsv"), heldout,
          "# split: held-out (never tune on this; report it)\n" + header)


if __name__ == "__main__":
    main()
