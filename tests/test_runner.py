"""The runner on digits-dit and the tiny diffusers pipelines: determinism, seeds, batches, schedulers,
the CFG layout each family claims (checked by a probe run), sizes, dtypes, offload, bad input."""

import pytest
import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.pipelines.probe import check_layout
from planner.runner import Sampler, load_runner
from planner.zoo import MODELS

TINY = sorted(name for name in MODELS if name.startswith("tiny:"))
CORE = ["digits-dit", "tiny:dit", "tiny:pixart-sigma", "tiny:sd3", "tiny:flux", "tiny:wan"]
STEPS = 3
_SLOW_TINY = {"tiny:hunyuanvideo-1.5"}  # its tiny fixture alone takes half a minute on a loaded 2-core machine


TORCH_THREADS = 1  # see conftest.py: these models are so small that a second thread only waits


@pytest.fixture(scope="module")
def runners():
    cache = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = load_runner(spec)
        return cache[spec]

    return get


def _quick(runner, guidance=None) -> Sampler:
    default = runner.family.default_sampler
    return Sampler(default.scheduler, STEPS, default.guidance if guidance is None else guidance)


@pytest.mark.parametrize("spec", CORE)
def test_same_conditions_and_seeds_give_bit_identical_outputs(runners, spec):
    runner = runners(spec)
    sampler = _quick(runner, 4.0)
    first, again = runner.conditions(3, seed=0), runner.conditions(3, seed=0)
    assert first == again
    assert torch.equal(runner.run(first, [0, 1, 2], sampler), runner.run(again, [0, 1, 2], sampler))


@pytest.mark.parametrize("spec", CORE)
def test_seeds_and_conditions_matter_and_a_sample_does_not_depend_on_its_batch(runners, spec):
    runner = runners(spec)
    sampler = _quick(runner, 4.0)
    conditions = runner.conditions(3, seed=0)
    a = runner.run(conditions, [0, 1, 2], sampler)
    b = runner.run(conditions, [10, 11, 12], sampler)
    assert all(not torch.allclose(a[i], b[i]) for i in range(3)), "a sample ignored its seed"
    assert conditions != runner.conditions(3, seed=1)
    # not bit-identical: CPU kernels round differently for other batch sizes (~1e-7); a generator or
    # condition mix-up between samples would differ by much more
    alone = runner.run(conditions[1:2], [1], sampler)
    assert torch.allclose(a[1:2], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s in _SLOW_TINY else s for s in TINY])
def test_every_tiny_pipeline_runs_and_its_family_claims_the_layout_a_probe_measures(runners, spec):
    runner = runners(spec)
    for guidance in (4.0, 1.0):
        sampler = _quick(runner, guidance)
        measured = check_layout(runner, sampler)  # raises when the family is wrong
        assert measured.layout is runner.cfg_layout(sampler)
        distilled = getattr(runner.family, "facts", None) is not None and runner.family.facts.guidance == "distilled"
        assert (measured.layout is CfgLayout.NONE) == (guidance <= 1 or distilled)
    out = runner.run(runner.conditions(2), [0, 1], _quick(runner, 4.0))
    assert out.dtype == torch.float32 and out.shape[0] == 2 and torch.isfinite(out).all()
    assert out.ndim == (5 if runner.family.output_field() == "frames" else 4)
    assert out.min() >= 0 and out.max() <= 1


def test_tiny_models_are_small_and_cover_the_block_layouts(runners):
    flux = runners("tiny:flux")
    lists = {m.name.split(".")[0] for m in flux.modules() if m.kind == "block"}
    assert lists == {"transformer_blocks", "single_transformer_blocks"}
    assert runners("tiny:sd3").transformer.transformer_blocks[-1].context_pre_only
    kinds = {m.name.rsplit(".", 1)[-1]: m.kind for m in runners("tiny:sd3.5").modules() if m.kind != "block"}
    assert kinds.get("attn2") == "attn"  # SD3.5's second attention attends to the image, not the text
    assert {m.kind for m in runners("tiny:qwen-image").modules()} == {"block", "attn", "mlp"}
    for spec in CORE[1:]:
        assert sum(p.numel() for p in runners(spec).transformer.parameters()) < 500_000


def test_every_allowed_scheduler_runs_deterministically(runners):
    for spec in ("tiny:dit", "tiny:pixart-sigma", "tiny:sd3"):
        runner = runners(spec)
        conditions = runner.conditions(2, seed=0)
        outputs = {}
        for name in runner.family.schedulers:
            sampler = Sampler(name, STEPS, 4.0)
            out = runner.run(conditions, [0, 1], sampler)
            assert torch.isfinite(out).all() and torch.equal(out, runner.run(conditions, [0, 1], sampler)), (spec, name)
            outputs[name] = out
        # "default" restores the model's own scheduler after any other was used
        assert torch.equal(outputs["default"], runner.run(conditions, [0, 1], Sampler("default", STEPS, 4.0)))


def test_flux_runs_both_cfg_modes(runners):
    runner = runners("tiny:flux")
    conditions = runner.conditions(2, seed=0)
    distilled, true_cfg = Sampler("default", STEPS, 1.0), Sampler("default", STEPS, 4.0)
    assert runner.cfg_layout(distilled) is CfgLayout.NONE and runner.cfg_layout(true_cfg) is CfgLayout.SEPARATE
    a, b = runner.run(conditions, [0, 1], distilled), runner.run(conditions, [0, 1], true_cfg)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_sizes_come_from_the_sampler(runners):
    runner = runners("tiny:pixart-sigma")
    out = runner.run(runner.conditions(1), [0], Sampler("default", 2, 4.0, height=32, width=16))
    assert tuple(out.shape[-2:]) == (32, 16)
    video = runners("tiny:wan").run(runners("tiny:wan").conditions(1), [0], Sampler("default", 2, 4.0, num_frames=9))
    assert video.shape[2] == 9


@pytest.mark.parametrize("spec", CORE)
def test_plans_carry_the_timesteps_the_pipeline_itself_sets(runners, spec):
    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    runner = runners(spec)
    sampler = _quick(runner)
    seen = []
    record = lambda module, args, kwargs: seen.append(float(kwargs["timestep"].reshape(-1).max()))  # noqa: E731
    handle = runner.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        runner.run(runner.conditions(1), [0], sampler, output="latent")
    finally:
        handle.remove()
    plan = plan_for_runner(runner, sampler)
    observed = sorted(set(seen), reverse=True)
    scale = 1000.0 if max(observed) <= 1.0 else 1.0  # Flux-like pipelines call the transformer with t / 1000
    assert plan.sampler.timesteps == pytest.approx([t * scale for t in observed], rel=1e-5)
    with apply_plan(runner.pipe, plan, strict=True):  # checked against the scheduler's own list
        runner.run(runner.conditions(1), [0], sampler, output="latent")


def test_bfloat16_and_cpu_offload_run_with_a_plan():
    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    plain = load_runner("tiny:flux", device="cpu")
    half = load_runner("tiny:flux", device="cpu", dtype="bfloat16")
    offloaded = load_runner("tiny:flux", device="cpu", offload="model")  # diffusers' offload hooks
    assert half.dtype == torch.bfloat16
    sampler = Sampler("default", 4, 4.0)
    conditions = plain.conditions(2)
    outputs = []
    for runner in (plain, half, offloaded):
        blocks = [m.name for m in runner.modules() if m.kind == "block"]
        with apply_plan(runner, plan_for_runner(runner, sampler, {b: "CDCD" for b in blocks})) as handle:
            outputs.append(runner.run(conditions, [0, 1], sampler))
            assert handle.stats()["fallbacks"] == 0 and handle.stats()["computed_fraction"] == 0.5
    assert torch.equal(outputs[0], outputs[2])  # offload hooks and plan hooks compose
    assert (outputs[0] - outputs[1]).abs().mean() < 0.05  # bf16 rounds, and that is all


def test_bad_specs_and_samplers_raise_planner_error(runners, tmp_path):
    for spec in ["no-such-model", "tiny:nope", str(tmp_path), "tiny:z-image"]:
        with pytest.raises(PlannerError):
            load_runner(spec)
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(PlannerError, match="not in diffusers"):
        load_runner(str(tmp_path))
    dit, flux = runners("tiny:dit"), runners("tiny:flux")
    for runner, bad in [
        (dit, Sampler("flow-euler", 2, 4.0)),
        (dit, Sampler("euler", 2, 4.0)),  # DiTPipeline never scales the initial noise for Euler
        (flux, Sampler("ddim", 2, 1.0)),
        (flux, Sampler("nonsense", 2, 1.0)),
        (flux, Sampler("default", 0, 1.0)),
    ]:
        with pytest.raises(PlannerError):
            runner.run(runner.conditions(1), [0], bad)
    with pytest.raises(PlannerError):
        dit.run(dit.conditions(2), [0], Sampler("default", 2, 4.0))
    with pytest.raises(PlannerError):
        dit.run(dit.conditions(1), [0], Sampler("default", 2, 4.0), output="bogus")


@pytest.mark.parametrize("spec, planned, other", [
    ("tiny:pixart-sigma", dict(height=16, width=16), dict(height=32, width=16)),
    ("tiny:flux", dict(height=16, width=16), dict(height=16, width=32)),
    ("tiny:wan", dict(num_frames=5), dict(num_frames=9)),
])
def test_apply_plan_refuses_a_run_at_another_size_at_the_first_call(runners, spec, planned, other):
    """The plan records the transformer's per-sample input shape; a pipeline called at another resolution or
    frame count is refused before its first transformer call computes anything."""
    from dataclasses import replace

    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    runner = runners(spec)
    sampler = replace(_quick(runner), **planned)
    plan = plan_for_runner(runner, sampler)
    assert plan.sampler.input_shape and len(plan.sampler.input_shape) >= 2
    calls = []
    handle = runner.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with apply_plan(runner.pipe, plan):
            runner.run(runner.conditions(1), [0], sampler, output="latent")  # the planned size passes
            assert len(calls) == STEPS * plan.layout.calls_per_step
            calls.clear()
            with pytest.raises(PlannerError, match="another resolution or frame count") as info:
                runner.run(runner.conditions(1), [0], replace(sampler, **other), output="latent")
            assert "\n" not in str(info.value) and len(calls) == 1  # refused at the first call
    finally:
        handle.remove()
