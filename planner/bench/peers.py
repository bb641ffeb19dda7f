"""Peer caching tools, run for real on our pipelines: diffusers' FirstBlockCache and TaylorSeer hooks,
and cache-dit's DBCache with and without its TaylorSeer calibrator.

Every peer setting gets its own deep copy of the pipeline (``clone_runner``), so no peer's hooks,
patched forwards or patched pipeline ``__call__`` (cache-dit patches the pipeline *class*; the copy
gets a private subclass) ever touch the model that the reference and our plans run on.

How the diffusers hooks are applied to models without ``CacheMixin`` (DiT, PixArt, SD3): diffusers'
``CacheMixin.enable_cache`` is nothing but ``apply_first_block_cache`` / ``apply_taylorseer_cache`` on
the transformer plus a refresh of the hook registry's child cache; its pipelines then wrap each
transformer call in ``transformer.cache_context(name)`` and reset the hooks' state at the end of the
call (``maybe_free_model_hooks`` -> ``_reset_stateful_cache``). We do the same: apply the hook, set
one cache context around the whole call (our pipelines make one batched-CFG transformer call per
step, which diffusers' pipelines name ``"cond_uncond"``, or ``"cond"`` without CFG) and reset the
stateful hooks after it. Models with ``CacheMixin`` (Flux, Wan) use ``enable_cache`` and their
pipelines' own contexts.

cache-dit on a custom pipeline: a ``BlockAdapter`` naming the transformer, its block list and the
blocks' forward pattern (DiT's blocks take and return ``hidden_states`` only: ``Pattern_3``), with
cache-dit's own ``DiTPatchFunctor`` for DiT transformers; pipelines cache-dit supports by name use
its registered adapters.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from planner.errors import PlannerError

PEERS = ("diffusers-fbcache", "diffusers-taylorseer", "cache-dit-dbcache", "cache-dit-dbcache-taylorseer")

# Knob values traced per peer, from least to most aggressive, chosen on digits-dit (DDIM 50, guidance
# 3) to span its useful range (override with ``--sweep NAME=v1,v2``): FirstBlockCache 1.3x-3x
# (below 0.05 it never caches); TaylorSeer 2x-4x (interval 2 is its least aggressive setting);
# DBCache 1.1x-2.3x: with cache-dit's default 8 warm-up steps it goes no faster, and beyond 0.48
# quality collapses (0.8: 16 dB).
DEFAULT_SWEEPS: dict[str, list[float]] = {
    "diffusers-fbcache": [0.05, 0.08, 0.12, 0.16, 0.24, 0.32],  # FirstBlockCacheConfig.threshold
    "diffusers-taylorseer": [2, 3, 4, 5, 6, 8],  # TaylorSeerCacheConfig.cache_interval
    "cache-dit-dbcache": [0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48],  # DBCacheConfig.residual_diff_threshold
    "cache-dit-dbcache-taylorseer": [0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48],
}
KNOBS = {
    "diffusers-fbcache": "threshold",
    "diffusers-taylorseer": "cache_interval",
    "cache-dit-dbcache": "residual_diff_threshold",
    "cache-dit-dbcache-taylorseer": "residual_diff_threshold",
}
INSTALL_HINT = "pip install 'dit-cache-planner[bench]'"


class PeerUnavailable(Exception):
    """A peer cannot run here (its package is missing, or it cannot drive this model): skip it, say why."""


@dataclass
class PeerRun:
    """A peer installed on its own copy of the pipeline: ``run(conditions, seeds, sampler)`` samples."""

    method: str
    setting: str
    run: Callable[[list, list, Any], Any]


def clone_runner(runner):
    """A Runner on a deep copy of ``runner``'s pipeline, whose class is a private subclass of the original
    (cache-dit patches ``__call__`` on the pipeline class); it keeps every option of ``runner`` (sampler
    defaults, meter, prompts, negative prompt, call arguments: :meth:`Runner.with_pipe`)."""
    pipe = copy.deepcopy(runner.pipe)
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__})
    return runner.with_pipe(pipe)


def parse_sweeps(items: list[str]) -> dict[str, list[float]]:
    """``["diffusers-fbcache=0.05,0.1"]`` -> ``{"diffusers-fbcache": [0.05, 0.1]}`` (PlannerError on bad input)."""
    sweeps: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in PEERS:
            raise PlannerError(f"--sweep takes PEER=v1,v2,... with PEER one of {', '.join(PEERS)}, got {item!r}")
        try:
            sweeps[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise PlannerError(f"--sweep {name}: values must be numbers, got {values!r}") from None
        if not sweeps[name]:
            raise PlannerError(f"--sweep {name}: give at least one value")
        if any(v < 0 for v in sweeps[name]):
            raise PlannerError(f"--sweep {name}: values must not be negative")
        if KNOBS[name] == "cache_interval" and any(v < 1 or v != int(v) for v in sweeps[name]):
            raise PlannerError(f"--sweep {name}: cache intervals are whole numbers of at least 1")
    return sweeps


def peer_runs(runner, sampler, peers: list[str], sweeps: dict[str, list[float]] | None = None
              ) -> tuple[list[PeerRun], dict[str, str]]:
    """Install every setting of every peer named in ``peers`` on its own pipeline copy.

    Returns the installed runs and, per peer that cannot run, the one-line reason it was skipped
    (e.g. the ``[bench]`` extra not installed).
    """
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise PlannerError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)}")
    sweeps = {**DEFAULT_SWEEPS, **(sweeps or {})}
    runs, skipped = [], {}
    for peer in peers:
        try:
            runs.extend(_INSTALLERS[peer](runner, sampler, peer, value) for value in sweeps[peer])
        except PeerUnavailable as exc:
            skipped[peer] = str(exc)
    return runs, skipped


def _setting(peer: str, value: float) -> str:
    knob = KNOBS[peer]
    return f"{knob}={int(value) if knob == 'cache_interval' else value:g}"


# --------------------------------------------------------------------------- diffusers hooks


def _diffusers_hooks():
    try:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            HookRegistry,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_taylorseer_cache,
        )
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        from diffusers.models.cache_utils import CacheMixin
    except ImportError as exc:
        raise PeerUnavailable(f"this diffusers has no FirstBlockCache/TaylorSeer hooks ({exc}); diffusers >= 0.36 has") from None
    return {
        "FirstBlockCacheConfig": FirstBlockCacheConfig, "TaylorSeerCacheConfig": TaylorSeerCacheConfig,
        "apply_first_block_cache": apply_first_block_cache, "apply_taylorseer_cache": apply_taylorseer_cache,
        "HookRegistry": HookRegistry, "CacheContext": CacheContext, "set_context": _set_cache_context,
        "CacheMixin": CacheMixin,
    }


def _install_diffusers(runner, sampler, peer: str, value: float) -> PeerRun:
    import torch

    from planner.cfg import CfgLayout

    d = _diffusers_hooks()
    layout = runner.cfg_layout(sampler)
    copy_runner = clone_runner(runner)
    transformer = copy_runner.transformer
    if peer == "diffusers-fbcache":
        config = d["FirstBlockCacheConfig"](threshold=float(value))
        apply = d["apply_first_block_cache"]
    else:
        # Default identifiers name attention modules ("...attn"), which DiT's "attn1" does not match:
        # name the transformer blocks, so TaylorSeer forecasts whole block outputs (what its paper caches).
        blocks = [m.name for m in copy_runner.modules() if m.kind == "block"]
        config = d["TaylorSeerCacheConfig"](
            cache_interval=int(value), max_order=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[re.escape(b) for b in blocks],
        )
        apply = d["apply_taylorseer_cache"]
    registry = d["HookRegistry"].check_if_exists_or_initialize(transformer)
    if isinstance(transformer, d["CacheMixin"]):
        transformer.enable_cache(config)  # the pipeline opens its own cache contexts and resets the state
        own_context = None
    else:
        if layout == CfgLayout.SEPARATE:
            raise PeerUnavailable(f"{peer}: {type(transformer).__name__} has no CacheMixin and its pipeline calls "
                                  "it twice per step; no cache context can tell the two calls apart")
        apply(transformer, config)
        registry.invalidate_child_registries_cache()
        own_context = "cond" if layout == CfgLayout.NONE else "cond_uncond"

    def run(conditions, seeds, smp):
        if own_context is None:
            return copy_runner.run(conditions, seeds, smp)
        d["set_context"](transformer, d["CacheContext"](own_context))
        try:
            return copy_runner.run(conditions, seeds, smp)
        finally:
            d["set_context"](transformer, None)
            registry.reset_stateful_hooks(recurse=True)

    return PeerRun(peer, _setting(peer, value), run)


# --------------------------------------------------------------------------- cache-dit


def _cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read at import: its info logs flood the console
    try:
        import cache_dit
    except ImportError:
        raise PeerUnavailable(f"cache-dit is not installed ({INSTALL_HINT})") from None
    return cache_dit


def _install_cache_dit(runner, sampler, peer: str, value: float) -> PeerRun:
    cache_dit = _cache_dit()
    from cache_dit import (
        BlockAdapter,
        DBCacheConfig,
        ForwardPattern,
        TaylorSeerCalibratorConfig,
    )
    from cache_dit.caching.block_adapters import BlockAdapterRegister
    from diffusers import DiTTransformer2DModel

    copy_runner = clone_runner(runner)
    pipe = copy_runner.pipe
    transformer = pipe.transformer
    if isinstance(transformer, DiTTransformer2DModel):
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        target = BlockAdapter(pipe=pipe, transformer=transformer, blocks=transformer.transformer_blocks,
                              forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                              check_forward_pattern=True)
    elif BlockAdapterRegister.is_supported(pipe):
        target = pipe
    else:
        raise PeerUnavailable(f"{peer}: cache-dit has no block adapter for {type(pipe).__name__}")
    # F1B0: the first block decides, as in FirstBlockCache (cache-dit's default F8 would be the whole
    # 8-block model); warm-up and the rest are cache-dit's defaults.
    config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=float(value),
                           num_inference_steps=sampler.steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if peer.endswith("taylorseer") else None
    cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)
    return PeerRun(peer, _setting(peer, value), lambda c, s, smp: copy_runner.run(c, s, smp))


_INSTALLERS: dict[str, Callable[..., PeerRun]] = {
    "diffusers-fbcache": _install_diffusers,
    "diffusers-taylorseer": _install_diffusers,
    "cache-dit-dbcache": _install_cache_dit,
    "cache-dit-dbcache-taylorseer": _install_cache_dit,
}
