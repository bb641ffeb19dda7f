"""Tests of the profiler: similarity numbers on a synthetic model with known outputs, CFG branch
separation for every layout, the latency model's arithmetic, the artifact's integrity checks, the
tiny pipelines and the CLI."""

from __future__ import annotations

import contextlib
import gzip
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from planner.profile import LatencyModel, ProfileError, TimingConfig, load_profile, profile_model
from planner.profile.capture import HookSet, StepTracker
from planner.profile.latency import plan_from_codes
from planner.profile.similarity import CFG_LAG, SimilarityCollector, pair_metrics, similarity_pass
from planner.cfg import CfgLayout
from planner.runner import Sampler

FAST = TimingConfig(warmup=1, repeats=3, run_repeats=1)


# --------------------------------------------------------------------------- a model with known outputs


class ToyAttn(nn.Module):
    """Output ``(step+1) * (1+branch) * (1+sample)`` everywhere: lag-j relative L1 is ``j/(t+1-j)``."""

    def forward(self, hidden_states, step, branch, sample):
        a = (step + 1) * (1.0 + branch) * (1.0 + sample)
        return a[:, None, None] * torch.ones_like(hidden_states)


class ToyFF(nn.Module):
    """Features alternate ``1`` and ``c*step`` with ``c = 1+sample``, the same on both branches."""

    def forward(self, hidden_states, step, sample):
        c = (1.0 + sample)[:, None, None]
        out = torch.ones_like(hidden_states)
        out[..., 1::2] = c * step
        return out


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = ToyAttn()
        self.ff = ToyFF()

    def forward(self, hidden_states, step, branch, sample):
        return hidden_states + self.attn1(hidden_states, step=step, branch=branch, sample=sample) + self.ff(hidden_states, step=step, sample=sample)


class ToyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([ToyBlock()])

    def forward(self, hidden_states, step, branch, sample):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, step=step, branch=branch, sample=sample)
        return hidden_states

    @contextlib.contextmanager
    def cache_context(self, name):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self, CacheContext(name))
        try:
            yield
        finally:
            _set_cache_context(self, None)


class ToyRunner:
    """Duck-typed Runner: zero latents (so a module's residual equals its output), ``steps`` steps,
    CFG laid out as ``layout`` says; ``use_context`` False drops the cache_context of separate calls."""

    def __init__(self, layout: str, use_context: bool = True, fill: float = 0.0):
        from planner.modules import cacheable_modules

        self.fill = fill
        self.transformer = ToyTransformer().eval()
        self.layout = layout
        self.use_context = use_context
        self.device = torch.device("cpu")
        self.pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=torch.tensor([])))
        self.mods = cacheable_modules(self.transformer)

    def cfg_layout(self, sampler):
        return self.layout

    def run(self, conditions, seeds, sampler, output="latent"):
        n = len(conditions)
        sample = torch.tensor(seeds, dtype=torch.float32)
        self.pipe.scheduler.timesteps = torch.arange(sampler.steps, 0, -1).float() * 10
        for t in range(sampler.steps):
            step = torch.tensor(float(t))
            if self.layout in (CfgLayout.COND_UNCOND, CfgLayout.UNCOND_COND):
                first = 0.0 if self.layout == CfgLayout.COND_UNCOND else 1.0
                br = torch.cat([torch.full((n,), first), torch.full((n,), 1 - first)])
                self.transformer(torch.full((2 * n, 3, 4), self.fill), step=step, branch=br, sample=torch.cat([sample, sample]))
            elif self.layout == CfgLayout.SEPARATE:
                for name, b in (("cond", 0.0), ("uncond", 1.0)):
                    ctx = self.transformer.cache_context(name) if self.use_context else contextlib.nullcontext()
                    with ctx:
                        self.transformer(torch.full((n, 3, 4), self.fill), step=step, branch=torch.full((n,), b), sample=sample)
            else:
                self.transformer(torch.full((n, 3, 4), self.fill), step=step, branch=torch.zeros(n), sample=sample)


def _ff_rel(c, t, lag):
    return lag * c / (1 + c * (t - lag))


def _ff_cos(c, t, lag):
    a, b = np.array([1, c * t]), np.array([1, c * (t - lag)])
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def _run_toy(layout, steps=6, samples=3, k=3, batch_size=None, use_context=True, fill=0.0):
    runner = ToyRunner(layout, use_context, fill)
    table, timesteps, warnings = similarity_pass(
        runner, runner.mods, Sampler("ddim", steps, 3.0), list(range(samples)), list(range(samples)),
        k=k, batch_size=batch_size or samples,
    )
    return runner, table, timesteps


def _row(table, module, step, branch, lag):
    r = table[(table.module == module) & (table.step == step) & (table.branch == branch) & (table.lag == lag)]
    assert len(r) == 1
    return r.iloc[0]


def test_pair_metrics_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 2.0], [0.0, 1.0, 0.0, 0.0]])
    rel, cos = pair_metrics(a, b)
    assert rel.tolist() == pytest.approx([2 / 8, 2 / 1])  # mean|a-b| / mean|b|
    assert cos[0].item() == pytest.approx(22 / np.sqrt(30 * 18))
    assert cos[1].item() == pytest.approx(0.0)
    rel3, _ = pair_metrics(a, torch.stack([b, a]))  # several look-backs at once
    assert rel3.shape == (2, 2) and rel3[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("layout", [CfgLayout.COND_UNCOND, CfgLayout.UNCOND_COND, CfgLayout.SEPARATE])
def test_similarity_of_known_outputs(layout):
    steps, samples = 6, 3
    runner, table, timesteps = _run_toy(layout, steps, samples)
    assert timesteps == [60.0, 50.0, 40.0, 30.0, 20.0, 10.0]
    assert len(table) == steps * 3 * 2 * (3 + 1)
    cs = np.arange(1, samples + 1)
    for t in range(1, steps):
        for lag in range(1, 4):
            for branch in ("cond", "uncond"):
                attn = _row(table, "transformer_blocks.0.attn1", t, branch, lag)
                ff = _row(table, "transformer_blocks.0.ff", t, branch, lag)
                if lag > t:
                    assert np.isnan(attn.rel_l1_mean) and attn.n == 0
                    continue
                want = lag / (t + 1 - lag)
                assert attn.rel_l1_mean == pytest.approx(want, rel=1e-5)
                assert attn.rel_l1_max == pytest.approx(want, rel=1e-5)
                assert attn.rel_l1_std == pytest.approx(0, abs=1e-6)
                assert attn.cos_mean == pytest.approx(1, abs=1e-6)
                assert attn.res_rel_l1_mean == pytest.approx(want, rel=1e-5)  # zero input: residual = output
                per_sample = np.array([_ff_rel(c, t, lag) for c in cs])
                assert ff.n == samples
                assert ff.rel_l1_mean == pytest.approx(per_sample.mean(), rel=1e-5)
                assert ff.rel_l1_std == pytest.approx(per_sample.std(ddof=1), rel=1e-4)
                assert ff.rel_l1_max == pytest.approx(per_sample.max(), rel=1e-5)
                assert ff.rel_l1_min == pytest.approx(per_sample.min(), rel=1e-5)
                assert ff.cos_mean == pytest.approx(np.mean([_ff_cos(c, t, lag) for c in cs]), rel=1e-5)
    # CFG: attn's uncond half is twice its cond half, ff is the same on both branches.
    for t in range(steps):
        cond = _row(table, "transformer_blocks.0.attn1", t, "cond", CFG_LAG)
        uncond = _row(table, "transformer_blocks.0.attn1", t, "uncond", CFG_LAG)
        assert cond.rel_l1_mean == pytest.approx(0.5, rel=1e-6)  # |c - 2c| / |2c|
        assert uncond.rel_l1_mean == pytest.approx(1.0, rel=1e-6)  # |2c - c| / |c|
        assert _row(table, "transformer_blocks.0.ff", t, "cond", CFG_LAG).rel_l1_max == pytest.approx(0, abs=1e-7)
    # the block's residual is attn + ff; its output equals the residual here
    blk = table[(table.module == "transformer_blocks.0") & (table.lag == 1) & (table.step > 0)]
    assert np.allclose(blk.rel_l1_mean, blk.res_rel_l1_mean, equal_nan=True)
    assert np.allclose(blk.rel_l1_mean, blk.res_reuse_rel_l1_mean, equal_nan=True)


def test_residual_metrics_with_a_nonzero_input():
    # input 1 everywhere: attn's residual is a - 1 with a = (t+1)(1+branch)(1+sample)
    _, table, _ = _run_toy(CfgLayout.COND_UNCOND, steps=5, samples=2, fill=1.0)
    for t in range(2, 5):  # at t=1 the cond residual of sample 0 is exactly zero
        for branch, g in (("cond", 1.0), ("uncond", 2.0)):
            row = _row(table, "transformer_blocks.0.attn1", t, branch, 1)
            per_sample = np.array([g * c / abs(t * g * c - 1) for c in (1.0, 2.0)])  # |delta a| / |a_prev - 1|
            assert row.res_rel_l1_mean == pytest.approx(per_sample.mean(), rel=1e-5)
            assert row.res_reuse_rel_l1_mean == pytest.approx(1 / t, rel=1e-5)  # |delta a| / |a_prev|
            assert row.rel_l1_mean == pytest.approx(1 / t, rel=1e-5)


def test_separate_calls_without_cache_context_alternate():
    _, with_ctx, _ = _run_toy(CfgLayout.SEPARATE, use_context=True)
    _, without, _ = _run_toy(CfgLayout.SEPARATE, use_context=False)
    pd.testing.assert_frame_equal(with_ctx, without)


def test_single_branch_layout_has_no_cfg_rows():
    _, table, _ = _run_toy(CfgLayout.NONE)
    assert set(table.branch) == {"cond"} and CFG_LAG not in set(table.lag)
    assert _row(table, "transformer_blocks.0.attn1", 4, "cond", 2).rel_l1_mean == pytest.approx(2 / 3, rel=1e-5)


def test_streaming_over_batches_matches_one_batch():
    _, one, _ = _run_toy(CfgLayout.COND_UNCOND, samples=4)
    _, chunks, _ = _run_toy(CfgLayout.COND_UNCOND, samples=4, batch_size=1)
    cols = ["rel_l1_mean", "rel_l1_max", "rel_l1_min", "cos_mean", "res_rel_l1_mean"]
    np.testing.assert_allclose(one[cols].to_numpy(), chunks[cols].to_numpy(), rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(one.rel_l1_std.to_numpy(), chunks.rel_l1_std.to_numpy(), rtol=1e-3, atol=1e-6, equal_nan=True)


def test_only_last_k_outputs_are_held_and_hooks_come_off():
    runner = ToyRunner(CfgLayout.COND_UNCOND)
    collector = SimilarityCollector(runner.mods, CfgLayout.COND_UNCOND, steps=8, k=2, device="cpu")
    collector.batch = 2
    tracker = StepTracker(CfgLayout.COND_UNCOND)
    collector.tracker = tracker
    from planner.profile.capture import ModuleWatch, attach, detach_hooks

    named = dict(runner.transformer.named_modules())
    hs = attach(runner.transformer, [(runner.transformer, tracker, "step")] + [
        (named[m.name], ModuleWatch(i, collector), m.name) for i, m in enumerate(runner.mods)
    ])
    runner.run([0, 1], [0, 1], Sampler("ddim", 8, 3.0))
    detach_hooks(runner.transformer, hs)
    assert tracker.step == 7
    for ring in collector.rings.values():
        assert ring.buf is not None and ring.buf.shape[0] == 2  # k outputs, not one per step
    for module in runner.transformer.modules():
        assert not hasattr(module, "_diffusers_hook")
        assert "forward" not in vars(module)


# --------------------------------------------------------------------------- latency model


def _cost_table(self_ms=(1.0, 2.0, 3.0), half=(0.6, 1.2, 1.6), fixed=(0.5, 0.25, 10.0)):
    names = ["transformer_blocks.0", "transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    rows = [
        {"module": n, "kind": k, "parent": p, "scope": "call", "self_ms": s, "self_half_ms": h,
         "reuse_ms": 0.1, "reuse_residual_ms": 0.2, "forecast_ms": 0.3, "share_cfg_ms": 0.4}
        for n, k, p, s, h in zip(names, ["block", "attn", "mlp"], ["", names[0], names[0]], self_ms, half)
    ]
    for name, scope, ms in zip(["<outside blocks>", "<outside transformer>", "<outside loop>"], ["call", "step", "run"], fixed):
        rows.append({"module": name, "kind": "fixed", "parent": "", "scope": scope, "self_ms": ms, "self_half_ms": ms})
    return pd.DataFrame(rows), names


@pytest.fixture(scope="module")
def digits_runner():
    """digits-dit for the timing tests (each removes whatever it attaches)."""
    from planner.runner import load_runner

    return load_runner("digits-dit")


def test_executor_hook_overhead_is_the_hooks_own_time(digits_runner, monkeypatch):
    # Each call is timed outside and inside the executor's hook, so what the hook adds is found and the
    # module's own time is not counted: a hook that adds 2 ms to every computed call is measured at 2 ms
    # or more (load only adds time), and blocks that take 10 ms more of their own do not show.
    import time

    from diffusers.hooks import ModelHook

    from planner.executor.hooks import CacheHook
    from planner.profile.capture import attach, detach_hooks
    from planner.profile.timing import executor_hook_overhead

    runner = digits_runner
    sampler = runner.resolve(Sampler("ddim", 3, 3.0))
    store = CacheHook._store

    def slow_store(self, *args, **kwargs):
        time.sleep(2e-3)
        return store(self, *args, **kwargs)

    class Slow(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            time.sleep(10e-3)
            return args, kwargs

    monkeypatch.setattr(CacheHook, "_store", slow_store)
    modules = runner.modules()
    blocks = [(m, Slow(), f"test.slow.{i}") for i, m in enumerate(runner.transformer.transformer_blocks)]
    hs = attach(runner.transformer, blocks)
    try:
        found, warnings = executor_hook_overhead(runner, modules, sampler, runner.conditions(2, seed=0), [0, 1], rounds=1)
    finally:
        detach_hooks(runner.transformer, hs)
    assert warnings == []
    assert set(found) == {"block", "sublayer"}
    assert 2.0 <= found["block"] < 2.0 + 5.0 and found["sublayer"] >= 2.0


def test_no_garbage_collection_lands_in_the_timed_runs(digits_runner, monkeypatch):
    # a full collection in a big process takes hundreds of ms; one inside the single timed run of a
    # fast profile was once counted as the run's fixed cost (0.45 s against a 70 ms run)
    import gc

    import planner.profile.core as core

    runner = digits_runner
    sampler = runner.resolve(Sampler("ddim", 4, 3.0))
    state = {"timing": False, "collections": 0, "elsewhere": 0}
    cost_pass = core._cost_pass

    def watched(*args, **kwargs):
        state["timing"] = True
        try:
            return cost_pass(*args, **kwargs)
        finally:
            state["timing"] = False

    def on_collection(phase, info):
        if phase == "start":
            state["collections" if state["timing"] else "elsewhere"] += 1

    def litter(module, args):  # cyclic garbage at every call: enough for the collector to run often
        for _ in range(300):
            cycle = []
            cycle.append(cycle)

    monkeypatch.setattr(core, "_cost_pass", watched)
    hook = runner.transformer.register_forward_pre_hook(litter)
    gc.callbacks.append(on_collection)
    try:
        profile_model(runner, sampler, samples=2, lags=1, timing=FAST, flops=False)
    finally:
        gc.callbacks.remove(on_collection)
        hook.remove()
    assert state["elsewhere"] > 0  # the litter does make the collector run (in the similarity pass) ...
    assert state["collections"] == 0  # ... but never while timing
    assert gc.isenabled()


def test_a_latency_model_that_misses_the_plain_runs_is_flagged(digits_runner, monkeypatch):
    # the plain runs the model is checked against report a tenth of what the stopwatched runs took:
    # whatever the machine does, the check must flag it (no timing of ours decides the outcome)
    import planner.profile.core as core
    from planner.profile.timing import RunTimes

    runner = digits_runner
    sampler = runner.resolve(Sampler("ddim", 4, 3.0))
    time_runs = core.time_runs

    def fast_plain_runs(*args, **kwargs):
        real = time_runs(*args, **kwargs)
        return RunTimes([t / 10 for t in real.clean], [t / 10 for t in real.latent])

    monkeypatch.setattr(core, "time_runs", fast_plain_runs)
    profile = profile_model(runner, sampler, samples=2, lags=1, timing=FAST, flops=False)
    assert profile.meta.latency["relative_error"] > core.LATENCY_CHECK_TOLERANCE
    assert any("predicted speedups are unreliable" in w for w in profile.meta.warnings)


def test_latency_model_arithmetic_batched():
    cost, names = _cost_table()
    m = LatencyModel.from_cost_table(cost, CfgLayout.COND_UNCOND, steps=4)
    assert m.predict_run(None) == pytest.approx((10 + 4 * (0.25 + 0.5 + 6)) / 1e3)
    # a reused block skips its children and costs one R op (half per branch, two branches)
    p = plan_from_codes({names[0]: "CRRR"})
    assert m.predict_step(p, 0) == pytest.approx((0.75 + 6) / 1e3)
    assert m.predict_step(p, 2) == pytest.approx((0.75 + 0.1) / 1e3)
    # one branch of a sub-layer computes: half-batch cost plus half an op
    p = SimpleNamespace(decisions={names[1]: {"cond": "CCCC", "uncond": "CSDF"}},
                        code=lambda mod, s, b: p.decisions.get(mod, {"cond": "CCCC", "uncond": "CCCC"})[b][s])
    assert m.predict_step(p, 1) == pytest.approx((0.75 + 1 + 1.2 + 3 + 0.4 / 2) / 1e3)
    assert m.predict_step(p, 2) == pytest.approx((0.75 + 1 + 1.2 + 3 + 0.2 / 2) / 1e3)
    # masks in both forms give the same as a plan of R codes
    p = plan_from_codes({names[2]: "CRCR"})
    mask = np.ones((4, 3, 2), dtype=bool)
    mask[[1, 3], 2, :] = False
    as_dict = {names[2]: {"cond": [True, False, True, False], "uncond": [True, False, True, False]}}
    assert m.predict_run(mask) == pytest.approx(m.predict_run(p))
    assert m.predict_run(as_dict) == pytest.approx(m.predict_run(p))
    assert m.predict_run(mask[:, :, 0]) == pytest.approx(m.predict_run(p))
    assert m.predict_speedup(p) > 1
    with pytest.raises(ValueError):
        m.predict_run(np.ones((3, 3, 2), dtype=bool))
    assert LatencyModel.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_latency_model_a_served_step_costs_the_step_outside_the_transformer_and_the_forecast():
    cost, names = _cost_table()
    for layout, calls in ((CfgLayout.COND_UNCOND, 1), (CfgLayout.SEPARATE, 2)):
        m = LatencyModel.from_cost_table(cost, layout, steps=4)
        base = plan_from_codes({names[0]: "CRCC"})
        p = SimpleNamespace(decisions=base.decisions, code=base.code, output="CFCR")
        # steps 1 and 3: no call, no block, no hook; the last block's op of that code, once per call
        assert m.predict_step(p, 1) == pytest.approx((0.25 + calls * 0.3) / 1e3)
        assert m.predict_step(p, 3) == pytest.approx((0.25 + calls * 0.1) / 1e3)
        assert m.predict_step(p, 2) == m.predict_step(None, 2)
        assert m.predict_run(p) == pytest.approx(10 / 1e3 + sum(m.predict_step(p, k) for k in range(4)))


def test_latency_model_separate_calls_pay_per_branch():
    cost, names = _cost_table()
    m = LatencyModel.from_cost_table(cost, CfgLayout.SEPARATE, steps=2, hook_ms=0.01)
    assert m.predict_step(None, 0) == pytest.approx((0.25 + 2 * 0.5 + 2 * 6) / 1e3)
    p = SimpleNamespace(decisions={names[0]: {"cond": "CC", "uncond": "CR"}},
                        code=lambda mod, s, b: p.decisions[mod][b][s] if mod in p.decisions else "C")
    # uncond call: block reused (R op at full call batch), children skipped; both calls pass the hook
    assert m.predict_step(p, 1) == pytest.approx((0.25 + 1.0 + 6 + 0.1 + 2 * 0.01) / 1e3)


# --------------------------------------------------------------------------- tiny pipelines, artifact, CLI

TINY = [("tiny:dit", 4.0, CfgLayout.COND_UNCOND), ("tiny:pixart-sigma", 4.5, CfgLayout.UNCOND_COND), ("tiny:sd3", 5.0, CfgLayout.UNCOND_COND),
        ("tiny:flux", 1.0, CfgLayout.NONE), ("tiny:flux", 3.5, CfgLayout.SEPARATE), ("tiny:wan", 5.0, CfgLayout.SEPARATE)]


@pytest.mark.slow
@pytest.mark.parametrize("spec,guidance,layout", TINY)
def test_tiny_pipelines(spec, guidance, layout):
    from planner.runner import load_runner

    runner = load_runner(spec)
    steps = 3
    p = profile_model(runner, Sampler("default", steps, guidance), samples=2, lags=2, timing=FAST)
    assert p.meta.cfg_layout == layout
    names = [m.name for m in runner.modules()]
    assert p.module_names == names
    branches = ("cond",) if layout == CfgLayout.NONE else ("cond", "uncond")
    assert p.branches == branches
    sim = p.similarity
    assert len(sim) == steps * len(names) * len(branches) * (2 + (len(branches) == 2))
    lag1 = sim[(sim.lag == 1) & (sim.step >= 1)]
    assert lag1.rel_l1_mean.notna().all() and (lag1.n == 2).all()
    if len(branches) == 2:
        cfg = sim[(sim.lag == CFG_LAG) & (sim.kind == "block")]
        assert cfg.rel_l1_mean.notna().all() and (cfg.rel_l1_mean > 0).any()  # the branches really differ
    mods = p.cost[p.cost.kind != "fixed"]
    assert (mods.latency_ms > 0).all() and (mods.self_ms >= 0).all()
    assert np.isfinite(p.meta.latency["predicted_run_s"])
    for module in runner.transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not registry.hooks


@pytest.fixture(scope="module")
def saved_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "tiny-dit"
    profile_model("tiny:dit", Sampler("default", 3, 4.0), samples=2, timing=FAST, out=path)
    return path


def test_artifact_roundtrip(saved_profile):
    p = load_profile(saved_profile)
    meta = json.loads((saved_profile / "meta.json").read_text())
    assert meta["schema"] == "dit-cache-profile" and meta["schema_version"] == p.meta.schema_version
    for key in ("fingerprint", "modules"):
        assert key in meta["model"]
    assert meta["calibration"]["seeds"] == [0, 1] and len(meta["sampler"]["timesteps"]) == 3
    assert set(meta["versions"]) >= {"planner", "torch", "diffusers"}
    assert p.curve(lag=1).shape == (3, len(p.module_names))
    assert p.stability().index[0] in p.module_names
    model = p.latency_model()
    assert model.predict_run(None) == pytest.approx(p.meta.latency["predicted_run_s"], rel=1e-4)  # tables keep 6 digits
    # the same data written twice gives byte-identical tables (fixed gzip mtime)
    again = saved_profile.parent / "again"
    p.save(again)
    assert (again / "similarity.csv.gz").read_bytes() == (saved_profile / "similarity.csv.gz").read_bytes()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_and_truncated_files_are_rejected(saved_profile, tmp_path):
    bad = _copy(saved_profile, tmp_path / "edited")
    text = (bad / "cost.csv").read_text()
    (bad / "cost.csv").write_text(text.replace("transformer_blocks.0,", "transformer_blocks.9,", 1))
    with pytest.raises(ProfileError, match="checksum mismatch"):
        load_profile(bad)

    cut = _copy(saved_profile, tmp_path / "cut")
    data = (cut / "similarity.csv.gz").read_bytes()
    (cut / "similarity.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProfileError, match="truncated"):
        load_profile(cut)

    meta_cut = _copy(saved_profile, tmp_path / "meta_cut")
    raw = (meta_cut / "meta.json").read_text()
    (meta_cut / "meta.json").write_text(raw[: len(raw) // 2])
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(meta_cut)

    newer = _copy(saved_profile, tmp_path / "newer")
    meta = json.loads((newer / "meta.json").read_text())
    meta["schema_version"] = "2.0.0"
    (newer / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="profile format version 2.0.0 is newer"):
        load_profile(newer)

    invalid = _copy(saved_profile, tmp_path / "invalid")
    meta = json.loads((invalid / "meta.json").read_text())
    meta["sampler"]["steps"] = "three"
    (invalid / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match=r"\$\.sampler\.steps: .three. is not of type .integer."):
        load_profile(invalid)

    # a consistent rewrite with a wrong row count is caught by the shape check, not the hash
    short = _copy(saved_profile, tmp_path / "short")
    df = pd.read_csv(short / "similarity.csv.gz")
    df.iloc[:-4].to_csv(short / "similarity.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    from planner.profile.artifact import sha256_file

    meta = json.loads((short / "meta.json").read_text())
    meta["tables"]["similarity"].update(sha256=sha256_file(short / "similarity.csv.gz"), rows=len(df) - 4)
    (short / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="expected steps x modules"):
        load_profile(short)

    with pytest.raises(ProfileError, match="no such profile"):
        load_profile(tmp_path / "nothing")
    assert gzip.decompress((saved_profile / "similarity.csv.gz").read_bytes())  # the original stays intact


def test_cli_profile_show_plot(tmp_path, capsys):
    from planner.cli import main

    out = tmp_path / "p"
    rc = main(["profile", "--model", "tiny:dit", "--steps", "3", "--samples", "2", "--lags", "2", "--out", str(out), "--quiet", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["path"] == str(out) and (out / "meta.json").is_file()
    assert payload["summary"]["sampler"]["steps"] == 3

    assert main(["profile", "show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "most stable" in text and "Where the time goes" in text
    assert main(["profile", "show", str(out), "--json", "--top", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["most_stable"]) == 2 and len(summary["step_curve"]) == 3

    assert main(["profile", "plot", str(out), "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert {p.rsplit("/", 1)[1] for p in files} == {
        "similarity_output.png", "similarity_residual.png", "similarity_residual_reuse.png", "curves.png", "cost.png"}
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(["profile", "show", str(tmp_path / "missing")]) == 2
    assert "no such profile" in capsys.readouterr().err
    assert main(["profile", "--model", "tiny:dit", "--samples", "0", "--quiet"]) == 2


def test_hookset_restores_modules_exactly():
    from diffusers.hooks import ModelHook

    lin = nn.Linear(2, 2)
    hs = HookSet()
    hs.add(lin, ModelHook(), "x")
    assert hasattr(lin, "_diffusers_hook") and "forward" in vars(lin)
    hs.remove()
    assert not hasattr(lin, "_diffusers_hook") and "forward" not in vars(lin)
