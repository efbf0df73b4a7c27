"""A generated mixed-domain question/answer corpus with exact-match short answers.

Eight task families in four domains that a sentence embedder separates clearly (so k-means with
K=4 on MiniLM embeddings recovers the domains) and that a small llama model learns as look-ups:

=========  ==========  =====================================================  ===========
domain     family      example prompt                                         answer
=========  ==========  =====================================================  ===========
math       arithmetic  ``Q: What is 7 plus 5? A:``                            ``12``
measures   units       ``Q: Convert 7 metres to centimetres. A:``             ``700``
geography  capitals    ``Q: Which city is the capital of Peru? A:``           ``Lima``
geography  continents  ``Q: Which continent is Kenya in? A:``                 ``Africa``
geography  languages   ``Q: What language is spoken in Brazil? A:``           ``Portuguese``
words      antonyms    ``Q: What is the opposite of the word hot? A:``        ``cold``
words      letters     ``Q: How many letters are in the word cat? A:``        ``3``
words      reverse     ``Q: Reverse the word frog. A:``                       ``gorf``
=========  ==========  =====================================================  ===========

Every family is enumerated completely (fact x template) and shuffled by the seed; each domain
gets the same prompt budget, shared evenly by its families. Each family is then split into
``train`` (expert fine-tuning), ``calib`` (gate training), ``validation`` (gate early stopping,
model selection) and ``test`` (60/15/10/15). A prompt string occurs in exactly one split; facts
are shared across splits through different templates, so held-out prompts are answerable.

``Sample.prompt`` is the exact text a model is given (tokenised as is, with BOS); the model is
expected to continue with ``" " + answer`` and then EOS. Exact match compares the generated text,
stripped of surrounding whitespace, with ``Sample.answer``.

Splits are stored as JSON lines of the operator data format (:mod:`.dataset`):
``{"prompt": ..., "answer": ..., "app": <family>, "raw": true, "family": ...}``.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DOMAINS",
    "FAMILIES",
    "PROMPT_TEMPLATE",
    "SPLITS",
    "Corpus",
    "Sample",
    "generate_corpus",
    "read_jsonl",
    "write_jsonl",
]

#: How a question becomes the text a model sees. The answer follows after one space.
PROMPT_TEMPLATE = "Q: {question} A:"

#: Split names in order, and the fraction of each family that goes to each.
SPLITS: tuple[str, ...] = ("train", "calib", "validation", "test")
_SPLIT_FRACTIONS: tuple[float, ...] = (0.6, 0.15, 0.1, 0.15)


@dataclass(frozen=True)
class Sample:
    """One question/answer pair. ``prompt`` is the full model input (see the module doc)."""

    prompt: str
    answer: str
    family: str

    def to_json(self) -> dict[str, object]:
        """A row of the operator data format (``moe2 calibrate --data``, ``moe2 eval
        --data``): the prompt sent raw, the family as its application class and label."""
        return {"prompt": self.prompt, "answer": self.answer, "app": self.family or "default",
                "raw": True, "family": self.family}

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> Sample:
        try:
            prompt, answer, family = obj["prompt"], obj["answer"], obj.get("family", "")
        except KeyError as exc:
            raise ValueError(f"sample lacks {exc.args[0]!r}") from None
        if not isinstance(prompt, str) or not isinstance(answer, str) or not isinstance(
                family, str):
            raise ValueError("prompt, answer and family must be strings")
        return cls(prompt=prompt, answer=answer, family=family)


def _q(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


# --------------------------------------------------------------------------- facts

#: (country, capital, continent, language)
_COUNTRIES = (
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Japan", "Tokyo", "Asia", "Japanese"), ("Canada", "Ottawa", "North America", "English"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Peru", "Lima", "South America", "Spanish"), ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Greece", "Athens", "Europe", "Greek"), ("Chile", "Santiago", "South America", "Spanish"),
    ("India", "Delhi", "Asia", "Hindi"), ("China", "Beijing", "Asia", "Chinese"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Portugal", "Lisbon", "Europe", "Portuguese"),
    ("Austria", "Vienna", "Europe", "German"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Cuba", "Havana", "North America", "Spanish"), ("Russia", "Moscow", "Europe", "Russian"),
    ("Ireland", "Dublin", "Europe", "English"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Turkey", "Ankara", "Asia", "Turkish"), ("Iran", "Tehran", "Asia", "Persian"),
    ("Iraq", "Baghdad", "Asia", "Arabic"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Mexico", "Mexico City", "North America",
                                                 "Spanish"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Colombia", "Bogota", "South America", "Spanish"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Nigeria", "Abuja", "Africa", "English"), ("Ghana", "Accra", "Africa", "English"),
    ("Nepal", "Kathmandu", "Asia", "Nepali"), ("Australia", "Canberra", "Oceania", "English"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"), ("Ethiopia", "Addis Ababa", "Africa",
                                                     "Amharic"),
)
_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"),
    ("light", "dark"), ("old", "young"), ("rich", "poor"), ("early", "late"), ("hard", "soft"),
    ("wet", "dry"), ("tall", "short"), ("open", "closed"), ("full", "empty"), ("loud", "quiet"),
    ("strong", "weak"), ("clean", "dirty"), ("thick", "thin"), ("high", "low"), ("win", "lose"),
    ("push", "pull"), ("buy", "sell"), ("left", "right"), ("inside", "outside"),
    ("before", "after"), ("always", "never"), ("true", "false"), ("friend", "enemy"),
    ("day", "night"), ("north", "south"), ("east", "west"), ("begin", "end"),
    ("smooth", "rough"), ("cheap", "expensive"), ("near", "far"), ("sweet", "sour"),
    ("brave", "afraid"), ("wide", "narrow"), ("arrive", "leave"), ("love", "hate"),
)
_UNITS = (
    ("metres", "centimetres", 100), ("kilometres", "metres", 1000),
    ("centimetres", "millimetres", 10), ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
)
_WORDS = (
    "cat", "dog", "sun", "pen", "cup", "hat", "box", "map", "bus", "car", "red", "top", "net",
    "pig", "fox", "owl", "bee", "ant", "egg", "ink", "jam", "key", "leg", "arm", "bed", "fan",
    "gem", "frog", "bird", "fish", "lamp", "desk", "ship", "rain", "snow", "moon", "star",
    "ring", "drum", "milk", "corn", "rose", "wolf", "lion", "bear", "duck", "goat", "tree",
    "book", "house", "water", "apple", "river", "garden", "window", "pencil", "rocket", "silver",
    "planet", "dragon", "market", "castle", "forest", "winter", "summer", "coffee", "bridge",
    "elephant", "computer", "mountain", "sandwich", "umbrella", "keyboard", "notebook",
)


# --------------------------------------------------------------------------- families


#: One fact: the questions (templates) that ask it, and its answer.
Fact = tuple[tuple[str, ...], str]


def _arithmetic() -> Iterator[Fact]:
    for a in range(13):
        for b in range(13):
            yield (f"What is {a} plus {b}?", f"Add {a} and {b}.", f"What is {a} and {b} added?"
                   ), str(a + b)
            if a >= b:
                yield (f"What is {a} minus {b}?", f"Subtract {b} from {a}.",
                       f"Take {b} away from {a}."), str(a - b)


def _units() -> Iterator[Fact]:
    for big, small, factor in _UNITS:
        for n in range(1, 41):
            yield (f"How many {small} are in {n} {big}?", f"Convert {n} {big} to {small}.",
                   f"Express {n} {big} in {small}."), str(n * factor)


def _capitals() -> Iterator[Fact]:
    for country, capital, _, _ in _COUNTRIES:
        yield (f"What is the capital of {country}?", f"Which city is the capital of {country}?",
               f"Name the capital city of {country}."), capital


def _continents() -> Iterator[Fact]:
    for country, _, continent, _ in _COUNTRIES:
        yield (f"On which continent is {country}?", f"Which continent is {country} in?",
               f"{country} lies on which continent?"), continent


def _languages() -> Iterator[Fact]:
    for country, _, _, language in _COUNTRIES:
        yield (f"What language is spoken in {country}?",
               f"Which language do people in {country} speak?",
               f"Name the main language of {country}."), language


def _antonyms() -> Iterator[Fact]:
    for a, b in _ANTONYMS:
        for word, opposite in ((a, b), (b, a)):
            yield (f"What is the opposite of the word {word}?",
                   f"Give the antonym of the word {word}.",
                   f"Which word means the opposite of {word}?"), opposite


def _letters() -> Iterator[Fact]:
    for word in _WORDS:
        yield (f"How many letters are in the word {word}?",
               f"Count the letters in the word {word}.",
               f"How long is the word {word} in letters?"), str(len(word))


def _reverse() -> Iterator[Fact]:
    for word in _WORDS:
        yield (f"Reverse the word {word}.", f"Spell the word {word} backwards.",
               f"Write the letters of the word {word} in reverse order."), word[::-1]


#: family name -> generator of facts, in a fixed order.
FAMILIES: dict[str, Callable[[], Iterator[Fact]]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "capitals": _capitals,
    "continents": _continents,
    "languages": _languages,
    "antonyms": _antonyms,
    "letters": _letters,
    "reverse": _reverse,
}

#: family -> domain: four groups that MiniLM embeddings separate clearly (k-means with K=4
#: recovers them), each with the same prompt budget in :func:`generate_corpus`.
DOMAINS: dict[str, str] = {
    "arithmetic": "math", "units": "measures",
    "capitals": "geography", "continents": "geography", "languages": "geography",
    "antonyms": "words", "letters": "words", "reverse": "words",
}


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """The four splits; every prompt occurs in exactly one of them."""

    splits: dict[str, tuple[Sample, ...]]
    seed: int

    def __getitem__(self, split: str) -> tuple[Sample, ...]:
        return self.splits[split]

    def all_samples(self) -> list[Sample]:
        return [s for name in SPLITS for s in self.splits[name]]

    def stats(self) -> dict[str, object]:
        """Counts per split and family (for the manifest)."""
        return {
            "seed": self.seed,
            "splits": {name: len(self.splits[name]) for name in SPLITS},
            "families": {
                name: dict(sorted(Counter(s.family for s in self.splits[name]).items()))
                for name in SPLITS
            },
        }

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``{split}.jsonl`` files; returns split -> path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for name in SPLITS:
            paths[name] = out / f"{name}.jsonl"
            write_jsonl(paths[name], self.splits[name])
        return paths


def generate_corpus(
    *,
    seed: int = 0,
    per_domain: int | None = 480,
    families: Sequence[str] | None = None,
) -> Corpus:
    """Build the four splits.

    Per family, facts are shuffled with ``seed`` and taken until the family has
    ``ceil(per_domain / families in its domain)`` prompts (``None``: every fact). One template of
    every fact goes to ``train``; the others go to ``train``, ``calib``, ``validation`` or
    ``test`` at random so that the overall split is about 60/15/10/15. So every held-out prompt
    asks a fact that the training split states in other words.
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families: {unknown}; known: {list(FAMILIES)}")
    if not names:
        raise ValueError("no families")
    domain_sizes = Counter(DOMAINS[n] for n in names)
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    seen: set[str] = set()
    for family in names:
        rng = random.Random(f"moe2-qa-{seed}-{family}")
        facts = list(FAMILIES[family]())
        rng.shuffle(facts)
        quota = None if per_domain is None else -(-per_domain // domain_sizes[DOMAINS[family]])
        taken = 0
        # P(extra template -> train) so that train gets _SPLIT_FRACTIONS[0] of all prompts.
        for questions, answer in facts:
            if quota is not None and taken >= quota:
                break
            order = list(questions)
            rng.shuffle(order)
            n = len(order)
            p_train = max(0.0, (_SPLIT_FRACTIONS[0] * n - 1) / max(1, n - 1))
            for i, question in enumerate(order):
                split = "train" if i == 0 or rng.random() < p_train else rng.choices(
                    SPLITS[1:], weights=_SPLIT_FRACTIONS[1:])[0]
                prompt = _q(question)
                if prompt in seen:
                    raise AssertionError(f"duplicate prompt {prompt!r}")
                seen.add(prompt)
                splits[split].append(Sample(prompt=prompt, answer=answer, family=family))
            taken += n
    rng = random.Random(f"moe2-qa-{seed}-order")
    for samples in splits.values():
        rng.shuffle(samples)
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise ValueError(f"per_domain {per_domain} is too small: no prompts in {empty}")
    return Corpus(splits={k: tuple(v) for k, v in splits.items()}, seed=seed)


def write_jsonl(path: str | os.PathLike[str], samples: Iterable[Sample]) -> None:
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, target)


def read_jsonl(path: str | os.PathLike[str]) -> list[Sample]:
    """Read a split written by :func:`write_jsonl` (blank lines are skipped)."""
    out: list[Sample] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Sample.from_json(json.loads(line)))
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
    return out
