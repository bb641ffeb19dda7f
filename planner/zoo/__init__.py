"""The model zoo: named models the CLI and the runner can load without downloading anything.

``load_model(spec)`` returns ``(pipeline, family)``. Specs: the names in ``MODELS``, or a local
folder written by ``save_pretrained`` (its ``model_index.json`` names the pipeline class, which
must be one whose family we know).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from planner.errors import PlannerError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    loader: Callable[[], tuple]  # () -> (pipeline, Family)
    trainable: bool = False


def _digits():
    from planner.zoo.digits import DigitsFamily, load_digits_pipeline

    return load_digits_pipeline(), DigitsFamily()


def _tiny(kind: str):
    def load():
        from planner.zoo.tiny import build_tiny

        return build_tiny(kind)

    return load


MODELS: dict[str, ZooEntry] = {
    "digits-dit": ZooEntry(
        "digits-dit",
        "class-conditional pixel-space DiT on sklearn digits (8 blocks, shipped weights)",
        _digits,
        trainable=True,
    ),
    **{
        f"tiny:{kind}": ZooEntry(f"tiny:{kind}", f"tiny randomly initialised {label} pipeline for tests", _tiny(kind))
        for kind, label in [
            ("dit", "DiTPipeline"),
            ("pixart", "PixArtSigmaPipeline"),
            ("sd3", "StableDiffusion3Pipeline"),
            ("flux", "FluxPipeline"),
            ("wan", "WanPipeline (text to video)"),
        ]
    },
}


def load_model(spec: str) -> tuple:
    """``(pipeline, family)`` for a zoo name or a local diffusers folder; PlannerError otherwise."""
    if spec in MODELS:
        return MODELS[spec].loader()
    path = Path(spec)
    if path.is_dir() and (path / "model_index.json").is_file():
        return _load_folder(path)
    raise PlannerError(
        f"unknown model {spec!r}: use one of {', '.join(MODELS)} or a folder written by save_pretrained"
    )


def family_of(pipe):
    """The family that drives ``pipe`` (a diffusers pipeline object); PlannerError when there is none."""
    return _family_for_class(type(pipe).__name__, str(type(pipe).__name__))


def _family_for_class(class_name: str | None, where: str):
    if class_name == "DigitsDiTPipeline":
        from planner.zoo.digits import DigitsFamily

        return DigitsFamily()
    from planner.zoo.tiny import family_for_pipeline

    family = family_for_pipeline(class_name)
    if family is None:
        raise PlannerError(f"{where}: pipeline class {class_name!r} is not supported")
    return family


def _load_folder(path: Path) -> tuple:
    """``(pipeline, family)`` from a ``save_pretrained`` folder; PlannerError naming the folder when its
    index, configs or weights cannot be read (a damaged folder is the user's input, not a bug)."""
    from planner.artifact import loads_json
    from planner.io import read_text_limited

    index = loads_json(read_text_limited(path / "model_index.json", "model_index.json", 1 << 20),
                       str(path / "model_index.json"))
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise PlannerError(f"{path / 'model_index.json'}: expected an object naming the pipeline in _class_name")
    class_name = index["_class_name"]
    family = _family_for_class(class_name, str(path))
    # Warnings raised on the way are shown only when the folder loads: for a damaged folder they are
    # noise around the one-line error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if class_name == "DigitsDiTPipeline":
                from planner.zoo.digits import load_digits_pipeline

                pipe = load_digits_pipeline(path)
            else:
                from planner.zoo.tiny import load_pipeline_folder

                pipe = load_pipeline_folder(path)
        except (PlannerError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers, transformers, safetensors and torch raise many kinds here
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise PlannerError(f"{path}: cannot load the model folder ({type(exc).__name__}: {first})") from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe, family
