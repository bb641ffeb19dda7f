"""HarmoniCa's Image-Error-Proxy (IEPO): lambda_t, how much caching at step t hurts the final image.

Both definitions compare final outputs of gradient-free rollouts from fixed noise (the search's
calibration inputs) under *hard* plans made from the router's current gates (0/1 masks, 1 =
compute), and measure the difference of two final outputs as a mean squared error:

* ``paper`` (the paper's definition): lambda_t = ||x0 - x0^(t)||^2, x0 from the current plan,
  x0^(t) from the same plan with step t forced to compute (caching disabled at step t only).
  One run for x0, one per step that caches anything.
* ``released`` (the released code's variant): switch the plan's caching on from the last step
  backwards; lambda_t = ||x0^(>=t) - x0^(>=t+1)||^2, the marginal change of the final output when
  step t's caching joins that of the later steps (x0^(>=T) is full compute). One run per step
  that caches anything.
* ``uniform``: lambda_t = 1 (SDT alone: the ablation that says what the proxy adds).

A step whose hard plan caches nothing gets 0 without a run (both of its runs are the same plan).
:func:`normalise` turns the raw figures into weights of mean 1 over the free steps, with a floor so
no step is ignored altogether.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from planner.errors import PlannerError

PROXIES = ("paper", "released", "uniform")


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def raw_proxy(final: Callable[[torch.Tensor], torch.Tensor], hard: torch.Tensor, proxy: str,
              full: torch.Tensor | None = None) -> torch.Tensor:
    """Raw lambda_t, ``[steps]`` (step 0: 0), for the 0/1 mask ``hard`` ``[steps, modules]``.

    ``final(mask)`` runs the fixed calibration inputs under the plan of ``mask`` and returns the final
    outputs; ``full`` (optional) is the all-compute output, saving that run for ``released``."""
    if proxy not in PROXIES:
        raise PlannerError(f"proxy must be one of {', '.join(PROXIES)}, got {proxy!r}")
    steps = hard.shape[0]
    raw = torch.zeros(steps, dtype=torch.float64)
    if proxy == "uniform":
        raw[1:] = 1.0
        return raw
    hard = hard.bool()
    caches = [not bool(hard[t].all()) for t in range(steps)]
    if proxy == "paper":
        if not any(caches[1:]):
            return raw
        base = final(hard)
        for t in range(1, steps):
            if caches[t]:
                mask = hard.clone()
                mask[t] = True
                raw[t] = _mse(final(mask), base)
        return raw
    previous = full if full is not None else final(torch.ones_like(hard))
    for t in range(steps - 1, 0, -1):
        if caches[t]:
            mask = torch.ones_like(hard)
            mask[t:] = hard[t:]
            current = final(mask)
            raw[t] = _mse(current, previous)
            previous = current
    return raw


def normalise(raw: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """Weights of mean 1 over steps 1.., at least ``floor``: ``floor + (1 - floor) * raw / mean(raw)``.

    Step 0 (always computed, never trained) gets 1. All-zero ``raw`` (nothing cached) gives all ones."""
    if not 0 <= floor <= 1:
        raise PlannerError(f"proxy_floor must lie in [0, 1], got {floor:g}")
    lam = torch.ones_like(raw, dtype=torch.float32)
    free = raw[1:].clamp_min(0).double()
    if len(free) and float(free.mean()) > 0:
        lam[1:] = (floor + (1 - floor) * free / free.mean()).float()
    return lam
