"""Captions for the digits, measured from the images themselves, and the meter of prompt adherence.

digits-mmdit is a text-to-image model, so its training images need captions and its samples need a
judge of whether they show what the prompt asked for. Both rest on three attributes measured from
an ``[8, 8]`` grey image in [0, 1]:

* **thickness**: the ink mass (sum of intensities). Within one digit class the strokes have about
  the same length, so more ink means thicker or darker strokes.
* **slant**: the shear ``-mu11 / mu02`` from the second-order central image moments (x to the
  right, y down): positive when the top of the digit leans to the right.
* **size**: the radius of gyration of the ink, ``sqrt(mu20 + mu02)``. sklearn's digits were
  scaled to fill the box height, so this mostly tells wide from narrow shapes.

Each attribute depends on the digit's shape as well (a 7's diagonal stroke shears it, a 1 is
narrow), so it is binned *within the class*: the words split each class's real images into equal
parts (terciles for thickness and slant, halves for size). A "thick seven" is thick for a seven,
and a meter that knows nothing of the words scores 1/3 (1/2 for size) on average.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTES = ("thickness", "slant", "size")

# Level index -> the phrasings captions use for it. The first one of each is the canonical word.
LEVEL_WORDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "thickness": (("thin", "light"), ("regular", "medium"), ("thick", "bold")),
    "slant": (("slanted left", "leaning left"), ("upright", "straight"), ("slanted right", "leaning right")),
    "size": (("small", "little"), ("large", "big")),
}
LEVEL_NAMES: dict[str, tuple[str, ...]] = {a: tuple(w[0] for w in words) for a, words in LEVEL_WORDS.items()}

# Words the prompt parser accepts for each level: the caption words and a few common synonyms.
_PARSE_WORDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "thickness": (("thin", "light", "skinny", "fine"), ("regular", "medium", "normal"), ("thick", "bold", "heavy", "fat")),
    "slant": (("left",), ("upright", "straight", "vertical", "unslanted"), ("right",)),
    "size": (("small", "little", "tiny", "narrow"), ("large", "big", "wide")),
}

# Caption grammar. {noun} is the digit as a word or numeral; {pre} adjectives before it;
# {post} phrases after it. Slant left/right only has after-noun phrasings.
_TEMPLATES_WITH_ATTRS = (
    "a {pre} {noun}{post}",
    "the digit {numeral}, {preds}",
    "a {pre} handwritten {numeral}{post}",
    "number {word}, {preds}",
    "{noun}, {preds}",
)
_TEMPLATES_PLAIN = ("{word}", "{numeral}", "the digit {numeral}", "a handwritten {word}", "number {numeral}", "a {word}")
_THICKNESS_STROKES = "with {} strokes"


# --- measuring -----------------------------------------------------------------------------------


def _as_grey(images) -> np.ndarray:
    x = torch.as_tensor(images).detach().float().cpu().numpy()
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected grey images [B, 1, H, W], got shape {x.shape}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected images [B, 1, H, W] or [B, H, W], got shape {x.shape}")
    return np.clip(x, 0.0, 1.0).astype(np.float64)


def measure_attributes(images) -> dict[str, np.ndarray]:
    """Raw attribute values of ``[B, 1, H, W]`` images in [0, 1]: ``{"thickness", "slant", "size"}`` -> ``[B]``.

    Thickness is the ink mass, slant the moment shear ``-mu11/mu02`` (positive: leaning right),
    size the ink's radius of gyration in pixels. A blank image gets zeros.
    """
    x = _as_grey(images)
    _, h, w = x.shape
    rows, cols = np.mgrid[0:h, 0:w]
    mass = x.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    cx = (x * cols).sum(axis=(1, 2)) / safe
    cy = (x * rows).sum(axis=(1, 2)) / safe
    dx = cols[None] - cx[:, None, None]
    dy = rows[None] - cy[:, None, None]
    mu20 = (x * dx * dx).sum(axis=(1, 2)) / safe
    mu02 = (x * dy * dy).sum(axis=(1, 2)) / safe
    mu11 = (x * dx * dy).sum(axis=(1, 2)) / safe
    slant = np.where(mu02 > 0, -mu11 / np.where(mu02 > 0, mu02, 1.0), 0.0)
    return {"thickness": mass, "slant": slant, "size": np.sqrt(mu20 + mu02)}


@dataclass(frozen=True)
class AttributeScale:
    """Per-class statistics of one attribute on the real digits: bin edges, mean and spread."""

    edges: np.ndarray  # [10, levels - 1] ascending thresholds of each class
    mean: np.ndarray  # [10]
    std: np.ndarray  # [10]

    @property
    def levels(self) -> int:
        return self.edges.shape[1] + 1

    def level(self, values: np.ndarray, digits: np.ndarray) -> np.ndarray:
        """The level (0 = lowest bin) of each value, judged against its digit's edges."""
        edges = self.edges[np.asarray(digits, dtype=np.int64)]
        return (np.asarray(values)[:, None] > edges).sum(axis=1)

    def standardise(self, values: np.ndarray, digits: np.ndarray) -> np.ndarray:
        """Values as z-scores within their digit's class."""
        d = np.asarray(digits, dtype=np.int64)
        return (np.asarray(values) - self.mean[d]) / self.std[d]


@functools.lru_cache(maxsize=1)
def attribute_scales() -> dict[str, AttributeScale]:
    """The binning of each attribute, fitted once per process on all 1797 real digits."""
    from planner.zoo.digits import load_digits_data

    images, labels = load_digits_data()
    values = measure_attributes((images + 1) / 2)
    labels = labels.numpy()
    scales = {}
    for name in ATTRIBUTES:
        n = len(LEVEL_WORDS[name])
        quantiles = np.arange(1, n) / n
        v = values[name]
        scales[name] = AttributeScale(
            edges=np.stack([np.quantile(v[labels == d], quantiles) for d in range(10)]),
            mean=np.array([v[labels == d].mean() for d in range(10)]),
            std=np.array([v[labels == d].std() for d in range(10)]),
        )
    return scales


def attribute_levels(images, digits) -> dict[str, np.ndarray]:
    """Level of each attribute of each image (``[B]`` ints), binned within the class in ``digits``."""
    values = measure_attributes(images)
    digits = np.asarray(torch.as_tensor(digits).cpu().numpy(), dtype=np.int64)
    return {name: scale.level(values[name], digits) for name, scale in attribute_scales().items()}


# --- writing captions ----------------------------------------------------------------------------


@dataclass
class CaptionConfig:
    """How captions are drawn: which attributes get named and how the digit is written."""

    attribute_prob: float = 0.6  # each attribute is named with this probability, independently
    numeral_prob: float = 0.4  # the digit is written "7" rather than "seven"
    capitalise_prob: float = 0.2  # "A thick seven": the text encoders should not care


def _join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(digit: int, levels: dict[str, int], rng: random.Random, cfg: CaptionConfig = CaptionConfig()) -> str:
    """One caption for a digit with the given attribute levels, phrased at random from ``rng``.

    A random subset of the attributes is named (possibly none): the model learns that an
    attribute left unsaid may be anything.
    """
    named = [a for a in ATTRIBUTES if a in levels and rng.random() < cfg.attribute_prob]
    rng.shuffle(named)
    word, numeral = DIGIT_WORDS[digit], str(digit)
    noun = numeral if rng.random() < cfg.numeral_prob else word
    if not named:
        text = rng.choice(_TEMPLATES_PLAIN).format(word=word, numeral=numeral)
    else:
        pre, post, preds = [], [], []
        for a in named:
            phrase = rng.choice(LEVEL_WORDS[a][levels[a]])
            if a == "thickness" and rng.random() < 0.3:
                phrase = _THICKNESS_STROKES.format(phrase)
            preds.append(phrase)
            # Phrases of more than one word ("slanted left", "with thin strokes") follow the noun.
            (post if " " in phrase else pre).append(phrase)
        template = rng.choice(_TEMPLATES_WITH_ATTRS)
        if "{pre}" in template and not pre:
            template = template.replace("{pre} ", "")
        text = template.format(
            pre=", ".join(pre),
            post=(", " + _join_and(post)) if post else "",
            preds=_join_and(preds),
            noun=noun,
            word=word,
            numeral=numeral,
        )
        text = re.sub(r"^a ([aeiou])", r"an \1", text)
    if rng.random() < cfg.capitalise_prob:
        text = text[0].upper() + text[1:]
    return text


def caption_vocabulary() -> list[str]:
    """Every word and punctuation mark a caption can contain, lower case, sorted."""
    pieces = [*DIGIT_WORDS, *(str(d) for d in range(10)), *_TEMPLATES_WITH_ATTRS, *_TEMPLATES_PLAIN, _THICKNESS_STROKES, "an", "and"]
    pieces += [p for words in LEVEL_WORDS.values() for level in words for p in level]
    pieces = [re.sub(r"\{\w*\}", " ", p) for p in pieces]
    return sorted({w for p in pieces for w in split_words(p)})


def split_words(text: str) -> list[str]:
    """Lower-case words, numerals (one digit each) and punctuation marks of ``text``, in order."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text.lower())


# --- reading prompts back ------------------------------------------------------------------------


@dataclass
class ParsedPrompt:
    """What a prompt asks for: a digit (``None`` if it names none) and the attribute levels it names."""

    digit: int | None
    levels: dict[str, int] = field(default_factory=dict)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Read the digit and attribute levels back out of a prompt, whatever its phrasing.

    The first digit named (word or numeral) wins; an attribute named twice keeps its first level.
    Unknown words are ignored.
    """
    words = split_words(prompt)
    digit = None
    levels: dict[str, int] = {}
    for w in words:
        if digit is None:
            if w.isdigit():
                digit = int(w)
            elif w in DIGIT_WORDS:
                digit = DIGIT_WORDS.index(w)
        for name, choices in _PARSE_WORDS.items():
            if name in levels:
                continue
            for level, synonyms in enumerate(choices):
                if w in synonyms:
                    levels[name] = level
                    break
    return ParsedPrompt(digit, levels)


def evaluation_prompts(seed: int = 0) -> list[str]:
    """180 prompts: every digit x every (thickness, slant, size) combination, each phrased at random.

    The phrasings come from the caption grammar with a seed of their own, so they are held out
    from any particular training draw, though not from the grammar.
    """
    rng = random.Random(seed)
    every = CaptionConfig(attribute_prob=1.0)
    prompts = []
    for digit in range(10):
        for t in range(3):
            for s in range(3):
                for z in range(2):
                    prompts.append(make_caption(digit, {"thickness": t, "slant": s, "size": z}, rng, every))
    return prompts


def calibration_prompts() -> list[str]:
    """The :func:`evaluation_prompts` combinations phrased from another seed, less any text the evaluation set
    holds: what searches calibrate on, held out from what plans are evaluated on."""
    held_out = set(evaluation_prompts())
    return [p for p in evaluation_prompts(seed=1) if p not in held_out]


def interleave_digits(prompts: list[str]) -> list[str]:
    """``prompts`` reordered so that the digits take turns (any 10 consecutive prompts name every digit, while
    each digit's prompts last) and each digit's attributes come in a fixed shuffled order: the order runs take
    prompts in, so that a few samples already vary."""
    by_digit: dict[int | None, list[str]] = {}
    for p in prompts:
        by_digit.setdefault(parse_prompt(p).digit, []).append(p)
    columns = [by_digit[d] for d in sorted(by_digit, key=lambda d: -1 if d is None else d)]
    for i, column in enumerate(columns):
        random.Random(i).shuffle(column)
    return [col[i] for i in range(max(map(len, columns))) for col in columns if i < len(col)]


# --- the meter -----------------------------------------------------------------------------------


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def prompt_adherence(images, prompts: list[str]) -> dict:
    """How well ``[B, 1, 8, 8]`` images in [0, 1] follow the prompts they were drawn for.

    * ``digit_accuracy``: the shipped classifier against the prompt's digit (prompts naming no
      digit are left out; ``digits_named`` says how many did).
    * per attribute named by any prompt: ``accuracy`` of the measured level against the asked
      level (binned within the prompt's digit), ``chance`` (the accuracy expected if measured and
      asked levels were independent, from their marginals), ``uniform_chance`` (1 / levels), and
      ``spearman`` between the asked level and the within-class z-score of the measured value.
    """
    from planner.metrics import digit_accuracy

    images = torch.as_tensor(images).float()
    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
    parsed = [parse_prompt(p) for p in prompts]
    has_digit = np.array([p.digit is not None for p in parsed])
    result: dict = {"images": len(prompts), "digits_named": int(has_digit.sum())}
    if not has_digit.any():
        return result
    idx = np.flatnonzero(has_digit)
    digits = np.array([parsed[i].digit for i in idx])
    result["digit_accuracy"] = digit_accuracy(images[idx], torch.as_tensor(digits))
    values = measure_attributes(images[idx])
    scales = attribute_scales()
    attrs = {}
    for name in ATTRIBUTES:
        sel = np.array([name in parsed[i].levels for i in idx])
        if not sel.any():
            continue
        asked = np.array([parsed[i].levels[name] for i, s in zip(idx, sel) if s])
        scale = scales[name]
        measured = scale.level(values[name][sel], digits[sel])
        n_levels = scale.levels
        p_asked = np.bincount(asked, minlength=n_levels) / len(asked)
        p_measured = np.bincount(measured, minlength=n_levels) / len(measured)
        attrs[name] = {
            "n": int(sel.sum()),
            "accuracy": float((measured == asked).mean()),
            "chance": float((p_asked * p_measured).sum()),
            "uniform_chance": 1.0 / n_levels,
            "spearman": _spearman(asked, scale.standardise(values[name][sel], digits[sel])),
        }
    result["attributes"] = attrs
    return result


def prompt_meter(images, conditions: list) -> dict[str, float | None]:
    """digits-mmdit's own quality scores for images drawn for prompt ``conditions``: digit ``accuracy``
    against the prompt's digit, the accuracy of each attribute the prompts ask for, and the ``frechet``
    distance of classifier features to the real digits."""
    from planner.metrics import digit_frechet_distance

    texts = [getattr(c, "prompt", c) for c in conditions]
    adherence = prompt_adherence(images, texts)
    scores: dict[str, float | None] = {"accuracy": adherence.get("digit_accuracy")}
    scores.update({name: a["accuracy"] for name, a in adherence.get("attributes", {}).items()})
    scores["frechet"] = digit_frechet_distance(torch.as_tensor(images).float()) if len(texts) >= 2 else None
    return scores
