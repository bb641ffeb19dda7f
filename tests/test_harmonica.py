"""Tests of the ``harmonica`` strategy (search/harmonica.py, _harmonica_sdt.py, _harmonica_proxy.py).

On digits-dit with 8 DDIM steps: SDT feeds the student's own x_t forward (the x_t the trainer saw
equal a gated rollout's and differ from the full-compute trajectory), the teacher call leaves the
executor's caches alone, one optimizer update per step and none at step 0, lambda_t grows when caching
at step t is made more harmful (a hand-made final-output model and real rollouts, both proxies), an
interrupted training resumes to exactly the same router, and the strategy end to end (files beside
the plan, provenance, budget met, bad parameters refused in one line)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.executor.session import apply_gates
from planner.profile import profile_model
from planner.runner import Sampler
from planner.search import get_strategy
from planner.search._harmonica_proxy import normalise, raw_proxy
from planner.search._router import load_router
from planner.search.budget import Budget
from planner.search.context import SearchContext
from planner.search.harmonica import HarmoniCaSettings, HarmoniCaTrainer, round_seeds

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"
STEPS = 8


TORCH_THREADS = 2  # see conftest.py


@pytest.fixture(scope="module")
def digits8(digits):
    sampler = digits.resolve(Sampler("ddim", STEPS, 3.0))
    profile = profile_model(digits, sampler, samples=2, lags=1, costs="flops")
    return digits, sampler, profile


def _context(digits8, artifacts=None):
    runner, sampler, profile = digits8
    return SearchContext.build(runner, sampler, profile, samples=2, artifacts=artifacts)


def trainer_for(ctx, budget="1.5x", **settings):
    return HarmoniCaTrainer(ctx, HarmoniCaSettings(**settings), Budget.parse(budget))


def _inputs_of_rollout(runner, sampler, conditions, seeds, gates=None, names=None):
    """The transformer's x_t at every step of one sampling run (soft-gated when ``gates`` is given)."""
    seen = []
    hook = runner.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        if gates is None:
            runner.run(conditions, seeds, sampler, output="latent")
        else:
            with apply_gates(runner.pipe, gates, names, cfg_layout=CfgLayout.COND_UNCOND):
                runner.run(conditions, seeds, sampler, output="latent")
    finally:
        hook.remove()
    return seen


# --------------------------------------------------------------------------- SDT


def test_sdt_feeds_the_students_own_xt_forward(digits8):
    ctx = _context(digits8)
    cfg = HarmoniCaSettings(batch=2, lr=1e-12, init=-3.0)  # gates ~0.05 (heavy mixing) that do not move
    trainer = HarmoniCaTrainer(ctx, cfg, Budget.parse("1.5x"))
    gates = trainer.router.gates().detach().clone()
    sdt = trainer.round(beta=0.0, index=0, record=True)
    seen = [r.inputs[0] for r in sdt.steps]
    assert len(seen) == STEPS and all(len(r.inputs) == 1 for r in sdt.steps)

    seeds = round_seeds(cfg.seed, 0, cfg.batch)
    conditions = ctx.runner.conditions(cfg.batch, seed=seeds[0])
    student = _inputs_of_rollout(ctx.runner, ctx.sampler, conditions, seeds, gates, trainer.names)
    teacher = _inputs_of_rollout(ctx.runner, ctx.sampler, conditions, seeds)
    for t in range(STEPS):  # the trainer saw the gated model's own trajectory ...
        assert torch.allclose(seen[t], student[t], atol=1e-5), f"step {t}"
    # ... which leaves the teacher's (full compute) trajectory: a trainer that advanced x_t with the
    # teacher's prediction (or trained on recorded full-compute inputs, as l2c does) fails here
    assert (seen[-1] - teacher[-1]).abs().max() > 0.05
    assert (student[-1] - teacher[-1]).abs().max() > 0.05
    # training happened at every step but the first: one update each
    assert sdt.steps[0].loss is None and all(r.loss is not None and r.mse > 0 for r in sdt.steps[1:])
    assert trainer.iterations == STEPS - 1


def test_one_update_per_step_and_step_zero_never_moves(digits8):
    ctx = _context(digits8)
    trainer = trainer_for(ctx, "1.2x", batch=2, lr=0.05, level="sublayer")
    before = trainer.router.scores.detach().clone()
    trainer.round(beta=0.05, index=3)
    after = trainer.router.scores.detach()
    assert torch.equal(after[0], before[0])  # step 0 is fixed to compute: no gradient, no update
    assert (after[1:] != before[1:]).all()
    assert trainer.optimizer.state[trainer.router.scores]["step"].item() == STEPS - 1
    assert all(p.grad is None for p in ctx.runner.transformer.parameters())


def test_the_teacher_call_reads_and_writes_no_cache(digits8):
    runner = digits8[0]
    transformer = runner.transformer
    names = ["transformer_blocks.0.attn1", "transformer_blocks.3.ff"]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"timestep": torch.full((4,), 500), "class_labels": torch.tensor([1, 2, 10, 10])}
    plain = transformer(x, **kwargs).sample
    with apply_gates(runner.pipe, torch.zeros(STEPS, 2), names, cfg_layout=CfgLayout.COND_UNCOND) as h:
        with h.at_step(0):
            transformer(x, **kwargs)  # fills the caches
        before = h.snapshot()
        teacher = type(transformer).forward(transformer, x * 2, **kwargs).sample  # the SDT teacher's path
        after = h.snapshot()
        with h.at_step(1):
            cached = transformer(x * 2, **kwargs).sample  # gates 0: both modules serve step 0's outputs
    for name in names:
        assert after[name]["cond"][0] is before[name]["cond"][0]  # the very same stored tensors
    assert torch.allclose(teacher, transformer(x * 2, **kwargs).sample)  # it ran the full model
    assert not torch.allclose(cached, teacher, atol=1e-4)
    assert torch.allclose(plain, transformer(x, **kwargs).sample)


# --------------------------------------------------------------------------- IEPO


def _toy_final(harm):
    """A hand-made "final output" model: caching step t (mask row 0) adds harm[t] along its own direction."""
    dirs = torch.eye(len(harm))

    def final(mask):
        cached = 1 - mask.float().mean(dim=1)
        return (cached * torch.as_tensor(harm))[:, None] * dirs + torch.outer(cached, cached)  # plus an interaction
    return final


@pytest.mark.parametrize("proxy", ["paper", "released"])
def test_lambda_grows_when_caching_at_a_step_is_made_more_harmful_toy(proxy):
    hard = torch.ones(6, 2)
    hard[1:, 0] = 0  # module 0 caches at every step but the first
    harm = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    base = normalise(raw_proxy(_toy_final(harm), hard, proxy))
    harm[3] = 4.0
    worse = normalise(raw_proxy(_toy_final(harm), hard, proxy))
    assert worse[3] > 2 * base[3]
    assert all(worse[t] < base[t] for t in (1, 2, 4, 5))  # mean 1: the others lose weight
    assert worse[1:].mean().item() == pytest.approx(1.0)
    assert normalise(raw_proxy(_toy_final(harm), torch.ones(6, 2), proxy)).tolist() == [1.0] * 6  # nothing cached


@pytest.mark.parametrize("proxy", ["paper", "released"])
def test_lambda_grows_when_caching_at_a_step_is_made_more_harmful_on_digits(digits8, proxy):
    ctx = _context(digits8)
    trainer = trainer_for(ctx, "1.2x", proxy=proxy)
    hard = torch.ones(STEPS, 8)
    hard[2, ::2] = 0  # step 2 reuses the residual of every other block, step 5 of the last block only
    hard[5, 7] = 0
    with torch.no_grad():
        raw = raw_proxy(trainer.final, hard, proxy, full=ctx.reference)
        hard[5, :] = 0  # step 5 now reuses every block: caching there hurts more
        raw_worse = raw_proxy(trainer.final, hard, proxy, full=ctx.reference)
    assert raw[2] > 0 and raw[5] > 0 and raw[[1, 3, 4, 6, 7]].abs().max() == 0  # steps that cache nothing: 0
    assert raw_worse[5] > 3 * raw[5]
    assert normalise(raw_worse)[5] > normalise(raw)[5]


# --------------------------------------------------------------------------- resume and end to end


@pytest.mark.slow  # two trainings: CI runs it (pytest --slow)
def test_resume_continues_exactly(digits8, tmp_path, monkeypatch):
    cfg = {"batch": 2, "rounds": 2, "betas": [0.01, 0.1], "proxy_every": 10, "checkpoint_every": 1}

    def train(folder, resume=False):
        trainer = trainer_for(_context(digits8, artifacts=folder), **cfg, resume=resume)
        return trainer, trainer.train()

    straight, snaps = train(tmp_path / "a")
    assert len(snaps) == 2 and straight.iterations == 4 * (STEPS - 1)
    assert straight.proxy_rows  # lambda was recomputed (after 14 updates)

    real_round, calls = HarmoniCaTrainer.round, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_round(self, *a, **k)

    monkeypatch.setattr(HarmoniCaTrainer, "round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b")
    monkeypatch.setattr(HarmoniCaTrainer, "round", real_round)
    resumed, snaps_b = train(tmp_path / "b", resume=True)
    assert torch.equal(resumed.router.scores, straight.router.scores)
    assert all(torch.equal(a.gates, b.gates) for a, b in zip(snaps, snaps_b))
    assert torch.equal(resumed.lambdas, straight.lambdas)
    assert len(resumed.curve.rows) == len(straight.curve.rows) == 4

    cfg["lr"] = 0.1
    with pytest.raises(PlannerError, match="another training"):
        train(tmp_path / "b", resume=True)
    with pytest.raises(PlannerError, match="nothing to resume"):
        train(tmp_path / "c", resume=True)


@pytest.mark.slow  # a training: CI runs it (pytest --slow)
def test_strategy_writes_plan_router_curve_and_proxy(digits8, tmp_path):
    ctx = _context(digits8, artifacts=tmp_path / "plan")
    strategy = get_strategy("harmonica")(batch=2, rounds=2, betas=[0.02], proxy_every=7, level="block", proxy="released")
    plan = strategy.search(ctx, Budget.parse("1.4x"))
    assert plan.prediction.speedup >= 1.4 and plan.provenance.strategy == "harmonica"
    params = plan.provenance.params
    assert {"beta", "theta", "iterations", "lr", "seed", "proxy"} <= set(params) and params["proxy"] == "released"
    router, meta = load_router(tmp_path / "plan")
    assert router.decisions(params["theta"]) == {m: plan.codes(m, "cond") for m in router.modules}
    assert len(meta["lambda"]) == STEPS
    for name in ("training_curve.csv", "training_curve.png", "proxy.csv"):
        assert (tmp_path / "plan" / name).stat().st_size > 0
    assert (tmp_path / "plan" / "proxy.csv").read_text().splitlines()[0] == "iteration,theta,step,cached_fraction,raw,lambda"


def test_a_run_cap_bounds_consecutive_reuses_and_the_saved_router_reproduces_the_plan(digits8, tmp_path):
    ctx = _context(digits8, artifacts=tmp_path / "plan")
    strategy = get_strategy("harmonica")(batch=2, rounds=1, betas=[0.3], init=-3.0, max_runs=[1])
    plan = strategy.search(ctx, Budget.parse("1.3x"))
    assert plan.provenance.params["max_run"] == 1 and plan.provenance.params["max_runs"] == [1]
    router, _ = load_router(tmp_path / "plan")
    codes = {m: plan.codes(m, "cond") for m in router.modules}
    assert any("D" in c for c in codes.values())  # low gates: the plan caches ...
    assert all("DD" not in c for c in codes.values())  # ... but never two steps in a row
    assert router.max_run == 1 and router.decisions(plan.provenance.params["theta"]) == codes


def test_cli_refuses_a_bad_proxy_in_one_line(tmp_path, cli):
    proc = cli("search", "--strategy", "harmonica", "--budget", "1.5x", "--profile", str(DIGITS_PROFILE),
               "--calib-samples", "1", "--param", "proxy=bogus", "--out", str(tmp_path / "p.json"), "--quiet",
               cwd=tmp_path)
    assert proc.returncode == 2 and "proxy: Input should be 'paper', 'released' or 'uniform'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()
