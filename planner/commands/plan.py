"""``planner plan show|plot|validate PLAN``: read, draw and check cache-plan files."""

from __future__ import annotations

import argparse
from pathlib import Path

from planner.cli import add_json_flag, report
from planner.errors import PlannerError
from planner.limits import finite_float, steps_arg
from planner.plan import ACTION_CODES

# Colours of the steps x modules map, one per action (and for sub-layers skipped with their block).
ACTION_COLOURS = {
    "C": "#f2f2f2",
    "R": "#3b75af",
    "D": "#519e3e",
    "F": "#ef8636",
    "Q": "#c5392b",
    "L": "#e377c2",
    "S": "#8d69b8",
    "-": "#c8c8c8",
}


def register(sub) -> None:
    p = sub.add_parser("plan", help="show, plot or validate a cache plan file")
    psub = p.add_subparsers(dest="plan_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(func=lambda args: _usage(p))

    show = psub.add_parser("show", help="print a summary of a plan")
    show.add_argument("plan", help="plan JSON file")
    add_json_flag(show)
    show.set_defaults(func=cmd_show)

    plot = psub.add_parser("plot", help="draw the steps x modules map of a plan (PNG)")
    plot.add_argument("plan", help="plan JSON file")
    plot.add_argument("--out", default=None, help="PNG to write (default: the plan's name with .png)")
    add_json_flag(plot)
    plot.set_defaults(func=cmd_plot)

    val = psub.add_parser("validate", help="check a plan alone, or against a model and a sampler")
    val.add_argument("plan", help="plan JSON file")
    val.add_argument("--model", default=None, help="also check against this model (digits-dit, tiny:flux, a folder)")
    val.add_argument("--steps", type=steps_arg, default=None, help="also check against a run of this many steps")
    val.add_argument("--guidance", type=finite_float, default=None, help="with --model: check the CFG layout at this guidance")
    val.add_argument("--device", default="cpu", help="device to load the model on (default cpu)")
    from planner.commands._args import add_size_args

    add_size_args(val.add_argument_group("with --model: check against a run of this size"))
    add_json_flag(val)
    val.set_defaults(func=cmd_validate)

    pareto = psub.add_parser("pareto", help="draw a search's Pareto front (run time vs error) with the baselines (PNG)")
    pareto.add_argument("front", help="the front folder beside an optuna plan (or the plan file)")
    pareto.add_argument("--out", default=None, help="PNG to write (default: DIR/front.png)")
    add_json_flag(pareto)
    pareto.set_defaults(func=cmd_pareto)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def summary(plan, source: str = "plan") -> dict:
    """The facts ``plan show`` prints, as a JSON-ready dict."""
    from planner.modules import module_kind
    from planner.plan import plan_to_dict

    doc = plan_to_dict(plan)
    per_step = plan.computed_fraction_per_step()
    reusing = {}
    for m in plan.model.modules:
        if not plan.is_all_compute(m):
            per = {b: plan.codes(m, b) for b in plan.branches}
            reusing[m] = next(iter(per.values())) if len(set(per.values())) == 1 else per
    return {
        "file": source,
        "schema_version": doc["version"],
        "model": {
            "class": plan.model.cls,
            "spec": plan.model.spec,
            "fingerprint": plan.model.fingerprint,
            "modules": len(plan.model.modules),
            "blocks": sum(module_kind(m)[0] == "block" for m in plan.model.modules),
        },
        "sampler": {
            "scheduler": plan.sampler.scheduler,
            "scheduler_class": plan.sampler.scheduler_class,
            "steps": plan.steps,
            "guidance": plan.sampler.guidance,
            "cfg_layout": plan.sampler.cfg_layout,
        },
        "actions": plan.action_counts(),
        "output": plan.output,  # the transformer's whole output per step, when the plan serves it
        "computed_fraction": sum(per_step) / len(per_step),
        "computed_fraction_per_step": per_step,
        "reusing_modules": reusing,
        "prediction": doc["prediction"],
        "provenance": doc["provenance"],
    }


def cmd_show(args) -> int:
    from planner.plan import load_plan

    plan = load_plan(args.plan)
    s = summary(plan, args.plan)
    m, sm, pr, pv = s["model"], s["sampler"], s["prediction"], s["provenance"]
    lines = [
        f"{args.plan}: cache plan v{s['schema_version']} for {m['class']}"
        + (f" ({m['spec']})" if m["spec"] else "")
        + f", fingerprint {m['fingerprint']}",
        f"sampler: {sm['scheduler']}" + (f" ({sm['scheduler_class']})" if sm["scheduler_class"] else "")
        + f", {sm['steps']} steps, guidance {sm['guidance']}, CFG {sm['cfg_layout']}",
        f"modules: {m['modules']} ({m['blocks']} blocks), {len(s['reusing_modules'])} with reuse",
        "actions: " + ", ".join(f"{k} {v}" for k, v in s["actions"].items()),
        *([f"output: {s['output']} (the whole transformer output; not run at {len(plan.served_steps())} steps)"]
          if s["output"] else []),
        f"computed fraction: {s['computed_fraction']:.3f} (per step {min(s['computed_fraction_per_step']):.2f} to "
        f"{max(s['computed_fraction_per_step']):.2f})",
    ]
    predicted = [
        f"speedup {pr['speedup']:.3f}x" + (" in FLOPs" if pr.get("costs") == "flops" else "")
        if pr["speedup"] is not None else None,
        f"latency fraction {pr['latency_fraction']:.3f}" if pr["latency_fraction"] is not None else None,
        f"calibration error {pr['calib_error']:.4g}" + (f" ({pr['metric']})" if pr["metric"] else "")
        if pr["calib_error"] is not None
        else None,
    ]
    predicted = [p for p in predicted if p]
    lines.append("predicted: " + (", ".join(predicted) if predicted else "nothing"))
    versions = ", ".join(f"{k} {v}" for k, v in pv["versions"].items())
    lines.append(
        f"provenance: {pv['strategy']}"
        + (f" {pv['params']}" if pv["params"] else "")
        + (f", profile {pv['profile_id']}" if pv["profile_id"] else "")
        + (f", calibration seeds {pv['calib_seeds']}" if pv["calib_seeds"] else "")
        + (f", {versions}" if versions else "")
        + (f", {pv['device']}" if pv["device"] else "")
        + (f", {pv['created']}" if pv["created"] else "")
    )
    if s["reusing_modules"]:
        legend = ", ".join(f"{code} {name}" for code, name in ACTION_CODES.items())
        lines.append(f"reusing modules ({legend}):")
        width = max(len(k) for k in s["reusing_modules"])
        for name, codes in s["reusing_modules"].items():
            if isinstance(codes, str):
                lines.append(f"  {name.ljust(width)}  {codes}")
            else:
                for i, (b, c) in enumerate(codes.items()):
                    lines.append(f"  {(name if i == 0 else '').ljust(width)}  {c}  {b}")
    report(args, s, "\n".join(lines))
    return 0


def cmd_plot(args) -> int:
    from planner.plan import load_plan

    from planner.io import check_output_path

    plan = load_plan(args.plan)
    out = check_output_path(Path(args.out) if args.out else Path(args.plan).with_suffix(".png"), "png")
    plot_plan(plan, out, title=Path(args.plan).name)
    report(args, {"plan": args.plan, "out": str(out)}, f"wrote {out}")
    return 0


def plot_plan(plan, out: str | Path, title: str | None = None) -> Path:
    """Draw the steps x modules map of ``plan`` to a PNG (one panel per CFG branch when they differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from planner.io import write_atomic

    # the whole output, when served at some steps, is the top row: nothing below it runs there
    modules = (["output"] if plan.output else []) + list(plan.model.modules)
    eff = plan.effective_compute()
    eff["output"] = {b: [c == "C" for c in plan.output or ""] for b in plan.branches}
    codes = list(ACTION_CODES) + ["-"]
    branches = list(plan.branches)
    if all(plan.codes(m, b) == plan.codes(m, branches[0]) for m in plan.model.modules for b in branches):
        branches = branches[:1]
    grids = []
    for b in branches:
        grid = np.zeros((len(modules), plan.steps), dtype=int)
        for i, m in enumerate(modules):
            for k, c in enumerate(plan.output if m == "output" else plan.codes(m, b)):
                # a sub-layer whose block is not computed does not run: show it as skipped
                skipped = c == "C" and not eff[m][b][k]
                grid[i, k] = codes.index("-" if skipped else c)
        grids.append(grid)
    cmap = ListedColormap([ACTION_COLOURS[c] for c in codes])
    height = max(2.5, 0.18 * len(modules) + 1.2)
    width = max(4.0, 0.16 * plan.steps * len(branches) + 3.5)
    fig, axes = plt.subplots(1, len(branches), figsize=(width, height), squeeze=False, sharey=True)
    for ax, grid, b in zip(axes[0], grids, branches):
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(codes) - 1, aspect="auto", interpolation="nearest")
        ax.set_xlabel("step")
        ax.set_title(b if len(branches) > 1 else "both branches" if len(plan.branches) > 1 else "")
        ax.set_xticks(range(0, plan.steps, max(1, plan.steps // 10)))
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels(modules, fontsize=6)
        ax.set_xticks(np.arange(-0.5, plan.steps, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(modules), 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.3)
        ax.tick_params(which="minor", length=0)
    legend = [Patch(color=ACTION_COLOURS[c], label=ACTION_CODES.get(c, "skipped (block not computed)")) for c in codes]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title or f"cache plan for {plan.model.cls}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def cmd_validate(args) -> int:
    from dataclasses import replace

    from planner.plan import load_plan

    plan = load_plan(args.plan)
    checks = ["schema", "rules"]
    if args.steps is not None:
        plan.check_steps(args.steps)
        checks.append("steps")
    if args.model is not None:
        from planner.runner import resolve_device
        from planner.runner import Sampler, load_runner

        runner = load_runner(args.model, device=resolve_device(args.device))
        plan.check_model(runner)
        checks.append("model")
        sampler = Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance,
                          height=args.height, width=args.width, num_frames=args.num_frames)
        if args.steps is not None:
            sampler = replace(sampler, steps=args.steps)
        if args.guidance is not None:
            sampler = replace(sampler, guidance=args.guidance)
        plan.check_sampler(runner, sampler)
        checks.append("sampler")
    elif args.guidance is not None:
        raise PlannerError("--guidance needs --model (the CFG layout depends on the model)")
    elif any(v is not None for v in (args.height, args.width, args.num_frames)):
        plan.check_size({k: v for k, v in (("height", args.height), ("width", args.width),
                                           ("num_frames", args.num_frames)) if v is not None})
        checks.append("size")
    payload = {"plan": args.plan, "valid": True, "checks": checks, "model": plan.model.cls, "steps": plan.steps}
    text = f"{args.plan}: valid ({', '.join(checks)})"
    report(args, payload, text)
    return 0


def cmd_pareto(args) -> int:
    """Draw the front folder's time-vs-error plot and report the front, the chosen plan and which
    front point dominates each baseline."""
    from planner.search._pareto import front_folder, load_front, plot_front, summarize_front

    from planner.io import check_output_path

    folder = front_folder(args.front)
    doc = load_front(folder)
    out = check_output_path(Path(args.out) if args.out else folder / "front.png", "png")
    plot_front(doc, out, folder / "trials.csv")
    s = {"front": str(folder), "out": str(out), **summarize_front(doc)}
    best = next((p for p in s["points"] if p["trial"] == s["best"]), None)
    lines = [f"{folder}: {len(s['points'])} front points from {s['trials_complete']} trials -> {out}"]
    if best is not None:
        lines.append(f"chosen plan: trial {best['trial']}, predicted {best['speedup']:.2f}x, error {best['error']:.4f}")
    for b in s["baselines"]:
        if "failed" in b:
            lines.append(f"{b['name']}: {b['failed']}")
            continue
        by = "not dominated" if b["dominated_by"] is None else f"dominated by trial {b['dominated_by']}"
        lines.append(f"{b['name']}: predicted {b['speedup']:.2f}x, error {b['error']:.4f}, {by}")
    report(args, s, "\n".join(lines))
    return 0
