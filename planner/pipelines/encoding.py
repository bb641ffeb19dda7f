"""Prompts through the pipeline's own ``encode_prompt``, once: embeddings cached in memory and on disk.

Each prompt is encoded alone (batch 1), so its embedding does not depend on what it is batched with;
a batch stacks the rows, padding the sequence axis where encoders give prompts different lengths.
On disk the rows go to ``<cache>/<model key>/<prompt key>-<settings>.safetensors``: the model key
hashes the text encoders and tokenizers (class, config, a sample of every weight), the settings the
arguments ``encode_prompt`` got (sequence length, instructions, ...). With the embeddings cached the
text encoders are not needed while profiling, searching or evaluating: ``release_text_encoders``
takes them off the pipeline.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from planner.errors import PlannerError
from planner.pipelines.prompts import Prompt

# Part of every cache key: bump it when what is stored for a prompt changes.
CACHE_FORMAT = 2
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dit-cache-planner" / "embeddings"
# What encode_prompt may take that the planner fills itself (the others come from __call__'s defaults).
_OWN_ARGS = {"prompt", "negative_prompt", "do_classifier_free_guidance", "device", "dtype", "num_images_per_prompt",
             "num_videos_per_prompt", "batch_size"}


def cache_dir() -> Path:
    """Where embeddings are cached: ``$PLANNER_EMBEDDING_CACHE``, else ``~/.cache/dit-cache-planner/embeddings``."""
    return Path(os.environ.get("PLANNER_EMBEDDING_CACHE", DEFAULT_CACHE))


def text_components(pipe) -> dict[str, Any]:
    """The pipeline's text encoders and tokenizers (components whose name says so), by component name."""
    return {name: c for name, c in pipe.components.items()
            if c is not None and (name.startswith("text_encoder") or name.startswith("tokenizer"))}


def model_key(pipe) -> str:
    """A short hash of the text encoders and tokenizers: class, config and a sample of every weight."""
    h = hashlib.sha256(type(pipe).__name__.encode())
    for name, component in sorted(text_components(pipe).items()):
        h.update(f"{name}:{type(component).__name__}".encode())
        config = getattr(component, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            h.update(config.to_json_string(use_diff=False).encode())
        if isinstance(component, torch.nn.Module):
            for pname, p in component.named_parameters():
                h.update(f"{pname}:{tuple(p.shape)}:{p.dtype}".encode())
                if p.device.type != "meta":  # sequential offload keeps weights elsewhere: shapes only then
                    h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
        else:  # a tokenizer: its vocabulary and special tokens
            vocab = getattr(component, "get_vocab", lambda: {})()
            h.update(json.dumps([len(vocab), sorted(vocab.items())[:2048], str(getattr(component, "all_special_tokens", ""))]).encode())
    return h.hexdigest()[:16]


class PromptEncoder:
    """Encodes prompts with ``pipe.encode_prompt`` into the ``pipe(...)`` keyword arguments they stand for.

    ``returns`` names what ``encode_prompt`` returns, in order (``None`` for outputs ``pipe(...)``
    does not take); ``negative_in_encode`` says whether one call also encodes the negative prompt
    (otherwise a second call does, and its outputs get a ``negative_`` prefix); ``settings`` are extra
    ``encode_prompt`` arguments (e.g. ``clean_caption=False``).
    """

    def __init__(self, pipe, returns: Sequence[str | None], negative_in_encode: bool, settings: dict | None = None,
                 cache: Path | None = None):
        if not hasattr(pipe, "encode_prompt"):
            raise PlannerError(f"{type(pipe).__name__} has no encode_prompt: it takes no text")
        if not any(name.startswith("text_encoder") for name in text_components(pipe)):
            raise PlannerError(f"{type(pipe).__name__} was loaded without its text encoders: prompts cannot be encoded")
        self.pipe = pipe
        self.returns = tuple(returns)
        self.negative_in_encode = negative_in_encode
        self.call_names = set(inspect.signature(type(pipe).__call__).parameters)
        self.args = self._encode_args(settings or {})
        self.cache = cache
        self.key = model_key(pipe)
        key = [CACHE_FORMAT, self.args, self.returns, negative_in_encode]
        self.settings_digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self._rows: dict[str, dict[str, torch.Tensor | None]] = {}

    def _encode_args(self, settings: dict) -> dict[str, Any]:
        """``encode_prompt``'s arguments that ``pipe(...)`` would pass from its own defaults, then ``settings``."""
        encode = inspect.signature(self.pipe.encode_prompt).parameters
        call = inspect.signature(type(self.pipe).__call__).parameters
        out = {}
        for name, param in encode.items():
            if name in _OWN_ARGS or "embeds" in name or "mask" in name or name not in call:
                continue
            default = call[name].default
            if default is not inspect.Parameter.empty and default is not None:
                out[name] = default
        out.update({k: v for k, v in settings.items() if k in encode})
        return out

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``pipe(...)`` for ``prompts`` in this order (rows stacked, CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if p.key not in self._rows]
        for p in missing:
            self._rows[p.key] = self._load(p) or self._store(p, self._encode_one(p))
        return stack_rows([self._rows[p.key] for p in prompts])

    def _encode_one(self, prompt: Prompt) -> dict[str, torch.Tensor | None]:
        if not any(name.startswith("text_encoder") for name in text_components(self.pipe)):
            raise PlannerError(f"cannot encode {prompt.prompt!r}: the text encoders were released; encode every "
                               "prompt a run needs before releasing them")
        rows = self._call(prompt.prompt, prompt.negative_prompt or "")
        if not self.negative_in_encode and any(n.startswith("negative_") for n in self.call_names):
            negative = self._call(prompt.negative_prompt or "", "")
            rows.update({f"negative_{k}": v for k, v in negative.items() if f"negative_{k}" in self.call_names})
        return rows

    @torch.no_grad()
    def _call(self, prompt: str, negative: str) -> dict[str, torch.Tensor | None]:
        pipe = self.pipe
        params = inspect.signature(pipe.encode_prompt).parameters
        kwargs: dict[str, Any] = {"prompt": [prompt], **self.args}
        own = {"negative_prompt": [negative], "do_classifier_free_guidance": True, "num_images_per_prompt": 1,
               "num_videos_per_prompt": 1, "batch_size": 1, "device": pipe._execution_device,
               "dtype": pipe.transformer.dtype}
        kwargs.update({k: v for k, v in own.items() if k in params})
        for name, param in params.items():  # SD3's prompt_2, prompt_3: required, None means "the same prompt"
            if name not in kwargs and param.default is inspect.Parameter.empty and name.startswith(("prompt_", "negative_prompt_")):
                kwargs[name] = None
        out = pipe.encode_prompt(**kwargs)
        out = out if isinstance(out, tuple) else (out,)
        if len(out) != len(self.returns):
            raise PlannerError(f"{type(pipe).__name__}.encode_prompt returned {len(out)} values, expected "
                               f"{len(self.returns)} ({', '.join(n or '-' for n in self.returns)}): another diffusers version?")
        rows = {}
        for name, value in zip(self.returns, out):
            if name is None or name not in self.call_names:
                continue
            if value is not None and not isinstance(value, torch.Tensor):
                raise PlannerError(f"{type(pipe).__name__}.encode_prompt gave {name} as {type(value).__name__}, not a tensor")
            rows[name] = None if value is None else value.detach().to("cpu")
        for name, value in list(rows.items()):  # a mask left out because it is all ones, made explicit
            embeds = rows.get(_masked(name))
            if value is None and isinstance(embeds, torch.Tensor):
                rows[name] = torch.ones(embeds.shape[:2], dtype=torch.long)
        return rows

    # ------------------------------------------------------------------ the disk cache
    def _path(self, prompt: Prompt) -> Path | None:
        return None if self.cache is None else self.cache / self.key / f"{prompt.key}-{self.settings_digest}.safetensors"

    def _load(self, prompt: Prompt) -> dict | None:
        path = self._path(prompt)
        if path is None or not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError):
            return None  # a damaged cache entry is encoded again
        return {k: v for k, v in tensors.items()}

    def _store(self, prompt: Prompt, rows: dict) -> dict:
        path = self._path(prompt)
        if path is not None:
            from safetensors.torch import save_file

            from planner.io import write_atomic

            present = {k: v.contiguous() for k, v in rows.items() if v is not None}
            try:
                write_atomic(path, lambda tmp: save_file(present, str(tmp), metadata={"prompt_key": prompt.key}))
            except OSError:
                pass  # an unwritable cache only costs encoding again next time
        return rows


def stack_rows(rows: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """One batch from per-prompt rows: tensors concatenated along the batch; where the sequence lengths
    differ (encoders that do not pad to a fixed length) zero-padded along dim 1 (masks too: the padding
    is masked out)."""
    names = dict.fromkeys(n for r in rows for n in r)
    out = {}
    for name in names:
        parts = [r.get(name) for r in rows]
        if all(p is None for p in parts):
            continue
        if len({p.shape[1:] for p in parts}) > 1:
            longest = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, longest - p.shape[1])) for p in parts]
        out[name] = torch.cat(parts)
    return out


def _masked(mask_name: str) -> str:
    """The embeddings a mask belongs to: ``prompt_embeds_mask`` and ``prompt_attention_mask`` mask ``prompt_embeds``."""
    if "mask" not in mask_name:
        return ""
    return mask_name.replace("_attention_mask", "_embeds").replace("_mask", "")


def release_text_encoders(pipe) -> list[str]:
    """Take the text encoders off the pipeline (embeddings are cached): frees their memory. Returns their names."""
    names = [n for n, c in text_components(pipe).items() if n.startswith("text_encoder")]
    pipe.register_modules(**{n: None for n in names})
    return names
