"""Every committed artifact loads and fits its model: the plans in plans/ and bench/, their Pareto
fronts and routers, and the profiles in profiles/; and the committed plans still give the outputs
they gave when they were made (recorded in tests/data/committed_plan_outputs.safetensors by
tests/data/record_plan_outputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.plan import load_plan
from planner.profile import load_profile
from planner.runner import Sampler, load_runner
from planner.search._pareto import load_front
from planner.search._router import load_router

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted(ROOT.glob("plans/*.json")) + sorted(ROOT.glob("plans/*/*.json")) + sorted(ROOT.glob("bench/*/plans/*.json"))
PLANS = [p for p in PLANS if p.name != "front.json"]
PROFILES = sorted(p.parent for p in ROOT.glob("profiles/*/meta.json"))
GOLDEN = ROOT / "tests" / "data" / "committed_plan_outputs.safetensors"
GOLDEN_SEEDS = [1_000_000 + i for i in range(4)]


TORCH_THREADS = 2  # see conftest.py: the recorded outputs were made with 2 threads


@pytest.fixture(scope="module")
def runner_for(digits):
    """The runner of a model spec, loaded once (digits-dit: the session's)."""
    loaded = {"digits-dit": digits}

    def get(spec: str):
        if spec not in loaded:
            loaded[spec] = load_runner(spec)
        return loaded[spec]

    return get


def test_there_are_committed_artifacts_to_check():
    assert len(PLANS) >= 10 and len(PROFILES) >= 2


@pytest.mark.parametrize("path", PLANS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_plan_loads_and_fits_its_model(path, runner_for):
    plan = load_plan(path)
    runner = runner_for(plan.model.spec)
    plan.check_model(runner)  # class, blocks, module names and fingerprint
    plan.check_sampler(runner, Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_committed_profile_loads_and_fits_its_model(path, runner_for):
    profile = load_profile(path)  # checksums, schema, table shapes
    runner = runner_for(profile.meta.model_spec)
    assert profile.meta.fingerprint == runner.fingerprint()
    assert profile.module_names == [m.name for m in runner.modules()]
    assert profile.latency_model().predict_run(None) > 0


def test_committed_fronts_and_routers_load():
    fronts = [p.parent for p in ROOT.glob("**/front.json") if ".venv" not in p.parts]
    routers = [p for p in ROOT.glob("**/router.safetensors") if ".venv" not in p.parts]
    assert fronts and routers
    for folder in fronts:
        assert load_front(folder)["points"]
    for path in routers:
        router, meta = load_router(path)
        assert router.steps == 50 and "theta" in meta


@pytest.mark.parametrize("name", [p.stem for p in sorted(ROOT.glob("plans/*.json"))])
def test_committed_plans_give_the_outputs_they_were_made_with(name, runner_for):
    from safetensors.torch import load_file

    from planner.executor import apply_plan

    expected = load_file(str(GOLDEN))[name]
    plan = load_plan(ROOT / "plans" / f"{name}.json")
    runner = runner_for(plan.model.spec)
    sampler = Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance)
    conditions = runner.conditions(len(GOLDEN_SEEDS), seed=GOLDEN_SEEDS[0])
    with apply_plan(runner, plan):
        got = runner.run(conditions, GOLDEN_SEEDS, sampler)
    # bit-identical on the machine that recorded them; other CPUs round sums differently, and 50 steps of
    # forecasts carry it on (greedy's 2x plan: 3.7e-5 on an AVX2 AMD EPYC). A change of what a plan does
    # moves outputs by orders of magnitude more.
    assert torch.allclose(got, expected, rtol=0, atol=1e-4), float((got - expected).abs().max())
