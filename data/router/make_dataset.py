#!/usr/bin/env python3
"""Build the labelled routing set: prompts of every task at three difficulty
tiers, and each model's score on each prompt.

The scores are synthetic and documented here, not measured: a model's score on
a prompt is a logistic function of (its skill at the task - the prompt's
difficulty) plus noise. Skills follow the public standing of the models (the
large ones are better at code, maths and reasoning; all of them handle chat,
translation and extraction well). The set exercises the learned router's whole
pipeline (embedding -> per-model quality -> cost/quality curve) and tells us
whether it can recognise, from the prompt alone, when the cheap model is good
enough. Replace it with scores from your own evaluations (an LLM judge, user
feedback) in the same JSONL shape: {"prompt", "model", "score"}.

Deterministic: python3 make_dataset.py writes train.jsonl and heldout.jsonl.
"""
import json
import math
import random

SEED = 20261125
MODELS = ["gpt-4o-mini", "claude-3-5-haiku", "gpt-4o", "claude-sonnet-4"]
SKILL = {
    "gpt-4o-mini":      {"code": .45, "math": .40, "reasoning": .35, "summarisation": .75, "extraction": .75, "translation": .75, "creative": .60, "chat": .85},
    "claude-3-5-haiku": {"code": .55, "math": .45, "reasoning": .50, "summarisation": .78, "extraction": .80, "translation": .75, "creative": .65, "chat": .85},
    "gpt-4o":           {"code": .80, "math": .75, "reasoning": .80, "summarisation": .85, "extraction": .85, "translation": .85, "creative": .80, "chat": .90},
    "claude-sonnet-4":  {"code": .90, "math": .80, "reasoning": .85, "summarisation": .88, "extraction": .88, "translation": .85, "creative": .85, "chat": .90},
}
TIER = {"easy": 0.15, "medium": 0.5, "hard": 0.85}

LANGS = ["Python", "Rust", "Go", "Java", "TypeScript", "C++", "Kotlin", "Ruby"]
SIMPLE_OPS = ["sum", "maximum", "average", "number of even values", "reverse", "sorted copy", "product", "last element"]
DS = ["linked list", "stack", "queue", "hash map", "binary tree", "priority queue", "trie", "ring buffer"]
SYSTEMS = ["lock-free concurrent hash map", "distributed rate limiter", "write-ahead log with crash recovery",
           "B-tree storage engine", "raft consensus module", "garbage collector for a toy language",
           "async HTTP/2 server", "MVCC transaction manager", "work-stealing thread pool", "CRDT text editor backend"]
TOPICS = ["climate change", "the history of the printing press", "a new smartphone launch", "remote work",
          "the city council budget", "a football match", "electric cars", "a medical study on sleep",
          "the stock market today", "a software outage post-mortem", "a product roadmap", "renewable energy subsidies"]
PHRASES = ["Good morning, how are you?", "Where is the nearest pharmacy?", "The meeting is moved to Friday.",
           "Please send me the invoice.", "I love this city.", "The train is late again.",
           "Can you help me with my luggage?", "We are closed on Sundays."]
TARGET_LANGS = ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Dutch", "Korean"]
THEMES = ["the sea", "a lost key", "winter mornings", "a robot learning to paint", "an old lighthouse",
          "friendship", "the first day of school", "a city at night"]
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hiro"]
PUZZLES = ["three light switches and one bulb in another room", "a wolf, a goat and a cabbage crossing a river",
           "two doors, one guard who lies and one who tells the truth", "twelve coins, one counterfeit, and a balance scale",
           "a 3-litre and a 5-litre jug used to measure 4 litres"]
DECISIONS = ["migrating our payments system to event sourcing", "adopting a four-day work week",
             "entering the Brazilian market next year", "replacing our SQL database with a document store",
             "open-sourcing our core product", "moving inference from GPUs to custom accelerators"]

TEMPLATES = {
    "code": {
        "easy": ["Write a {lang} function that returns the {op} of a list of integers.",
                 "How do I print hello world in {lang}?",
                 "In {lang}, how do I get the length of a string?"],
        "medium": ["Implement a {ds} in {lang} with the usual operations and explain their complexity.",
                   "Write a {lang} program that reads a CSV file and prints the {op} of the second column, handling malformed lines.",
                   "Refactor this {lang} code that uses a {ds} so it is easier to test, and add unit tests."],
        "hard": ["Design and implement a {system} in {lang}. Explain the concurrency model, the failure cases and prove its invariants.",
                 "Implement a {system} in {lang} that is correct under concurrent access; analyse the memory ordering and the edge cases.",
                 "Find the race condition in a {system} written in {lang}, explain why it happens, and write a fix with a stress test."],
    },
    "math": {
        "easy": ["What is {a} plus {b}?", "What is {a} times {b}?", "What is {pct} percent of {n}?"],
        "medium": ["Solve for x: {a}x + {b} = {n}, and check the answer.",
                   "What is the probability of getting at least one six in {k} rolls of a fair die?",
                   "Compute the derivative of x^{k} * sin({a}x)."],
        "hard": ["Prove that there are infinitely many primes of the form {k}n + 1 and explain every step rigorously.",
                 "Evaluate the integral of x^{k} * e^(-{a}x) from 0 to infinity and prove the general formula by induction.",
                 "Find all integer solutions of x^2 - {a}y^2 = 1 and prove that your description is complete."],
    },
    "reasoning": {
        "easy": ["Is a {thing} bigger than a mouse?", "If today is Monday, what day is it in {k} days?",
                 "Which is heavier, a kilogram of {thing}s or a kilogram of feathers?"],
        "medium": ["Solve this puzzle and explain your reasoning: {puzzle}.",
                   "{name} is older than {name2}, and {name2} is older than {name3}. Who is the youngest, and why?",
                   "What are the pros and cons of {decision}?"],
        "hard": ["Analyse the trade-offs of {decision} in depth: second-order effects, risks, and a staged plan with decision criteria.",
                 "Solve the general version of this puzzle and prove your strategy is optimal: {puzzle}.",
                 "Critique the strategy of {decision}: identify hidden assumptions, logical fallacies and the strongest counter-argument."],
    },
    "summarisation": {
        "easy": ["Summarise in one sentence: {name} went to the market and bought apples.",
                 "Give me a one-line summary of a short note about {topic}.",
                 "TL;DR of this sentence: the meeting about {topic} is postponed."],
        "medium": ["Summarise this article about {topic} in three bullet points for a busy reader.",
                   "Write an executive summary of the report on {topic}.",
                   "Summarise the key arguments for and against {topic} from the following debate transcript."],
        "hard": ["Summarise these ten conflicting research papers on {topic}, reconcile their findings and note where the evidence is weak.",
                 "Produce a structured summary of a 50-page legal contract about {topic}, flagging unusual clauses and their risks.",
                 "Summarise a two-hour technical design review about {topic}, preserving every decision, owner and open question."],
    },
    "extraction": {
        "easy": ["Extract the email address from: contact {name} at {lower}@example.com.",
                 "What is the date in this sentence: the launch is on 3 March?",
                 "Extract the name from: my name is {name}."],
        "medium": ["Extract the names, dates and amounts from this invoice about {topic} as JSON.",
                   "List every company and person mentioned in this article about {topic}.",
                   "Parse these log lines into JSON objects with timestamp, level and message fields."],
        "hard": ["From these 40 pages of clinical notes, extract every medication, dose, start and stop date, and resolve conflicting entries.",
                 "Extract a knowledge graph of entities and relations from this long report on {topic}, with evidence spans.",
                 "Extract all obligations, parties and deadlines from this contract about {topic}, including nested exceptions."],
    },
    "translation": {
        "easy": ["Translate \"{phrase}\" into {tl}.", "How do you say \"{phrase}\" in {tl}?",
                 "Translate to {tl}: {phrase}"],
        "medium": ["Translate this business email about {topic} into {tl}, keeping a formal tone.",
                   "Translate this product description into {tl} for our website, adapting the idioms.",
                   "Translate the following paragraph about {topic} from English into {tl}."],
        "hard": ["Translate this poem about {theme} into {tl}, preserving metre and rhyme, and explain your choices.",
                 "Translate this legal contract about {topic} into {tl}, keeping every term legally precise.",
                 "Translate this technical specification about a {system} into {tl}, keeping terminology consistent."],
    },
    "creative": {
        "easy": ["Write a haiku about {theme}.", "Give me a funny name for a cat that likes {theme}.",
                 "Write one sentence about {theme}."],
        "medium": ["Write a short poem about {theme}.", "Write a bedtime story about {name} and {theme}.",
                   "Come up with five slogans for a shop selling things about {theme}."],
        "hard": ["Write the opening chapter of a literary novel about {theme}, with three distinct narrative voices.",
                 "Write a sonnet sequence about {theme} in which each poem answers the previous one.",
                 "Write a screenplay scene about {theme} with subtext, where no character says what they mean."],
    },
    "chat": {
        "easy": ["Hi {name}! How are you?", "Good morning!", "Thanks, that helped a lot.",
                 "What's a good name for a puppy?"],
        "medium": ["Can you recommend a good book about {topic}?", "What should I pack for a weekend trip to the mountains?",
                   "How do I politely decline a meeting invitation from {name}?"],
        "hard": ["I'm struggling to decide between two job offers; one pays more, the other is about {topic}. Help me think it through.",
                 "My friend {name} and I argued about {topic}; how can I repair the friendship without giving up my view?",
                 "Help me prepare for a difficult conversation with my manager about {topic} and my career."],
    },
}
THINGS = ["elephant", "cat", "car", "brick", "horse", "bicycle"]


def fill(t, r):
    name, name2, name3 = r.sample(NAMES, 3)
    return t.format(lang=r.choice(LANGS), op=r.choice(SIMPLE_OPS), ds=r.choice(DS), system=r.choice(SYSTEMS),
                    a=r.randint(2, 99), b=r.randint(2, 99), n=r.randint(100, 999), pct=r.choice([5, 10, 15, 20, 25, 40]),
                    k=r.randint(2, 9), topic=r.choice(TOPICS), phrase=r.choice(PHRASES), tl=r.choice(TARGET_LANGS),
                    theme=r.choice(THEMES), name=name, name2=name2, name3=name3, lower=name.lower(),
                    puzzle=r.choice(PUZZLES), decision=r.choice(DECISIONS), thing=r.choice(THINGS))


def score(model, task, difficulty, r):
    s = 1.0 / (1.0 + math.exp(-(SKILL[model][task] - difficulty) * 9.0))
    return round(min(1.0, max(0.0, s + r.gauss(0, 0.05))), 4)


def main():
    r = random.Random(SEED)
    prompts = {}
    for task, tiers in TEMPLATES.items():
        for tier, templates in tiers.items():
            tries = 0
            made = 0
            while made < 45 and tries < 2000:
                tries += 1
                p = fill(r.choice(templates), r)
                if p in prompts:
                    continue
                prompts[p] = (task, min(1.0, max(0.0, TIER[tier] + r.uniform(-0.08, 0.08))))
                made += 1
    items = sorted(prompts.items())
    r.shuffle(items)
    cut = int(len(items) * 0.8)
    for name, part in (("train.jsonl", items[:cut]), ("heldout.jsonl", items[cut:])):
        with open(name, "w") as f:
            for prompt, (task, d) in part:
                for m in MODELS:
                    f.write(json.dumps({"prompt": prompt, "model": m, "score": score(m, task, d, r), "task": task}) + "\n")
        print(f"{name}: {len(part)} prompts x {len(MODELS)} models")


if __name__ == "__main__":
    main()
