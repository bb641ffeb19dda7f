"""Reading a profile: the summary ``planner profile show`` prints and the PNGs ``planner profile plot`` draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from planner.profile.artifact import Profile
from planner.profile.similarity import CFG_LAG

KIND_ORDER = ("block", "attn", "cross_attn", "mlp")
KIND_COLORS = {"block": "#4c72b0", "attn": "#dd8452", "cross_attn": "#55a868", "mlp": "#c44e52", "fixed": "#8c8c8c"}
_SPARK = "▁▂▃▄▅▆▇█"


def short_name(name: str) -> str:
    """A module name without its block-list prefix: ``transformer_blocks.3.attn1`` -> ``3.attn1``;
    Flux's single blocks keep an ``s`` (``s2.proj_mlp``)."""
    for prefix, rep in (("single_transformer_blocks.", "s"), ("transformer_blocks.", ""), ("blocks.", "")):
        if name.startswith(prefix):
            return rep + name[len(prefix):]
    return name


def sparkline(values, log: bool = True) -> str:
    """Unicode sparkline of ``values`` (log scale by default, NaN as a space)."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & ((v > 0) if log else True)
    if not ok.any():
        return " " * len(v)
    w = np.log10(np.where(ok, v, np.nan)) if log else np.where(ok, v, np.nan)
    lo, hi = np.nanmin(w), np.nanmax(w)
    span = hi - lo or 1.0
    return "".join(" " if not good else _SPARK[int(round((x - lo) / span * (len(_SPARK) - 1)))] for x, good in zip(w, ok))


def _ordered_modules(profile: Profile) -> list[str]:
    """Modules grouped by kind (blocks, attention, cross-attention, MLP), each group in block order."""
    mods = sorted(profile.meta.modules, key=lambda m: (KIND_ORDER.index(m.kind) if m.kind in KIND_ORDER else 9, m.block, m.name))
    return [m.name for m in mods]


def summarize(profile: Profile, top: int = 5) -> dict:
    """The figures ``planner profile show`` reports, as plain JSON-able data.

    Stability is the mean (over steps from 1 on and both branches) of the mean relative L1 of a
    module's output against the previous step; lower is more cacheable.
    """
    m = profile.meta
    stab = profile.stability(lag=1, skip_first=1)
    reuse = profile.curve(lag=1, metric="res_reuse_rel_l1_mean").iloc[1:].mean()

    def rows(df):
        return [
            {"module": name, "kind": r.kind, "rel_l1": _f(r["mean"]), "rel_l1_max": _f(r["max"]),
             "residual_reuse_rel_l1": _f(reuse.get(name))}
            for name, r in df.iterrows()
        ]

    sim = profile.similarity
    blocks = sim[sim.kind == "block"]
    curve = blocks[blocks.lag == 1].groupby("step").rel_l1_mean.mean().reindex(range(m.steps))
    cfg_curve = blocks[blocks.lag == CFG_LAG].groupby("step").rel_l1_mean.mean().reindex(range(m.steps)) if len(m.branches) == 2 else None
    by_lag = {int(lag): _f(g.rel_l1_mean.mean()) for lag, g in sim[sim.lag > 0].groupby("lag")}
    by_kind = {k: _f(g.rel_l1_mean.mean()) for k, g in sim[(sim.lag == 1) & (sim.step > 0)].groupby("kind")}
    lag1 = sim[(sim.lag == 1) & (sim.step > 0)]
    res_by_kind = {k: _f(g.res_rel_l1_mean.mean()) for k, g in lag1.groupby("kind")}
    reuse_by_kind = {k: _f(g.res_reuse_rel_l1_mean.mean()) for k, g in lag1.groupby("kind")}
    both = pd.DataFrame({"out": stab["mean"], "res": reuse}).dropna()
    residual_wins = [n for n, r in both.iterrows() if r.res < r.out]

    model = profile.latency_model()
    run_s = model.predict_run(None)
    parts = model.breakdown()
    cost = profile.cost
    mods = cost[cost.kind != "fixed"].sort_values("self_ms", ascending=False)
    lat = m.latency
    return {
        "name": m.name,
        "path": str(profile.path) if profile.path else None,
        "model": {"spec": m.model_spec, "class": m.model_class, "fingerprint": m.fingerprint, "modules": len(m.modules),
                  "blocks": sum(1 for x in m.modules if x.kind == "block")},
        "sampler": {**m.sampler.to_dict(), "cfg_layout": m.cfg_layout, "branches": list(m.branches)},
        "calibration": {"samples": m.samples, "seeds": [m.seeds[0], m.seeds[-1]] if m.seeds else [], "batch": m.batch},
        "device": m.device,
        "duration_s": _f(m.durations_s.get("total")),
        "most_stable": rows(stab.head(top)),
        "least_stable": rows(stab.tail(top).iloc[::-1]),
        "rel_l1_by_kind": by_kind,
        "residual_rel_l1_by_kind": res_by_kind,
        "residual_reuse_rel_l1_by_kind": reuse_by_kind,
        "residual_reuse_better": {"modules": residual_wins, "of": int(len(both))},
        "rel_l1_by_lag": by_lag,
        "step_curve": [_f(x) for x in curve],
        "cfg_curve": [_f(x) for x in cfg_curve] if cfg_curve is not None else None,
        "time": {
            "run_s": run_s,
            "step_s": (run_s - model.run_fixed_s) / m.steps,
            "parts_s": parts,
            "top_modules": [{"module": r.module, "kind": r.kind, "self_ms": _f(r.self_ms), "flops": _f(r.self_flops)} for r in mods.head(top).itertuples()],
        },
        "latency_model": {
            "predicted_run_s": _f(lat.get("predicted_run_s")),
            "measured_run_s": _f(lat.get("measured_run_s")),
            "relative_error": _f(lat.get("relative_error")),
        },
        "warnings": list(m.warnings),
    }


def _f(x):
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if not np.isfinite(x) else x


def format_summary(s: dict) -> str:
    """``summarize``'s figures as the text ``planner profile show`` prints."""
    lines = []
    sam = s["sampler"]
    lines.append(f"profile {s['name']}" + (f"  ({s['path']})" if s["path"] else ""))
    lines.append(f"  model     {s['model']['spec']}  {s['model']['class']}  fingerprint {s['model']['fingerprint']}  "
                 f"{s['model']['modules']} cacheable modules in {s['model']['blocks']} blocks")
    lines.append(f"  sampler   {sam['scheduler']}, {sam['steps']} steps, guidance {sam['guidance']:g}, CFG {sam['cfg_layout']} "
                 f"(branches {', '.join(sam['branches'])})")
    cal = s["calibration"]
    dev = s["device"]
    lines.append(f"  calib     {cal['samples']} samples (seeds {cal['seeds'][0]}..{cal['seeds'][-1]}), batch {cal['batch']}; "
                 f"device {dev.get('type')} ({dev.get('name')}, {dev.get('threads')} threads)"
                 + (f"; profiling took {s['duration_s']:.1f} s" if s["duration_s"] is not None else ""))
    lines.append("")
    lines.append("Stability: relative L1 of the output vs the previous step (mean over steps and samples; lower = more cacheable);")
    lines.append("           'residual reuse' is the output error if the residual (output - input) were reused instead")
    w = max(len(r["module"]) for r in s["most_stable"] + s["least_stable"])
    for title, rows in (("most stable", s["most_stable"]), ("least stable", s["least_stable"])):
        lines.append(f"  {title}:")
        for r in rows:
            res = f"   residual reuse {r['residual_reuse_rel_l1']:.4f}" if r["residual_reuse_rel_l1"] is not None else ""
            lines.append(f"    {r['module']:<{w}}  {r['kind']:<10} {r['rel_l1']:.4f}  (worst step {r['rel_l1_max']:.3f}){res}")
    kinds = "  ".join(f"{k} {v:.4f}" for k, v in s["rel_l1_by_kind"].items() if v is not None)
    lines.append(f"  by kind (lag 1): {kinds}")
    res_kinds = "  ".join(f"{k} {v:.4f}" for k, v in s["residual_reuse_rel_l1_by_kind"].items() if v is not None)
    if res_kinds:
        lines.append(f"  residual reuse by kind: {res_kinds}")
        win = s["residual_reuse_better"]
        lines.append(f"  residual reuse errs less than output reuse for {len(win['modules'])} of {win['of']} modules"
                     + (f" ({', '.join(short_name(n) for n in win['modules'][:12])}{', ...' if len(win['modules']) > 12 else ''})" if win["modules"] else ""))
    lags = "  ".join(f"lag {k}: {v:.4f}" for k, v in s["rel_l1_by_lag"].items() if v is not None)
    lines.append(f"  by look-back: {lags}")
    lines.append("")
    curve = s["step_curve"]
    vals = [np.nan if v is None else v for v in curve]
    lines.append("Per step: mean over blocks of relative L1 vs the previous step (log sparkline, step 0 -> last)")
    lines.append(f"  {sparkline(vals)}")
    idx = sorted(set(np.linspace(1, len(vals) - 1, min(8, max(1, len(vals) - 1))).round().astype(int).tolist())) if len(vals) > 1 else []
    lines.append("  " + "  ".join(f"t{i}:{vals[i]:.3f}" for i in idx if np.isfinite(vals[i])))
    if s["cfg_curve"] is not None:
        cfg = [np.nan if v is None else v for v in s["cfg_curve"]]
        lines.append("  cond vs uncond (what sharing CFG costs), mean over blocks:")
        lines.append(f"  {sparkline(cfg)}")
        lines.append("  " + "  ".join(f"t{i}:{cfg[i]:.3f}" for i in [0, *idx] if np.isfinite(cfg[i])))
    lines.append("")
    t = s["time"]
    lines.append(f"Where the time goes: {t['run_s'] * 1e3:.1f} ms per run, {t['step_s'] * 1e3:.2f} ms per step")
    total = t["run_s"] or 1.0
    for part, sec in sorted(t["parts_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {part:<22} {sec * 1e3:9.1f} ms  {100 * sec / total:5.1f}%")
    lines.append("  costliest modules (own compute per call, children excluded):")
    for r in t["top_modules"]:
        fl = f"  {r['flops'] / 1e6:.2f} MFLOP" if r["flops"] is not None else ""
        lines.append(f"    {r['module']:<{w}}  {r['kind']:<10} {r['self_ms']:.3f} ms{fl}")
    lm = s["latency_model"]
    if None not in (lm["predicted_run_s"], lm["measured_run_s"], lm["relative_error"]):
        lines.append(f"Latency model: full run predicted {lm['predicted_run_s'] * 1e3:.1f} ms, measured {lm['measured_run_s'] * 1e3:.1f} ms "
                     f"({100 * lm['relative_error']:+.1f}%)")
    for wmsg in s["warnings"]:
        lines.append(f"warning: {wmsg}")
    return "\n".join(lines)


def plot_profile(profile: Profile, out_dir: str | Path | None = None) -> list[Path]:
    """Write the profile's PNGs into ``out_dir`` (default: the profile folder) and return their paths:
    ``similarity_output.png``, ``similarity_residual.png`` and ``similarity_residual_reuse.png``
    (steps x modules heatmaps of the mean relative L1 of the output, of the residual, and of the
    output error a residual reuse makes, per lag and branch), ``curves.png`` (per-step curves per
    kind) and ``cost.png`` (per-module latency and FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    from planner.io import write_atomic

    out = Path(out_dir) if out_dir is not None else profile.path
    if out is None:
        raise ValueError("the profile has no folder; pass out_dir")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, fname in (("rel_l1_mean", "similarity_output.png"), ("res_rel_l1_mean", "similarity_residual.png"),
                          ("res_reuse_rel_l1_mean", "similarity_residual_reuse.png")):
        fig = _heatmaps(profile, metric)
        target = out / fname
        write_atomic(target, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        written.append(target)
        _close(fig)
    for fname, build in (("curves.png", _curves), ("cost.png", _cost)):
        fig = build(profile)
        target = out / fname
        write_atomic(target, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        written.append(target)
        _close(fig)
    return written


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


_HEATMAP_TITLES = {
    "rel_l1_mean": "relative L1 change of each module's output",
    "res_rel_l1_mean": "relative L1 change of each module's residual (output - input)",
    "res_reuse_rel_l1_mean": "output error if each module's residual were reused (relative L1)",
}


def _heatmaps(profile: Profile, metric: str):
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter, LogLocator

    m = profile.meta
    order = _ordered_modules(profile)
    kinds = {x.name: x.kind for x in m.modules}
    lags = list(range(1, m.lags + 1)) + ([CFG_LAG] if len(m.branches) == 2 else [])
    panels = {(lag, b): profile.curve(lag=lag, branch=b, metric=metric)[order].T.to_numpy() for lag in lags for b in m.branches}
    allv = np.concatenate([p[np.isfinite(p) & (p > 0)] for p in panels.values()]) if panels else np.array([])
    if allv.size == 0:
        allv = np.array([1e-3, 1.0])
    vmin = max(np.percentile(allv, 1), 1e-4)
    vmax = max(np.percentile(allv, 99.5), vmin * 10)
    nrow, ncol = len(lags), len(m.branches)
    height = max(2.2, 0.13 * len(order) + 1.0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 1.6, height * nrow + 0.8), squeeze=False, sharex=True, sharey=True)
    im = None
    for i, lag in enumerate(lags):
        for j, b in enumerate(m.branches):
            ax = axes[i][j]
            data = np.ma.masked_invalid(panels[(lag, b)])
            im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax))
            what = f"vs {lag} step{'s' if lag > 1 else ''} back" if lag != CFG_LAG else f"vs the {'uncond' if b == 'cond' else 'cond'} branch, same step"
            ax.set_title(f"{b}: {what}", fontsize=9)
            _kind_separators(ax, order, kinds)
            if j == 0:
                ax.set_yticks(range(len(order)))
                ax.set_yticklabels([short_name(n) for n in order], fontsize=max(4, min(7, 300 // max(1, len(order)))))
                ax.set_ylabel("module (blocks | attention | MLP)", fontsize=8)
            if i == nrow - 1:
                ax.set_xlabel("step")
    fig.suptitle(f"{m.name}: {_HEATMAP_TITLES.get(metric, metric)}, mean over {m.samples} samples "
                 f"(dark = stable, bright = changing; blank = no data)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.91, 0.97))
    cax = fig.add_axes((0.925, 0.1, 0.015, 0.8))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"{metric} (log scale)")
    cb.locator = LogLocator(subs=(1.0, 2.0, 5.0))
    cb.formatter = FuncFormatter(lambda v, _pos: f"{v:g}")
    cb.update_ticks()
    return fig


def _kind_separators(ax, order, kinds):
    prev = None
    for i, name in enumerate(order):
        if prev is not None and kinds[name] != prev:
            ax.axhline(i - 0.5, color="white", lw=0.8)
        prev = kinds[name]


def _curves(profile: Profile):
    import matplotlib.pyplot as plt

    m = profile.meta
    sim = profile.similarity
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for kind, g in sim[sim.lag == 1].groupby("kind"):
        c = g.groupby("step").rel_l1_mean.mean().reindex(range(m.steps))
        ax.plot(c.index, c.values, label=f"{kind} output", color=KIND_COLORS.get(kind))
        r = g.groupby("step").res_reuse_rel_l1_mean.mean().reindex(range(m.steps))
        if r.notna().any():
            ax.plot(r.index, r.values, ls="--", color=KIND_COLORS.get(kind), alpha=0.7, label=f"{kind} residual reuse")
    if len(m.branches) == 2:
        c = sim[(sim.lag == CFG_LAG) & (sim.kind == "block")].groupby("step").rel_l1_mean.mean().reindex(range(m.steps))
        ax.plot(c.index, c.values, color="k", lw=1, ls=":", label="block cond vs uncond")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L1 error vs previous step (mean)")
    ax.set_title("per-step change by module kind", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    blocks = sim[(sim.kind == "block") & (sim.lag > 0)]
    for lag, g in blocks.groupby("lag"):
        c = g.groupby("step").rel_l1_mean.mean().reindex(range(m.steps))
        ax.plot(c.index, c.values, label=f"lag {lag}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("blocks: change vs 1..k steps back", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(f"{m.name}", fontsize=10)
    fig.tight_layout()
    return fig


def _cost(profile: Profile):
    import matplotlib.pyplot as plt

    m = profile.meta
    cost = profile.cost
    calls = 2 if m.cfg_layout == "separate" else 1
    mods = cost[cost.kind != "fixed"].copy()
    mods = mods.set_index("module").loc[_ordered_modules(profile)].reset_index()
    per_step = mods.self_ms * calls
    fixed = cost[cost.kind == "fixed"].copy()
    scale = {"call": calls, "step": 1, "run": 1 / m.steps}
    fixed_step = [r.self_ms * scale.get(r.scope, 1) for r in fixed.itertuples()]
    labels = [short_name(n) for n in mods.module] + list(fixed.module)
    values = list(per_step) + fixed_step
    colors = [KIND_COLORS.get(k, "#999") for k in mods.kind] + [KIND_COLORS["fixed"]] * len(fixed)
    n = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.17 * n + 1.5)), sharey=True)
    y = np.arange(n)
    axes[0].barh(y, values, color=colors)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=max(4, min(8, 320 // max(1, n))))
    axes[0].invert_yaxis()
    total_step = sum(values)
    axes[0].set_xlabel("ms per step (own compute, children excluded; fixed run costs spread over the steps)")
    axes[0].set_title(f"latency on {m.device.get('type')} ({m.device.get('name', '')[:40]}): {total_step:.2f} ms per step", fontsize=9)
    fl = list(mods.self_flops / 1e6) + [0.0] * len(fixed)
    axes[1].barh(y, fl, color=colors)
    axes[1].set_xlabel("MFLOP per call (fvcore, multiply-add = 1)")
    axes[1].set_title("FLOPs (own, children excluded)", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=k) for k, c in KIND_COLORS.items() if k in set(mods.kind) or k == "fixed"]
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(f"{m.name}: module cost at batch {int(mods.batch.iloc[0]) if len(mods) else '?'}", fontsize=10)
    fig.tight_layout()
    return fig
