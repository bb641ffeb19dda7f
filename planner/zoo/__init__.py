"""The model zoo: named models the CLI and the runner can load without downloading anything.

* ``digits-dit``: the project's own trained class-conditional DiT (:mod:`planner.zoo.digits`), the default;
  ``digits-dit-wide`` and ``digits-dit-deep`` are the same recipe in other shapes (the development suite);
* ``digits-mmdit``: the project's own trained text-to-image Flux model, prompted with captions of digits
  (:mod:`planner.zoo.mmdit`);
* ``tiny:<kind>``: tiny but real diffusers pipelines of every supported kind, with tiny text encoders
  and tokenizers built offline (:mod:`planner.zoo.fixtures`), for tests and for trying the planner out.

Besides a loader, an entry holds what every run of its model needs and what the model's family cannot
know: call arguments, a default sampler, its own prompt sets and a quality meter.

Folders, Hugging Face repo ids and ``module:function`` specs are loaded by
:mod:`planner.pipelines.loading`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ZooEntry:
    """A named model: ``loader() -> pipeline`` and its defaults.

    ``call_args``: ``pipe(...)`` arguments every run needs (sizes, sequence length). ``sampler``: the
    default :class:`~planner.runner.Sampler` fields where the family's defaults do not fit. ``prompts``:
    ``() -> (calibration, evaluation)`` prompt lists for text models. ``meter``: ``(images, conditions)
    -> dict`` of the model's own quality scores (e.g. digit accuracy)."""

    name: str
    description: str
    loader: Callable[[], object]
    trainable: bool = False
    call_args: Mapping[str, Any] = field(default_factory=dict)
    sampler: Mapping[str, Any] = field(default_factory=dict)
    prompts: Callable[[], tuple[list[str], list[str]]] | None = None
    meter: Callable[[Any, list], dict] | None = None


def _digits(name: str):
    def load():
        from planner.zoo.digits import load_digits_pipeline

        return load_digits_pipeline(name)

    return load


def _digit_meter(images, conditions) -> dict:
    from planner.zoo.digits import digit_meter

    return digit_meter(images, conditions)


def _mmdit():
    from planner.zoo.mmdit import load_digits_mmdit_pipeline

    return load_digits_mmdit_pipeline()


def _caption_prompts() -> tuple[list[str], list[str]]:
    from planner.zoo.captions import calibration_prompts, evaluation_prompts, interleave_digits

    return interleave_digits(calibration_prompts()), interleave_digits(evaluation_prompts())


def _prompt_meter(images, conditions) -> dict:
    from planner.zoo.captions import prompt_meter

    return prompt_meter(images, conditions)


def _fixture(kind: str):
    def load():
        from planner.zoo.fixtures import build_fixture

        return build_fixture(kind)

    return load


def _entries() -> dict[str, ZooEntry]:
    from planner.zoo.digits import ARCHITECTURES
    from planner.zoo.fixtures import specs
    from planner.zoo.mmdit import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE, MAX_SEQUENCE_LENGTH

    entries = {}
    for name, arch in ARCHITECTURES.items():
        shape = (f"{arch['num_layers']} blocks of width {arch['num_attention_heads'] * arch['attention_head_dim']}, "
                 f"patch {arch['patch_size']}")
        entries[name] = ZooEntry(name, f"class-conditional pixel-space DiT on sklearn digits ({shape}; shipped "
                                       "weights)", _digits(name), trainable=True, meter=_digit_meter)
    entries["digits-mmdit"] = ZooEntry(
        "digits-mmdit", "text-to-image Flux MMDiT on captioned sklearn digits (2 double- and 4 single-stream "
                        "blocks; shipped weights, tokenizers and text encoders)", _mmdit, trainable=True,
        call_args={"height": IMAGE_SIZE, "width": IMAGE_SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        sampler={"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}, prompts=_caption_prompts,
        meter=_prompt_meter)
    for kind, spec in specs().items():
        if kind in UNSUPPORTED:
            continue
        entries[f"tiny:{kind}"] = ZooEntry(f"tiny:{kind}", f"tiny random-weight {spec.pipeline}: {spec.description}",
                                           _fixture(kind), call_args=dict(spec.call))
    return entries


# Fixture kinds the planner cannot drive yet, and why (docs/pipelines.md has the facts).
UNSUPPORTED = {
    "z-image": "its transformer takes lists of per-sample tensors and a rising time argument t, which the "
               "executor's batch slicing and step tracking do not handle",
}
MODELS: dict[str, ZooEntry] = _entries()
