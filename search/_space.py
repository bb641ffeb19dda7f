"""A compact search space over cache plans, shaped by the profile (used by the ``optuna`` strategy).

One boolean per (step, module) would give an optimizer thousands of dimensions; this space has
``5 + groups`` of them. One schedule for the whole model:

* ``action``: how skipped steps are served: ``D`` (block residual reuse), ``F`` / ``Q`` (first- /
  second-order forecast of the block output) or ``R`` (reuse of attention/MLP outputs; the block's
  norms still run);
* ``interval``: compute once every N steps (1 = never reuse), as in FORA / DeepCache;
* ``warmup`` / ``cooldown``: steps at the start / end that always compute (the late steps are the
  sensitive ones: their outputs change most);
* ``tolerance``: a percentile p: a reuse k steps after the last compute is allowed only at steps
  where the profile's lag-k change of the module's group is within its p-th percentile
  (SmoothCache's threshold on the lag curves, per group; 100 = everywhere);

and per depth group of blocks ``gI_shift``: the group computes once every ``interval + shift``
steps (clipped to 1..its longest interval).

Why one action and one tolerance for all groups, not one per group: a block's forecast replaces its
output whatever its input, so at a step where a deeper block forecasts, the blocks before it
computed for nothing; independent per-group intervals mostly make such wasted mixes. Per-group
schedules stay in reach through the shifts (residual reuse composes across blocks).

What the profile decides:

* each group's longest interval shrinks with how much the group changes: ``max_interval`` times
  the most stable group's median lag-1 change over this group's (at least 2);
* ``F`` is offered only where the block *outputs* drift: their median lag-2 change is at least
  ``drift_ratio`` (1.5) times the lag-1 change (pure drift gives 2, a random walk sqrt(2), noise 1;
  extrapolating noise doubles the error); ``R`` only for blocks with sub-layers;
* the cool-down / warm-up ranges reach twice the number of trailing / leading steps whose change is
  over twice the median (at least a tenth of the steps, at most a quarter).

``PlanSpace.decisions(params)`` is a pure function of the parameters (and the space), so a trial's
plan can be rebuilt anywhere from its stored parameters; ``digest()`` names the space so a study
refuses workers whose space differs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from planner.errors import PlannerError

SPACE_VERSION = 1
ACTION_NAMES = {"D": "block residual reuse", "F": "block output forecast", "Q": "block output forecast, second order",
                "L": "block output forecast, second order, limited", "R": "attention/MLP output reuse"}
SUBLAYER_KINDS = ("attn", "cross_attn", "mlp")
DEFAULT_TOLERANCES = (70, 80, 90, 100)
DEFAULT_SHIFTS = (-1, 0, 1)


@dataclass(frozen=True)
class GroupSpace:
    """One depth range of blocks and what the profile allows it.

    ``allowed[action][percentile][lag - 1]`` is a ``0``/``1`` string over steps: whether a reuse
    ``lag`` steps after the last compute may happen at that step (percentile 100 is not stored)."""

    name: str
    blocks: tuple[str, ...]
    sublayers: tuple[str, ...]
    max_interval: int
    allowed: dict[str, dict[int, tuple[str, ...]]]


@dataclass(frozen=True)
class PlanSpace:
    """The parameters of a plan and the pure mapping from them to decisions."""

    steps: int
    actions: tuple[str, ...]
    max_interval: int
    groups: tuple[GroupSpace, ...]
    max_warmup: int
    max_cooldown: int
    tolerances: tuple[int, ...]
    shifts: tuple[int, ...] = DEFAULT_SHIFTS
    version: int = SPACE_VERSION

    # ----------------------------------------------------------------- parameters
    def suggest(self, trial) -> dict[str, Any]:
        """Ask an Optuna trial for one point of the space; returns the complete parameter dict."""
        params: dict[str, Any] = {}
        if len(self.actions) > 1:
            params["action"] = trial.suggest_categorical("action", list(self.actions))
        params["interval"] = trial.suggest_int("interval", 1, self.max_interval)
        params["warmup"] = trial.suggest_int("warmup", 0, self.max_warmup)
        params["cooldown"] = trial.suggest_int("cooldown", 0, self.max_cooldown)
        if len(self.tolerances) > 1:
            params["tolerance"] = trial.suggest_int("tolerance", self.tolerances[0], 100,
                                                    step=_tolerance_step(self.tolerances))
        if len(self.shifts) > 1:
            for g in self.groups:
                params[f"{g.name}_shift"] = trial.suggest_int(f"{g.name}_shift", self.shifts[0], self.shifts[-1])
        return self.complete(params)

    def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with the values the space fixes filled in (a single action, tolerance 100,
        shift 0); PlannerError when a value lies outside the space."""
        out = dict(params)
        out.setdefault("action", self.actions[0])
        if out["action"] not in self.actions:
            raise PlannerError(f"action={out['action']!r} is not an option of this space ({''.join(self.actions)})")
        for key, low, high in (("interval", 1, self.max_interval), ("warmup", 0, self.max_warmup),
                               ("cooldown", 0, self.max_cooldown), ("tolerance", self.tolerances[0], 100)):
            value = int(out.get(key, {"interval": 1, "tolerance": 100}.get(key, 0)))
            if not low <= value <= high or (key == "tolerance" and value not in self.tolerances):
                raise PlannerError(f"{key}={value} lies outside the search space ({low}..{high})")
            out[key] = value
        for g in self.groups:
            shift = int(out.get(f"{g.name}_shift", 0))
            if shift not in self.shifts:
                raise PlannerError(f"{g.name}_shift={shift} is not one of {list(self.shifts)}")
            out[f"{g.name}_shift"] = shift
        return out

    def fastest_params(self, action: str) -> dict[str, Any]:
        """The point of the space that reuses most with ``action``: the longest interval, every group at its
        own longest, no warm-up or cool-down, tolerance 100."""
        shift = self.shifts[-1]
        return self.complete({"action": action, "interval": self.max_interval, "tolerance": 100,
                              **{f"{g.name}_shift": shift for g in self.groups}})

    def uniform_params(self, interval: int, action: str, cooldown: int = 0) -> dict[str, Any]:
        """FORA's pattern as a point of the space: every group computes once every ``interval``
        steps (capped at its own longest) and serves the others with ``action``; no warm-up,
        tolerance 100."""
        return self.complete({"action": action if action in self.actions else self.actions[0],
                              "interval": max(1, min(interval, self.max_interval)),
                              "cooldown": min(cooldown, self.max_cooldown)})

    def group_interval(self, group: GroupSpace, params: dict[str, Any]) -> int:
        """The group's own interval: the model's plus its shift, within 1..its longest."""
        return int(min(max(params["interval"] + params[f"{group.name}_shift"], 1), group.max_interval))

    # ----------------------------------------------------------------- the mapping
    def group_codes(self, group: GroupSpace, params: dict[str, Any]) -> str:
        """The per-step code string of one group (``C`` or the action)."""
        action, interval, tolerance = params["action"], self.group_interval(group, params), params["tolerance"]
        masks = None if tolerance >= 100 else group.allowed[action][tolerance]
        warmup, cooldown = params["warmup"], params["cooldown"]
        codes, since = [], 0  # steps since the group last computed
        for step in range(self.steps):
            lag = since + 1
            reuse = (
                step > 0 and warmup <= step < self.steps - cooldown and lag < interval
                and (masks is None or masks[min(lag, len(masks)) - 1][step] == "1")
            )
            codes.append(action if reuse else "C")
            since = lag if reuse else 0
        return "".join(codes)

    def decisions(self, params: dict[str, Any]) -> dict[str, str]:
        """``{module: codes}`` for the point ``params`` (same codes on every CFG branch): blocks carry
        ``D``/``F``, or with ``R`` their attention/MLP sub-layers do. Pure: equal params, equal plan."""
        params = self.complete(params)
        out: dict[str, str] = {}
        for g in self.groups:
            codes = self.group_codes(g, params)
            if "C" * self.steps == codes:
                continue
            for name in g.sublayers if params["action"] == "R" else g.blocks:
                out[name] = codes
        return out

    # ----------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        """Everything that defines the space, JSON-ready."""
        return asdict(self)

    def digest(self) -> str:
        """A short hash of :meth:`to_dict`: two spaces with equal digests map equal params to equal plans."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        """A few lines: the model-wide options, then each group's blocks and longest interval."""
        lines = [(f"actions {''.join(self.actions)}, interval 1..{self.max_interval}, warm-up 0..{self.max_warmup}, "
                  f"cool-down 0..{self.max_cooldown}, tolerances {list(self.tolerances)}, shifts {list(self.shifts)}")]
        for g in self.groups:
            lines.append(f"{g.name}: {g.blocks[0]}..{g.blocks[-1].rsplit('.', 1)[-1]}, interval at most {g.max_interval}")
        return "\n".join(lines)


def _tolerance_step(tolerances: tuple[int, ...]) -> int:
    steps = {b - a for a, b in itertools.pairwise(tolerances)}
    if len(tolerances) > 1 and (len(steps) != 1 or tolerances[-1] != 100):
        raise PlannerError(f"tolerances must be evenly spaced percentiles ending at 100, got {list(tolerances)}")
    return steps.pop() if steps else 1


def split_groups(blocks: list[str], groups: int) -> list[list[str]]:
    """``blocks`` (in forward order) cut into ``groups`` contiguous, near-equal depth ranges."""
    if groups < 1:
        raise PlannerError(f"groups must be at least 1, got {groups}")
    return [list(part) for part in np.array_split(np.array(blocks, dtype=object), min(groups, len(blocks))) if len(part)]


class _Curves:
    """The profile's ``[steps x modules]`` curves, each pivoted once (a pivot of the whole table is the slow part)."""

    def __init__(self, profile, steps: int):
        self.profile, self.steps, self.frames = profile, steps, {}

    def group(self, names: list[str], lag: int, metric: str) -> np.ndarray:
        """Mean over ``names`` of ``metric`` at ``lag``, per step (NaN where unknown)."""
        if (lag, metric) not in self.frames:
            self.frames[lag, metric] = self.profile.curve(lag=lag, metric=metric)
        c = self.frames[lag, metric][names].mean(axis=1).to_numpy(dtype=float)
        return c if len(c) == self.steps else np.full(self.steps, np.nan)


def _allowed_masks(curves: list[np.ndarray], tolerances: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """Per percentile below 100 and lag: ``1`` where the lag's change is within that percentile."""
    out = {}
    for p in tolerances:
        if p >= 100:
            continue
        per_lag = []
        for lag, c in enumerate(curves, start=1):
            known = c[lag:][np.isfinite(c[lag:])]
            threshold = np.percentile(known, p) if len(known) else np.inf
            per_lag.append("".join("1" if np.isfinite(v) and v <= threshold else "0" for v in c))
        out[int(p)] = tuple(per_lag)
    return out


def _edge_steps(change: np.ndarray, from_end: bool) -> int:
    """How many steps at the start (after step 0) or the end change by more than twice the median."""
    values = change[1:][::-1] if from_end else change[1:]
    median = np.nanmedian(change[1:]) if np.isfinite(change[1:]).any() else np.nan
    n = 0
    for v in values:
        if not (np.isfinite(v) and v > 2 * median):
            break
        n += 1
    return n


def _median_ratio(num: np.ndarray, den: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    r = r[np.isfinite(r)]
    return float(np.median(r)) if len(r) else float("nan")


def build_space(profile, modules, steps: int, *, groups: int = 4, max_interval: int = 6, actions: str = "DF",
                tolerances: Iterable[int] = DEFAULT_TOLERANCES, shifts: Iterable[int] = DEFAULT_SHIFTS,
                drift_ratio: float = 1.5, scale_groups: bool = True) -> PlanSpace:
    """The plan space for a model (``modules`` as ``runner.modules()``) and its profile; see the module docstring.
    ``scale_groups=False`` gives every group ``max_interval`` as its longest interval (the widest space)."""
    if not actions or any(a not in ACTION_NAMES for a in actions):
        raise PlannerError(f"actions must be letters of {''.join(ACTION_NAMES)}, got {actions!r}")
    if max_interval < 2:
        raise PlannerError(f"max_interval must be at least 2, got {max_interval}")
    tolerances = tuple(sorted({int(t) for t in tolerances} | {100}))
    _tolerance_step(tolerances)
    if tolerances[0] < 1:
        raise PlannerError(f"tolerances are percentiles in 1..100, got {list(tolerances)}")
    shifts = tuple(range(min(0, *shifts), max(0, *shifts) + 1))
    blocks = [m.name for m in modules if m.kind == "block"]
    if not blocks:
        raise PlannerError("the model has no transformer blocks to cache")
    children = {b: [m.name for m in modules if m.kind in SUBLAYER_KINDS and m.name.rsplit(".", 1)[0] == b] for b in blocks}
    lags = max(1, int(profile.meta.lags))
    parts = split_groups(blocks, groups)

    table = _Curves(profile, steps)

    def curves(names, metric):
        return [table.group(names, k, metric) for k in range(1, lags + 1)]

    try:
        residual = curves(blocks, "res_reuse_rel_l1_mean")
        output = curves(blocks, "rel_l1_mean")
        change = [np.nanmedian(table.group(part, 1, "res_reuse_rel_l1_mean")[1:]) for part in parts]
    except KeyError as e:
        raise PlannerError(f"the profile lacks module {e}: was it made for this model?") from None
    offered = []
    for a in dict.fromkeys(actions):
        if a in "FQL" and lags >= 2 and not _median_ratio(output[1][2:], output[0][2:]) >= drift_ratio:
            continue  # the outputs do not drift: extrapolating them would add noise
        if a == "R" and not any(children.values()):
            continue
        offered.append(a)
    if not offered:
        raise PlannerError(f"the profile leaves none of the actions {actions!r} to this model: allow D")
    finite = [c for c in change if np.isfinite(c) and c > 0]
    out = []
    for i, (part, c) in enumerate(zip(parts, change)):
        ratio = min(finite) / c if finite and np.isfinite(c) and c > 0 else 0.0
        subs = tuple(n for b in part for n in children[b])
        group_curves = {"D": curves(part, "res_reuse_rel_l1_mean"), "F": curves(part, "rel_l1_mean"),
                        "Q": curves(part, "rel_l1_mean"), "L": curves(part, "rel_l1_mean"),
                        "R": curves(list(subs), "rel_l1_mean") if subs else []}
        out.append(GroupSpace(
            name=f"g{i}", blocks=tuple(part), sublayers=subs,
            max_interval=int(np.clip(round(max_interval * ratio), 2, max_interval)) if scale_groups else max_interval,
            allowed={a: _allowed_masks(group_curves[a], tolerances) for a in offered},
        ))
    low, high = max(1, steps // 10), max(1, steps // 10, steps // 4)
    return PlanSpace(
        steps=steps,
        actions=tuple(offered),
        max_interval=max_interval,
        groups=tuple(out),
        max_warmup=int(np.clip(2 * _edge_steps(residual[0], from_end=False), low, high)),
        max_cooldown=int(np.clip(2 * _edge_steps(residual[0], from_end=True), low, high)),
        tolerances=tolerances,
        shifts=shifts,
    )
