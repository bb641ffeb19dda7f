"""Loading a pipeline the way its owner would: a folder, a Hugging Face repo id already in the local
cache, or custom code; with a dtype, a device and optional CPU offload.

Model specs (``--model``):

* a name of the zoo (``digits-dit``, ``tiny:flux``, ...: :mod:`planner.zoo`);
* a folder written by ``save_pretrained`` (``model_index.json`` inside), loaded by diffusers'
  ``DiffusionPipeline.from_pretrained`` with its text encoders, tokenizers and VAE;
* a Hugging Face repo id (``org/name``), resolved in the local cache only (``--revision``,
  ``--variant``): nothing is downloaded, and a repo that is not cached is a one-line error saying so;
* ``module:function``: a function of an importable module that returns a pipeline.
"""

from __future__ import annotations

import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlannerError

DTYPES = ("float32", "bfloat16", "float16")
OFFLOAD = ("none", "model", "sequential")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Loaded:
    """A loaded pipeline and what plans and profiles record about where it came from."""

    pipe: Any
    spec: str
    revision: str | None = None  # the snapshot's commit for a hub model


def torch_dtype(name: str | None):
    """The torch dtype named ``float32``, ``bfloat16`` or ``float16`` (``None`` stays ``None``)."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise PlannerError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_pipeline(spec: str, *, revision: str | None = None, variant: str | None = None,
                  dtype: str | None = None) -> Loaded:
    """The pipeline ``spec`` names (see the module docstring); PlannerError (one line) when it cannot be loaded."""
    from planner.zoo import MODELS

    if spec in MODELS:
        if revision or variant:
            raise PlannerError(f"{spec} is a model of the planner's zoo: it has no --revision or --variant")
        pipe = MODELS[spec].loader()
        return Loaded(_with_dtype(pipe, dtype), spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PlannerError(f"{path}: not a pipeline folder (no model_index.json; write one with save_pretrained)")
        return Loaded(load_folder(path, variant=variant, dtype=dtype), str(path))
    if names_a_function(spec):
        return Loaded(_with_dtype(_from_function(spec), dtype), spec)
    if _REPO_ID.fullmatch(spec) and not path.exists():
        folder, commit = cached_snapshot(spec, revision)
        return Loaded(load_folder(folder, variant=variant, dtype=dtype), spec, commit)
    raise PlannerError(f"unknown model {spec!r}: use a zoo name ({', '.join(MODELS)}), a folder written by "
                       "save_pretrained, a Hugging Face repo id in the local cache, or module:function")


def load_folder(path: Path, *, variant: str | None = None, dtype: str | None = None):
    """A ``save_pretrained`` folder through diffusers' ``from_pretrained``; components saved as ``None``
    (e.g. text encoders left out) stay ``None``."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from planner.artifact import loads_json
    from planner.io import read_text_limited

    index_file = Path(path) / "model_index.json"
    index = loads_json(read_text_limited(index_file, "model_index.json", 1 << 20), str(index_file))
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise PlannerError(f"{index_file}: no \"_class_name\": not a pipeline folder")
    cls = getattr(diffusers, index["_class_name"], None)
    if cls is None:
        if index["_class_name"] == "DigitsDiTPipeline":
            from planner.zoo.digits import DigitsDiTPipeline as cls
        else:
            raise PlannerError(f"{path}: pipeline class {index['_class_name']!r} is not in diffusers")
    missing = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    diffusers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = dict(missing)
    if variant:
        kwargs["variant"] = variant
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)  # diffusers 0.42 calls the old name torch_dtype deprecated
    # Warnings raised on the way are shown only when the folder loads: for a damaged folder they are
    # noise around the one-line error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _quiet():
                pipe = cls.from_pretrained(str(path), **kwargs)
        except (PlannerError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers, transformers, safetensors and torch raise many kinds here
            text = str(exc).strip().splitlines()
            raise PlannerError(f"{path}: cannot load the pipeline ({type(exc).__name__}: "
                               f"{text[0][:200] if text else ''})") from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cached_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """``(folder, commit)`` of a repo in the local Hugging Face cache; PlannerError saying how to fetch it
    when it is not there (nothing is ever downloaded)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        where = constants.HF_HUB_CACHE
        at = f" at revision {revision}" if revision else ""
        raise PlannerError(f"model {repo_id!r}{at} is not in the local Hugging Face cache ({where}): fetch it where "
                           f"there is network (huggingface-cli download {repo_id}) or give a folder") from None
    return folder, folder.name


def names_a_function(spec: str) -> bool:
    """Whether loading ``spec`` would import a module and call a function of it (``module:function``), that is
    run code, rather than read a zoo model or a pipeline folder."""
    from planner.zoo import MODELS

    return spec not in MODELS and bool(_FUNCTION.fullmatch(spec)) and not Path(spec).exists()


def _from_function(spec: str):
    module_name, function = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlannerError(f"{spec}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise PlannerError(f"{spec}: {module_name} has no function {function}")
    try:
        pipe = fn()
    except (Exception, SystemExit) as exc:  # the user's factory: its failure is an error of the spec, in one line
        raise PlannerError(f"{spec}: calling {function}() failed ({type(exc).__name__}: {exc})") from exc
    if getattr(pipe, "transformer", None) is None:
        raise PlannerError(f"{spec} returned a {type(pipe).__name__}, not a pipeline with a transformer")
    return pipe


def _with_dtype(pipe, dtype: str | None):
    """``pipe`` in ``dtype`` (cast only when its transformer is in another: diffusers warns at every cast)."""
    if dtype is not None and pipe.transformer.dtype != torch_dtype(dtype):
        pipe.to(torch_dtype(dtype))
    return pipe


def place(pipe, device: str, offload: str = "none") -> None:
    """Put ``pipe`` on ``device``, or with ``offload`` keep it on the CPU and let diffusers' offload hooks
    move each model (``model``) or each layer (``sequential``) to ``device`` when it runs."""
    if offload not in OFFLOAD:
        raise PlannerError(f"unknown --offload {offload!r}: use one of {', '.join(OFFLOAD)}")
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)


class _quiet:
    """transformers' and diffusers' warnings muted while loading (e.g. a missing torchvision)."""

    def __enter__(self):
        from diffusers.utils import logging as d_logging
        from transformers.utils import logging as t_logging

        self.levels = t_logging.get_verbosity(), d_logging.get_verbosity()
        self.bar = t_logging.is_progress_bar_enabled()
        t_logging.set_verbosity_error()
        d_logging.set_verbosity_error()
        t_logging.disable_progress_bar()  # transformers' "Loading weights" bar of each text encoder

    def __exit__(self, *exc):
        from diffusers.utils import logging as d_logging
        from transformers.utils import logging as t_logging

        t_logging.set_verbosity(self.levels[0])
        d_logging.set_verbosity(self.levels[1])
        if self.bar:
            t_logging.enable_progress_bar()
