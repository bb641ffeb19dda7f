"""Greedy with its old candidate actions against richer ones, on the model suite, at a few budgets.

For each model, sampler (the model's own default) and budget it searches a greedy plan per variant of
candidate actions and measures it on held-out seeds: pooled, mean and worst-image PSNR against full
compute, and the realized (wall-clock) speedup next to the predicted one. The variants:

* ``old``: blocks try a first-order forecast, then residual reuse (``{"block": "FD"}``, the default
  before forecast2);
* ``q``: blocks also try the second-order forecast first (``{"block": "QFD"}``);
* ``sub``: ``q`` plus attention and MLP outputs trying forecast then reuse when their block computes.

Results go to ``benchmarks/results/actions_reach.{json,md}``. Each model can run in its own process
(``--part``: the figures of that run go to ``actions_reach.<model>.json``) and ``--merge`` joins the
parts into the results files.

    OMP_NUM_THREADS=1 python benchmarks/actions_reach.py --models digits-dit [--part]
    python benchmarks/actions_reach.py --merge
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks._results import RESULTS, finish, machine  # noqa: E402

VARIANTS = {
    "old": {"block": "FD"},
    "q": {"block": "QFD"},
    "sub": {"block": "QFD", "attn": "FR", "cross_attn": "FR", "mlp": "FR"},
}
NAME = "actions_reach"


def measure_model(model: str, budgets: list[str], variants: list[str], calib: int, eval_n: int, repeats: int,
                  save=None, done: list[dict] | None = None) -> dict:
    """Every (budget, variant) of one model: search figures and held-out figures; ``save(result so far)``
    after each row (a long run keeps what it measured)."""
    from planner.errors import PlannerError
    from planner.evaluate import evaluate_plan
    from planner.profile.store import profile_for
    from planner.runner import load_runner
    from planner.search import get_strategy
    from planner.search.budget import Budget
    from planner.search.context import SearchContext
    from planner.seeds import evaluation_seeds

    runner = load_runner(model)
    sampler = runner.resolve(runner.default_sampler)
    t0 = time.perf_counter()
    profile = profile_for(runner, sampler, samples=8)
    profile_s = time.perf_counter() - t0
    ctx = SearchContext.build(runner, sampler, profile, samples=calib)
    seeds = evaluation_seeds(eval_n)
    rows = list(done or [])  # rows an earlier run of the same settings measured (--append)
    have = {(r["budget"], r["variant"]) for r in rows if r.get("status") == "ok"}
    head = {"model": model, "sampler": {"scheduler": sampler.scheduler, "steps": sampler.steps, "guidance": sampler.guidance},
            "profile": profile.meta.name, "profile_s": profile_s, "calib_samples": calib, "eval_seeds": f"{seeds[0]}..{seeds[-1]}",
            "repeats": repeats, "max_speedup": ctx.max_speedup(), "rows": rows}
    for budget in budgets:
        for variant in variants:
            if (budget, variant) in have:
                continue
            row = {"budget": budget, "variant": variant, "actions": VARIANTS[variant]}
            t0 = time.perf_counter()
            try:
                plan = get_strategy("greedy")(actions=VARIANTS[variant]).search(ctx, Budget.parse(budget))
            except PlannerError as e:
                rows.append({**row, "status": str(e)})
                print(model, budget, variant, "error:", e, flush=True)
                continue
            row["search_s"] = time.perf_counter() - t0
            row["predicted_speedup"] = plan.prediction.speedup
            row["calib_error"] = plan.prediction.calib_error
            row["passes"] = plan.provenance.params.get("passes")
            row["max_run"] = plan.provenance.params.get("max_run")
            row["actions_used"] = {k: v for k, v in plan.action_counts().items() if v} if hasattr(plan, "action_counts") else None
            report = evaluate_plan(runner, sampler, plan, seeds, repeats=repeats)
            row.update({"status": "ok", "speedup": report["speedup"], "psnr": report["psnr"],
                        "psnr_mean": report["psnr_mean"], "psnr_worst": report["psnr_worst"]})
            rows.append(row)
            if save is not None:
                save({**head, "machine": machine()})
            print(model, budget, variant, {k: row[k] for k in ("predicted_speedup", "speedup", "psnr", "psnr_mean", "psnr_worst")}, flush=True)
    return {**head, "machine": machine()}


def render(models: list[dict]) -> None:
    """The markdown tables: per model, per budget, each variant's figures."""
    print("# Greedy's candidate actions: old (block F, D) vs forecast2 (Q) and sub-layers\n")
    print("Variants: " + "; ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in VARIANTS.items()) + ".\n")
    print("PSNR in dB against full compute on held-out seeds: pooled (MSE over all images, the headline), "
          "mean of per-image PSNRs, worst image. Speedup: realized wall-clock (median of interleaved runs) "
          "and predicted by the latency model.\n")
    for m in models:
        s = m["sampler"]
        print(f"## {m['model']} ({s['scheduler']} {s['steps']} steps, guidance {s['guidance']:g}; max predicted "
              f"{m['max_speedup']:.2f}x; {m['calib_samples']} calibration samples; seeds {m['eval_seeds']})\n")
        print("| budget | variant | predicted | realized | PSNR pooled | mean | worst | calib. error | search s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in m["rows"]:
            if r.get("status") != "ok":
                print(f"| {r['budget']} | {r['variant']} | {r['status']} |||||||")
                continue
            print(f"| {r['budget']} | {r['variant']} | {r['predicted_speedup']:.2f}x | {r['speedup']:.2f}x | "
                  f"{r['psnr']:.2f} | {r['psnr_mean']:.2f} | {r['psnr_worst']:.2f} | {r['calib_error']:.4f} | {r['search_s']:.0f} |")
        print()
    print(summary(models))


def summary(models: list[dict]) -> str:
    """Per variant: pooled PSNR minus ``old``'s at the same model and budget, worst and mean over them."""
    lines = ["## Pooled PSNR against `old` (same model and budget)\n", "| variant | worst | mean | cells |", "|---|---|---|---|"]
    for v in VARIANTS:
        if v == "old":
            continue
        diffs = []
        for m in models:
            by = {(r["budget"], r["variant"]): r for r in m["rows"] if r.get("status") == "ok"}
            for (b, var), r in by.items():
                if var == v and (b, "old") in by:
                    diffs.append(r["psnr"] - by[(b, "old")]["psnr"])
        if diffs:
            lines.append(f"| {v} | {min(diffs):+.2f} dB | {sum(diffs) / len(diffs):+.2f} dB | {len(diffs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-dit,digits-mmdit")
    ap.add_argument("--budgets", default="1.5x,2x,3x")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--eval-seeds", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", action="store_true", help="write each model's figures to actions_reach.<model>.json only")
    ap.add_argument("--merge", action="store_true", help="join the parts into actions_reach.{json,md}")
    ap.add_argument("--append", action="store_true", help="with --part: keep the rows the model's part file holds, measure the rest")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        parts = sorted(RESULTS.glob(f"{NAME}.*.json"))
        models = [json.loads(p.read_text()) for p in parts]
        return finish(NAME, {"models": models, "parts": [p.name for p in parts]}, lambda: render(models), args.json)
    models = []
    from planner.io import write_json_atomic

    for model in args.models.split(","):
        part = RESULTS / f"{NAME}.{model}.json"
        save = (lambda r, part=part: write_json_atomic(part, r)) if args.part else None
        done = json.loads(part.read_text())["rows"] if args.append and part.exists() else None
        result = measure_model(model, args.budgets.split(","), args.variants.split(","), args.calib_samples,
                               args.eval_seeds, args.repeats, save, done)
        if args.part:
            save(result)
        models.append(result)
    if args.part:
        render(models)
        return 0
    return finish(NAME, {"models": models}, lambda: render(models), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
