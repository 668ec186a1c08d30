"""RULER-style long-context tasks, generated offline from a seed.

Every case is a haystack (``context``) and the questions asked about it; several questions share one
prefill where the task has several things to ask (multi-key needles, fact sheets), so a cell reaches
dozens of questions at 7.5K tokens in CPU time.  Needles, phrasings, value kinds, fillers and
depths all vary with the seed, and every answer occurs in its haystack exactly once, so a method
cannot pass by luck or by copying a nearby sentence.

Tasks:

* ``single`` — one needle per haystack; numbers, words or hex codes; several needle and question
  phrasings (the question rarely repeats the needle's wording).
* ``multikey`` — five needles of the same kind with different keys: each question has four distractors.
* ``multivalue`` — three keys with four values each, spread out; the answer must list all four.
* ``vt`` — variable tracking: three chains ``VAR A = 12345``, ``VAR B = VAR A`` ...; name every
  variable that ends up holding a value.
* ``cwe`` — common-word extraction over a long numbered word list: the five most frequent words,
  the most frequent one, three frequent ones.
* ``qa`` — questions over short synthetic fact sheets (people, towns, employers, years) among filler.

Scoring is inclusion after normalisation (case, spaces and punctuation ignored); questions with
several answers score the fraction found.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

from transformers import PreTrainedTokenizerBase

from .fillers import FILLERS, REAL_FILLERS, _paragraphs, real_paragraphs, separator, sentences

TASKS = ("single", "multikey", "multivalue", "vt", "cwe", "qa")

ADJECTIVES = ("amber", "silent", "crimson", "hollow", "northern", "velvet", "rusty", "frozen", "golden", "quiet",
              "copper", "distant", "scarlet", "ancient", "misty", "bright", "lonely", "marble", "wandering", "iron",
              "emerald", "pale", "stormy", "hidden", "crooked", "gentle", "silver", "broken", "restless", "sunken")
NOUNS = ("lighthouse", "orchard", "lantern", "harbor", "cathedral", "mill", "glacier", "bridge", "observatory",
         "library", "vineyard", "quarry", "tower", "garden", "canal", "foundry", "monastery", "ferry", "meadow",
         "archive", "bakery", "chapel", "fortress", "workshop", "theatre", "station", "granary", "pier", "tavern")
VALUE_WORDS = ("zephyr", "quartz", "nebula", "tundra", "falcon", "saffron", "obsidian", "cobalt", "juniper", "marigold",
               "pelican", "sapphire", "tamarind", "walrus", "yarrow", "kestrel", "lychee", "mongoose", "narwhal",
               "ocelot", "papaya", "quokka", "raven", "sequoia", "tortoise", "umber", "vervain", "wombat", "xylophone",
               "zinnia", "basilisk", "cinnabar", "dahlia", "ermine", "fennel", "gazelle", "heron", "ibis", "jackal")
FIRST_NAMES = ("Ilse", "Tomas", "Marta", "Oskar", "Greta", "Henrik", "Sanna", "Lukas", "Vera", "Anton", "Freya",
               "Emil", "Nora", "Viktor", "Linnea", "Jonas", "Astrid", "Mikael", "Sigrid", "Pavel")
LAST_NAMES = ("Varga", "Lindqvist", "Okafor", "Moreau", "Halvorsen", "Castellano", "Nakamura", "Brennan", "Kowalczyk",
              "Duarte", "Eriksen", "Fischer", "Ivanova", "Laine", "Petrov", "Quist", "Romero", "Sato", "Tanaka")
TOWNS = ("Tromsø", "Kilkenny", "Ljubljana", "Valparaíso", "Bergamo", "Tartu", "Ghent", "Aarhus", "Porto", "Kraków",
         "Salzburg", "Galway", "Uppsala", "Bordeaux", "Zadar", "Haarlem", "Lucerne", "Brno", "Turku", "Sintra")
OCCUPATIONS = ("ferry engineer", "cartographer", "beekeeper", "glassblower", "archivist", "violin maker", "pilot",
               "geologist", "pastry chef", "translator", "surveyor", "lighthouse keeper", "botanist", "locksmith")
COMPANIES = ("Nordlys Marine", "Caldera Optics", "Brightwater Mills", "Halcyon Freight", "Ostara Seeds",
             "Pinecrest Labs", "Silverline Rail", "Tidewater Print", "Juniper Textiles", "Redfern Instruments")
CWE_WORDS = ("apple", "river", "candle", "window", "pepper", "ladder", "button", "jacket", "pillow", "violin",
             "basket", "hammer", "kettle", "mirror", "needle", "pencil", "rocket", "saddle", "tunnel", "wallet",
             "anchor", "blanket", "compass", "drawer", "feather", "goblet", "helmet", "island", "jigsaw", "lemon",
             "magnet", "napkin", "orange", "parrot", "quiver", "ribbon", "spoon", "teapot", "umbrella", "velvet")

SINGLE_KINDS = {"number": ("special magic number", "access number"), "word": ("secret word", "password"),
                "code": ("serial code", "identifier")}
NEEDLE_PHRASES = ("The {kind} for {key} is: {value}.", "Remember this: {key} was given the {kind} {value}.",
                  "For the record, the {kind} assigned to {key} is {value}.", "Note that {key} uses {value} as its {kind}.")
QUESTION_PHRASES = ("What is the {kind} for {key}?", "Which {kind} was given to {key}?",
                    "Tell me the {kind} of {key}.", "What {kind} does {key} use?")


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]
    depth: float | None = None
    """Where the evidence sits in the haystack (0 = start, 1 = end), for depth x length maps."""
    max_new_tokens: int = 24


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    seed: int
    filler: str
    context: str
    questions: tuple[Question, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"{self.task}-{self.length}-{self.seed}"


def normalize(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


def score(answer: str, question: Question) -> float:
    """Fraction of the expected answers found in ``answer`` (inclusion, normalised)."""
    found = normalize(answer)
    return sum(normalize(a) in found for a in question.answers) / len(question.answers)


@cache
def _filler_words(filler: str) -> frozenset[str]:
    """Words a word-valued needle must not be: the essays' (every generated filler keeps the values it
    always drew), and a real text's own words besides."""
    text = " ".join(_paragraphs() + (real_paragraphs(filler) if filler in REAL_FILLERS else ()))
    return frozenset(re.findall(r"[a-z]+", text.lower()))


class _Builder:
    """Places items (needles, fact sheets) between filler sentences at given depths, filling the
    rest of a token budget with the seed's filler."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, length: int, filler: str, seed: int) -> None:
        self.tokenizer, self.length, self.filler, self.seed = tokenizer, length, filler, seed
        self.items: list[tuple[float, str]] = []
        self.unique: list[str] = []
        """Strings that must occur exactly once in the haystack (answers, definitions)."""

    def tokens(self, text: str) -> int:
        """Tokens of ``text`` where it stands in the haystack: after a separator."""
        return len(self.tokenizer(separator(self.filler) + text, add_special_tokens=False).input_ids)

    def add(self, depth: float, text: str) -> None:
        self.items.append((depth, text))

    def build(self) -> str:
        budget = self.length - sum(self.tokens(text) for _, text in self.items)
        stream, chosen, used = sentences(self.filler, self.seed), [], 0
        while used < budget:
            sentence = next(stream)
            chosen.append(sentence)
            used += self.tokens(sentence)
        pieces = list(chosen)
        for depth, text in sorted(self.items, key=lambda item: item[0], reverse=True):
            pieces.insert(round(depth * len(chosen)), text)
        return separator(self.filler).join(pieces)


def _keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], count)
    return [f"the {a} {n}" for a, n in pairs]


def _value(rng: random.Random, kind: str, filler: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice([w for w in VALUE_WORDS if w not in _filler_words(filler)])
    return f"{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}"


def _depths(rng: random.Random, count: int) -> list[float]:
    """Spread over the haystack: one depth per equal slice, jittered (never the first or last 3 %)."""
    return [min(0.97, max(0.03, (i + rng.random()) / count)) for i in range(count)]


def _needle_case(b: _Builder, rng: random.Random, keys: int, kind: str | None = None) -> list[Question]:
    questions = []
    kind = kind or rng.choice(list(SINGLE_KINDS))
    values: set[str] = set()
    for key, depth in zip(_keys(rng, keys), _depths(rng, keys)):
        name = rng.choice(SINGLE_KINDS[kind])
        value = _value(rng, kind, b.filler)
        while value in values:
            value = _value(rng, kind, b.filler)
        values.add(value)
        b.unique.append(value)
        b.add(depth, rng.choice(NEEDLE_PHRASES).format(kind=name, key=key, value=value))
        question = rng.choice(QUESTION_PHRASES).format(kind=name, key=key)
        questions.append(Question(question[0].upper() + question[1:], (value,), depth))
    return questions


def _multivalue(b: _Builder, rng: random.Random) -> list[Question]:
    questions = []
    for key in _keys(rng, 3):
        values = [_value(rng, "number", b.filler) for _ in range(4)]
        b.unique += values
        for value, depth in zip(values, _depths(rng, 4)):
            b.add(depth, f"One of the special magic numbers for {key} is: {value}.")
        questions.append(Question(f"What are all the special magic numbers for {key}? List every one of them.",
                                  tuple(values), None, 48))
    return questions


def _variable_tracking(b: _Builder, rng: random.Random) -> list[Question]:
    questions = []
    names: set[str] = set()
    for _ in range(3):
        chain = []
        while len(chain) < 4:
            name = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.add(name)
                chain.append(name)
        value = str(rng.randint(10_000, 99_999))
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b_} = VAR {a}." for a, b_ in zip(chain, chain[1:])]
        b.unique += [value] + [f"VAR {name} =" for name in chain]
        for statement, depth in zip(statements, sorted(_depths(rng, len(statements)))):
            b.add(depth, statement)
        questions.append(Question(f"Which variables are assigned the value {value}, directly or through other "
                                  "variables? List all of them.", tuple(chain), None, 40))
    return questions


def _fact_sheets(b: _Builder, rng: random.Random) -> list[Question]:
    questions = []
    people = rng.sample([(f, l) for f in FIRST_NAMES for l in LAST_NAMES], 6)
    towns, jobs, firms = rng.sample(TOWNS, 6), rng.sample(OCCUPATIONS, 6), rng.choices(COMPANIES, k=6)
    for (first, last), town, job, firm, depth in zip(people, towns, jobs, firms, _depths(rng, 6)):
        year = rng.randint(1971, 2019)
        name = f"{first} {last}"
        b.add(depth, f"Staff profile: {name} was born in {town}. {first} works as a {job} at {firm} and joined "
                     f"the company in {year}.")
        asked = rng.choice([(f"In which town was {name} born?", town), (f"What is {name}'s occupation?", job),
                            (f"In what year did {name} join {firm}?", str(year))])
        b.unique.append(asked[1])
        questions.append(Question(asked[0], (asked[1],), depth))
    return questions


def _cwe(tokenizer: PreTrainedTokenizerBase, length: int, rng: random.Random) -> tuple[str, list[Question]]:
    words = rng.sample(CWE_WORDS, len(CWE_WORDS))
    common, rare = words[:5], words[5:]
    per_item = len(tokenizer(" 123. pencil", add_special_tokens=False).input_ids)
    items = max(40, length // per_item)
    common_count = max(6, items // 12)  # each common word about 4x as frequent as any rare one
    counts = {w: common_count + 2 * (len(common) - i) for i, w in enumerate(common)}  # and no two alike
    listed = [w for w in common for _ in range(counts[w])]
    listed += [rare[i % len(rare)] for i in range(max(0, items - len(listed)))]
    rng.shuffle(listed)
    context = "Here is a list of words:\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
    top = max(common, key=counts.get)
    return context, [Question("What are the 5 most common words in the list above? Answer with the five words.",
                              tuple(common), None, 32),
                     Question("Which word appears most often in the list above?", (top,), None, 16),
                     Question("Name three words that appear many times in the list above.", tuple(common), None, 24)]


def make_case(task: str, length: int, seed: int, tokenizer: PreTrainedTokenizerBase,
              fillers: Sequence[str] = FILLERS) -> Case:
    """The case of ``task`` at about ``length`` tokens for ``seed`` (the same every time), its haystack
    from ``fillers[seed % len(fillers)]`` (``cwe`` has none: its haystack is the word list).

    Draws again (deterministically) until every answer occurs exactly once in the haystack: a
    value that also turned up in the filler (digits in log lines, say) could be found by chance.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    unknown = sorted(set(fillers) - set(FILLERS + REAL_FILLERS))
    if unknown or not fillers:
        raise ValueError(f"unknown or no filler(s) {unknown}; fillers: {', '.join(FILLERS + REAL_FILLERS)}")
    for attempt in range(100):
        rng = random.Random(f"{task}-{length}-{seed}-{attempt}")
        if task == "cwe":  # its answers are the words that occur most often, by design
            context, questions = _cwe(tokenizer, length, rng)
            return Case(task, length, seed, "words", context, tuple(questions))
        filler = fillers[seed % len(fillers)]
        b = _Builder(tokenizer, length, filler, seed + 1000 * attempt)
        questions = {"single": lambda: _needle_case(b, rng, 1), "multikey": lambda: _needle_case(b, rng, 5, "number"),
                     "multivalue": lambda: _multivalue(b, rng), "vt": lambda: _variable_tracking(b, rng),
                     "qa": lambda: _fact_sheets(b, rng)}[task]()
        context = b.build()
        if all(context.count(text) == 1 for text in b.unique):
            return Case(task, length, seed, filler, context, tuple(questions))
    raise RuntimeError(f"could not place unique answers for {task} at {length} tokens (seed {seed})")


def cases_for(task: str, length: int, questions: int, tokenizer: PreTrainedTokenizerBase, first_seed: int = 0,
              fillers: Sequence[str] = FILLERS) -> list[Case]:
    """Enough cases of ``task`` at ``length`` for at least ``questions`` questions."""
    out: list[Case] = []
    seed = first_seed
    while sum(len(c.questions) for c in out) < questions:
        out.append(make_case(task, length, seed, tokenizer, fillers))
        seed += 1
    return out
