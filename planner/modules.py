"""Which modules of a diffusers transformer a cache plan can address, and a fingerprint of them.

A *cacheable module* is a transformer block, or inside a block its self-attention
(``attn``), cross-attention (``cross_attn``) or feed-forward (``mlp``). Names are the
dotted module paths of ``transformer.named_modules()`` (``transformer_blocks.3.attn1``), so a
plan is keyed exactly as diffusers' ``_tp_plan`` is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# Lists of blocks, in the order a forward pass runs them.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")

# Child name inside a block -> kind. Covers BasicTransformerBlock (DiT, PixArt), JointTransformerBlock
# (SD3), Flux's double/single blocks and WanTransformerBlock.
SUBMODULE_KINDS = {
    "attn": "attn",
    "attn1": "attn",
    "attn2": "cross_attn",
    "ff": "mlp",
    "ffn": "mlp",
    "ff_context": "mlp",
    "proj_mlp": "mlp",
    "img_mlp": "mlp",  # Qwen-Image
    "txt_mlp": "mlp",
}

KINDS = ("block", "attn", "cross_attn", "mlp")
SUBLAYER_KINDS = ("attn", "cross_attn", "mlp")
# The granularity a strategy caches at: whole blocks, or the attention/MLP sub-layers inside them.
LEVEL_KINDS = {"block": ("block",), "sublayer": SUBLAYER_KINDS}
LEVELS = tuple(LEVEL_KINDS)


@dataclass(frozen=True)
class CacheableModule:
    """One module a plan may cache: its dotted name, its kind and the index of its block."""

    name: str
    kind: str
    block: int  # position of the enclosing block in forward order (across all block lists)
    cls: str


def module_kind(name: str) -> tuple[str, str | None]:
    """``(kind, parent block name)`` of a cacheable module name: ``("block", None)`` or e.g.
    ``("attn", "transformer_blocks.3")``; other names give ``("unknown", None)``. Needs no model."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in BLOCK_LISTS and parts[-1].isdigit():
        return "block", None
    if len(parts) >= 3 and parts[-3] in BLOCK_LISTS and parts[-2].isdigit() and parts[-1] in SUBMODULE_KINDS:
        return SUBMODULE_KINDS[parts[-1]], ".".join(parts[:-1])
    return "unknown", None


def cacheable_modules(transformer) -> list[CacheableModule]:
    """All cacheable modules of ``transformer`` in forward order: each block followed by its sub-layers.

    A :class:`planner.executor.pair.TransformerPair` (a pipeline's several transformers seen as one) lists
    the first transformer's modules as they are, then each further one's with its component name as a
    prefix (``transformer_2.blocks.0``)."""
    found: list[CacheableModule] = []
    parts = [("", transformer)] + [(f"{c}.", t) for c, t in getattr(transformer, "planner_components", {}).items()]
    for prefix, model in parts:
        found += _blocks_of(model, prefix, 1 + max((m.block for m in found), default=-1))
    return found


def _blocks_of(transformer, prefix: str, first_block: int) -> list[CacheableModule]:
    import torch  # here, so that plan files can be read without importing torch

    found: list[CacheableModule] = []
    block_index = first_block
    for list_name in BLOCK_LISTS:
        blocks = getattr(transformer, list_name, None)
        if not isinstance(blocks, torch.nn.ModuleList):
            continue
        for i, block in enumerate(blocks):
            name = f"{prefix}{list_name}.{i}"
            found.append(CacheableModule(name, "block", block_index, type(block).__name__))
            for child_name, child in block.named_children():
                kind = SUBMODULE_KINDS.get(child_name)
                if kind == "cross_attn" and getattr(child, "is_cross_attention", True) is False:
                    kind = "attn"  # SD3.5's second attention is a self-attention
                if kind is not None and child is not None:
                    found.append(CacheableModule(f"{name}.{child_name}", kind, block_index, type(child).__name__))
            block_index += 1
    return found


def modules_at_level(modules, level: str) -> list[str]:
    """Names of ``modules`` (``CacheableModule``-like: ``.name``, ``.kind``) at ``level`` (``block`` or ``sublayer``)."""
    return [m.name for m in modules if m.kind in LEVEL_KINDS[level]]


def transformer_of(obj):
    """The transformer inside a Runner or pipeline, or ``obj`` itself (a transformer)."""
    if hasattr(obj, "pipe") and hasattr(obj, "family"):  # Runner (for Wan 2.2 its transformer is a TransformerPair)
        inner = obj.transformer
        return getattr(inner, "_orig_mod", inner)
    inner = getattr(obj, "transformer", None)
    if inner is not None and not isinstance(obj, type) and hasattr(inner, "named_modules"):
        return getattr(inner, "_orig_mod", inner)  # torch.compile wraps a module: the module inside is the model
    return getattr(obj, "_orig_mod", obj)


def class_name(transformer) -> str:
    """The class a plan records for ``transformer``: its own, or for a TransformerPair its first transformer's."""
    return getattr(transformer, "planner_class", None) or type(transformer).__name__


def model_fingerprint(transformer) -> str:
    """A short hash of the transformer's class, config and cacheable-module structure.

    Two models with equal fingerprints accept the same plans; weights are deliberately not
    hashed (a fine-tune keeps its plan's validity, if not its quality).
    """
    config = dict(getattr(transformer, "config", {}) or {})
    payload = {
        "class": class_name(transformer),
        "config": {k: v for k, v in sorted(config.items()) if not k.startswith("_")},
        "modules": [(m.name, m.kind, m.cls) for m in cacheable_modules(transformer)],
    }
    others = getattr(transformer, "planner_components", {})
    if others:  # a TransformerPair: the other transformers' configs too (single models hash as before)
        payload["components"] = {c: model_fingerprint(t) for c, t in others.items()}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
