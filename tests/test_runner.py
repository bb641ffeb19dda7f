"""The runner on digits-dit and every tiny diffusers pipeline: determinism, CFG layouts, bad input."""

import pytest
import torch

from planner.errors import PlannerError
from planner.cfg import CfgLayout
from planner.runner import Runner, Sampler, load_runner
from planner.zoo.tiny import KINDS, build_tiny, family_for_pipeline, load_pipeline_folder

TINY = [f"tiny:{kind}" for kind in KINDS]
SPECS = ["digits-dit", *TINY]
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are so small that a second intra-op thread only adds overhead, and on a busy
    # 2-core machine an oversubscribed thread pool makes a 30 ms run take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_runner(tmp_path_factory):
    """The shipped digits-dit; a 5-step throwaway when the weights have not been trained yet."""
    from planner.zoo.digits import WEIGHTS_DIR, DigitsFamily, TrainConfig, load_digits_pipeline, train_digits_dit

    if (WEIGHTS_DIR / "model_index.json").is_file():
        return load_runner("digits-dit")
    out = tmp_path_factory.mktemp("digits-dit")
    train_digits_dit(TrainConfig(steps=5), out_dir=out, progress=False)
    return Runner(load_digits_pipeline(out), DigitsFamily(), "digits-dit")


@pytest.fixture(scope="module", params=SPECS)
def runner(request):
    if request.param == "digits-dit":
        return request.getfixturevalue("digits_runner")
    return load_runner(request.param)


@pytest.fixture(scope="module", params=TINY)
def tiny_runner(request):
    return load_runner(request.param)


def _quick(runner, guidance=None) -> Sampler:
    default = runner.family.default_sampler
    return Sampler(default.scheduler, STEPS, default.guidance if guidance is None else guidance)


def _same_conditions(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def test_same_conditions_and_seeds_give_bit_identical_outputs(runner):
    sampler = _quick(runner)
    first = runner.conditions(3, seed=0)
    again = runner.conditions(3, seed=0)
    assert _same_conditions(first, again)
    a = runner.run(first, [0, 1, 2], sampler)
    b = runner.run(again, [0, 1, 2], sampler)
    assert torch.equal(a, b)


def test_different_seeds_give_different_outputs(runner):
    sampler = _quick(runner)
    conditions = runner.conditions(3, seed=0)
    a = runner.run(conditions, [0, 1, 2], sampler)
    b = runner.run(conditions, [10, 11, 12], sampler)
    for i in range(3):
        assert not torch.allclose(a[i], b[i]), f"sample {i} ignored its seed"
    assert not _same_conditions(conditions, runner.conditions(3, seed=1))


def test_a_sample_does_not_depend_on_its_batch(runner):
    # Not bit-identical: CPU kernels round differently for different batch sizes (~1e-7 here). A
    # generator or condition mix-up between samples would show as differences of order 1.
    sampler = _quick(runner)
    conditions = runner.conditions(3, seed=0)
    batch = runner.run(conditions, [0, 1, 2], sampler)
    alone = runner.run(conditions[1:2], [1], sampler)
    assert torch.allclose(batch[1:2], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_builds_are_reproducible_and_leave_the_global_rng_alone(kind):
    state = torch.random.get_rng_state()
    pipe_a, family = build_tiny(kind)
    pipe_b, _ = build_tiny(kind)
    assert torch.equal(state, torch.random.get_rng_state())
    a, b = pipe_a.transformer.state_dict(), pipe_b.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not pipe_a.transformer.training
    assert pipe_a.transformer.dtype == torch.float32
    assert family.name == kind


def test_tiny_model_is_small_but_has_several_blocks(tiny_runner):
    blocks = [m for m in tiny_runner.modules() if m.kind == "block"]
    assert len(blocks) >= 2
    if tiny_runner.spec == "tiny:flux":
        lists = {m.name.split(".")[0] for m in blocks}
        assert lists == {"transformer_blocks", "single_transformer_blocks"}
    if tiny_runner.spec == "tiny:sd3":
        assert tiny_runner.transformer.transformer_blocks[-1].context_pre_only
    assert sum(p.numel() for p in tiny_runner.transformer.parameters()) < 500_000


@pytest.mark.parametrize("spec", [s for s in TINY if s != "tiny:dit"])
def test_tiny_text_and_image_streams_differ_in_shape(spec):
    # Hooks pair block outputs with inputs by shape; the tiny configs keep that unambiguous.
    tiny_runner = load_runner(spec)
    block = tiny_runner.transformer.get_submodule(tiny_runner.modules()[0].name)
    seen = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        seen.append((hidden.shape, enc.shape))

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tiny_runner.run(tiny_runner.conditions(1), [0], _quick(tiny_runner), output="latent")
    finally:
        handle.remove()
    assert seen and all(h != e for h, e in seen)


def test_tiny_model_runs_its_default_sampler(tiny_runner):
    sampler = tiny_runner.family.default_sampler
    assert sampler.steps <= 20
    out = tiny_runner.run(tiny_runner.conditions(2, seed=0), [0, 1])
    assert out.dtype == torch.float32
    assert out.shape[0] == 2
    assert out.ndim == (5 if tiny_runner.spec == "tiny:wan" else 4)  # Wan: [B, frames, C, H, W]
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    latent = tiny_runner.run(tiny_runner.conditions(2, seed=0), [0, 1], Sampler(sampler.scheduler, 2, sampler.guidance), output="latent")
    assert latent.shape[0] == 2 and torch.isfinite(latent).all()


def test_every_allowed_scheduler_runs_deterministically(tiny_runner):
    conditions = tiny_runner.conditions(2, seed=0)
    guidance = tiny_runner.family.default_sampler.guidance
    outputs = {}
    for name in tiny_runner.family.schedulers:
        sampler = Sampler(name, STEPS, guidance)
        out = tiny_runner.run(conditions, [0, 1], sampler)
        assert torch.isfinite(out).all(), name
        assert torch.equal(out, tiny_runner.run(conditions, [0, 1], sampler)), name
        outputs[name] = out
    # "default" restores the model's own scheduler after any other was used
    assert torch.equal(outputs["default"], tiny_runner.run(conditions, [0, 1], Sampler("default", STEPS, guidance)))


def test_flux_runs_both_cfg_modes():
    runner = load_runner("tiny:flux")
    conditions = runner.conditions(2, seed=0)
    distilled, true_cfg = Sampler("default", STEPS, 1.0), Sampler("default", STEPS, 4.0)
    assert runner.cfg_layout(distilled) == CfgLayout.NONE
    assert runner.cfg_layout(true_cfg) == CfgLayout.SEPARATE
    a = runner.run(conditions, [0, 1], distilled)
    b = runner.run(conditions, [0, 1], true_cfg)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a.shape == b.shape
    assert not torch.allclose(a, b)


def _branch_inputs(runner, conditions):
    """The conditioning input the transformer sees for the cond and the uncond branch, one row per sample."""
    if isinstance(conditions[0], dict):
        cond = torch.stack([c["prompt_embeds"] for c in conditions])
        uncond = torch.stack([c["negative_prompt_embeds"] for c in conditions])
        return cond, uncond
    null = int(runner.transformer.config.num_embeds_ada_norm)
    return torch.tensor(conditions), torch.full((len(conditions),), null)


def _which(x, cond, uncond) -> str:
    x = x.detach().cpu()
    for label, ref in (("cond", cond), ("uncond", uncond)):
        if x.shape == ref.shape and torch.allclose(x.float(), ref.float()):
            return label
    return "?"


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cfg_layout_is_what_the_family_claims(runner, guidance):
    sampler = _quick(runner, guidance)
    layout = runner.cfg_layout(sampler)
    n = 2
    conditions = runner.conditions(n, seed=0)
    cond, uncond = _branch_inputs(runner, conditions)
    calls = []

    def record(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        signal = kwargs["class_labels"] if "class_labels" in kwargs else kwargs["encoder_hidden_states"]
        calls.append((x.shape[0], signal))

    handle = runner.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        runner.run(conditions, [0, 1], sampler, output="latent")
    finally:
        handle.remove()

    sizes = [size for size, _ in calls]
    if layout == CfgLayout.NONE:
        assert sizes == [n] * STEPS
        assert all(_which(s, cond, uncond) == "cond" for _, s in calls)
    elif layout in (CfgLayout.COND_UNCOND, CfgLayout.UNCOND_COND):
        assert sizes == [2 * n] * STEPS
        order = ["cond", "uncond"] if layout == CfgLayout.COND_UNCOND else ["uncond", "cond"]
        for _, s in calls:
            assert [_which(s[:n], cond, uncond), _which(s[n:], cond, uncond)] == order
    elif layout == CfgLayout.SEPARATE:
        assert sizes == [n] * (2 * STEPS)
        assert [_which(s, cond, uncond) for _, s in calls] == ["cond", "uncond"] * STEPS
    else:
        pytest.fail(f"unknown layout {layout!r}")
    assert (layout == CfgLayout.NONE) == (guidance <= 1)


def test_bad_specs_raise_planner_error(tmp_path):
    for spec in ["no-such-model", "tiny:nope", str(tmp_path)]:
        with pytest.raises(PlannerError):
            load_runner(spec)
    with pytest.raises(PlannerError):
        build_tiny("nope")
    (tmp_path / "model_index.json").write_text('{"_class_name": "NoSuchPipeline"}')
    with pytest.raises(PlannerError):
        load_runner(str(tmp_path))


def test_bad_samplers_raise_planner_error():
    dit, flux = load_runner("tiny:dit"), load_runner("tiny:flux")
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
            runner.cfg_layout(bad)
    with pytest.raises(PlannerError):
        dit.run(dit.conditions(2), [0], Sampler("default", 2, 4.0))
    with pytest.raises(PlannerError):
        dit.run(dit.conditions(1), [0], Sampler("default", 2, 4.0), output="bogus")


def test_family_for_pipeline_knows_the_tiny_classes():
    for kind in KINDS:
        pipe, family = build_tiny(kind)
        found = family_for_pipeline(type(pipe).__name__)
        assert type(found) is type(family)
    assert family_for_pipeline("StableDiffusionPipeline") is None
    assert family_for_pipeline(None) is None


@pytest.mark.parametrize("kind", KINDS)
def test_saved_tiny_pipeline_reloads_to_identical_outputs(kind, tmp_path):
    pipe, family = build_tiny(kind)
    pipe.save_pretrained(tmp_path)
    original = Runner(pipe, family, f"tiny:{kind}")
    loaded = Runner(load_pipeline_folder(tmp_path), family_for_pipeline(type(pipe).__name__), str(tmp_path))
    assert loaded.fingerprint() == original.fingerprint()
    sampler = _quick(original, 4.0)
    conditions = original.conditions(2, seed=0)
    assert torch.equal(original.run(conditions, [0, 1], sampler), loaded.run(conditions, [0, 1], sampler))
    if kind == "dit":  # the zoo's own folder loading, for a pipeline with no missing components
        assert torch.equal(original.run(conditions, [0, 1], sampler), load_runner(str(tmp_path)).run(conditions, [0, 1], sampler))
