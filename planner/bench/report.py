"""Tables and figures of ``planner bench`` and ``planner eval``: CSV, markdown, the Pareto plot (realized
speedup vs PSNR, one curve per method), the environment, and side-by-side sample grids."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from planner.io import json_safe

COLUMNS = ["method", "kind", "setting", "budget", "status", "speedup", "speedup_min", "speedup_max", "median_s",
           "predicted_speedup", "calib_error", "search_s", "psnr", "ssim", "rel_l1", "mse", "accuracy", "frechet",
           "plan", "params"]
STYLE = {"ours": "-", "baseline": "--", "peer": ":"}
PACKAGES = ("torch", "diffusers", "cache-dit", "optuna", "numpy", "transformers", "dit-cache-planner")
NEAREST_TOLERANCE = 0.10  # a curve that does not bracket a target speedup may answer with a point this close


# --------------------------------------------------------------------------- environment


def environment(runner) -> dict:
    """Versions, device, threads and host: what the bench's timings depend on."""
    import importlib.metadata as md
    import sys

    import torch

    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    device = runner.device
    return {
        "versions": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


# --------------------------------------------------------------------------- tables


def results_frame(rows: list[dict]):
    """The rows as a pandas DataFrame with the columns in ``COLUMNS`` order."""
    import pandas as pd

    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("speedup") is not None and r.get("kind") != "reference"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, PSNR) points no other point beats on both, sorted by speedup (non-finite PSNR left out)."""
    finite = sorted((s, q) for s, q in points if math.isfinite(s) and math.isfinite(q))
    front = []
    for s, q in sorted(finite, key=lambda p: (-p[0], -p[1])):  # fastest first: keep a point if it beats all faster ones
        if not front or q > front[-1][1]:
            front.append((s, q))
    return sorted(front)


def psnr_at(points: list[tuple[float, float]], target: float) -> tuple[float, str] | None:
    """PSNR a method's curve gives at ``target`` realized speedup: linear interpolation on its Pareto front
    where the front brackets the target (``how`` = ``""``), else the front point within 10 % of it
    (``how`` = its speedup, e.g. ``"1.46x"``); ``None`` when no point is that close."""
    front = pareto_front(points)
    if not front:
        return None
    speeds = [s for s, _ in front]
    if speeds[0] <= target <= speeds[-1]:
        return float(np.interp(target, speeds, [q for _, q in front])), ""
    s, q = min(front, key=lambda p: abs(p[0] - target))
    if abs(s - target) <= NEAREST_TOLERANCE * target:
        return q, f"{s:.2f}x"
    return None


def matched_table(rows: list[dict], targets: list[float]) -> list[dict]:
    """Per method: PSNR at each target realized speedup (see :func:`psnr_at`), in first-seen order."""
    methods: dict[str, dict] = {}
    for r in _measured(rows):
        m = methods.setdefault(r["method"], {"method": r["method"], "kind": r["kind"], "points": []})
        if r["psnr"] is not None:
            m["points"].append((r["speedup"], r["psnr"]))
    return [{"method": m["method"], "kind": m["kind"], "psnr": {t: psnr_at(m["points"], t) for t in targets}}
            for m in methods.values()]


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def results_markdown(rows: list[dict], targets: list[float], skipped: dict[str, str], info: dict, env: dict) -> str:
    """The bench report in markdown: quality at matched realized speedup, then every point measured."""
    setup = (f"Model {info.get('model', '')}, {_sampler_text(info['sampler'])}; {info['n']} held-out seeds "
             f"({_seed_text(info['seeds'])}), {info['repeats']} interleaved timed runs each after {info['warmup']} "
             f"warm-up; {env['device']} ({env['device_name']}), {env['torch_threads']} torch threads.")
    how = (f"PSNR (dB, against the full {info['sampler']['steps']}-step run from the same seeds) at matched realized "
           "speedup: interpolated on each method's Pareto front; a value with a speedup in brackets is the nearest "
           "measured point (within 10 %); blank: the method does not reach that speed.")
    lines = [setup, "", how, ""]
    head = "| method | kind | " + " | ".join(f"{t:g}x" for t in targets) + " |"
    lines += [head, "|---|---|" + "---|" * len(targets)]
    for m in matched_table(rows, targets):
        cells = []
        for t in targets:
            v = m["psnr"][t]
            cells.append("" if v is None else f"{v[0]:.2f}" + (f" ({v[1]})" if v[1] else ""))
        lines.append(f"| {m['method']} | {m['kind']} | " + " | ".join(cells) + " |")
    lines += ["", "Every point measured (speedup: median of per-run ratios to the interleaved full runs, min-max in brackets):", ""]
    lines += ["| method | kind | setting | realized speedup | predicted | PSNR dB | SSIM | rel. L1 | digit acc. | Frechet | search s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = ""
        if r.get("speedup") is not None:
            speed = f"{r['speedup']:.2f}x"
            if r.get("speedup_min") is not None:
                speed += f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        status = "" if r["status"] == "ok" else r["status"].replace("|", "/")
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['setting']} | {speed} | {_fmt(r.get('predicted_speedup'), '.2f')} | "
            f"{_fmt(r.get('psnr'), '.2f')} | {_fmt(r.get('ssim'), '.4f')} | {_fmt(r.get('rel_l1'), '.4f')} | "
            f"{_fmt(r.get('accuracy'), '.3f')} | {_fmt(r.get('frechet'), '.1f')} | {_fmt(r.get('search_s'), '.1f')} | {status} |")
    if info.get("search_params"):
        given = "; ".join(f"{name} " + ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
                          for name, params in info["search_params"].items())
        lines += ["", f"Search parameters set by the bench (the rest are each strategy's defaults): {given}."]
    if skipped:
        lines += [""] + [f"- peer `{name}` skipped: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def _sampler_text(s: dict) -> str:
    return f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']:g}"


def _seed_text(seeds: list[int]) -> str:
    from planner.seeds import format_seeds

    return format_seeds(seeds)


# --------------------------------------------------------------------------- figures


def pareto_plot(rows: list[dict], path: str | Path, title: str, targets: list[float] = ()) -> Path:
    """Realized speedup vs PSNR, one curve per method (ours solid, baselines dashed, peers dotted) through
    its points in knob order, each with its min-max speedup spread as a horizontal bar; written
    atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.io import write_atomic

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    methods: dict[str, list[dict]] = {}
    for r in _measured(rows):
        if r["psnr"] is not None and math.isfinite(r["psnr"]):
            methods.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    for (name, pts), color in zip(methods.items(), colors * 2):
        # points joined in knob order (budget, threshold), so timing noise shows rather than being sorted away
        x = np.array([r["speedup"] for r in pts])
        y = np.array([r["psnr"] for r in pts])
        err = np.array([[r["speedup"] - (r["speedup_min"] or r["speedup"]) for r in pts],
                        [(r["speedup_max"] or r["speedup"]) - r["speedup"] for r in pts]]).clip(min=0)
        kind = pts[0]["kind"]
        ax.errorbar(x, y, xerr=err, color=color, linestyle=STYLE.get(kind, "-"), marker="o", markersize=4, capsize=2,
                    linewidth=2.2 if kind == "ours" else 1.3, label=f"{name} ({kind})")
    for t in targets:
        ax.axvline(t, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("realized speedup over full compute (interleaved wall clock, median)")
    ax.set_ylabel("PSNR vs full compute (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def _tile(images, columns: int = 8) -> np.ndarray:
    """``[B, C, H, W]`` (videos: first frame) in [0, 1] -> one ``[rows*H, columns*W, C]`` array with 1-px gaps."""
    x = images[:, :, 0] if images.dim() == 5 else images
    b, c, h, w = x.shape
    columns = min(columns, b)
    rows = -(-b // columns)
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c), dtype=np.float32)
    arr = x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, col = divmod(i, columns)
        grid[r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = arr[i]
    return grid


def save_comparison_grid(full, planned, path: str | Path, title: str = "", columns: int = 8) -> Path:
    """Three panels side by side: full compute, the planned run, and their absolute difference (scaled
    to its maximum, which the panel title states); written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.io import write_atomic

    diff = (planned.float() - full.float()).abs()
    peak = float(diff.max())
    panels = [("full compute", _tile(full, columns)), ("planned", _tile(planned, columns)),
              (f"|difference| x {1 / peak:.3g} (max {peak:.3g})" if peak > 0 else "|difference| (identical)",
               _tile(diff / peak if peak > 0 else diff, columns))]
    aspect = panels[0][1].shape[0] / panels[0][1].shape[1]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4 * aspect + 0.9), dpi=120)
    for ax, (name, img) in zip(axes, panels):
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------- all outputs


def write_outputs(result, env: dict, out: str | Path, targets: list[float], title: str) -> dict[str, str]:
    """Write ``results.csv``, ``results.md``, ``results.json``, ``pareto.png`` and ``environment.json`` into
    ``out`` (each atomically); returns their paths."""
    from planner.io import write_atomic, write_json_atomic, write_text_atomic

    out = Path(out)
    files = {name: str(out / name) for name in
             ("results.csv", "results.md", "results.json", "pareto.png", "environment.json")}
    frame = results_frame(result.rows)
    write_atomic(files["results.csv"], lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))
    write_text_atomic(files["results.md"], results_markdown(result.rows, targets, result.skipped, result.info, env))
    pareto_plot(result.rows, files["pareto.png"], title, targets)
    write_json_atomic(files["environment.json"], json_safe(env))
    write_json_atomic(files["results.json"], json_safe({"info": result.info, "skipped": result.skipped,
                                                        "rows": result.rows, "environment": env}))
    return files
