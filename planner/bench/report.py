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
from planner.metrics import PSNR_INTERVAL_LEVEL

COLUMNS = ["method", "kind", "setting", "budget", "status", "speedup", "speedup_min", "speedup_max", "median_s",
           "flop_speedup", "flops", "predicted_speedup", "calib_error", "search_s", "psnr", "psnr_lo", "psnr_hi",
           "psnr_mean", "psnr_p5", "psnr_worst", "ssim", "rel_l1", "mse"]
TAIL = ["plan", "params"]  # after the model's own meter scores (accuracy, frechet, ...), whichever it has
STYLE = {"ours": "-", "baseline": "--", "peer": ":"}
PACKAGES = ("torch", "diffusers", "cache-dit", "optuna", "numpy", "transformers", "dit-cache-planner")


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


def meter_columns(rows: list[dict]) -> list[str]:
    """The model's own meter scores the rows carry (e.g. ``accuracy``, ``frechet``), in first-seen order."""
    known = set(COLUMNS) | set(TAIL)
    return list(dict.fromkeys(k for r in rows for k in r if k not in known))


def results_frame(rows: list[dict]):
    """The rows as a pandas DataFrame: the columns of ``COLUMNS``, the meter scores, then ``TAIL``."""
    import pandas as pd

    return pd.DataFrame(rows).reindex(columns=COLUMNS + meter_columns(rows) + TAIL)


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("speedup") is not None and r.get("kind") != "reference"]


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def results_markdown(rows: list[dict], targets: list[float], skipped: dict[str, str], info: dict, env: dict,
                     margin_table: dict | None = None) -> str:
    """The bench report in markdown: pooled PSNR at matched realized and FLOP speedup, the margins of our
    best strategy (``margin_table``, :func:`planner.bench.margins.margins`; default: the rows' own, without
    intervals), then every point measured."""
    from planner.bench.margins import AXES, margin_text, margins, matched
    from planner.evaluate import METER_LABELS, interval_text

    timed = info.get("timed_seeds", info["n"])
    on = "" if timed == info["n"] else f" on the first {timed}"
    setup = (f"Model {info.get('model', '')}, {_sampler_text(info['sampler'])}; {info['n']} held-out seeds "
             f"({_seed_text(info['seeds'])}), {info['repeats']} interleaved timed runs each{on} after {info['warmup']} "
             f"warm-up; {env['device']} ({env['device_name']}), {env['torch_threads']} torch threads.")
    how = (f"Pooled PSNR (dB, from the MSE over all pixels of all images, against the full {info['sampler']['steps']}-step "
           "run from the same seeds) at matched speedup, read off each method's Pareto front: linear interpolation "
           "between the measured neighbours, the slowest point when all are faster, blank when the method does not "
           "reach that speed (docs/eval-and-bench.md).")
    lines = [setup, "", how, ""]
    if info.get("timing_noise"):
        lines += [noise_text(info["timing_noise"]), ""]
    if info.get("top_up"):
        plans = ", ".join(f"{t['method']} {t['budget']}" for t in info["top_up"])
        lines += [f"Searched again because the plan for the largest budget ran slower than it: {plans} (the rows "
                  "marked top-up).", ""]
    for axis, title in AXES.items():
        lines += [f"**At matched {title}**", "", "| method | kind | " + " | ".join(f"{t:g}x" for t in targets) + " |",
                  "|---|---|" + "---|" * len(targets)]
        for m in matched(rows, targets, axis):
            cells = ["" if m["psnr"][t] is None else f"{m['psnr'][t]:.2f}" for t in targets]
            lines.append(f"| {m['method']} | {m['kind']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Margins of the best of our strategies** (dB pooled PSNR; blank: a side does not reach the speed)", "",
              "| axis | speedup | best of ours | vs best peer | vs fewer steps | vs greedy |", "|---|---|---|---|---|---|"]
    for axis, per in (margin_table or margins(rows, targets)).items():
        for label, e in per.items():
            ours = "" if e["ours"]["psnr"] is None else f"{e['ours']['psnr']:.2f} ({e['ours']['method']})"
            cells = [margin_text(e, k) for k in ("margin_peer", "margin_fewer_steps", "margin_greedy")]
            lines.append(f"| {AXES[axis]} | {label} | {ours} | " + " | ".join(cells) + " |")
    if any(k.endswith("_interval") for per in (margin_table or {}).values() for e in per.values() for k in e):
        lines += ["", f"In brackets: the {PSNR_INTERVAL_LEVEL:.0%} bootstrap interval of each margin over the held-out "
                      "images (every method's PSNR pooled over the same draw of images, every front read again)."]
    meters = meter_columns(rows)
    lines += ["", "Every point measured (realized speedup: median of per-run ratios to the interleaved full runs, "
              "min-max in brackets; FLOP speedup: counted FLOPs of full compute over the method's; PSNR pooled with "
              f"its {PSNR_INTERVAL_LEVEL:.0%} bootstrap interval over the images in brackets, then the mean, 5th "
              "percentile and worst of the per-image PSNRs):", ""]
    lines += ["| method | kind | setting | realized speedup | FLOP speedup | predicted | PSNR pooled | mean | p5 | worst | "
              "SSIM | " + "".join(f"{METER_LABELS.get(n, n)} | " for n in meters) + "search s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(meters) + "---|---|"]
    for r in rows:
        speed = ""
        if r.get("speedup") is not None:
            speed = f"{r['speedup']:.2f}x"
            if r.get("speedup_min") is not None:
                speed += f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        flop = "" if r.get("flop_speedup") is None else f"{r['flop_speedup']:.2f}x"
        status = "" if r["status"] == "ok" else r["status"].replace("|", "/")
        meter = "".join(f"{_fmt(r.get(n), '.1f' if n == 'frechet' else '.3f')} | " for n in meters)
        lines.append(
            f"| {r['method']} | {r['kind']} | {r['setting']} | {speed} | {flop} | {_fmt(r.get('predicted_speedup'), '.2f')} | "
            + f"{_fmt(r.get('psnr'), '.2f')}{interval_text(r.get('psnr_lo'), r.get('psnr_hi'))} | "
            + " | ".join(_fmt(r.get(k), ".2f") for k in ("psnr_mean", "psnr_p5", "psnr_worst"))
            + f" | {_fmt(r.get('ssim'), '.4f')} | {meter}{_fmt(r.get('search_s'), '.1f')} | {status} |")
    if info.get("search_params"):
        given = "; ".join(f"{name} " + ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
                          for name, params in info["search_params"].items())
        lines += ["", f"Search parameters set by the bench (the rest are each strategy's defaults): {given}."]
    if info.get("reduced"):
        cut = "; ".join(f"{name} " + ", ".join(f"{k}={json.dumps(v['bench'])} (default {json.dumps(v['default'])})"
                                               for k, v in keys.items()) for name, keys in info["reduced"].items())
        lines += ["", f"Reduced from the declared defaults in this run: {cut}."]
    if skipped:
        lines += [""] + [f"- peer `{name}` skipped: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def noise_text(noise: dict) -> str:
    """One paragraph on how far this run's realized speedups can be trusted (``planner.evaluate.timing_noise``
    plus the load averages the bench read), flagged in bold when they are noisy."""
    text = (f"Timing noise: one run's speed ratio scattered by {noise['ratio_sd']:.1%} (pooled over every method's "
            f"runs), so a realized speedup from {noise['runs']} runs is uncertain by about "
            f"{noise['speedup_se']:.1%}")
    if noise.get("load_before") is not None:
        text += (f"; load average {noise['load_before']:.1f} before timing, {noise['load_after']:.1f} after, on "
                 f"{noise['cpus']} CPUs")
    text += "."
    if noise["noisy"]:
        text = ("**Noisy timing.** " + text + " The realized-speedup figures of this run may move by several dB in a "
                "rerun where a front is steep; --max-repeats adds rounds while the timing is noisy, and a machine with "
                "nothing else running narrows it. "
                "The FLOP axis does not depend on timing.")
    return text


def noise_summary(noises: dict[str, dict | None]) -> str:
    """A summary line (markdown, ending in a blank line): each model's standard error of a realized speedup,
    the noisy ones named; empty when no model has a noise figure."""
    known = {m: n for m, n in noises.items() if n}
    if not known:
        return ""
    each = ", ".join(f"{m} {n['speedup_se']:.1%}" + (" (noisy)" if n["noisy"] else "") for m, n in known.items())
    return f"\nRealized speedups uncertain by about (standard error): {each}.\n"


def _sampler_text(s: dict) -> str:
    return f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']:g}"


def _seed_text(seeds: list[int]) -> str:
    from planner.seeds import format_seeds

    return format_seeds(seeds)


# --------------------------------------------------------------------------- figures


def pareto_plot(rows: list[dict], path: str | Path, title: str, targets: list[float] = ()) -> Path:
    """Two panels, realized speedup vs pooled PSNR and FLOP speedup vs pooled PSNR, one curve per method
    (ours solid, baselines dashed, peers dotted) through its points in knob order, realized points with
    their min-max speedup spread as a horizontal bar; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planner.io import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), dpi=120, sharey=True)
    methods: dict[str, list[dict]] = {}
    for r in _measured(rows):
        if r["psnr"] is not None and math.isfinite(r["psnr"]):
            methods.setdefault(r["method"], []).append(r)
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20").colors
    for ax, axis in zip(axes, ("speedup", "flop_speedup")):
        for (name, pts), color in zip(methods.items(), colors * 3):
            # points joined in knob order (budget, threshold), so timing noise shows rather than being sorted away
            pts = [r for r in pts if r.get(axis) is not None]
            if not pts:
                continue
            x = np.array([r[axis] for r in pts])
            y = np.array([r["psnr"] for r in pts])
            err = None
            if axis == "speedup":
                err = np.array([[r["speedup"] - (r["speedup_min"] or r["speedup"]) for r in pts],
                                [(r["speedup_max"] or r["speedup"]) - r["speedup"] for r in pts]]).clip(min=0)
            kind = pts[0]["kind"]
            ax.errorbar(x, y, xerr=err, color=color, linestyle=STYLE.get(kind, "-"), marker="o", markersize=4,
                        capsize=2, linewidth=2.2 if kind == "ours" else 1.3, label=f"{name} ({kind})")
        for t in targets:
            ax.axvline(t, color="0.85", linewidth=0.8, zorder=0)
        ax.grid(True, alpha=0.3)
    axes[0].set_xlabel("realized speedup over full compute (interleaved wall clock, median)")
    axes[1].set_xlabel("FLOP speedup over full compute (counted FLOPs)")
    axes[0].set_ylabel("pooled PSNR vs full compute (dB)")
    fig.suptitle(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="best")
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
    margin_table = result.margins(targets)
    write_text_atomic(files["results.md"], results_markdown(result.rows, targets, result.skipped, result.info, env,
                                                            margin_table))
    pareto_plot(result.rows, files["pareto.png"], title, targets)
    write_json_atomic(files["environment.json"], json_safe(env))
    write_json_atomic(files["results.json"], json_safe({"info": result.info, "skipped": result.skipped,
                                                        "margins": margin_table,
                                                        "rows": result.rows, "environment": env}))
    return files
