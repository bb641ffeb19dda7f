"""A bench run's points scored again on more held-out seeds, with the speedups the bench measured.

``planner bench`` times every point, which bounds the held-out seeds a run can afford, and on 32 seeds
one image that drifts decides a pooled PSNR. This script takes a bench folder (one subfolder per model
holding ``results.json`` and the greedy plans it names), runs every point again without timing it
(greedy's plans from the folder, fewer sampling steps, each peer setting, installed as the bench
installs it) on ``--seeds`` held-out seeds from the bench's first, and recomputes the margins at matched
realized and FLOP speedup with the bench's own functions (:mod:`planner.bench.margins`).

Results go to ``benchmarks/results/<folder>-<seeds>-seeds.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/rescore_suite.py benchmarks/results/bench-suite-v7 --seeds 256 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import finish, psnr_text  # noqa: E402


def rescored_rows(folder: str, n_seeds: int) -> list[dict]:
    """The bench rows of one model's ``folder`` with their quality measured again on ``n_seeds`` seeds."""
    import torch

    from planner.bench.peers import peer_runs
    from planner.executor import apply_plan
    from planner.metrics import psnr_summary
    from planner.plan.io import load_plan
    from planner.runner import load_runner
    from planner.seeds import evaluation_seeds

    torch.set_num_threads(1)
    bench = json.loads((Path(folder) / "results.json").read_text())
    runner = load_runner(bench["info"]["model"])
    sampler = runner.resolve(None)
    seeds = evaluation_seeds(n_seeds, start=bench["info"]["seeds"][0])
    conditions = runner.conditions(n_seeds, seed=seeds[0])
    reference = runner.run(conditions, seeds, sampler)
    sweeps: dict[str, list[float]] = {}
    for row in bench["rows"]:
        if row["kind"] == "peer":
            sweeps.setdefault(row["method"], []).append(float(row["setting"].split("=")[1]))
    peers, _ = peer_runs(runner, sampler, list(sweeps), sweeps)
    peer = {(p.method, p.setting): p for p in peers}

    def output(row):
        if row["method"] == "fewer steps":
            return runner.run(conditions, seeds, replace(sampler, steps=int(row["setting"].split()[0])))
        if row["kind"] == "peer":
            return peer[(row["method"], row["setting"])].run(conditions, seeds, sampler)
        with apply_plan(runner.pipe, load_plan(row["plan"])):
            return runner.run(conditions, seeds, sampler)

    rows = []
    for row in bench["rows"]:
        if row["kind"] == "reference" or row.get("psnr") is None:
            continue
        scores = psnr_summary(output(row), reference)
        rows.append({"model": bench["info"]["model"], "method": row["method"], "kind": row["kind"],
                     "setting": row["setting"], "speedup": row["speedup"], "flop_speedup": row["flop_speedup"],
                     "bench_psnr": row["psnr"], **{k: scores[k] for k in ("psnr", "psnr_mean", "psnr_worst")}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a bench folder with one subfolder per model")
    ap.add_argument("--seeds", type=int, default=256, help="held-out seeds, from the bench's first")
    ap.add_argument("--jobs", type=int, default=1, help="models scored at once (one thread each)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from concurrent.futures import ProcessPoolExecutor

    from planner.bench.margins import margins, margins_markdown, worst_case

    folders = sorted(str(p.parent) for p in Path(args.folder).glob("*/results.json"))
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:  # one model per worker
        scored = pool.map(rescored_rows, folders, [args.seeds] * len(folders))
        per_model = dict(zip([Path(f).name for f in folders], scored))
    old = {m: json.loads((Path(args.folder) / m / "results.json").read_text())["margins"] for m in per_model}
    new = {m: margins(rows, [1.5, 2.0, 3.0]) for m, rows in per_model.items()}
    worst = {"bench": worst_case(old), "rescored": worst_case(new)}

    def render():
        print(f"The points of `{args.folder}` scored again on {args.seeds} held-out seeds from the bench's first "
              f"(the bench's own measured speedups). Pooled PSNR of each point on the bench's seeds and on these "
              f"(pooled / mean per image / worst image):\n")
        print("| model | method | setting | FLOP speedup | realized speedup | bench seeds | these seeds |")
        print("|---|---|---|---:|---:|---:|---|")
        for model, rows in per_model.items():
            for r in rows:
                print(f"| {model} | {r['method']} | {r['setting']} | {r['flop_speedup']:.2f} | {r['speedup']:.2f} "
                      f"| {r['bench_psnr']:.2f} | {psnr_text(r)} |")
        print("\nWorst margin of the best of ours over the best peer across models, on the bench's seeds -> on "
              "these:\n")
        print("| axis | 1.5x | 2x | 3x |")
        print("|---|---|---|---|")
        for axis in ("flop_speedup", "speedup"):
            cells = []
            for label in ("1.5x", "2x", "3x"):
                a, b = (worst[k][axis][label]["margin_peer"] for k in ("bench", "rescored"))
                cells.append(" -> ".join("n/a" if e["worst"] is None else f"{e['worst']:+.2f} ({e['model']})"
                                         for e in (a, b)))
            print(f"| {axis.replace('_', ' ')} | " + " | ".join(cells) + " |")
        print("\n## On these seeds\n")
        print(margins_markdown(new, worst["rescored"]))

    return finish(f"{Path(args.folder).name}-{args.seeds}-seeds", {"rows": per_model, "margins": new,
                                                                    "worst": worst}, render, args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
