"""Benchmark of ``--strategy harmonica`` (issue 8) on digits-dit, DDIM at guidance 3, 20 and 50 steps.

For every step count and budget (default 1.5x and 2x) four plans are made on the same search
context (8 calibration samples): harmonica with the paper's image-error proxy, harmonica with the
released code's proxy, l2c (trained once per step count; later budgets resume its finished
checkpoint) and greedy. Then all four and full compute run on the same held-out seeds (from
1,000,000), timed interleaved in one sequence (``planner.evaluate.time_against_reference``: each
plan's run is paired with the full-compute runs around it), so that their realized speedups are
measured side by side. Reported per plan: search (training) seconds, predicted and realized speedup,
calibration error, PSNR and SSIM against full compute at the same seeds, and the digit classifier's
accuracy and Frechet distance on its features (full compute's beside them). The HarmoniCa paper's
claim (it beats L2C at equal speed) is checked per setting on PSNR.

    python benchmarks/harmonica_bench.py [--steps 20,50] [--budgets 1.5x,2x] [--calib-samples 8]
                                         [--verify-samples 16] [--repeats 3] [--threads 2] [--json]
                                         [--param KEY=VALUE ...]   (harmonica parameters)
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

from benchmarks.l2c_bench import add_run_arguments, l2c_plans, profile_for  # noqa: E402

PROXIES = {"harmonica": "paper", "harmonica-released": "released"}


def search_timed(strategy: str, params: dict, context, label: str, folder: Path | None = None):
    """``(plan or error text, seconds)`` of one search; ``folder`` holds the training's artifacts."""
    from planner.errors import PlannerError
    from planner.search.api import search_plan

    start = time.perf_counter()
    try:
        out = None if folder is None else folder.with_suffix(".json")
        return search_plan(None, label, strategy=strategy, context=context, out=out, **params), time.perf_counter() - start
    except PlannerError as e:
        return str(e), time.perf_counter() - start
    finally:
        context.artifacts = None


def measure(runner, sampler, plans: dict, seeds: list[int], repeats: int) -> dict:
    """Full compute and every plan on ``seeds``, timed interleaved; ``{name: figures}`` plus ``"full"``."""
    from planner.evaluate import REFERENCE, Contender, meter_scores, quality, time_against_reference
    from planner.executor import apply_plan

    conditions = runner.conditions(len(seeds), seed=seeds[0])

    def run():
        return runner.run(conditions, seeds, sampler)

    timed = time_against_reference(
        Contender(run), {name: Contender(run, context=lambda p=plan: apply_plan(runner.pipe, p)) for name, plan in plans.items()},
        repeats=repeats, reference_every=len(plans),
    )
    full = timed.outputs[REFERENCE]
    out = {"full": {**meter_scores(runner, full, conditions), "seconds": min(timed.reference_seconds)}}
    for name, plan in plans.items():
        q = {**quality(timed.outputs[name], full), **meter_scores(runner, timed.outputs[name], conditions)}
        out[name] = {"realized": timed.timings[name].speedup, "predicted": plan.prediction.speedup,
                     "calib_error": plan.prediction.calib_error, **q}
    return out


def markdown(rows: list[dict]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| steps | budget | method | search s | predicted | realized | calib. error | PSNR dB | SSIM | accuracy | Frechet |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['steps']} | {r['budget']} | {r['method']} | {f(r.get('search_s'), '.0f')} | {r['note']} |||||||")
            continue
        lines.append(
            f"| {r['steps']} | {r['budget']} | {r['method']} | {f(r.get('search_s'), '.0f')} | {f(r.get('predicted'), '.2f')}x | "
            f"{f(r.get('realized'), '.2f')}x | {f(r.get('calib_error'), '.4f')} | {f(r.get('psnr'), '.2f')} | "
            f"{f(r.get('ssim'), '.4f')} | {f(r['accuracy'], '.3f')} | {f(r['frechet'], '.1f')} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[dict]:
    """Per (steps, budget): harmonica (paper proxy) minus l2c in PSNR, with both realized speedups."""
    out = []
    keyed = {(r["steps"], r["budget"], r["method"]): r for r in rows if "psnr" in r}
    for steps, budget in dict.fromkeys((r["steps"], r["budget"]) for r in rows if r["budget"] != "-"):
        h, lc = keyed.get((steps, budget, "harmonica")), keyed.get((steps, budget, "l2c"))
        if h and lc:
            out.append({"steps": steps, "budget": budget, "psnr_gain_db": h["psnr"] - lc["psnr"],
                        "harmonica_realized": h["realized"], "l2c_realized": lc["realized"],
                        "holds": h["psnr"] > lc["psnr"] and h["realized"] >= 0.95 * lc["realized"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--budgets", default="1.5x,2x")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="harmonica parameter (JSON value)")
    add_run_arguments(ap, verify_samples=16)
    args = ap.parse_args(argv)

    import torch

    from planner.commands.search import parse_params
    from planner.evaluate import evaluation_seeds
    from planner.runner import Sampler, load_runner
    from planner.search.context import SearchContext

    torch.set_num_threads(args.threads)
    params = parse_params(args.param)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    runner = load_runner("digits-dit")
    seeds = evaluation_seeds(args.verify_samples)
    rows: list[dict] = []
    for steps in [int(s) for s in args.steps.split(",")]:
        sampler = Sampler("ddim", steps, 3.0)
        context = SearchContext.build(runner, sampler, profile_for(runner, sampler), samples=args.calib_samples)
        context.progress = False
        with tempfile.TemporaryDirectory() as tmp:
            l2c = l2c_plans(context, budgets, {}, Path(tmp) / "l2c")
            for label in budgets:
                made = {name: search_timed("harmonica", {**params, "proxy": proxy}, context, label, Path(tmp) / f"{name}-{label}")
                        for name, proxy in PROXIES.items()}
                made["l2c"] = l2c[label]
                made["greedy"] = search_timed("greedy", {}, context, label)
                plans = {name: plan for name, (plan, _) in made.items() if not isinstance(plan, str)}
                figures = measure(runner, sampler, plans, seeds, args.repeats)
                full = figures["full"]
                rows.append({"steps": steps, "budget": "-", "method": "full compute", "realized": 1.0, "predicted": 1.0,
                             "calib_error": 0.0, "psnr": None, "ssim": None, **full})
                for name, (plan, seconds) in made.items():
                    row = {"steps": steps, "budget": label, "method": name, "search_s": seconds}
                    if isinstance(plan, str):
                        rows.append({**row, "note": plan})
                        continue
                    p = plan.provenance.params
                    rows.append({**row, **figures[name], "train_s": p.get("train_s"), "beta": p.get("beta"),
                                 "lambda": p.get("lambda"), "theta": p.get("theta"), "max_run": p.get("max_run")})
                print(f"{steps} steps, {label}: done", file=sys.stderr, flush=True)
    report = {"threads": args.threads, "verify_samples": args.verify_samples, "harmonica_params": params,
              "rows": rows, "harmonica_vs_l2c": verdicts(rows)}
    def render():
        print(markdown(rows))
        print("\n| steps | budget | harmonica - l2c PSNR dB | realized (harmonica / l2c) | paper's claim holds |\n|---|---|---|---|---|")
        for v in report["harmonica_vs_l2c"]:
            print(f"| {v['steps']} | {v['budget']} | {v['psnr_gain_db']:+.2f} | {v['harmonica_realized']:.2f}x / "
                  f"{v['l2c_realized']:.2f}x | {'yes' if v['holds'] else 'no'} |")

    return finish("harmonica", report, render, args.json, args.results)


if __name__ == "__main__":
    sys.exit(main())
