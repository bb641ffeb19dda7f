"""The executor on a pipeline with two transformers (Wan 2.2, the tiny fixture called with prompt strings):
each transformer's decisions are taken at its own global steps, one engine checks the run, the hooks come
off cleanly, a plan made with another boundary or for one transformer is refused, and single-transformer
plans of older format versions still load and run."""

from __future__ import annotations

import json

import pytest
import torch

from planner.errors import PlannerError
from planner.executor import apply_plan
from planner.plan import loads_plan, plan_for_runner, plan_to_json

TORCH_THREADS = 1  # see conftest.py
STEPS = 6


@pytest.fixture(scope="module")
def made():
    """A Runner on one tiny Wan 2.2 pipeline (plans are made there), and a second, plain pipeline of the same
    build the plans are applied to as a user would."""
    from planner.runner import as_runner, make_sampler
    from planner.zoo.fixtures import build_fixture

    runner = as_runner(build_fixture("wan2.2"))
    sampler = make_sampler(runner, steps=STEPS, height=32, width=32, num_frames=5)
    return runner, sampler, build_fixture("wan2.2")


def call(pipe, **extra):
    from planner.zoo.fixtures import call_kwargs

    kwargs = call_kwargs("wan2.2", prompt="a red fox asleep in fresh snow", steps=STEPS, output_type="latent")
    return pipe(**{**kwargs, "guidance_scale": 5.0, **extra}).frames


def count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A plain torch forward hook counting ``module``'s calls (it sits inside a cached module: it runs only
    when that module really computes)."""
    n = [0]
    return n, module.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))


def run_counting_attention(pipe, plan) -> tuple[torch.Tensor, dict, tuple[int, int]]:
    """``pipe`` run under ``plan``: its output, the executor's stats, and how often the first block's
    attention computed in each transformer."""
    q1, h1 = count_calls(pipe.transformer.blocks[0].attn1.to_q)
    q2, h2 = count_calls(pipe.transformer_2.blocks[0].attn1.to_q)
    try:
        with apply_plan(pipe, plan) as handle:
            planned = call(pipe)
            stats = handle.stats()
    finally:
        h1.remove()
        h2.remove()
    return planned, stats, (q1[0], q2[0])


def test_each_transformer_takes_its_decisions_at_its_own_steps(made):
    runner, sampler, pipe = made
    steps = runner.component_steps(sampler)
    assert steps == {"transformer": [0, 1], "transformer_2": [2, 3, 4, 5]}  # boundary 875: both run in 6 steps
    plan = plan_for_runner(runner, sampler, {"blocks.0.attn1": "CRCCCC", "transformer_2.blocks.0.attn1": "CCCRCR",
                                             "transformer_2.blocks.1": "CCCDDD"})
    plan = loads_plan(plan_to_json(plan))
    assert plan.model.components["transformer_2"].steps == [2, 3, 4, 5]

    full = call(pipe)
    planned, stats, (q1, q2) = run_counting_attention(pipe, plan)
    # two calls (cond, uncond) per step: transformer's attn1 computes at step 0 of its 0-1, transformer_2's at 2 and 4
    assert (q1, q2) == (2, 4)
    assert stats["runs"] == 1 and stats["steps_run"] == list(range(STEPS)) and stats["fallbacks"] == 0
    assert stats["executed"]["blocks.0.attn1"] == "CR...."
    assert stats["executed"]["transformer_2.blocks.0.attn1"] == "..CRCR"
    assert stats["executed"]["transformer_2.blocks.1"] == "..CDDD"
    assert stats["reuse_hits"]["reuse"] == 2 * 3 and stats["reuse_hits"]["reuse_residual"] == 2 * 3
    # decisions: 16 modules x 2 branches, each at its own transformer's steps (2 or 4 of them)
    # (the three sub-layers of transformer_2.blocks.1 do not run while it reuses its residual: 3 steps x 2 branches)
    assert stats["decisions"] == 2 * (8 * 2 + 8 * 4) == stats["as_planned"] + stats["skipped_with_parent"]
    assert stats["skipped_with_parent"] == 3 * 3 * 2
    assert torch.isfinite(planned).all() and not torch.equal(planned, full)
    # the hooks (and the routing the plan put on) came off: the pipeline computes exactly as before
    for t in (pipe.transformer, pipe.transformer_2):
        assert not getattr(t, "_diffusers_hook", None) or not t._diffusers_hook.hooks
    assert torch.equal(call(pipe), full)


def test_the_whole_output_is_forecast_from_its_own_transformers_outputs_only(made):
    """A plan serving the transformer's whole output: each transformer keeps its own outputs (a forecast at
    transformer_2's second computed step has one output of its own, not the first transformer's, to
    extrapolate from), and each transformer's first step must compute; a search's schedule is made to."""
    from planner.plan.components import output_computing_first_steps

    runner, sampler, pipe = made
    plan = loads_plan(plan_to_json(plan_for_runner(runner, sampler, {}, output="CCCFCQ")))
    planned, stats, (q1, q2) = run_counting_attention(pipe, plan)
    assert (q1, q2) == (2 * 2, 2 * 2)  # cond and uncond at steps 0, 1 and at steps 2, 4
    # step 3: transformer_2 has kept step 2 alone, so its forecast reuses it (across the switch it would have
    # extrapolated from steps 1 and 2); step 5: the second-order forecast has two outputs, steps 2 and 4
    assert stats["output"] == "CCCRCF" and torch.isfinite(planned).all()

    steps = runner.component_steps(sampler)
    with pytest.raises(PlannerError, match=r"output.*step 2 is the first step of 'transformer_2'"):
        plan_for_runner(runner, sampler, {}, output="CCFCCC")
    assert output_computing_first_steps("CFFFFF", steps) == "CFCFFF"
    assert output_computing_first_steps("CFFFFF", None) == "CFFFFF"


def test_an_all_compute_plan_is_the_unhooked_pipeline_bit_for_bit(made):
    runner, sampler, pipe = made
    full = call(pipe)
    with apply_plan(pipe, plan_for_runner(runner, sampler)) as handle:
        same = call(pipe)
    assert torch.equal(same, full) and handle.stats()["computed_fraction"] == 1.0


def test_a_run_that_splits_the_steps_otherwise_is_refused(made):
    runner, sampler, pipe = made
    plan = plan_for_runner(runner, sampler, {"transformer_2.blocks.0": "CCCDCD"})
    pipe.register_to_config(boundary_ratio=0.95)  # transformer now runs step 0 only (t = 999)
    try:
        with apply_plan(pipe, plan), pytest.raises(PlannerError, match=r"step 1 of the run is on transformer_2, the "
                                                                       r"plan has it on transformer"):
            call(pipe)
    finally:
        pipe.register_to_config(boundary_ratio=0.875)


def test_the_run_checks_still_hold(made):
    runner, sampler, pipe = made
    plan = plan_for_runner(runner, sampler, {"blocks.0": "CDCCCC"})
    with apply_plan(pipe, plan), pytest.raises(PlannerError, match="plan was made for 6 steps, the pipeline runs 4"):
        call(pipe, num_inference_steps=4)
    with apply_plan(pipe, plan), pytest.raises(PlannerError, match="but the pipeline runs with CFG off"):
        call(pipe, guidance_scale=1.0, guidance_scale_2=1.0)


def test_plans_for_one_transformer_are_refused_on_two_and_still_run_on_one(made, tiny):
    runner, sampler, pipe = made
    from planner.plan import plan_for_model

    single = plan_for_model(pipe.transformer, steps=STEPS, cfg_layout="separate")
    with pytest.raises(PlannerError, match=r"plan was made for one transformer, this pipeline runs 2 "
                                           r"\(transformer, transformer_2\)"):
        apply_plan(pipe, single)
    assert not getattr(pipe.transformer, "_diffusers_hook", None) or not pipe.transformer._diffusers_hook.hooks
    # an older single-transformer plan file (format 1.2.0) loads and runs as before
    dit = tiny("dit")
    n = dit.resolve(None).steps
    doc = json.loads(plan_to_json(plan_for_runner(dit, None, {"transformer_blocks.0": "C" + "D" * (n - 1)})))
    doc["version"] = "1.2.0"
    old = loads_plan(json.dumps(doc))
    assert old.model.components is None
    with apply_plan(dit, old) as handle:
        dit.run(dit.conditions(1), [0], None, output="latent")
    stats = handle.stats()
    assert stats["runs"] == 1 and stats["fallbacks"] == 0 and stats["reuse_hits"]["reuse_residual"] >= n - 1


def test_soft_gates_refuse_two_transformers_in_one_line(made):
    """The learned strategies (l2c, harmonica) train through soft gates, which cover one transformer so far."""
    from planner.executor.session import apply_gates

    runner, sampler, pipe = made
    with pytest.raises(PlannerError, match=r"soft gates .* cover one transformer so far.*runs 2 \(Wan 2.2\); search it "
                                           r"with greedy, uniform, smoothcache or optuna") as info:
        apply_gates(runner, torch.ones(STEPS, 2), ["blocks.0.attn1", "transformer_2.blocks.0.attn1"])
    assert "\n" not in str(info.value)


def test_steps_counted_by_calls_as_on_a_gpu_give_the_same_run(made):
    """Timesteps held on a GPU are not read per call: steps are counted by calls (forced here on the CPU);
    both transformers' decisions land on the same global steps and the outputs are the same."""
    runner, sampler, pipe = made
    plan = plan_for_runner(runner, sampler, {"blocks.1": "CDCCCC", "transformer_2.blocks.0": "CCCDCD"})
    with apply_plan(pipe, plan) as handle:
        read = call(pipe)
        executed = handle.stats()["executed"]
    with apply_plan(pipe, plan) as handle:
        handle._engine.deferred_timesteps = True
        counted = call(pipe)
        stats = handle.stats()
    assert stats["executed"] == executed and executed["transformer_2.blocks.0"] == "..CDCD"
    assert torch.equal(read, counted)
