"""Benchmark of ``--strategy l2c`` (issue 7) on digits-dit, DDIM at guidance 3, 50 and 20 steps.

For each step count: the l2c router is trained once per level (the training does not depend on the
budget; later budgets resume the finished checkpoint) and a plan is chosen for every budget
(default 1.3x, 2x, 3x); greedy, uniform and smoothcache search the same budgets. Every plan is
checked on held-out seeds with ``planner.evaluate.verify_plan`` (seeds from 1,000,000, full compute
and plan timed interleaved): realized speedup, PSNR/SSIM against full compute at the same seeds,
and the digit classifier's accuracy (``planner.metrics.digit_accuracy``; full compute's beside it).
Plus L2C's own finding on our model: learned caching at speed s against simply sampling with fewer
DDIM steps (round(steps / s)), both compared with the full ``steps``-step output of the same seeds.

The 20-step profile is made on the fly into ``profiles/`` when missing (``planner profile --steps 20``).

    python benchmarks/l2c_bench.py [--steps 50,20] [--budgets 1.3x,2x,3x] [--calib-samples 8]
                                   [--verify-samples 8] [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import finish  # noqa: E402

BASELINES = ("greedy", "uniform", "smoothcache")


def add_run_arguments(ap, verify_samples: int) -> None:
    """The options these benchmarks share: sample counts, timed repeats, torch threads, ``--json``."""
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--verify-samples", type=int, default=verify_samples)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")


def profile_for(runner, sampler):
    """The committed profile for ``sampler`` (made with ``planner profile``'s defaults when missing)."""
    from planner.profile import default_profile_name, load_profile, profile_model

    folder = ROOT / "profiles" / default_profile_name(runner.spec, sampler, "cpu")
    if (folder / "meta.json").is_file():
        return load_profile(folder)
    return profile_model(runner, sampler, samples=8, device="cpu", out=folder)


def l2c_plans(context, budgets, params: dict, folder: Path) -> dict:
    """``{budget label: (plan or error text, seconds)}``; one training per level, shared by resuming."""
    from planner.errors import PlannerError
    from planner.search.api import search_plan

    out = {}
    trained = False
    for label in budgets:
        start = time.perf_counter()
        try:  # later budgets resume the finished training (its checkpoint is in the plan's folder)
            plan = search_plan(None, label, strategy="l2c", context=context, out=folder / "l2c.json",
                               resume=trained, **params)
            out[label] = (plan, time.perf_counter() - start)
            trained = True
        except PlannerError as e:
            out[label] = (str(e), time.perf_counter() - start)
    context.artifacts = None
    return out


def fewer_steps(runner, full_steps: int, speed: float, seeds: list[int], guidance: float, repeats: int) -> dict:
    """Sampling with round(full_steps / speed) DDIM steps, against the full-step output of the same seeds
    (``speed``: the plan's predicted speedup; realized speedups on a shared machine are too noisy to pick
    a step count from, so both sides' realized figures are reported beside it)."""
    from planner.evaluate import Contender, quality, time_against_reference
    from planner.metrics import digit_accuracy
    from planner.runner import Sampler

    steps = max(1, round(full_steps / speed))
    conditions = runner.conditions(len(seeds), seed=seeds[0])
    full, short = Sampler("ddim", full_steps, guidance), Sampler("ddim", steps, guidance)
    timed = time_against_reference(
        Contender(lambda: runner.run(conditions, seeds, full)),
        {"short": Contender(lambda: runner.run(conditions, seeds, short))},
        repeats=repeats, reference_every=1,
    )
    q = quality(timed.outputs["short"], timed.outputs["full"])
    return {"steps": steps, "speedup": timed.timings["short"].speedup, "psnr": q["psnr"], "ssim": q["ssim"],
            "accuracy": digit_accuracy(timed.outputs["short"], conditions)}


def row_of(method: str, label: str, plan, search_s: float, verify: dict | None, note: str = "") -> dict:
    if verify is None:
        return {"method": method, "budget": label, "note": note}
    params = plan.provenance.params
    return {
        "method": method, "budget": label, "search_s": round(search_s, 1),
        "predicted": plan.prediction.speedup, "calib_error": plan.prediction.calib_error,
        "realized": verify["speedup"], "psnr": verify["psnr"], "ssim": verify["ssim"],
        "accuracy": verify["meter"]["plan"]["accuracy"], "full_accuracy": verify["meter"]["full"]["accuracy"],
        "train_s": params.get("train_s"), "level": params.get("level"),
        "lambda": params.get("lambda"), "theta": params.get("theta"), "note": note,
    }


def markdown(rows: list[dict], steps: int) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"**{steps} steps**", "",
             "| budget | method | search s | predicted | calib. error | realized speedup | PSNR dB | SSIM | accuracy (full) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "realized" not in r:
            lines.append(f"| {r['budget']} | {r['method']} | - | {r['note']} | | | | | |")
            continue
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['search_s']:.1f} | {r['predicted']:.2f}x | {r['calib_error']:.4f} | "
            f"{r['realized']:.2f}x | {f(r['psnr'], '.2f')} | {f(r['ssim'], '.4f')} | "
            f"{f(r['accuracy'], '.3f')} ({f(r['full_accuracy'], '.3f')}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="50,20")
    ap.add_argument("--budgets", default="1.3x,2x,3x")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--level", default="block", help="level param of uniform/smoothcache (l2c's default level is block)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="l2c parameter (JSON value)")
    add_run_arguments(ap, verify_samples=8)
    args = ap.parse_args(argv)

    import torch

    from planner.commands.search import parse_params
    from planner.errors import PlannerError
    from planner.evaluate import evaluation_seeds, verify_plan
    from planner.runner import Sampler, load_runner
    from planner.search.api import search_plan
    from planner.search.context import SearchContext

    torch.set_num_threads(args.threads)
    params = parse_params(args.param)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    runner = load_runner("digits-dit")
    seeds = evaluation_seeds(args.verify_samples)
    report: dict = {"threads": args.threads, "budgets": budgets, "l2c_params": params, "runs": {}}
    text = []
    for steps in [int(s) for s in args.steps.split(",")]:
        sampler = Sampler("ddim", steps, 3.0)
        profile = profile_for(runner, sampler)
        context = SearchContext.build(runner, sampler, profile, samples=args.calib_samples)
        rows, versus = [], []
        with tempfile.TemporaryDirectory() as tmp:
            l2c = l2c_plans(context, budgets, params, Path(tmp))
        for label in budgets:
            plan, seconds = l2c[label]
            if isinstance(plan, str):
                rows.append(row_of("l2c", label, None, seconds, None, plan))
            else:
                v = verify_plan(runner, sampler, plan, samples=args.verify_samples, repeats=args.repeats)
                rows.append(row_of("l2c", label, plan, seconds, v))
                short = fewer_steps(runner, steps, plan.prediction.speedup, seeds, 3.0, args.repeats)
                versus.append({"budget": label, "l2c_predicted": plan.prediction.speedup, "l2c_speedup": v["speedup"],
                               "l2c_psnr": v["psnr"],
                               "l2c_accuracy": v["meter"]["plan"]["accuracy"], **{f"ddim_{k}": x for k, x in short.items()}})
            for name in [b for b in args.baselines.split(",") if b]:
                start = time.perf_counter()
                try:
                    base_params = {"level": args.level} if name in ("uniform", "smoothcache") else {}
                    base = search_plan(None, label, strategy=name, context=context, **base_params)
                except PlannerError as e:  # an unreachable budget is a row, not the end of the benchmark
                    rows.append(row_of(name, label, None, 0.0, None, str(e)))
                    continue
                took = time.perf_counter() - start
                rows.append(row_of(name, label, base, took, verify_plan(runner, sampler, base, samples=args.verify_samples,
                                                                      repeats=args.repeats)))
            print(f"{steps} steps, {label}: done", file=sys.stderr, flush=True)
        report["runs"][str(steps)] = {"rows": rows, "versus_fewer_steps": versus}
        text.append(markdown(rows, steps))
        text.append("\n| budget | l2c predicted (realized) | l2c PSNR dB | l2c accuracy | DDIM steps at that speed | their realized | their PSNR dB | their accuracy |\n"
                    "|---|---|---|---|---|---|---|---|\n" + "\n".join(
                        f"| {v['budget']} | {v['l2c_predicted']:.2f}x ({v['l2c_speedup']:.2f}x) | {v['l2c_psnr']:.2f} | {v['l2c_accuracy']:.3f} | "
                        f"{v['ddim_steps']} | {v['ddim_speedup']:.2f}x | {v['ddim_psnr']:.2f} | {v['ddim_accuracy']:.3f} |"
                        for v in versus))
    def render():
        print("\n\n".join(text))

    return finish("l2c", report, render, args.json, args.results)


if __name__ == "__main__":
    sys.exit(main())
