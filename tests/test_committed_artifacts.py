"""Every committed artifact loads and fits its model: the plans in plans/ and bench/, their Pareto
fronts and routers, and the profiles in profiles/; and the committed plans still give the outputs
they gave when they were made (recorded in tests/data/committed_plan_outputs.safetensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.plan import load_plan
from planner.profile import load_profile
from planner.runner import Sampler
from planner.search._pareto import load_front
from planner.search._router import load_router

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted(ROOT.glob("plans/*.json")) + sorted(ROOT.glob("plans/*/*.json")) + sorted(ROOT.glob("bench/*/plans/*.json"))
PLANS = [p for p in PLANS if p.name != "front.json"]
PROFILES = sorted(p.parent for p in ROOT.glob("profiles/*/meta.json"))
GOLDEN = ROOT / "tests" / "data" / "committed_plan_outputs.safetensors"
GOLDEN_SEEDS = [1_000_000 + i for i in range(4)]


TORCH_THREADS = 2  # see conftest.py: the recorded outputs were made with 2 threads


def test_there_are_committed_artifacts_to_check():
    assert len(PLANS) >= 10 and len(PROFILES) >= 2


@pytest.mark.parametrize("path", PLANS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_plan_loads_and_fits_its_model(path, digits):
    plan = load_plan(path)
    assert plan.model.spec == "digits-dit"
    plan.check_model(digits)  # class, blocks, module names and fingerprint
    plan.check_sampler(digits, Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_committed_profile_loads_and_fits_its_model(path, digits):
    profile = load_profile(path)  # checksums, schema, table shapes
    assert profile.meta.fingerprint == digits.fingerprint()
    assert profile.module_names == [m.name for m in digits.modules()]
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
def test_committed_plans_give_the_outputs_they_were_made_with(name, digits):
    from safetensors.torch import load_file

    from planner.executor import apply_plan

    expected = load_file(str(GOLDEN))[name]
    plan = load_plan(ROOT / "plans" / f"{name}.json")
    sampler = Sampler(plan.sampler.scheduler, plan.steps, plan.sampler.guidance)
    conditions = digits.conditions(len(GOLDEN_SEEDS), seed=GOLDEN_SEEDS[0])
    with apply_plan(digits, plan):
        got = digits.run(conditions, GOLDEN_SEEDS, sampler)
    # bit-identical on the machine that recorded them; other CPUs may round sums differently
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), float((got - expected).abs().max())
