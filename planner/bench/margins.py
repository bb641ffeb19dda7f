"""Quality at matched speed, and the margins of our best strategy over the other methods.

**Matching.** Each method's measured points give a curve of pooled PSNR against speedup, on one
of two axes: realized wall-clock speedup (``speedup``) or FLOP speedup (``flop_speedup``). The
quality a method gives at a target speedup ``t`` is read off its Pareto front (the points no
other point of the same method beats on both speed and PSNR):

* where the front has points on both sides of ``t``: linear interpolation between the two
  neighbours (speed is traded for quality along the front, so a point between two measured ones
  is what a setting between theirs would give);
* where every front point is faster than ``t``: the PSNR of the slowest one (it meets the target
  with room to spare; nothing slower was measured);
* where every front point is slower than ``t``: none: the method does not reach that speed, and
  no extrapolation stands in for a measurement.

So a method is never credited with a speed it was not measured at, and every method, ours,
baselines and peers, is read the same way.

**Margins** (dB of pooled PSNR, the headline metric), per axis and target: the best of our
strategies (kind ``ours``) minus the best peer (kind ``peer``), minus fewer sampling steps, and
minus greedy. A margin is ``None`` where either side does not reach the target. Across models,
the worst case is the smallest margin, with the model it came from.

**Intervals.** Given each point's per-image errors, every margin also gets a bootstrap interval over
the held-out images: each draw pools every point's PSNR over the same images and reads every front
and margin again (:func:`margin_intervals`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from planner.metrics import PSNR_INTERVAL_LEVEL, bootstrap_pooled_psnr, middle_interval

AXES = {"speedup": "realized wall-clock speedup", "flop_speedup": "FLOP speedup"}
METRIC = "psnr"  # pooled PSNR: the MSE over every pixel of every image
COMPARISONS = {"peer": "best peer", "fewer steps": "fewer sampling steps", "greedy": "greedy"}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, PSNR) points no other point beats on both, sorted by speedup (non-finite values left
    out, except an infinite PSNR, which beats everything at its speed)."""
    kept = sorted((s, q) for s, q in points if s is not None and q is not None and math.isfinite(s)
                  and not math.isnan(q))
    front: list[tuple[float, float]] = []
    for s, q in sorted(kept, key=lambda p: (-p[0], -p[1])):  # fastest first: keep a point if it beats all faster ones
        if not front or q > front[-1][1]:
            front.append((s, q))
    return sorted(front)


def quality_at(points: list[tuple[float, float]], target: float) -> float | None:
    """PSNR at ``target`` speedup read off the Pareto front of ``points`` (see the module docstring)."""
    front = pareto_front(points)
    if not front or front[-1][0] < target:
        return None
    if front[0][0] >= target:
        return front[0][1]
    speeds, quals = [s for s, _ in front], [q for _, q in front]
    above = next(i for i, s in enumerate(speeds) if s >= target)
    if speeds[above] == target:
        return quals[above]
    if math.isinf(quals[above - 1]) or math.isinf(quals[above]):  # an exact match beside: the finite side
        return min(quals[above - 1], quals[above])
    return float(np.interp(target, speeds, quals))


def curves(rows: list[dict], axis: str) -> dict[str, dict[str, Any]]:
    """Per method (first-seen order): its kind and measured ``(speed on axis, pooled PSNR)`` points."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == "reference" or r.get(axis) is None or r.get(METRIC) is None:
            continue
        m = out.setdefault(r["method"], {"kind": r["kind"], "points": []})
        m["points"].append((float(r[axis]), float(r[METRIC])))
    return out


def matched(rows: list[dict], targets: list[float], axis: str = "speedup") -> list[dict]:
    """Per method: ``{"method", "kind", "psnr": {target: PSNR or None}}`` on ``axis``."""
    return [{"method": name, "kind": c["kind"], "psnr": {t: quality_at(c["points"], t) for t in targets}}
            for name, c in curves(rows, axis).items()]


def _best(table: list[dict], target: float, keep) -> tuple[str | None, float | None]:
    values = [(m["psnr"][target], m["method"]) for m in table if keep(m) and m["psnr"][target] is not None]
    if not values:
        return None, None
    q, name = max(values)
    return name, q


def margins(rows: list[dict], targets: list[float], image_mse: list | None = None) -> dict[str, dict[str, dict]]:
    """``{axis: {"1.5x": {...}}}``: per axis and target, the best of ours, the best peer, fewer steps and
    greedy (method and PSNR), and the margins of ours over each (``margin_peer``, ``margin_fewer_steps``,
    ``margin_greedy``; ``None`` where a side does not reach the target). With ``image_mse`` (per row, its
    images' MSEs, or ``None`` for a row not scored) each margin also has its bootstrap interval
    (``margin_peer_interval``, ...: :func:`margin_intervals`)."""
    out = _point_margins(rows, targets)
    if image_mse is not None:
        for (axis, label, key), bounds in margin_intervals(rows, image_mse, targets).items():
            out[axis][label][f"{key}_interval"] = list(bounds)
    return out


# Bootstrap draws behind a margin's interval: each redoes every method's Pareto front and reading.
MARGIN_RESAMPLES = 1000


def margin_intervals(rows: list[dict], image_mse: list, targets: list[float], *, resamples: int = MARGIN_RESAMPLES,
                     seed: int = 0) -> dict[tuple[str, str, str], tuple[float, float]]:
    """``{(axis, "2x", "margin_peer"): (lo, hi)}``: the middle ``PSNR_INTERVAL_LEVEL`` of each margin over
    bootstrap draws of the held-out images. A draw takes the same images for every row (``image_mse``: per
    row, the MSEs of its images in one order, ``None`` for a row not scored), pools each row's PSNR over
    them and reads every front and margin again, so the interval carries the pairing of methods run on the
    same inputs and the front points that a draw moves. Margins that are ``None`` (a side does not reach
    the speed) have none."""
    scored = [i for i, errors in enumerate(image_mse) if errors is not None]
    pooled = bootstrap_pooled_psnr([image_mse[i] for i in scored], resamples=resamples, seed=seed)
    keys = [f"margin_{side.replace(' ', '_')}" for side in COMPARISONS]
    values: dict[tuple[str, str, str], list[float]] = {}
    for draw in range(resamples):
        drawn = list(rows)
        for i, psnrs in zip(scored, pooled):
            drawn[i] = {**rows[i], METRIC: psnrs[draw].item()}
        for axis, per in _point_margins(drawn, targets).items():
            for label, entry in per.items():
                for key in keys:
                    if entry[key] is not None:
                        values.setdefault((axis, label, key), []).append(entry[key])
    return {k: middle_interval(torch.tensor(v, dtype=torch.float64)) for k, v in values.items()}


def _point_margins(rows: list[dict], targets: list[float]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for axis in AXES:
        table = matched(rows, targets, axis)
        per: dict[str, dict] = {}
        for t in targets:
            ours = _best(table, t, lambda m: m["kind"] == "ours")
            sides = {"peer": _best(table, t, lambda m: m["kind"] == "peer"),
                     "fewer steps": _best(table, t, lambda m: m["method"] == "fewer steps"),
                     "greedy": _best(table, t, lambda m: m["method"] == "greedy")}
            entry: dict[str, Any] = {"ours": {"method": ours[0], "psnr": ours[1]}}
            for side, (name, q) in sides.items():
                key = side.replace(" ", "_")
                entry[key] = {"method": name, "psnr": q}
                entry[f"margin_{key}"] = None if ours[1] is None or q is None else _diff(ours[1], q)
            per[f"{t:g}x"] = entry
        out[axis] = per
    return out


def margin_text(entry: dict, key: str) -> str:
    """A margin of a :func:`margins` entry as a table cell, ``+1.56 (+0.80 to +2.31)`` with its interval where
    it has one; blank where it is ``None``."""
    value = entry[key]
    if value is None:
        return ""
    interval = entry.get(f"{key}_interval")
    return f"{value:+.2f}" + ("" if interval is None else f" ({interval[0]:+.2f} to {interval[1]:+.2f})")


def _diff(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return 0.0
    return a - b


def worst_case(per_model: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Across models (``{model: margins(...)}``): per axis, target and comparison the smallest margin and
    its model (``None`` margins left out, the models they came from listed under ``missing``)."""
    out: dict[str, dict[str, dict]] = {}
    for axis in AXES:
        out[axis] = {}
        labels = dict.fromkeys(label for m in per_model.values() for label in m[axis])
        for label in labels:
            entry = {}
            for side in COMPARISONS:
                key = f"margin_{side.replace(' ', '_')}"
                got = [(m[axis][label][key], model) for model, m in per_model.items()
                       if label in m[axis] and m[axis][label][key] is not None]
                missing = [model for model, m in per_model.items()
                           if label not in m[axis] or m[axis][label][key] is None]
                worst = min(got) if got else (None, None)
                entry[key] = {"worst": worst[0], "model": worst[1], "missing": missing}
                if worst[1] is not None and f"{key}_interval" in per_model[worst[1]][axis][label]:
                    entry[key]["worst_interval"] = per_model[worst[1]][axis][label][f"{key}_interval"]
            out[axis][label] = entry
    return out


def margins_markdown(per_model: dict[str, dict], worst: dict) -> str:
    """The summary in markdown: worst-case margins across models, then each model's margins."""
    lines = ["Margins in dB of **pooled PSNR** (MSE over all pixels of all held-out images) of the best of our "
             "strategies over the best peer, over fewer sampling steps and over greedy, at matched speed read off "
             "each method's Pareto front (linear interpolation between the measured neighbours; the slowest point "
             "when all are faster; blank when the method does not reach the speed). Worst case: the smallest "
             f"margin across models. In brackets, where the bench knew each image's error: the margin's "
             f"{PSNR_INTERVAL_LEVEL:.0%} bootstrap interval over the held-out images.", ""]
    for axis, title in AXES.items():
        lines += [f"### Worst case across models, matched {title}", "",
                  "| speedup | " + " | ".join(f"vs {v}" for v in COMPARISONS.values()) + " |",
                  "|---|" + "---|" * len(COMPARISONS)]
        for label, entry in worst[axis].items():
            cells = []
            for side in COMPARISONS:
                e = entry[f"margin_{side.replace(' ', '_')}"]
                cell = "" if e["worst"] is None else f"{margin_text(e, 'worst')} ({e['model']})"
                if e["missing"]:
                    cell += (" " if cell else "") + "n/a on " + ", ".join(e["missing"])
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    for model, m in per_model.items():
        lines += [f"### {model}", "", "| axis | speedup | best of ours | best peer | fewer steps | greedy | "
                  "vs peer | vs fewer steps | vs greedy |", "|---|---|---|---|---|---|---|---|---|"]
        for axis, title in AXES.items():
            for label, e in m[axis].items():
                def side(key):
                    s = e[key]
                    return "" if s["psnr"] is None else f"{s['psnr']:.2f} ({s['method']})"

                def margin(key):
                    return margin_text(e, f"margin_{key}")

                lines.append(f"| {title} | {label} | {side('ours')} | {side('peer')} | {side('fewer_steps')} | "
                             f"{side('greedy')} | {margin('peer')} | {margin('fewer_steps')} | {margin('greedy')} |")
        lines.append("")
    return "\n".join(lines)
