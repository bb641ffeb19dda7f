"""Prompts: what a text-conditioned pipeline is calibrated and evaluated on.

A :class:`Prompt` is one input: the text, an optional negative prompt, an optional seed and the
call arguments only this input takes. A :class:`PromptSet` is an ordered list of them with a hash
that plans and profiles record. Files: ``.txt`` (one prompt a line; blank lines and lines starting
with ``#`` are skipped) or ``.jsonl`` (one object a line: ``prompt``, optional ``negative_prompt``,
``seed`` and ``call_args``).

The project ships two disjoint sets of its own writing (``planner/data/prompts``): a calibration
set for profiles and searches and an evaluation set for ``planner eval`` and the bench.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from planner.errors import PlannerError

DATA = Path(__file__).resolve().parent.parent / "data" / "prompts"
CALIBRATION_FILE = DATA / "calibration.txt"
EVALUATION_FILE = DATA / "evaluation.txt"
MAX_PROMPTS = 100_000
MAX_FILE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Prompt:
    """One text input. ``call_args`` are extra ``pipe(...)`` arguments of this input alone."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    call_args: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def key(self) -> str:
        """A short hash of what the text encoders see (the prompt and the negative prompt)."""
        return _digest([self.prompt, self.negative_prompt])

    @property
    def text_key(self) -> str:
        """A short hash of the prompt text alone: what held-out checks compare (a calibration prompt stays
        one whatever negative prompt it is given)."""
        return _digest([" ".join(self.prompt.split())])

    def args(self) -> dict[str, Any]:
        return dict(self.call_args)


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts and where it came from."""

    prompts: tuple[Prompt, ...]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def digest(self) -> str:
        """A short hash of the whole set (texts, negatives, seeds, call arguments), as plans record it."""
        return _digest([[p.prompt, p.negative_prompt, p.seed, list(map(list, p.call_args))] for p in self.prompts])

    def keys(self) -> set[str]:
        return {p.key for p in self.prompts}

    def with_negative(self, negative: str | None) -> "PromptSet":
        """Every prompt without its own negative prompt takes ``negative``."""
        if negative is None:
            return self
        return PromptSet(tuple(p if p.negative_prompt is not None else Prompt(p.prompt, negative, p.seed, p.call_args)
                               for p in self.prompts), self.source)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def load_prompts(path: str | Path) -> PromptSet:
    """A prompt set from a ``.txt`` or ``.jsonl`` file; PlannerError naming the file and line on bad input."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise PlannerError(f"{path}: prompts are a .txt file (one a line) or a .jsonl file (one JSON object a line)")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PlannerError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB: not a prompt file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError:
        raise PlannerError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PlannerError(f"{path}: cannot read: {exc.strerror or exc}") from None
    rows = _jsonl(text, path) if path.suffix == ".jsonl" else _txt(text)
    if not rows:
        raise PlannerError(f"{path}: no prompts in it")
    if len(rows) > MAX_PROMPTS:
        raise PlannerError(f"{path}: {len(rows)} prompts, at most {MAX_PROMPTS}")
    return PromptSet(tuple(rows), str(path))


def _txt(text: str) -> list[Prompt]:
    lines = (line.strip() for line in text.splitlines())
    return [Prompt(line) for line in lines if line and not line.startswith("#")]


def _jsonl(text: str, path: Path) -> list[Prompt]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlannerError(f"{path}:{n}: not a JSON object: {exc.msg}") from None
        out.append(_record(row, f"{path}:{n}"))
    return out


def _record(row: Any, where: str) -> Prompt:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise PlannerError(f"{where}: expected an object with a \"prompt\" string")
    unknown = set(row) - {"prompt", "negative_prompt", "seed", "call_args"}
    if unknown:
        raise PlannerError(f"{where}: unknown key {sorted(unknown)[0]!r} (prompt, negative_prompt, seed, call_args)")
    negative = row.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PlannerError(f"{where}: negative_prompt must be a string")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise PlannerError(f"{where}: seed must be a whole number in [0, 2^63)")
    args = row.get("call_args", {})
    if not isinstance(args, dict) or any(not isinstance(k, str) for k in args):
        raise PlannerError(f"{where}: call_args must be an object of pipeline arguments")
    for key, value in args.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PlannerError(f"{where}: call_args.{key} must be finite")
    return Prompt(row["prompt"], negative, seed, tuple(sorted((k, _frozen(v)) for k, v in args.items())))


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def as_prompt_set(prompts: "PromptSet | str | Path | Iterable[str] | None", negative: str | None = None, *,
                  source: str = "given") -> PromptSet | None:
    """A prompt set from a set, a ``.txt``/``.jsonl`` file, or a list of strings (named ``source``; ``None`` stays
    ``None``); prompts without their own negative prompt take ``negative``."""
    if prompts is None:
        return None
    if isinstance(prompts, PromptSet):
        found = prompts
    elif isinstance(prompts, (str, Path)):
        found = load_prompts(prompts)
    else:
        texts = list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PlannerError("prompts must be a non-empty list of strings, a .txt or .jsonl file, or a PromptSet")
        found = PromptSet(tuple(Prompt(t) for t in texts), source)
    return found.with_negative(negative)


def calibration_prompts() -> PromptSet:
    """The shipped calibration prompts."""
    return load_prompts(CALIBRATION_FILE)


def evaluation_prompts() -> PromptSet:
    """The shipped evaluation prompts (none of them is a calibration prompt)."""
    return load_prompts(EVALUATION_FILE)


def check_held_out_prompts(evaluation: Iterable[Prompt], calibration_keys: Iterable[str], force: bool = False) -> None:
    """PlannerError when an evaluation prompt is one the plan was calibrated on (unless ``force``);
    ``calibration_keys`` are the :attr:`Prompt.text_key` of the calibration prompts, as plans record them
    (or their :attr:`Prompt.key`)."""
    keys = set(calibration_keys)  # a set's own keys (Prompt.key) are taken too
    shared = list(dict.fromkeys(p.prompt for p in evaluation if p.text_key in keys or p.key in keys))
    if shared and not force:
        more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
        raise PlannerError(f"evaluation prompt {shared[0]!r}{more} was a calibration prompt of this plan: a plan must "
                           "be judged on held-out prompts; --force evaluates anyway")
