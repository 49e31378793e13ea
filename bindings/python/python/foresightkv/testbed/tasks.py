"""Seeded long-context tasks with exact answers whose answer depends on tokens far back, and the
natural text the teacher-forced evaluation reads.

Every example is a plain-text completion prompt (``Question: ... Answer: <lead-in>``), the answer a
number the model must copy from far back in the context; ``grade`` compares the first number of the
model's continuation with the expected one, exactly. Tasks (``TASKS``):

- ``kv_retrieval``: a long table of ``The code of <name> is <number>.`` lines; asked for one name.
- ``needle``: one such line (the needle) hidden at a random depth in natural text (the licence texts
  of ``/usr/share/common-licenses``); asked for it at the end.
- ``var_track``: variable tracking: ``Let <var> = <number>.`` then a chain of ``Let <var> = <var>.``
  copies spread through filler; asked for the value of the chain's last variable (multi-hop).

``make_example(task, seed, target_tokens, tokenizer)`` builds one example whose prompt is about
``target_tokens`` tokens long; the same (task, seed, length, tokenizer) always gives the same text.
"""

import glob
import os
import random
import re
from dataclasses import dataclass
from typing import Any, List, Optional

#: Task names.
TASKS = ("kv_retrieval", "needle", "var_track")

#: Where the natural text comes from (Debian's base-files; each licence permits verbatim copies).
TEXT_GLOB = "/usr/share/common-licenses/*"

_NAMES = [
    "apple",
    "amber",
    "anchor",
    "arrow",
    "aspen",
    "badger",
    "banjo",
    "basil",
    "beacon",
    "birch",
    "bison",
    "blossom",
    "bramble",
    "breeze",
    "bronze",
    "cactus",
    "camel",
    "candle",
    "canyon",
    "cedar",
    "cherry",
    "cobalt",
    "comet",
    "copper",
    "coral",
    "cotton",
    "crane",
    "crystal",
    "daisy",
    "delta",
    "dolphin",
    "dune",
    "eagle",
    "ember",
    "falcon",
    "fern",
    "fig",
    "flint",
    "forest",
    "fossil",
    "garnet",
    "geyser",
    "ginger",
    "glacier",
    "granite",
    "harbor",
    "hazel",
    "heron",
    "hickory",
    "honey",
    "iris",
    "ivory",
    "jade",
    "jasmine",
    "juniper",
    "kestrel",
    "kettle",
    "lagoon",
    "lantern",
    "lemon",
    "lily",
    "lotus",
    "maple",
    "marble",
    "meadow",
    "mint",
    "nectar",
    "nickel",
    "oak",
    "olive",
    "onyx",
    "orchid",
    "otter",
    "panther",
    "pearl",
    "pepper",
    "pine",
    "plum",
    "quartz",
    "rabbit",
    "raven",
    "reed",
    "river",
    "robin",
    "ruby",
    "saffron",
    "sage",
    "salmon",
    "sapphire",
    "shadow",
    "silver",
    "sparrow",
    "spruce",
    "summit",
    "thistle",
    "thunder",
    "tiger",
    "topaz",
    "tulip",
    "valley",
    "velvet",
    "violet",
    "walnut",
    "willow",
    "zephyr",
]


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt text, the expected answer (digits) and what built it."""

    task: str
    seed: int
    prompt: str
    answer: str


def natural_text() -> str:
    """The concatenated licence texts of ``/usr/share/common-licenses`` (sorted by name; symlinks
    skipped), whitespace-normalised paragraphs. Raises ``FileNotFoundError`` when there are none."""
    parts = []
    for p in sorted(glob.glob(TEXT_GLOB)):
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8", errors="replace") as f:
            parts.append(re.sub(r"[ \t]+", " ", f.read()).strip())
    if not parts:
        raise FileNotFoundError(f"no natural text found at {TEXT_GLOB}")
    return "\n\n".join(parts)


def _sentences(rng: random.Random, text: Optional[str]) -> List[str]:
    """Sentences of the natural text from a random starting point (filler in reading order)."""
    text = text if text is not None else natural_text()
    sents = [
        s.strip()
        for s in re.split(r"(?<=[.;:])\s+", text.replace("\n", " "))
        if len(s.strip()) > 20
    ]
    start = rng.randrange(len(sents))
    return sents[start:] + sents[:start]


def _number(rng: random.Random) -> str:
    """A 4-digit number without a leading zero."""
    return str(rng.randint(1000, 9999))


def _fit(
    tokenizer: Any, lines: List[str], tail: str, target: int, join: str = "\n"
) -> str:
    """Joins as many of ``lines`` as fit ``target`` tokens with ``tail`` (counted, not guessed)."""
    lo, hi = 1, len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer(join.join(lines[:mid]) + tail)["input_ids"]) <= target:
            lo = mid
        else:
            hi = mid - 1
    return join.join(lines[:lo]) + tail


def make_example(
    task: str,
    seed: int,
    target_tokens: int,
    tokenizer: Any,
    *,
    text: Optional[str] = None,
) -> Example:
    """The example of ``task`` for ``seed``, its prompt about ``target_tokens`` tokens long."""
    rng = random.Random(f"{task}:{seed}")
    if task == "kv_retrieval":
        names = rng.sample(_NAMES, len(_NAMES))
        n = len(names)
        # enough lines for any target: names repeat with a numeric suffix, codes unique per line
        rows = []
        for i in range(4 * target_tokens // 10 + 1):
            rows.append(
                (f"{names[i % n]}{'' if i < n else '-' + str(i // n)}", _number(rng))
            )
        # pick the queried entry among the lines that will fit, early in the table (far back)
        head = "Below is a table of secret codes. Remember them.\n"
        lines = [head] + [f"The code of {k} is {v}." for k, v in rows]
        probe = _fit(tokenizer, lines, "", target_tokens - 40)
        kept = probe.count("The code of ")
        qi = rng.randrange(max(1, kept // 2))
        key, val = rows[qi]
        tail = f"\n\nQuestion: What is the code of {key}?\nAnswer: The code of {key} is"
        return Example(task, seed, _fit(tokenizer, lines, tail, target_tokens), val)
    if task == "needle":
        key = rng.choice(_NAMES)
        val = _number(rng)
        sents = _sentences(rng, text)
        needle = f"The secret code of {key} is {val}."
        tail = f"\n\nQuestion: What is the secret code of {key}?\nAnswer: The secret code of {key} is"
        body = _fit(tokenizer, sents * 4, tail, target_tokens - 24, join=" ")[
            : -len(tail)
        ]
        words = body.split(" ")
        depth = rng.uniform(0.05, 0.5)  # in the first half: far from the question
        at = int(len(words) * depth)
        prompt = " ".join(words[:at] + [needle] + words[at:]) + tail
        return Example(task, seed, prompt, val)
    if task == "var_track":
        names = [f"{a}{b}" for a in "ABCDEFGHJKLMNPQRSTUVWXYZ" for b in "0123456789"]
        rng.shuffle(names)
        hops = rng.randint(1, 2)
        chain = names[: hops + 1]
        val = _number(rng)
        decoys = [(names[hops + 1 + i], _number(rng)) for i in range(4)]
        stmts = [f"Let {chain[0]} = {val}."] + [
            f"Let {chain[i + 1]} = {chain[i]}." for i in range(hops)
        ]
        stmts += [f"Let {k} = {v}." for k, v in decoys]
        first = stmts[0]
        rest = stmts[1:]
        rng.shuffle(rest)
        sents = _sentences(rng, text)
        tail = f"\n\nQuestion: What is the value of {chain[-1]}?\nAnswer: The value of {chain[-1]} is"
        body = _fit(
            tokenizer, sents * 4, tail, target_tokens - 12 * len(stmts), join=" "
        )[: -len(tail)]
        words = body.split(" ")
        # the value early (far back), the copies and decoys later in order of the chain
        cuts = sorted(rng.uniform(0.35, 0.95) for _ in rest)
        pieces = [first] + words[: int(len(words) * 0.1)]
        prev = int(len(words) * 0.1)
        order = [s for s in rest if s.split()[1] not in chain] + [
            f"Let {chain[i + 1]} = {chain[i]}." for i in range(hops)
        ]
        for c, s in zip(cuts, order):
            at = int(len(words) * c)
            pieces += words[prev:at] + [s]
            prev = at
        pieces += words[prev:]
        return Example(task, seed, " ".join(pieces) + tail, val)
    raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")


def grade(expected: str, generated: str) -> bool:
    """Exact grading: the first number in the model's continuation equals the expected answer."""
    m = re.search(r"\d+", generated)
    return m is not None and m.group(0) == expected
