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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import PlannerError
from planner.io import atomic_folder, json_text, write_atomic

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
    """Write ``front.json``, ``front.csv``, ``trials.csv`` and the plans (``{file name: Plan}``) as the
    folder ``folder``, atomically as a whole (a front of an earlier run there is replaced, never mixed in)."""
    import pandas as pd

    from planner.plan import plan_to_json

    folder = Path(folder)
    rows = [{k: v for k, v in p.items() if k != "params"} | {f"param.{k}": v for k, v in p["params"].items()}
            for p in doc["points"]]
    with atomic_folder(folder) as staging:
        for name, plan in plans.items():
            (staging / name).write_text(plan_to_json(plan.validate()), encoding="utf-8")
        for name, frame in (("front.csv", pd.DataFrame(rows)), ("trials.csv", pd.DataFrame(trials_rows))):
            frame.to_csv(staging / name, index=False, float_format="%.6g")
        (staging / FRONT_FILE).write_text(json_text(doc), encoding="utf-8")
    return folder / FRONT_FILE


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
    import warnings

    from planner.artifact import loads_json
    from planner.io import read_text_limited, recover_folder
    from planner.plan.io import bundle_mismatch

    folder = front_folder(path)
    recover_folder(folder)
    file = folder / FRONT_FILE
    if not file.is_file():
        raise PlannerError(f"{folder}: no {FRONT_FILE} (run `planner search --strategy optuna` first)")
    doc = loads_json(read_text_limited(file, "Pareto front"), str(file))
    if not isinstance(doc, dict) or doc.get("format") != FRONT_FORMAT:
        raise PlannerError(f"{file}: not a Pareto front written by the planner")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PlannerError(f"{file}: $.version: expected a format version (an integer >= 1), got {version!r}")
    if version > FRONT_VERSION:
        raise PlannerError(f"{file}: front format version {version} is newer than this planner reads")
    _check_front(doc, str(file))
    if (why := bundle_mismatch(folder)) is not None:
        warnings.warn(why, stacklevel=2)
    return doc


def _check_front(doc: dict, source: str) -> None:
    """PlannerError (one line, naming the JSON path) unless ``doc`` has the fields summaries and plots read;
    numbers written as ``"inf"``/``"nan"`` (strict JSON) become floats again."""
    from planner.artifact import json_path

    def number(value: Any, *where: Any, low: float | None = None) -> float:
        if isinstance(value, str) and value in ("inf", "-inf", "nan"):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (low is not None and not value >= low):
            bound = f" >= {low:g}" if low is not None else ""
            raise PlannerError(f"{source}: {json_path(*where)}: expected a number{bound}, got {value!r}")
        return float(value)

    def obj(value: Any, *where: Any) -> dict:
        if not isinstance(value, dict):
            raise PlannerError(f"{source}: {json_path(*where)}: expected an object")
        return value

    points = doc.get("points")
    if not isinstance(points, list):
        raise PlannerError(f"{source}: $.points: expected an array of front points")
    for i, p in enumerate(points):
        obj(p, "points", i)
        if isinstance(p.get("trial"), bool) or not isinstance(p.get("trial"), int):
            raise PlannerError(f"{source}: {json_path('points', i, 'trial')}: expected a trial number")
        for key in ("fraction", "speedup", "error"):
            p[key] = number(p.get(key), "points", i, key, low=0.0)
        if not isinstance(p.get("params", {}), dict):
            raise PlannerError(f"{source}: {json_path('points', i, 'params')}: expected an object")
        p.setdefault("feasible", None)
        p.setdefault("plan", None)
    baselines = doc.get("baselines", [])
    if not isinstance(baselines, list):
        raise PlannerError(f"{source}: $.baselines: expected an array")
    for i, b in enumerate(baselines):
        obj(b, "baselines", i)
        if not isinstance(b.get("name"), str):
            raise PlannerError(f"{source}: {json_path('baselines', i, 'name')}: expected a name")
        if "failed" in b:
            b["failed"] = str(b["failed"])
            continue
        for key in ("fraction", "speedup", "error"):
            b[key] = number(b.get(key), "baselines", i, key, low=0.0)
    for key in ("budget", "study"):
        if doc.get(key) is not None:
            obj(doc[key], key)
    budget = doc.get("budget") or {}
    if budget.get("speedup") is not None:
        budget["speedup"] = number(budget["speedup"], "budget", "speedup", low=1.0)
    if doc.get("best") is not None and (isinstance(doc["best"], bool) or not isinstance(doc["best"], int)):
        raise PlannerError(f"{source}: $.best: expected a trial number or null")


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


def _read_trials(path: Path):
    """``trials.csv`` (fraction and error of every finished trial); PlannerError when it is damaged."""
    import pandas as pd

    from planner.io import MAX_ARTIFACT_BYTES

    if path.stat().st_size > MAX_ARTIFACT_BYTES:
        raise PlannerError(f"{path}: larger than any trials table")
    try:
        trials = pd.read_csv(path)
        fraction = pd.to_numeric(trials["fraction"], errors="raise")
        error = pd.to_numeric(trials["error"], errors="raise")
    except Exception as e:  # noqa: BLE001 - pandas raises many kinds for a damaged table
        raise PlannerError(f"{path}: unreadable trials table ({type(e).__name__}: {str(e)[:100]})") from None
    return pd.DataFrame({"fraction": fraction, "error": error})


BASELINE_MARKERS = {"uniform": ("s", "#d62728"), "smoothcache": ("D", "#9467bd"), "greedy": ("^", "#2ca02c")}


def plot_front(doc: dict, out: str | Path, trials_csv: Path | None = None) -> Path:
    """Draw time vs error: every finished trial (grey), the front (line), the best plan (star), the
    budget (dashed), and the baselines (marked and labelled); PNG at ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if trials_csv is not None and Path(trials_csv).is_file():
        trials = _read_trials(Path(trials_csv))
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
