"""Plans over several transformers (Wan 2.2): ``model.components``, prefixed module names, the rules
``Plan.validate`` keeps about the steps each transformer runs, the file format, and the latency model
charging a module only at its transformer's steps. No model runs here (the executor is tests/test_executor_wan22.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.plan import PLAN_FORMAT, ModelRef, Plan, SamplerRef, load_plan, loads_plan, normalize_decisions, plan_to_json
from planner.plan.components import ComponentRef, absent_steps, compute_absent

STEPS = 6
FIRST, SECOND = [0, 1], [2, 3, 4, 5]
MODULES = ["blocks.0", "blocks.0.attn1", "transformer_2.blocks.0", "transformer_2.blocks.0.attn1"]
ROOT = Path(__file__).resolve().parents[1]


def wan22_plan(decisions: dict, components: dict | None = None) -> Plan:
    comps = components or {"transformer": ComponentRef("WanTransformer3DModel", "f1", FIRST),
                           "transformer_2": ComponentRef("WanTransformer3DModel", "f2", SECOND)}
    layout = CfgLayout.SEPARATE
    plan = Plan(model=ModelRef("WanTransformer3DModel", "pair", list(MODULES), components=comps),
                sampler=SamplerRef("default", STEPS, 5.0, layout, timesteps=[999, 937, 857, 750, 600, 376]),
                decisions=normalize_decisions(decisions, layout.branches, STEPS))
    return plan.validate()


def test_each_transformer_decides_at_its_own_steps_and_the_file_round_trips():
    plan = wan22_plan({"blocks.0": "CDCCCC", "transformer_2.blocks.0.attn1": "CCCRFR"})
    assert absent_steps(plan.model.components, plan.model.modules, STEPS) == {
        "blocks.0": {2, 3, 4, 5}, "blocks.0.attn1": {2, 3, 4, 5},
        "transformer_2.blocks.0": {0, 1}, "transformer_2.blocks.0.attn1": {0, 1}}
    # what a plan reports counts each module at its own transformer's steps only
    assert plan.action_counts()["compute"] == 2 * (2 * 2 + 2 * 4) - 2 * 1 - 2 * 3  # 24 decisions, 8 reuses
    assert plan.computed_fraction_per_step() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # leaves: the two attn1
    doc = json.loads(plan_to_json(plan))
    assert doc["version"] == PLAN_FORMAT.version == "1.7.0"
    assert doc["model"]["components"]["transformer_2"] == {"class": "WanTransformer3DModel", "fingerprint": "f2",
                                                          "steps": SECOND}
    again = loads_plan(plan_to_json(plan))
    assert again.model.components == plan.model.components and again.decisions == plan.decisions


@pytest.mark.parametrize("module, codes, words", [
    # a reuse at a step the module's transformer does not run is no decision of it
    ("transformer_2.blocks.0.attn1", "CRCCCC", r"step 1 is run by 'transformer', not by this module's transformer "
                                               r"\('transformer_2'\): its code there must be C"),
    ("blocks.0", "CCCDCC", r"step 3 is run by 'transformer_2'"),
    # nothing is cached before a transformer's first step
    ("transformer_2.blocks.0", "CCDCCC", r"step 2 is the first step of 'transformer_2' and must compute"),
])
def test_a_decision_at_another_transformers_step_is_refused(module, codes, words):
    with pytest.raises(PlannerError, match=words) as info:
        wan22_plan({module: codes})
    assert str(info.value).startswith(f'$.decisions["{module}"]')
    # the same refusal when the file is read
    good = json.loads(plan_to_json(wan22_plan({})))
    good["decisions"][module] = codes
    with pytest.raises(PlannerError, match=words):
        loads_plan(json.dumps(good), "p.json")


@pytest.mark.parametrize("steps, words", [
    ({"transformer": [0, 1, 2], "transformer_2": [2, 3, 4, 5]}, "step 2 is also run by 'transformer'"),
    ({"transformer": [0, 1], "transformer_2": [3, 4, 5]}, "no transformer runs step 2"),
    ({"transformer": [1, 0], "transformer_2": [2, 3, 4, 5]}, "expected sorted distinct step indices"),
    ({"transformer": [0, 1], "transformer_2": [2, 3, 4, 5, 6]}, "from 0 to 5"),
    ({"transformer_1": [0, 1], "transformer_2": [2, 3, 4, 5]}, "expected a 'transformer' entry"),
])
def test_components_must_split_the_steps(steps, words):
    comps = {c: ComponentRef("WanTransformer3DModel", c, s) for c, s in steps.items()}
    with pytest.raises(PlannerError, match=words):
        wan22_plan({}, comps)


def test_compute_absent_keeps_a_strategys_codes_to_each_transformers_steps():
    decisions = normalize_decisions({m: "CDDDDD" for m in ("blocks.0", "transformer_2.blocks.0")}, ("cond", "uncond"), STEPS)
    kept = compute_absent(decisions, {"transformer": FIRST, "transformer_2": SECOND}, STEPS)
    assert kept["blocks.0"]["cond"] == "CDCCCC"
    assert kept["transformer_2.blocks.0"]["uncond"] == "CCCDDD"  # its first step (2) computes
    wan22_plan({m: per for m, per in kept.items()})  # valid


def test_single_transformer_plans_of_older_versions_load_unchanged():
    """A committed single-transformer plan of an older version reads as before and writes no components."""
    path = ROOT / "plans" / "digits-dit-ddim50-g3-optuna-2x.json"
    doc = json.loads(path.read_text())
    assert doc["version"] in ("1.0.0", "1.1.0", "1.2.0") and "components" not in doc["model"]
    plan = load_plan(path)
    assert plan.model.components is None
    again = json.loads(plan_to_json(plan))
    assert "components" not in again["model"]
    assert again["model"] == {"spec": None, **doc["model"]} and again["decisions"] == doc["decisions"]


def test_the_latency_model_charges_a_module_only_at_its_transformers_steps():
    from planner.profile.latency import LatencyModel, ModuleCost

    codes = {"R": 0.0, "D": 0.0, "F": 0.0, "Q": 0.0, "S": 0.0}
    mods = (ModuleCost("blocks.0", "block", None, 1.0, 0.5, codes),
            ModuleCost("transformer_2.blocks.0", "block", None, 2.0, 1.0, codes))
    one = LatencyModel("none", STEPS, mods, 0.0, 0.0, 0.0)
    two = LatencyModel("none", STEPS, mods, 0.0, 0.0, 0.0, components={"transformer": FIRST, "transformer_2": SECOND})
    assert one.predict_run(None) == pytest.approx(STEPS * 3.0)  # without components every module runs every step
    assert two.predict_run(None) == pytest.approx(2 * 1.0 + 4 * 2.0)
    assert [two.predict_step(None, k) for k in range(STEPS)] == pytest.approx([1, 1, 2, 2, 2, 2])
    assert LatencyModel.from_dict(two.to_dict()) == two
