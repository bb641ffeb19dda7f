"""The model zoo: named models the CLI and the runner can load without downloading anything.

* ``digits-dit``: the project's own trained class-conditional DiT (:mod:`planner.zoo.digits`), the default;
  ``digits-dit-wide`` and ``digits-dit-deep`` are the same recipe in other shapes (the development suite);
* ``tiny:<kind>``: tiny but real diffusers pipelines of every supported kind, with tiny text encoders
  and tokenizers built offline (:mod:`planner.zoo.fixtures`), for tests and for trying the planner out.

Folders, Hugging Face repo ids and ``module:function`` specs are loaded by
:mod:`planner.pipelines.loading`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    loader: Callable[[], object]  # () -> pipeline
    trainable: bool = False


def _digits(name: str):
    def load():
        from planner.zoo.digits import load_digits_pipeline

        return load_digits_pipeline(name)

    return load


def _fixture(kind: str):
    def load():
        from planner.zoo.fixtures import build_fixture

        return build_fixture(kind)

    return load


def _entries() -> dict[str, ZooEntry]:
    from planner.zoo.digits import ARCHITECTURES
    from planner.zoo.fixtures import specs

    entries = {}
    for name, arch in ARCHITECTURES.items():
        shape = (f"{arch['num_layers']} blocks of width {arch['num_attention_heads'] * arch['attention_head_dim']}, "
                 f"patch {arch['patch_size']}")
        entries[name] = ZooEntry(name, f"class-conditional pixel-space DiT on sklearn digits ({shape}; shipped "
                                       "weights)", _digits(name), trainable=True)
    for kind, spec in specs().items():
        if kind in UNSUPPORTED:
            continue
        entries[f"tiny:{kind}"] = ZooEntry(f"tiny:{kind}", f"tiny random-weight {spec.pipeline}: {spec.description}",
                                           _fixture(kind))
    return entries


# Fixture kinds the planner cannot drive yet, and why (docs/pipelines.md has the facts).
UNSUPPORTED = {
    "z-image": "its transformer takes lists of per-sample tensors and a rising time argument t, which the "
               "executor's batch slicing and step tracking do not handle",
}
MODELS: dict[str, ZooEntry] = _entries()


def default_call_args(spec: str) -> dict:
    """What every call of a zoo model needs besides prompts and the sampler (sizes and switches of the tiny
    pipelines); ``{}`` for other models."""
    if not spec.startswith("tiny:"):
        return {}
    from planner.zoo.fixtures import spec as fixture_spec

    return dict(fixture_spec(spec.removeprefix("tiny:")).call)
