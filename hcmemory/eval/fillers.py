"""Haystack text that carries no answer, so a claim never rests on one style of text.

The generated fillers (``FILLERS``, the standard grid's):

* ``noise`` — RULER's repeated template sentences ("The grass is green. ...");
* ``prose`` — the shipped essay paragraphs in a seeded order;
* ``shuffled`` — the same essays cut into sentences and shuffled, so no paragraph survives;
* ``logs`` — synthetic service log lines (timestamps, ids, latencies: digits everywhere).

Text people wrote (``REAL_FILLERS``): generated text is more regular than real text, and a codec that
holds on it can still lose answers on real documents.  Three kinds of CPython's own documentation
(PSF License, copied from CPython 3.11.7 by ``benchmarks/prose_fillers.py``; sources and license in
``hcmemory/data/PROSE-SOURCES.md``):

* ``reference`` — the Language Reference's prose (``pydoc_data/topics.py``): dense technical definitions;
* ``manual`` — IDLE's user manual (``idlelib/help.html``): instructions, menus, second person;
* ``changelog`` — IDLE's change log (``idlelib/NEWS.txt``): terse entries, issue numbers, names, versions.

A real filler is read in order, as a document is, from a paragraph the seed picks, wrapping around at
the end (each file is longer than the longest haystack, so no paragraph repeats in one).

Each filler yields units (sentences, log lines, paragraphs of the real texts); the task builder counts
their tokens and places needles between them, never inside one.  None of them is the calibration text
the codebooks were fitted on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources

FILLERS = ("noise", "prose", "shuffled", "logs")
REAL_FILLERS = ("reference", "manual", "changelog")

_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
_SERVICES = ("api-gateway", "billing", "search-index", "auth", "scheduler", "mailer", "thumbnailer", "ledger")
_PATHS = ("/v1/orders", "/v1/users", "/v2/search", "/health", "/v1/invoices", "/v1/sessions", "/v2/reports")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN")


@cache
def _paragraphs() -> tuple[str, ...]:
    text = resources.files("hcmemory.data").joinpath("filler.txt").read_text(encoding="utf-8")
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


@cache
def real_paragraphs(kind: str) -> tuple[str, ...]:
    """The paragraphs of a real filler, in the document's order."""
    text = resources.files("hcmemory.data").joinpath(f"prose-{kind}.txt").read_text(encoding="utf-8")
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


@cache
def _sentences() -> tuple[str, ...]:
    return tuple(s for p in _paragraphs() for s in re.split(r"(?<=[.!?])\s+", p) if s)


def _log_line(rng: random.Random) -> str:
    return (f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
            f"{rng.randint(0, 59):02d}Z {rng.choice(_LEVELS)} {rng.choice(_SERVICES)} "
            f"{rng.choice(('GET', 'POST', 'PUT'))} {rng.choice(_PATHS)}/{rng.randint(100, 99999)} "
            f"{rng.choice((200, 200, 200, 201, 204, 404, 500))} {rng.randint(1, 900)}ms "
            f"req={rng.getrandbits(32):08x}")


def sentences(kind: str, seed: int) -> Iterator[str]:
    """An endless, seeded stream of filler sentences (log lines for ``logs``, paragraphs of a real text)."""
    if kind not in FILLERS + REAL_FILLERS:
        raise ValueError(f"unknown filler {kind!r}; fillers: {', '.join(FILLERS + REAL_FILLERS)}")
    rng = random.Random(f"filler-{kind}-{seed}")
    if kind in REAL_FILLERS:
        paragraphs = real_paragraphs(kind)
        start = rng.randrange(len(paragraphs))
        while True:
            yield from paragraphs[start:]
            yield from paragraphs[:start]
    while True:
        if kind == "noise":
            yield from _NOISE
        elif kind == "prose":
            order = list(_paragraphs())
            rng.shuffle(order)
            for paragraph in order:
                yield from re.split(r"(?<=[.!?])\s+", paragraph)
        elif kind == "shuffled":
            order = list(_sentences())
            rng.shuffle(order)
            yield from order
        else:
            yield _log_line(rng)


def separator(kind: str) -> str:
    """What joins two sentences of this filler (two paragraphs of a real text)."""
    if kind in REAL_FILLERS:
        return "\n\n"
    return "\n" if kind == "logs" else " "
