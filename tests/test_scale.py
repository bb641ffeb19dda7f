"""Scale (issue 19): the dry-run estimate and the memory check, micro-batch-bounded memory, token
sampling, mergeable shards, the bounded capture of the cost pass, and an executor that reads no
timestep from the device during a run (the read-back counts stand in for
``torch.cuda.set_sync_debug_mode``, which needs a GPU; benchmarks/scale.py runs that on one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from planner.cli import main
from planner.errors import PlannerError
from planner.profile import load_profile, profile_model
from planner.profile.estimate import estimate_profile, probe
from planner.profile.shard import ShardSpec, merge_profiles
from planner.profile.similarity import similarity_stats
from planner.profile.tokens import TokenSampler
from planner.runner import Sampler

TORCH_THREADS = 1
STAT_COLUMNS = [f"{m}_{a}" for m in ("rel_l1", "cos", "res_rel_l1", "res_cos", "res_reuse_rel_l1")
                for a in ("mean", "std", "min", "max")]


def _stats(profile) -> np.ndarray:
    return profile.similarity[STAT_COLUMNS].to_numpy(dtype=float)


# --------------------------------------------------------------------------- token sampling


def test_token_positions_are_fixed_sorted_and_only_for_long_token_axes():
    s = TokenSampler(4, seed=7)
    a, b = s.indices(16, "cpu"), TokenSampler(4, seed=7).indices(16, "cpu")
    assert torch.equal(a, b) and len(a) == 4 and torch.all(a[1:] > a[:-1])
    assert not torch.equal(a, TokenSampler(4, seed=8).indices(16, "cpu"))
    assert s.indices(4, "cpu") is None
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    assert torch.equal(s.sample(x), x[:, a])
    flat = torch.ones(2, 16)  # no token axis: kept whole
    assert s.sample(flat) is flat
    with pytest.raises(PlannerError):
        TokenSampler(0)


def test_token_sample_shrinks_the_ring_buffers_and_all_tokens_gives_the_exact_statistics(tiny):
    runner = tiny("dit")
    sampler = Sampler("default", 4, 4.0)
    conds, seeds = runner.conditions(2, 0), [0, 1]
    modules = runner.modules()
    exact, ts, _ = similarity_stats(runner, modules, sampler, conds, seeds, k=2, batch_size=2)
    half, _, _ = similarity_stats(runner, modules, sampler, conds, seeds, k=2, batch_size=2, token_sample=TokenSampler(8))
    whole, _, _ = similarity_stats(runner, modules, sampler, conds, seeds, k=2, batch_size=2, token_sample=TokenSampler(16))
    assert half.peak_ring_bytes * 2 == exact.peak_ring_bytes  # tiny:dit outputs have 16 tokens
    np.testing.assert_array_equal(whole.raw()["sum"], exact.raw()["sum"])
    a, b = exact.table(ts), half.table(ts)
    assert not np.allclose(a.rel_l1_mean, b.rel_l1_mean, equal_nan=True)  # sampled: an estimate, not a copy


# --------------------------------------------------------------------------- micro-batches bound memory


def test_ring_buffer_memory_follows_the_micro_batch_not_the_calibration_set(tiny):
    runner = tiny("dit")
    sampler = Sampler("default", 3, 4.0)
    modules = runner.modules()

    def peak(samples, batch):
        c, _, _ = similarity_stats(runner, modules, sampler, runner.conditions(samples, 0), list(range(samples)),
                                   k=2, batch_size=batch)
        return c.peak_ring_bytes

    one = peak(2, 1)
    assert one > 0
    assert peak(4, 1) == one  # twice the samples, same micro-batch: same memory
    assert peak(4, 4) == 4 * one


def test_estimate_counts_calls_and_predicts_the_ring_buffers_exactly(tiny):
    runner = tiny("dit")
    sampler = Sampler("default", 5, 4.0)
    est = estimate_profile(runner, sampler, samples=6, batch_size=2, lags=2, token_sample=8, timed=False)
    assert est.chunks == 3 and est.calls["similarity"] == 3 * 5 * 1
    c, _, _ = similarity_stats(runner, runner.modules(), sampler, runner.conditions(6, 0), list(range(6)),
                               k=2, batch_size=2, token_sample=TokenSampler(8))
    assert est.memory["rings"] == c.peak_ring_bytes
    assert est.max_tokens == 16 and est.fits is True and est.time_s["total"] is None  # untimed probe


def test_estimate_of_separate_cfg_calls_counts_both_calls(tiny):
    runner = tiny("wan")
    est = estimate_profile(runner, Sampler("default", 3, 5.0), samples=2, batch_size=1, lags=1, timed=True)
    assert est.probe["calls_per_step"] == 2 and est.calls["similarity"] == 2 * 3 * 2
    assert est.time_s["total"] > 0


def test_a_run_that_would_not_fit_is_refused_with_the_fix_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    import planner.profile.estimate as estimate

    runner = tiny("dit")
    sampler = Sampler("default", 3, 4.0)
    p = probe(runner, runner.modules(), sampler, runner.conditions(4, 0), [0, 1, 2, 3], timed=False)
    p.peak.host = 0  # activations out of the picture: the rings decide
    one = estimate_profile(runner, sampler, samples=4, batch_size=1, lags=3, probe_result=p)
    # room for a micro-batch of one sample, not of two
    monkeypatch.setattr(estimate, "host_available", lambda: int(one.memory["peak"] * 1.01 / estimate.FIT_FRACTION))
    est = estimate_profile(runner, sampler, samples=4, lags=3, probe_result=p)
    assert est.fits is False and "--batch-size 1" in est.fixes
    monkeypatch.setattr(estimate, "probe", lambda *a, **k: p)
    with pytest.raises(PlannerError, match="would not fit.*--batch-size 1"):
        profile_model(runner, sampler, samples=4, lags=3, costs="flops", out=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    # the dry run says the same and exits 0
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "tiny:dit", "--steps", "3", "--samples", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "--batch-size 1" in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_one_json_object_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "tiny:dit", "--steps", "4", "--samples", "3", "--batch-size", "2",
                 "--token-sample", "8", "--dry-run", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["chunks"] == 2 and est["token_sample"] == 8 and est["fits"] is True
    assert set(est["memory"]) >= {"rings", "activations", "similarity_peak", "cost_peak"}
    assert est["time_s"]["total"] > 0 and est["calls"]["total"] > est["calls"]["similarity"]
    assert main(["search", "--model", "tiny:dit", "--steps", "4", "--calib-samples", "2", "--dry-run", "--json"]) == 0
    search = json.loads(capsys.readouterr().out)
    assert search["profiles"] is True and search["estimate"]["samples"] == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/2"], "index must be in 0..1"),
    (["--shard", "1/9", "--samples", "4"], "9 shards need at least 9"),
    (["--shard", "x"], "INDEX/COUNT"),
    (["--shard", "0/0"], "count must be at least 1"),
    (["--token-sample", "0"], "positive number of tokens"),
    (["--token-sample", "16", "--dry-run"], "keeps every token"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_scale_options_are_one_line_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "tiny:dit", "--steps", "3", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- shards


def test_shard_slices_are_contiguous_and_cover_every_sample_once():
    slices = [ShardSpec(i, 3).indices(8) for i in range(3)]
    assert slices == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert ShardSpec.parse(" 1 / 3 ") == ShardSpec(1, 3)


@pytest.mark.parametrize("spec, steps, guidance, shards", [("tiny:dit", 4, 4.0, 2), ("tiny:wan", 3, 5.0, 3)])
def test_merged_shards_equal_the_single_run(spec, steps, guidance, shards, tiny, tmp_path):
    runner = tiny(spec.split(":")[1])
    sampler = Sampler("default", steps, guidance)
    kw = dict(samples=3, lags=2, batch_size=1, costs="flops", seed=5)
    single = profile_model(runner, sampler, **kw)
    paths = []
    for i in reversed(range(shards)):  # any order
        path = tmp_path / f"s{i}"
        part = profile_model(runner, sampler, shard=f"{i}/{shards}", out=path, **kw)
        assert part.meta.extra["shard"]["index"] == i and part.raw is not None
        paths.append(path)
    merged = merge_profiles(paths)
    np.testing.assert_allclose(_stats(merged), _stats(single), rtol=1e-6, atol=1e-9, equal_nan=True)
    assert (merged.similarity.n.to_numpy() == single.similarity.n.to_numpy()).all()
    assert merged.meta.samples == 3 and list(merged.meta.seeds) == [5, 6, 7]
    assert merged.meta.conditions == single.meta.conditions
    assert merged.meta.extra["merged_from"]["costs"].startswith("shard 0")
    merged.save(tmp_path / "merged")
    again = load_profile(tmp_path / "merged")
    assert len(again.similarity) == len(single.similarity) and "shard" not in again.meta.extra


@pytest.mark.slow  # two shard profiles and a single one of digits-dit: CI runs it (pytest --slow)
def test_merged_digits_shards_equal_the_single_run(digits, tmp_path, capsys):
    sampler = Sampler("ddim", 8, 3.0)
    kw = dict(samples=4, lags=2, batch_size=2, costs="flops")
    single = profile_model(digits, sampler, **kw)
    for i in range(2):
        profile_model(digits, sampler, shard=(i, 2), out=tmp_path / f"d_shard{i}of2", **kw)
    assert main(["profile", "merge", str(tmp_path / "d_shard1of2"), str(tmp_path / "d_shard0of2"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    merged = load_profile(payload["path"])
    assert Path(payload["path"]).name == "d" and merged.meta.samples == 4
    # through the CSV (4 significant digits) both tables round alike
    saved_single = tmp_path / "single"
    single.save(saved_single)
    np.testing.assert_allclose(_stats(merged), _stats(load_profile(saved_single)), rtol=1e-6, equal_nan=True)


def test_merge_refuses_mismatched_or_incomplete_shards_and_writes_nothing(tiny, tmp_path, capsys):
    dit, pixart = tiny("dit"), tiny("pixart-sigma")
    kw = dict(samples=2, lags=1, costs="flops")
    a0 = profile_model(dit, Sampler("default", 3, 4.0), shard="0/2", out=tmp_path / "a0", **kw).path
    a1 = profile_model(dit, Sampler("default", 3, 4.0), shard="1/2", out=tmp_path / "a1", **kw).path
    steps4 = profile_model(dit, Sampler("default", 4, 4.0), shard="1/2", out=tmp_path / "s4", **kw).path
    other = profile_model(pixart, Sampler("default", 3, 4.5), shard="1/2", out=tmp_path / "px", **kw).path
    lags2 = profile_model(dit, Sampler("default", 3, 4.0), shard="1/2", out=tmp_path / "l2", samples=2, lags=2, costs="flops").path
    whole = profile_model(dit, Sampler("default", 3, 4.0), out=tmp_path / "whole", **kw).path
    out = tmp_path / "merged"
    for paths, message in [
        ([a0, other], "another model"),
        ([a0, steps4], "another sampler"),
        ([a0, lags2], "another number of lags"),
        ([a0], "1/2 missing"),
        ([a0, a0], "given twice"),
        ([a0, whole], "not a shard profile"),
        ([a0, tmp_path / "nothing"], "no such profile"),
    ]:
        assert main(["profile", "merge", *map(str, paths), "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert main(["profile", "merge", str(a0), str(a1), "--out", str(a0)]) == 2
    assert "is one of the shards" in capsys.readouterr().err


def test_tampered_shard_statistics_are_rejected(tiny, tmp_path):
    path = profile_model(tiny("dit"), Sampler("default", 3, 4.0), samples=2, lags=1, costs="flops",
                         shard="0/2", out=tmp_path / "s0").path
    stats = path / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-8])
    with pytest.raises(PlannerError, match="checksum mismatch"):
        load_profile(path)


# --------------------------------------------------------------------------- the cost pass's capture


def test_capture_keeps_one_copy_per_call_signature(digits):
    from planner.profile.timing import capture_inputs

    sampler = Sampler("ddim", 4, 3.0)
    modules = digits.modules()
    caps, _ = capture_inputs(digits, modules, sampler, digits.conditions(2, 0), [0, 1])
    full, _ = capture_inputs(digits, modules, sampler, digits.conditions(2, 0), [0, 1], dedupe=False)
    kinds = {m.kind for m in modules}
    assert len({id(c) for c in caps}) == len(kinds) < len(modules)  # 8 identical blocks share one
    assert [[t.shape for t in c.outputs] for c in caps] == [[t.shape for t in c.outputs] for c in full]


# --------------------------------------------------------------------------- no device read per step


class _ReadCounter:
    """Counts reads of tensor values into Python (what is a device-to-host sync on a GPU), split by
    whether the executor's own code made them."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.total = 0
        self.executor = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        counter = self

        def read(self, *args, **kwargs):
            counter.total += 1
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/planner/executor/" in caller:
                counter.executor += 1
            return original(self, *args, **kwargs)

        return read

    def reset(self):
        self.total = self.executor = 0


def _mixed_plan(runner, sampler):
    from planner.plan import plan_for_runner

    n = sampler.steps
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    subs = [m.name for m in runner.modules() if m.kind != "block"]
    alt = "".join("RC"[k % 2] if k else "C" for k in range(n))
    return plan_for_runner(runner, sampler, {
        blocks[1]: "".join("DC"[k % 2] if k else "C" for k in range(n)),
        blocks[3]: "CC" + "".join("FC"[k % 2] for k in range(n - 2)),
        subs[0]: alt,
        subs[-1]: {"cond": "C" * n, "uncond": "C" + "S" * (n - 2) + "C"},
    })


@pytest.mark.parametrize("steps", [6, 12])
def test_a_static_plan_reads_nothing_back_per_step(steps, digits, monkeypatch):
    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    sampler = Sampler("ddim", steps, 3.0)
    conds, seeds = digits.conditions(2, 0), [0, 1]
    counter = _ReadCounter(monkeypatch)
    digits.run(conds, seeds, sampler, output="latent")
    pipeline_reads = counter.total
    results = {}
    for label, plan in (("all-compute", plan_for_runner(digits, sampler)), ("mixed", _mixed_plan(digits, sampler))):
        for deferred in (True, False):
            with apply_plan(digits, plan) as handle:
                handle._engine.deferred_timesteps = deferred  # True: the path a GPU timestep takes
                counter.reset()
                out = digits.run(conds, seeds, sampler, output="latent")
                assert handle.stats()["fallbacks"] == 0
            results[label, deferred] = (counter.total, counter.executor, out)
    for label in ("all-compute", "mixed"):
        total, by_executor, out = results[label, True]
        # two reads per run, none per step: the scheduler's timesteps at its start, the timestep check at its end
        assert by_executor == 2
        assert total - pipeline_reads == 2
        eager_total, eager_executor, eager_out = results[label, False]
        assert eager_executor == steps + 1  # timesteps on the CPU are read at every call: the counter sees them
        assert torch.equal(out, eager_out)  # both ways of tracking steps run the same plan


def test_deferred_step_tracking_still_catches_calls_that_do_not_follow_the_plan(tiny):
    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    runner = tiny("dit")
    sampler = Sampler("default", 3, 4.0)
    plan = plan_for_runner(runner, sampler)
    t = runner.transformer
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 1000])
    with apply_plan(t, plan) as handle, torch.no_grad():
        handle._engine.deferred_timesteps = True
        t(x, timestep=torch.tensor([900.0, 900.0]), class_labels=labels)
        t(x, timestep=torch.tensor([950.0, 950.0]), class_labels=labels)  # rises: no longer the same run
        with pytest.raises(PlannerError, match="does not fall"):
            t(x, timestep=torch.tensor([100.0, 100.0]), class_labels=labels)


# --------------------------------------------------------------------------- the scale benchmark's smoke run


@pytest.mark.slow
def test_scale_benchmark_smoke_run_measures_everything(tmp_path):
    """benchmarks/scale.py on a CPU (reduced Flux and Wan configs): every measurement present, none failed."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "scale.py"), "--device", "cpu", "--configs", "flux.1-dev-1024,wan2.1-1.3b-480p",
         "--steps", "3", "--repeats", "1", "--greedy", "", "--compile", "", "--time-limit", "600", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=root, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "scale-cpu.json").read_text())
    assert results["stopped"] is None
    for name in ("flux.1-dev-1024", "wan2.1-1.3b-480p"):
        entry = results["configs"][name]
        for key in ("build", "estimate", "syncs", "executor_overhead", "profile", "plan_2x"):
            assert isinstance(entry[key], dict) and "error" not in entry[key] and "skipped" not in entry[key], (name, key)
        assert entry["syncs"]["executor_reads_per_run_gpu_path"] == 2  # the scheduler's CPU list at the start, the deferred check at the end
        assert entry["profile"]["ring_buffer_peak_bytes"] == entry["profile"]["estimated_rings_bytes"]
    assert "| flux.1-dev-1024 |" in (tmp_path / "scale-cpu.md").read_text()


def _drive_steps(runner, device: str, steps: int, around_call):
    """Call the transformer of ``runner`` for ``steps`` steps with a plan using reuse_residual and
    share_cfg, each call inside ``around_call(step)``; returns the handle's stats."""
    import contextlib

    from planner.executor import apply_plan
    from planner.plan import plan_for_runner

    sampler = Sampler("default", steps, 4.0)
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    subs = [m.name for m in runner.modules() if m.kind != "block"]
    plan = plan_for_runner(runner, sampler, {
        blocks[0]: "".join("CD"[k % 2] for k in range(steps)),
        subs[-1]: {"cond": "C" * steps, "uncond": "C" + "S" * (steps - 1)},
    })
    t = runner.transformer
    x = torch.randn(2, 4, 8, 8, device=device)
    labels = torch.tensor([1, 1000], device=device)
    with apply_plan(t, plan) as handle, torch.no_grad():
        handle._engine.deferred_timesteps = True  # what a timestep on a GPU gets by itself
        for k, value in enumerate(torch.linspace(900, 100, steps).tolist()):
            ts = torch.full((2,), value, device=device)
            with around_call(k) if around_call else contextlib.nullcontext():
                t(x, timestep=ts, class_labels=labels)
        return handle.stats()


def test_driven_steps_read_nothing_back_until_the_run_ends(tiny, monkeypatch):
    counter = _ReadCounter(monkeypatch)
    seen = []

    import contextlib

    @contextlib.contextmanager
    def count(step):
        counter.reset()
        yield
        seen.append(counter.executor)

    stats = _drive_steps(tiny("dit"), "cpu", 6, count)
    assert seen == [0, 0, 0, 0, 0, 1]  # the last call ends the run: its one read
    assert stats["runs"] == 1 and stats["fallbacks"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.set_sync_debug_mode)")
def test_on_a_gpu_the_executor_never_synchronises_before_the_run_ends():
    """Every step but the last runs with synchronisation as an error: the executor reads nothing back
    per step; the last call's end makes the run's one read (the deferred timestep check)."""
    import contextlib

    from planner.runner import load_runner

    steps = 6

    @contextlib.contextmanager
    def strict(step):
        torch.cuda.set_sync_debug_mode("error" if step < steps - 1 else 0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    stats = _drive_steps(load_runner("tiny:dit", device="cuda"), "cuda", steps, strict)
    assert stats["runs"] == 1 and stats["fallbacks"] == 0


def test_a_plan_that_forecasts_without_its_timesteps_still_reads_each_step_time(tiny, monkeypatch):
    """Forecasts extrapolate in the sampler's time; a plan that does not carry the timesteps takes them
    from the calls, so it keeps reading them (one per call) even where a GPU timestep would defer."""
    from planner.executor import apply_plan
    from planner.plan import plan_for_model

    runner = tiny("dit")
    steps = 5
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    plan = plan_for_model(runner.transformer, steps=steps, cfg_layout="cond_uncond", guidance=4.0,
                          decisions={blocks[0]: "CCCFF"})
    assert not plan.sampler.timesteps
    counter = _ReadCounter(monkeypatch)
    t = runner.transformer
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 1000])
    with apply_plan(t, plan) as handle, torch.no_grad():
        handle._engine.deferred_timesteps = True
        for value in torch.linspace(900, 100, steps).tolist():
            t(x, timestep=torch.full((2,), value), class_labels=labels)
        stats = handle.stats()
    assert counter.executor == steps and stats["fallbacks"] == 0
