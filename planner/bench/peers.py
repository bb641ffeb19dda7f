"""Peer caching tools, run for real on our pipelines: diffusers' FirstBlockCache, TaylorSeer, MagCache,
Pyramid Attention Broadcast and FasterCache hooks, and cache-dit's DBCache at three block splits
(F1B0, F2B1, F4B0), each with and without its TaylorSeer calibrator.

A peer's settings are every value of its main knob (``DEFAULT_SWEEPS``, ``--sweep``) and, for the peers
with a warm-up knob, each of those with every warm-up traced (``DEFAULT_WARMUPS``, ``--peer-warmups``).

Every peer setting gets its own deep copy of the pipeline (``clone_runner``), so no peer's hooks,
patched forwards or patched pipeline ``__call__`` (cache-dit patches the pipeline *class*; the copy
gets a private subclass) ever touch the model that the reference and our plans run on.

How the diffusers hooks are applied to models without ``CacheMixin`` (DiT, PixArt, SD3): diffusers'
``CacheMixin.enable_cache`` is nothing but ``apply_<method>`` on the transformer plus a refresh of the
hook registry's child cache; its pipelines then wrap each transformer call in
``transformer.cache_context(name)`` and reset the hooks' state at the end of the call
(``maybe_free_model_hooks`` -> ``_reset_stateful_cache``). We do the same: apply the hook, set one
cache context around the whole call (our pipelines make one batched-CFG transformer call per step,
which diffusers' pipelines name ``"cond_uncond"``, or ``"cond"`` without CFG) and reset the stateful
hooks after it. Models with ``CacheMixin`` (Flux, Wan) use ``enable_cache`` and their pipelines' own
contexts.

MagCache needs magnitude ratios of the model; they come from its own ``calibrate=True`` mode, run
once on the calibration inputs (seeds 0..N-1, the ones our searches calibrate on) on a separate
copy; the ratios it prints at the end of each run (one list per cache context and batch) are
averaged step by step and passed as ``mag_ratios``. Pyramid Attention Broadcast and FasterCache
read the current timestep through a callback: the pipeline's ``current_timestep`` where it has one,
else the ``timestep`` argument of the transformer's last call. Both keep one state per attention
module rather than per cache context, so on a pipeline that calls the transformer twice per step
(``separate`` CFG) the second call would reuse the first's attention: there they are unavailable.
FasterCache's CFG cache assumes ``[uncond, cond]`` batches; on a ``[cond, uncond]`` pipeline (DiT)
it runs its attention cache alone (``is_guidance_distilled=True``), which its setting says.

cache-dit on a custom pipeline: a ``BlockAdapter`` naming the transformer, its block list and the
blocks' forward pattern (DiT's blocks take and return ``hidden_states`` only: ``Pattern_3``), with
cache-dit's own ``DiTPatchFunctor`` for DiT transformers; pipelines cache-dit supports by name use
its registered adapters.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from planner.errors import PlannerError

# cache-dit's DBCache at three splits: F compute blocks first (their residual decides), B last.
DBCACHE_SPLITS = {"cache-dit-dbcache": (1, 0), "cache-dit-dbcache-F2B1": (2, 1), "cache-dit-dbcache-F4B0": (4, 0)}
DBCACHE_PEERS = tuple(name + suffix for name in DBCACHE_SPLITS for suffix in ("", "-taylorseer"))
PEERS = ("diffusers-fbcache", "diffusers-taylorseer", "diffusers-magcache", "diffusers-pab", "diffusers-fastercache",
         *DBCACHE_PEERS)

# Knob values traced per peer, from least to most aggressive, chosen on digits-dit (DDIM 50, guidance
# 3) to span its useful range (override with ``--sweep NAME=v1,v2``): FirstBlockCache 1.3x-3x
# (below 0.05 it never caches); TaylorSeer 2x-4x (interval 2 is its least aggressive setting);
# DBCache 1.1x-2.3x: with cache-dit's default 8 warm-up steps it goes no faster, and beyond 0.48
# quality collapses (0.8: 16 dB). MagCache's accumulated-error threshold (0.06 is its default);
# PAB's and FasterCache's attention skip ranges (2 is their default).
DBCACHE_SWEEP = [0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48]
DEFAULT_SWEEPS: dict[str, list[float]] = {
    "diffusers-fbcache": [0.05, 0.08, 0.12, 0.16, 0.24, 0.32],  # FirstBlockCacheConfig.threshold
    "diffusers-taylorseer": [2, 3, 4, 5, 6, 8],  # TaylorSeerCacheConfig.cache_interval
    "diffusers-magcache": [0.005, 0.01, 0.02, 0.04, 0.1, 0.2],  # MagCacheConfig.threshold
    "diffusers-pab": [2, 3, 4, 6],  # PyramidAttentionBroadcastConfig.spatial_attention_block_skip_range
    "diffusers-fastercache": [2, 3, 4, 6],  # FasterCacheConfig.spatial_attention_block_skip_range
    **{name: list(DBCACHE_SWEEP) for name in DBCACHE_PEERS},  # DBCacheConfig.residual_diff_threshold
}
KNOBS = {
    "diffusers-fbcache": "threshold",
    "diffusers-taylorseer": "cache_interval",
    "diffusers-magcache": "threshold",
    "diffusers-pab": "skip_range",
    "diffusers-fastercache": "skip_range",
    **{name: "residual_diff_threshold" for name in DBCACHE_PEERS},
}
WHOLE_KNOBS = {"cache_interval", "skip_range"}  # knobs that count calls: whole numbers of at least 1

# A peer's warm-up: the first sampling steps it always computes, each peer in its own knob (MagCache's is a
# fraction of the steps). Every warm-up traced is run with every value of the main knob: a shorter warm-up
# is a faster point of the same peer, and its front takes whichever is better. TaylorSeer's front at 2x and
# 3x rises a lot with a 1-step warm-up and a longer one helps at its slowest points, so 1, its default 3 and
# 5 are traced; other warm-ups left MagCache's and DBCache's fronts where they were or below TaylorSeer's
# (benchmarks/results/peer_warmups.md), so they keep their own default unless ``--peer-warmups`` asks: each
# warm-up traced runs the whole sweep again.
WARMUP_KNOBS = {
    "diffusers-taylorseer": "disable_cache_before_step",
    "diffusers-magcache": "retention_ratio",
    **{name: "max_warmup_steps" for name in DBCACHE_PEERS},
}
DEFAULT_WARMUPS: dict[str, list[int]] = {"diffusers-taylorseer": [1, 3, 5]}
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
    sweeps = _peer_values(items, "--sweep")
    for name, values in sweeps.items():
        if KNOBS[name] in WHOLE_KNOBS and any(v < 1 or v != int(v) for v in values):
            raise PlannerError(f"--sweep {name}: {KNOBS[name]} takes whole numbers of at least 1")
    return sweeps


def parse_warmups(items: list[str]) -> dict[str, list[int]]:
    """``["diffusers-taylorseer=1,3"]`` -> ``{"diffusers-taylorseer": [1, 3]}``: the warm-ups (steps) traced per
    peer (PlannerError on bad input, or for a peer without a warm-up knob)."""
    warmups = _peer_values(items, "--peer-warmups")
    for name, values in warmups.items():
        if name not in WARMUP_KNOBS:
            raise PlannerError(f"--peer-warmups {name}: this peer has no warm-up knob; these have: "
                               f"{', '.join(WARMUP_KNOBS)}")
        if any(v < 1 or v != int(v) for v in values):
            raise PlannerError(f"--peer-warmups {name}: a warm-up is a whole number of steps, at least 1")
    return {name: [int(v) for v in values] for name, values in warmups.items()}


def _peer_values(items: list[str], flag: str) -> dict[str, list[float]]:
    """``PEER=v1,v2,...`` items -> ``{PEER: [v1, v2, ...]}``, the numbers finite and not negative."""
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in PEERS:
            raise PlannerError(f"{flag} takes PEER=v1,v2,... with PEER one of {', '.join(PEERS)}, got {item!r}")
        try:
            out[name] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise PlannerError(f"{flag} {name}: values must be numbers, got {values!r}") from None
        if not out[name]:
            raise PlannerError(f"{flag} {name}: give at least one value")
        if not all(0 <= v < float("inf") for v in out[name]):
            raise PlannerError(f"{flag} {name}: values must be finite and not negative")
    return out


def check_peers(peers: list[str]) -> None:
    """PlannerError naming the first of ``peers`` the bench does not know."""
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise PlannerError(f"unknown peer {unknown[0]!r}: choose from {', '.join(PEERS)}")


def peer_runs(runner, sampler, peers: list[str], sweeps: dict[str, list[float]] | None = None,
              warmups: dict[str, list[int]] | None = None,
              calib_samples: int = 8) -> tuple[list[PeerRun], dict[str, str]]:
    """Install every setting of every peer named in ``peers`` on its own pipeline copy: each value of its main
    knob (``sweeps``, else :data:`DEFAULT_SWEEPS`) with each of its warm-ups in steps (``warmups``, else
    :data:`DEFAULT_WARMUPS`, else the peer's own default).

    Returns the installed runs and, per peer that cannot run, the one-line reason it was skipped
    (e.g. the ``[bench]`` extra not installed, or a hook that cannot drive this pipeline).
    ``calib_samples``: calibration inputs (seeds 0..N-1) of the peers that calibrate (MagCache).
    """
    check_peers(peers)
    sweeps = {**DEFAULT_SWEEPS, **(sweeps or {})}
    warmups = {**DEFAULT_WARMUPS, **(warmups or {})}
    shared = {"calib_samples": calib_samples}  # what several settings of one peer share (MagCache's ratios)
    runs, skipped = [], {}
    for peer in peers:
        grid = [(value, warmup) for warmup in warmups.get(peer, [None]) for value in sweeps[peer]]
        try:
            runs.extend(_INSTALLERS[peer](runner, sampler, peer, value, warmup, shared) for value, warmup in grid)
        except PeerUnavailable as exc:
            skipped[peer] = str(exc)
    return runs, skipped


def _setting(peer: str, value: float, warmup: int | None, note: str = "") -> str:
    knob = KNOBS[peer]
    text = f"{knob}={int(value) if knob in WHOLE_KNOBS else value:g}"
    if peer in DBCACHE_PEERS:
        f, b = DBCACHE_SPLITS[peer.removesuffix("-taylorseer")]
        text = f"F{f}B{b} {text}"
    if warmup is not None:
        text = f"{text} warmup={warmup}"
    return f"{text} {note}".strip()


# --------------------------------------------------------------------------- diffusers hooks


def _diffusers_hooks():
    try:
        from diffusers.hooks import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            HookRegistry,
            MagCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
            apply_faster_cache,
            apply_first_block_cache,
            apply_mag_cache,
            apply_pyramid_attention_broadcast,
            apply_taylorseer_cache,
        )
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        from diffusers.models.cache_utils import CacheMixin
    except ImportError as exc:
        raise PeerUnavailable(f"this diffusers lacks a cache hook the bench runs ({exc}); diffusers >= 0.37 has them") from None
    return SimpleNamespace(
        FasterCacheConfig=FasterCacheConfig, FirstBlockCacheConfig=FirstBlockCacheConfig, MagCacheConfig=MagCacheConfig,
        PyramidAttentionBroadcastConfig=PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig=TaylorSeerCacheConfig,
        apply={"diffusers-fbcache": apply_first_block_cache, "diffusers-taylorseer": apply_taylorseer_cache,
               "diffusers-magcache": apply_mag_cache, "diffusers-pab": apply_pyramid_attention_broadcast,
               "diffusers-fastercache": apply_faster_cache},
        HookRegistry=HookRegistry, CacheContext=CacheContext, set_context=_set_cache_context, CacheMixin=CacheMixin,
    )


def _timestep_reader(copy_runner) -> Callable[[], float]:
    """A callback giving the current timestep on the 0..1000 scale: the pipeline's ``current_timestep`` where
    it has one, else the ``timestep`` argument of the transformer's latest call (read by a pre-hook)."""
    pipe = copy_runner.pipe
    if hasattr(type(pipe), "current_timestep"):
        return lambda: float(pipe.current_timestep)
    seen = {"t": 1000.0}

    def remember(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            seen["t"] = float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)

    copy_runner.transformer.register_forward_pre_hook(remember, with_kwargs=True)
    return lambda: seen["t"]


def _diffusers_config(d, peer: str, value: float, warmup: int | None, copy_runner, sampler, layout, shared: dict,
                      runner) -> tuple[Any, str]:
    """The diffusers cache config of ``peer`` at knob ``value`` and ``warmup`` (steps; ``None``: its default),
    and a note for its setting text."""
    import torch

    from planner.cfg import CfgLayout

    if peer == "diffusers-fbcache":
        return d.FirstBlockCacheConfig(threshold=float(value)), ""
    if peer == "diffusers-taylorseer":
        # Default identifiers name attention modules ("...attn"), which DiT's "attn1" does not match:
        # name the transformer blocks, so TaylorSeer forecasts whole block outputs (what its paper caches).
        blocks = [m.name for m in copy_runner.modules() if m.kind == "block"]
        # max_order=1: order 2 was no better on digits-dit and worse on digits-mmdit (peer_warmups.md).
        before = {} if warmup is None else {"disable_cache_before_step": warmup}
        return d.TaylorSeerCacheConfig(cache_interval=int(value), max_order=1, taylor_factors_dtype=torch.float32,
                                       cache_identifiers=[re.escape(b) for b in blocks], **before), ""
    if peer == "diffusers-magcache":
        if "mag_ratios" not in shared:
            shared["mag_ratios"] = _magcache_ratios(d, runner, sampler, shared["calib_samples"])
        retention = {} if warmup is None else {"retention_ratio": min(1.0, warmup / sampler.steps)}
        return d.MagCacheConfig(threshold=float(value), num_inference_steps=sampler.steps,
                                mag_ratios=list(shared["mag_ratios"]), **retention), ""
    if layout == CfgLayout.SEPARATE:
        raise PeerUnavailable(f"{peer}: its hooks keep one state per attention module, not per cache context, and "
                              f"this pipeline calls the transformer twice per step (cond, uncond): the uncond call "
                              "would reuse the cond call's attention")
    timestep = _timestep_reader(copy_runner)
    if peer == "diffusers-pab":
        return d.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(value),
                                                 current_timestep_callback=timestep), ""
    # FasterCache: its CFG cache splits batches as [uncond, cond]; elsewhere only its attention cache runs.
    attention_only = layout != CfgLayout.UNCOND_COND
    return d.FasterCacheConfig(spatial_attention_block_skip_range=int(value), current_timestep_callback=timestep,
                               attention_weight_callback=lambda _: 0.5, tensor_format="BCHW",
                               is_guidance_distilled=attention_only), ("(attention cache only)" if attention_only else "")


def _install_diffusers(runner, sampler, peer: str, value: float, warmup: int | None, shared: dict) -> PeerRun:

    d = _diffusers_hooks()
    layout = runner.cfg_layout(sampler)
    copy_runner = clone_runner(runner)
    transformer = copy_runner.transformer
    config, note = _diffusers_config(d, peer, value, warmup, copy_runner, sampler, layout, shared, runner)
    with _diffusers_quiet():  # FasterCache warns that it is experimental on every install
        run = _hooked(d, copy_runner, layout, peer, lambda: d.apply[peer](transformer, config), config)
    return PeerRun(peer, _setting(peer, value, warmup, note), run)


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _hooked(d, copy_runner, layout, peer: str, apply: Callable[[], None], config) -> Callable:
    """Install a diffusers cache on ``copy_runner``'s transformer and return its ``run(conditions, seeds,
    sampler)``, which opens the cache context and resets the hooks' state as diffusers' pipelines do."""
    from planner.cfg import CfgLayout

    transformer = copy_runner.transformer
    registry = d.HookRegistry.check_if_exists_or_initialize(transformer)
    if isinstance(transformer, d.CacheMixin):
        transformer.enable_cache(config)  # the pipeline opens its own cache contexts and resets the state
        own_context = None
    else:
        if layout == CfgLayout.SEPARATE:
            raise PeerUnavailable(f"{peer}: {type(transformer).__name__} has no CacheMixin and its pipeline calls "
                                  "it twice per step; no cache context can tell the two calls apart")
        apply()
        registry.invalidate_child_registries_cache()
        own_context = "cond" if layout == CfgLayout.NONE else "cond_uncond"

    def run(conditions, seeds, smp):
        if own_context is None:
            return copy_runner.run(conditions, seeds, smp)
        d.set_context(transformer, d.CacheContext(own_context))
        try:
            return copy_runner.run(conditions, seeds, smp)
        finally:
            d.set_context(transformer, None)
            registry.reset_stateful_hooks(recurse=True)

    return run


def _magcache_ratios(d, runner, sampler, samples: int) -> list[float]:
    """MagCache's magnitude ratios of this model and sampler, from its own ``calibrate=True`` mode run on the
    calibration inputs (seeds ``0..samples-1``): the lists it prints, averaged step by step."""
    import io
    import json

    copy_runner = clone_runner(runner)
    layout = runner.cfg_layout(sampler)
    config = d.MagCacheConfig(calibrate=True, num_inference_steps=sampler.steps)
    run = _hooked(d, copy_runner, layout, "diffusers-magcache",
                  lambda: d.apply["diffusers-magcache"](copy_runner.transformer, config), config)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(runner.conditions(samples, seed=0), list(range(samples)), sampler)
    lists = []
    for line in printed.getvalue().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]") and "MagCache" not in line:
            try:
                values = json.loads(line)
            except ValueError:
                continue
            if len(values) == sampler.steps and all(isinstance(v, (int, float)) for v in values):
                lists.append(values)
    if not lists:
        raise PeerUnavailable("diffusers-magcache: its calibration run printed no magnitude ratios for this model "
                              "(no transformer block list it recognises)")
    return [sum(col) / len(col) for col in zip(*lists)]


# --------------------------------------------------------------------------- cache-dit


def _cache_dit():
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read at import: its info logs flood the console
    try:
        import cache_dit
    except ImportError:
        raise PeerUnavailable(f"cache-dit is not installed ({INSTALL_HINT})") from None
    return cache_dit


def _install_cache_dit(runner, sampler, peer: str, value: float, warmup: int | None, shared: dict) -> PeerRun:
    cache_dit = _cache_dit()
    front, back = DBCACHE_SPLITS[peer.removesuffix("-taylorseer")]
    blocks = sum(1 for m in runner.modules() if m.kind == "block")
    if front + back >= blocks:
        raise PeerUnavailable(f"{peer}: F{front}B{back} computes all {blocks} blocks of this model at every step; "
                              "nothing is left to cache")
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
    # F1B0: the first block decides, as in FirstBlockCache; F2B1 and F4B0: the splits cache-dit's docs
    # recommend (its default F8 would be the whole 8-block model); the rest, the warm-up unless one is asked
    # too, are its defaults.
    warmup_steps = {} if warmup is None else {"max_warmup_steps": warmup}
    config = DBCacheConfig(Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=float(value),
                           num_inference_steps=sampler.steps, **warmup_steps)
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if peer.endswith("taylorseer") else None
    cache_dit.enable_cache(target, cache_config=config, calibrator_config=calibrator)
    return PeerRun(peer, _setting(peer, value, warmup), lambda c, s, smp: copy_runner.run(c, s, smp))


_INSTALLERS: dict[str, Callable[..., PeerRun]] = {
    **{name: _install_diffusers for name in PEERS if name.startswith("diffusers-")},
    **{name: _install_cache_dit for name in DBCACHE_PEERS},
}
