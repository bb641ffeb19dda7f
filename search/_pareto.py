"""Pareto fronts of plans (predicted run time vs calibration error): the front, dominance, the
folder a search leaves beside its plan, and its plot (``planner plan pareto DIR``).

The folder holds ``front.json`` (the summary below), ``front.csv`` (one row per front point),
``trials.csv`` (every finished trial), one loadable plan per front point (``front-trial-NNNNN.json``)
and per baseline (``baseline-NAME.json``). ``front.json``::

    {"format": "dit-cache-planner-front", "version": 1, "model": ..., "sampler": {...},
     "budget": {...}, "study": {...}, "best": TRIAL, "points": [{"trial", "fraction", "speedup",
     "error", "feasible", "params", "plan"}], "baselines": [{"name", "fraction", "speedup", "error",
     "plan", "dominated_by"} or {"name", "failed"}]}

``fraction`` is the predicted run time over full compute (the latency model), ``error`` the
relative L1 of the final latents against full compute on the calibration inputs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlannerError
from planner.io import write_atomic, write_json_atomic

FRONT_FORMAT = "dit-cache-planner-front"
FRONT_VERSION = 1
FRONT_FILE = "front.json"


@dataclass(frozen=True)
class Point:
    """One plan's figures: predicted run-time fraction (lower is faster) and calibration error."""

    fraction: float
    error: float


def pareto_indices(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (no other point is at most as slow and as wrong and
    better in one), ordered from fastest to slowest; of equal points only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i].fraction, points[i].error, i))
    front, best_error = [], float("inf")
    for i in order:
        if points[i].error < best_error:
            front.append(i)
            best_error = points[i].error
    return front


def dominates(a: Point, b: Point) -> bool:
    """Whether ``a`` is at least as fast and as accurate as ``b`` and strictly better in one."""
    return a.fraction <= b.fraction and a.error <= b.error and (a.fraction < b.fraction or a.error < b.error)


def dominating(front: Sequence[Point], target: Point) -> int | None:
    """Index in ``front`` of the most accurate point that dominates ``target``, or None."""
    better = [i for i, p in enumerate(front) if dominates(p, target)]
    return min(better, key=lambda i: front[i].error) if better else None


def write_front(folder: Path, doc: dict, plans: dict[str, Any], trials_rows: list[dict]) -> Path:
    """Write ``front.json``, ``front.csv``, ``trials.csv`` and the plans (``{file name: Plan}``) into
    ``folder`` atomically, and remove front plans of earlier runs that are no longer on the front."""
    import pandas as pd

    from planner.plan import save_plan

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, plan in plans.items():
        save_plan(plan, folder / name)
    for old in folder.glob("front-trial-*.json"):
        if old.name not in plans:
            old.unlink(missing_ok=True)
    rows = [{k: v for k, v in p.items() if k != "params"} | {f"param.{k}": v for k, v in p["params"].items()}
            for p in doc["points"]]
    for name, frame in (("front.csv", pd.DataFrame(rows)), ("trials.csv", pd.DataFrame(trials_rows))):
        write_atomic(folder / name, lambda tmp, f=frame: f.to_csv(tmp, index=False, float_format="%.6g"))
    return write_json_atomic(folder / FRONT_FILE, doc)


def front_folder(path: str | Path) -> Path:
    """The front folder for ``path``: the folder itself, or ``plans/NAME/`` for ``plans/NAME.json``."""
    p = Path(path)
    if p.suffix == ".json" and p.name != FRONT_FILE:
        p = p.with_suffix("")
    elif p.name == FRONT_FILE:
        p = p.parent
    return p


def load_front(path: str | Path) -> dict:
    """The ``front.json`` of a front folder (or of the plan it lies beside); PlannerError if there is none."""
    folder = front_folder(path)
    file = folder / FRONT_FILE
    if not file.is_file():
        raise PlannerError(f"{folder}: no {FRONT_FILE} (run `planner search --strategy optuna` first)")
    try:
        doc = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlannerError(f"{file}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FRONT_FORMAT:
        raise PlannerError(f"{file}: not a Pareto front written by the planner")
    if int(doc.get("version", 0)) > FRONT_VERSION:
        raise PlannerError(f"{file}: front format version {doc.get('version')} is newer than this planner reads")
    return doc


def summarize_front(doc: dict) -> dict:
    """What ``planner plan pareto`` reports: the front, the best plan, each baseline and what dominates it."""
    front = [Point(p["fraction"], p["error"]) for p in doc["points"]]
    baselines = []
    for b in doc.get("baselines", []):
        if "failed" in b:
            baselines.append(b)
            continue
        i = dominating(front, Point(b["fraction"], b["error"]))
        baselines.append({**b, "dominated_by": None if i is None else doc["points"][i]["trial"]})
    return {
        "points": [{k: p[k] for k in ("trial", "fraction", "speedup", "error", "feasible", "plan")} for p in doc["points"]],
        "best": doc.get("best"),
        "budget": doc.get("budget"),
        "trials_complete": doc.get("study", {}).get("trials_complete"),
        "baselines": baselines,
        "all_baselines_dominated": all(b.get("dominated_by") is not None for b in baselines if "failed" not in b),
    }


BASELINE_MARKERS = {"uniform": ("s", "#d62728"), "smoothcache": ("D", "#9467bd"), "greedy": ("^", "#2ca02c")}


def plot_front(doc: dict, out: str | Path, trials_csv: Path | None = None) -> Path:
    """Draw time vs error: every finished trial (grey), the front (line), the best plan (star), the
    budget (dashed), and the baselines (marked and labelled); PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if trials_csv is not None and Path(trials_csv).is_file():
        trials = pd.read_csv(trials_csv)
        if len(trials):
            ax.scatter(trials.fraction, trials.error, s=10, color="#bbbbbb", label=f"trials ({len(trials)})", zorder=1)
    pts = sorted(doc["points"], key=lambda p: p["fraction"])
    # steps-post: the boundary of what the front dominates (a slower plan is no better until the next point)
    ax.plot([p["fraction"] for p in pts], [p["error"] for p in pts], "-o", color="#1f77b4", ms=4, drawstyle="steps-post",
            label=f"Pareto front ({len(pts)})", zorder=3)
    best = next((p for p in pts if p["trial"] == doc.get("best")), None)
    if best is not None:
        ax.scatter([best["fraction"]], [best["error"]], marker="*", s=220, color="#ff7f0e", edgecolor="k",
                   label=f"chosen plan (trial {best['trial']})", zorder=5)
    speedup = (doc.get("budget") or {}).get("speedup")
    if speedup:
        ax.axvline(1.0 / speedup, ls="--", color="k", lw=0.8, label=f"budget {speedup:g}x")
    for b in doc.get("baselines", []):
        if "failed" in b:
            continue
        marker, colour = BASELINE_MARKERS.get(b["name"], ("P", "#8c564b"))
        ax.scatter([b["fraction"]], [b["error"]], marker=marker, s=70, color=colour, edgecolor="k",
                   label=f"{b['name']} ({b['speedup']:.2f}x, {b['error']:.4f})", zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("predicted run time / full compute (latency model)")
    ax.set_ylabel("calibration error (rel. L1 of final latents)")
    study = doc.get("study", {})
    ax.set_title(f"{doc.get('model', '')}: {study.get('sampler', '')} study, {study.get('trials_complete', '?')} trials",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
