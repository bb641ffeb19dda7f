"""Record the outputs of committed plans in tests/data/committed_plan_outputs.safetensors, which
tests/test_committed_artifacts.py compares them with: ``python tests/data/record_plan_outputs.py NAME...``
(plan stems in plans/). Existing entries are kept unless ``--replace`` is given: a recorded output is
the promise that a plan keeps giving what it gave, so replacing one needs a reason."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from planner.executor import apply_plan
from planner.plan import load_plan
from planner.runner import Sampler, load_runner

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "committed_plan_outputs.safetensors"
SEEDS = [1_000_000 + i for i in range(4)]  # as GOLDEN_SEEDS in the test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", help="plan stems in plans/")
    parser.add_argument("--replace", action="store_true", help="overwrite entries that exist")
    args = parser.parse_args()
    torch.set_num_threads(2)  # as TORCH_THREADS in the test
    recorded = load_file(str(GOLDEN))
    runners = {}
    for name in args.names:
        if name in recorded and not args.replace:
            print(f"{name}: kept (recorded before)")
            continue
        plan = load_plan(ROOT / "plans" / f"{name}.json")
        runner = runners.setdefault(plan.model.spec, load_runner(plan.model.spec))
        sampler = Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance)
        with apply_plan(runner, plan):
            recorded[name] = runner.run(runner.conditions(len(SEEDS), seed=SEEDS[0]), SEEDS, sampler).contiguous()
        print(f"{name}: recorded")
    save_file(recorded, str(GOLDEN))


if __name__ == "__main__":
    main()
