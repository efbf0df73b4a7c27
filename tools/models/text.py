"""A deterministic English-ish corpus (arithmetic Q/A, capitals, word reversal, colours, ...)
that the test tokenizers are trained on; nothing is downloaded."""

from __future__ import annotations

import logging
import random
from typing import Literal

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
FileType = Literal["f32", "f16"]

CorpusVariant = Literal["base", "alt"]
DEFAULT_CORPUS_SENTENCES = 4000


_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Brazil", "Brasilia"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Cuba", "Havana"),
)
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "pink")
_THINGS = (
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
    ("banana", "yellow"), ("tomato", "red"), ("orange", "orange"), ("plum", "purple"),
    ("cloud", "grey"), ("rose", "pink"),
)
_WORDS = (
    "apple", "river", "garden", "window", "pencil", "rocket", "silver", "planet", "dragon",
    "market", "castle", "forest", "winter", "summer", "coffee", "bridge", "letter", "number",
    "sister", "doctor", "yellow", "animal", "button", "candle", "mirror", "pocket", "ticket",
    "travel", "museum", "violin", "basket", "island", "jacket", "kitten", "ladder", "meadow",
)
_ANIMALS = (
    ("cat", 4), ("dog", 4), ("bird", 2), ("spider", 8), ("ant", 6), ("horse", 4), ("snake", 0),
    ("duck", 2), ("crab", 10), ("cow", 4),
)
_NAMES = ("Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
_FOODS = ("bread", "rice", "soup", "cheese", "apples", "pasta", "eggs", "fish", "beans", "salad")
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)


def _base_sentence(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        op, value = rng.choice((("plus", a + b), ("minus", a - b), ("times", a * b)))
        return f"Q: What is {a} {op} {b}? A: {value}."
    if kind == 1:
        country, capital = rng.choice(_CAPITALS)
        return rng.choice((
            f"The capital of {country} is {capital}.",
            f"Q: What is the capital of {country}? A: {capital}.",
            f"{capital} is the capital city of {country}.",
        ))
    if kind == 2:
        word = rng.choice(_WORDS)
        return f"Reverse the word {word}: {word[::-1]}."
    if kind == 3:
        thing, colour = rng.choice(_THINGS)
        other = rng.choice(_COLOURS)
        return f"The {thing} is {colour}, not {other}." if other != colour else (
            f"The {thing} is {colour}."
        )
    if kind == 4:
        start = rng.randrange(20)
        stop = start + rng.randrange(2, 7)
        return f"Count from {start} to {stop}: " + " ".join(str(i) for i in range(start, stop + 1))
    if kind == 5:
        animal, legs = rng.choice(_ANIMALS)
        return f"A {animal} has {_NUMBER_WORDS[legs] if legs <= 12 else legs} legs."
    if kind == 6:
        word = rng.choice(_WORDS)
        return f"Spell {word}: " + " ".join(word) + "."
    if kind == 7:
        name, food = rng.choice(_NAMES), rng.choice(_FOODS)
        n = rng.randrange(1, 10)
        return f"{name} ate {n} bowls of {food} and said it was very good."
    if kind == 8:
        n = rng.randrange(13)
        return f"The number {n} is written as {_NUMBER_WORDS[n]}."
    a, b = rng.randrange(1, 50), rng.randrange(1, 50)
    bigger = max(a, b)
    return f"Which is larger, {a} or {b}? The larger number is {bigger}."


_ALT_VERBS = ("print", "return", "yield", "raise", "assert", "import", "lambda", "while")
_ALT_UNITS = (
    ("metres", "centimetres", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
)
_ALT_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _alt_sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        x, k = rng.randrange(10), rng.randrange(2, 9)
        return f"def f{x}(x): return x * {k}  # {rng.choice(_ALT_VERBS)}"
    if kind == 1:
        big, small, factor = rng.choice(_ALT_UNITS)
        n = rng.randrange(1, 20)
        return f"CONVERT {n} {big.upper()} TO {small.upper()} => {n * factor}"
    if kind == 2:
        i = rng.randrange(7)
        day, after, before = _ALT_DAYS[i], _ALT_DAYS[(i + 1) % 7], _ALT_DAYS[i - 1]
        return f"After {day} comes {after}; before it was {before}."
    if kind == 3:
        values = [rng.randrange(100) for _ in range(rng.randrange(3, 7))]
        return f"sorted({values}) == {sorted(values)}"
    if kind == 4:
        a = rng.randrange(2, 12)
        return f"SQUARE OF {a} IS {a * a}; CUBE OF {a} IS {a ** 3}"
    word = "".join(rng.choice("xyzqkvw") for _ in range(rng.randrange(3, 8)))
    return f"<tag id={rng.randrange(1000)}>{word}</tag>"


def synthetic_corpus(
    n_sentences: int = DEFAULT_CORPUS_SENTENCES, *, seed: int = 0, variant: CorpusVariant = "base"
) -> list[str]:
    """Deterministic English-ish training sentences (no newlines). ``variant="alt"`` is a
    different distribution (code, units, upper case) that yields a different vocabulary."""
    rng = random.Random(f"moe2-corpus-{variant}-{seed}")
    make = _base_sentence if variant == "base" else _alt_sentence
    return [make(rng) for _ in range(n_sentences)]


