"""Which output sizes a pipeline can take, checked before anything runs.

A height or width must give the transformer a whole number of patches after the VAE shrinks it:
a multiple of the VAE's spatial factor times the patch size (2 for pipelines that pack latents into
2x2 patches, like Flux). Some pipelines ask for a coarser multiple in their own input checks
(diffusers 0.42: PixArt 8, Sana 32, Wan 16, LTX 32, CogVideoX 8), and video pipelines that fold
``4k + 1`` frames into ``k + 1`` latent frames want ``num_frames - 1`` divisible by the VAE's
temporal factor. Pipelines that would resize or round a size quietly are refused too: a profile or a
plan must record the size that really ran.
"""

from __future__ import annotations

import math
from typing import Any

from planner.errors import PlannerError

# What each pipeline's check_inputs demands of height and width (diffusers 0.42).
DECLARED_MULTIPLE = {"PixArtAlphaPipeline": 8, "PixArtSigmaPipeline": 8, "SanaPipeline": 32, "WanPipeline": 16,
                     "LTXPipeline": 32, "CogVideoXPipeline": 8}
# Pipelines that pack latents into 2x2 patches before the transformer (their transformer's patch size is 1).
PACKED = {"FluxPipeline", "ChromaPipeline", "QwenImagePipeline", "Flux2Pipeline", "Flux2KleinPipeline"}
# Video pipelines whose VAE folds 1 + temporal*k frames into 1 + k latent frames.
FRAMES_1_PLUS_K = {"WanPipeline", "LTXPipeline", "HunyuanVideo15Pipeline"}


def _names(pipe: Any) -> list[str]:
    return [c.__name__ for c in type(pipe).__mro__]


def _first(table, names: list[str]):
    for n in names:
        if n in table:
            return table[n] if isinstance(table, dict) else n
    return None


def spatial_multiple(pipe: Any) -> int | None:
    """The multiple a height and width of ``pipe`` must be (``None`` when the pipeline says nothing)."""
    vae = next((getattr(pipe, a) for a in ("vae_scale_factor_spatial", "vae_scale_factor", "vae_spatial_compression_ratio")
                if isinstance(getattr(pipe, a, None), int)), None)
    names = _names(pipe)
    patch = None
    config = getattr(getattr(pipe, "transformer", None), "config", {}) or {}
    size = config.get("patch_size") if hasattr(config, "get") else None
    if isinstance(size, int):
        patch = size
    elif isinstance(size, (list, tuple)) and size and all(isinstance(x, int) for x in size):
        patch = size[-1]
    if _first(PACKED, names):
        patch = max(patch or 1, 2)
    computed = vae * (patch or 1) if vae is not None else None
    declared = _first(DECLARED_MULTIPLE, names)
    found = [m for m in (computed, declared) if m]
    return math.lcm(*found) if found else None


def temporal_factor(pipe: Any) -> int | None:
    """The VAE's temporal factor of a ``1 + factor*k`` frames video pipeline (``None`` otherwise)."""
    if not _first(FRAMES_1_PLUS_K, _names(pipe)):
        return None
    return next((getattr(pipe, a) for a in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio")
                 if isinstance(getattr(pipe, a, None), int)), None)


def check_size(pipe: Any, call_names: set[str], height: int | None, width: int | None, num_frames: int | None) -> None:
    """PlannerError (one line) unless ``pipe`` can run at this size; ``None`` sizes are the pipeline's own."""
    name = type(pipe).__name__
    for flag, value, arg in (("--height", height, "height"), ("--width", width, "width"), ("--num-frames", num_frames, "num_frames")):
        if value is not None and arg not in call_names:
            raise PlannerError(f"{name} takes no {arg}: leave out {flag}")
        if value is not None and value < 1:
            raise PlannerError(f"{flag} must be a positive number, got {value}")
    multiple = spatial_multiple(pipe)
    if multiple:
        for flag, value in (("--height", height), ("--width", width)):
            if value is not None and value % multiple:
                low = max(multiple, value // multiple * multiple)
                raise PlannerError(f"{flag} {value}: {name}'s VAE and patches take multiples of {multiple} "
                                   f"(e.g. {low} or {low + multiple})")
    factor = temporal_factor(pipe)
    if factor and num_frames is not None and (num_frames - 1) % factor:
        low = (num_frames - 1) // factor * factor + 1
        raise PlannerError(f"--num-frames {num_frames}: {name}'s VAE takes 1 + {factor}k frames (e.g. {low} or {low + factor})")
