"""A bench suite's margins read again with more points of ours: what a denser front of ours changes.

The bench searches each of our strategies at the budgets it is asked for and reads every method's front
at those speeds by linear interpolation between measured neighbours, while a peer brings every setting of
its sweep. This script takes a suite folder (one subfolder per model holding ``results.json``) and a
second bench folder of the same layout, holding more of our points (the same seeds: for example greedy
searched just below a target), adds those points to the suite's and reads the margins at matched FLOP
speedup again with the bench's own functions (:mod:`planner.bench.margins`, without the bootstrap
intervals: ``results.json`` keeps no per-image errors). Only the FLOP axis: realized speedups timed in
two runs are not comparable.

    python benchmarks/added_points.py benchmarks/results/bench-suite-v10 benchmarks/results/bench-suite-v10-2.9x

Results go to ``benchmarks/results/added_points.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import finish  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite", help="bench folder with one subfolder per model")
    ap.add_argument("added", help="bench folder with more of our points, the same layout")
    ap.add_argument("--targets", default="1.5,2,3", help="speedups the margins are read at")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from planner.bench.margins import AXES, margins

    axis, title = "flop_speedup", AXES["flop_speedup"]
    targets = [float(t) for t in args.targets.split(",")]
    models = []
    for folder in sorted(p for p in Path(args.added).iterdir() if (p / "results.json").is_file()):
        rows = json.loads((Path(args.suite) / folder.name / "results.json").read_text())["rows"]
        added = [r for r in json.loads((folder / "results.json").read_text())["rows"] if r["kind"] == "ours"]
        before, after = margins(rows, targets), margins(rows + added, targets)
        models.append({"model": folder.name,
                       "added": [{k: r[k] for k in ("method", "budget", "flop_speedup", "psnr", "psnr_mean",
                                                    "psnr_worst")} for r in added],
                       "margins": {label: {"ours_before": before[axis][label]["ours"]["psnr"],
                                           "ours_after": after[axis][label]["ours"]["psnr"],
                                           "peer": after[axis][label]["peer"]["psnr"],
                                           "margin_peer_before": before[axis][label]["margin_peer"],
                                           "margin_peer_after": after[axis][label]["margin_peer"]}
                                   for label in after[axis]}})

    def render():
        print("Points added (pooled / mean of per-image / worst-image PSNR, dB):\n")
        print("| model | method | budget | FLOP speedup | PSNR |")
        print("|---|---|---|---|---|")
        for m in models:
            for r in m["added"]:
                print(f"| {m['model']} | {r['method']} | {r['budget']} | {r['flop_speedup']:.3f}x | "
                      f"{r['psnr']:.2f} / {r['psnr_mean']:.2f} / {r['psnr_worst']:.2f} |")
        print(f"\nBest of ours and its margin over the best peer at matched {title}, before -> after:\n")
        print("| model | " + " | ".join(f"{t:g}x" for t in targets) + " |")
        print("|---|" + "---|" * len(targets))
        for m in models:
            print(f"| {m['model']} | " + " | ".join(_cell(e) for e in m["margins"].values()) + " |")

    return finish("added_points", {"suite": args.suite, "added": args.added, "axis": axis, "models": models}, render,
                  args.json, args.out)


def _cell(entry: dict) -> str:
    def num(x, sign=""):
        return "-" if x is None else f"{x:{sign}.2f}"
    return (f"{num(entry['ours_before'])} -> {num(entry['ours_after'])} "
            f"({num(entry['margin_peer_before'], '+')} -> {num(entry['margin_peer_after'], '+')})")


if __name__ == "__main__":
    raise SystemExit(main())
