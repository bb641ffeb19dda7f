"""Tests of the shared learned router (search/_router.py): gated modules, soft-to-hard conversion on a
hand example, the threshold search on the committed digits-dit latency model, checkpoints that
restore an optimizer exactly, and on digits-dit (10 steps): hardened gates reproduce the hard plan's
run (sub-layers and blocks), gradients reach the scores and not the model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from planner.errors import PlannerError
from planner.cfg import CfgLayout
from planner.executor import apply_plan
from planner.executor.session import apply_gates
from planner.plan import plan_for_runner
from planner.profile import load_profile
from planner.profile.latency import plan_from_codes
from planner.search.budget import Budget
from planner.search._router import (
    Gates,
    choose_plan,
    plan_at_theta,
    SCORE_LIMIT,
    Router,
    TrainingCurve,
    every_other_step,
    frozen,
    gate_costs,
    gated_modules,
    load_checkpoint,
    load_router,
    optimizer_tensors,
    record_calls,
    restore_optimizer,
    save_checkpoint,
    save_router,
    theta_candidates,
    theta_for_speedup,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"


TORCH_THREADS = 2  # see conftest.py


def _mods(*pairs):
    return [SimpleNamespace(name=n, kind=k) for n, k in pairs]


# --------------------------------------------------------------------------- no model needed


def test_gated_modules_by_level():
    mods = _mods(("b.0", "block"), ("b.0.attn1", "attn"), ("b.0.attn2", "cross_attn"), ("b.0.ff", "mlp"), ("b.1", "block"))
    assert gated_modules(mods, "sublayer") == ["b.0.attn1", "b.0.attn2", "b.0.ff"]
    assert gated_modules(mods, "block") == ["b.0", "b.1"]
    with pytest.raises(PlannerError, match="sublayer or block"):
        gated_modules(mods, "head")


def test_soft_to_hard_conversion_on_a_hand_example():
    names = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    router = Router(names, steps=4, level="sublayer")
    # gates:        attn1  ff
    #  step 0        0.1  0.9   (step 0 is fixed: always computes)
    #  step 1        0.7  0.3
    #  step 2        0.5  0.05
    #  step 3        0.2  0.95
    g = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.5, 0.05], [0.2, 0.95]])
    router.load_scores(torch.logit(g))
    assert router.decisions(0.5) == {names[0]: "CCCR", names[1]: "CRRC"}  # gate >= theta computes
    assert router.decisions(0.25) == {names[0]: "CCCR", names[1]: "CCRC"}
    assert router.decisions(0.0) == {names[0]: "CCCC", names[1]: "CCCC"}
    assert router.decisions(1.0 + 1e-9) == {names[0]: "CRRR", names[1]: "CRRR"}
    assert router.hard_gates(0.5).tolist() == [[1, 1], [1, 0], [1, 0], [0, 1]]
    capped = Router(names, steps=4, level="sublayer", max_run=1)  # at most one reuse in a row
    capped.load_scores(torch.logit(torch.tensor([[0.9, 0.9], [0.1, 0.1], [0.1, 0.9], [0.1, 0.1]])))
    assert capped.decisions(0.5) == {names[0]: "CRCR", names[1]: "CRCR"}
    assert capped.hard_gates(0.5).tolist() == [[1, 1], [0, 0], [1, 1], [0, 0]]
    blocks = Router(["transformer_blocks.0"], steps=4, level="block")
    blocks.load_scores(torch.logit(g[:, :1]))
    assert blocks.decisions(0.5) == {"transformer_blocks.0": "CCCD"}  # blocks reuse their residual
    # the thresholds at which the plan changes: 0, midpoints of the free gates, then all-reuse
    cands = theta_candidates(router.gates(), router.fixed)
    assert cands[0] == 0.0 and cands[-1] > 1.0 and len(cands) == 2 + 5
    assert cands[1] == pytest.approx((0.05 + 0.2) / 2)


def test_paper_mode_fixes_even_steps_and_scores_are_clamped():
    router = Router(["a.attn1"], steps=5, level="sublayer", fixed=every_other_step(5, 1), init=-3.0)
    assert router.decisions(0.5) == {"a.attn1": "CRCRC"}
    with torch.no_grad():
        router.scores.add_(100)
    router.clamp_()
    assert router.scores.max().item() == SCORE_LIMIT
    assert torch.equal(router.gates()[0::2], torch.ones(3, 1))


def _latency_context():
    """A stand-in for SearchContext's plan/predict, on the committed profile's latency model (no model run)."""
    lm = load_profile(DIGITS_PROFILE).latency_model()
    return SimpleNamespace(
        plan=lambda decisions, **kw: plan_from_codes(decisions),
        predict=lambda plan: (lm.predict_speedup(plan), 1 / lm.predict_speedup(plan)),
        latency=lm,
        modules=[SimpleNamespace(name=m.name, kind=m.kind) for m in lm.modules],
        steps=lm.steps,
    ), lm


def test_theta_search_meets_the_budget_with_the_least_reuse():
    ctx, lm = _latency_context()
    names = gated_modules(ctx.modules, "block")
    router = Router(names, lm.steps, "block")
    router.load_scores(torch.randn(lm.steps, len(names), generator=torch.Generator().manual_seed(0)) * 2)
    theta, speedup = theta_for_speedup(ctx, router, 2.0)
    assert speedup >= 2.0
    cands = theta_candidates(router.gates(), router.fixed)
    i = cands.index(theta)
    assert lm.predict_speedup(plan_from_codes(router.decisions(cands[i - 1]))) < 2.0  # one step less reuse misses
    assert theta_for_speedup(ctx, router, 50.0) is None
    # the cost weights: blocks all cost about the same, mean 1
    w = gate_costs(lm, names)
    assert w.mean().item() == pytest.approx(1.0) and (w > 0.5).all()


def test_plan_at_a_fixed_theta_is_the_least_error_candidate_that_meets_the_budget():
    steps, names = 4, ["b0", "b1"]

    def candidate(name, b0, b1):
        gates = torch.tensor([[b0, b1]] * steps)
        return Gates(gates, names, "block", torch.zeros(steps, 2, dtype=torch.bool), {"name": name})

    def reuses(decisions):
        return sum(codes.count("D") for codes in decisions.values())

    ctx = SimpleNamespace(  # one reuse: +0.25x predicted speedup, +0.1 error
        plan=lambda decisions, **made: SimpleNamespace(decisions=decisions, **made),
        evaluate=lambda plan: SimpleNamespace(predicted_speedup=1 + 0.25 * reuses(plan.decisions),
                                              error=0.1 * reuses(plan.decisions)),
    )
    every, one, none = candidate("every", 0.2, 0.2), candidate("one", 0.2, 0.9), candidate("none", 0.9, 0.9)
    plan = plan_at_theta(ctx, Budget.parse("1.5x"), [every, one, none], 0.5, "l2c", "of a test router")
    assert plan.params == {"name": "one", "theta": 0.5} and plan.strategy == "l2c"
    assert plan.decisions == {"b0": "CDDD", "b1": "CCCC"} and plan.evaluation.error == pytest.approx(0.3)
    with pytest.raises(PlannerError, match="no plan of a test router at theta 0.5 meets"):
        plan_at_theta(ctx, Budget.parse("3x"), [every, one, none], 0.5, "l2c", "of a test router")
    # the router saved beside a plan gives the plan again, with its run cap
    capped = Gates(every.gates, names, "block", every.fixed, max_run=1)
    assert every.router(max_run=1).decisions(0.5) == capped.decisions(0.5) == {"b0": "CDCD", "b1": "CDCD"}


def test_an_error_target_takes_the_fastest_plan_within_it_not_the_one_with_most_reuse():
    # one block, gates falling over the steps: theta 0.5 reuses 2 steps, 0.7 three; past two reuses
    # each more one is slower (as when a hook's cost outweighs what a reuse saves)
    gates = torch.tensor([[1.0], [0.8], [0.6], [0.4], [0.2]])
    fixed = torch.zeros(5, 1, dtype=torch.bool)
    fixed[0] = True  # the first step always computes
    g = Gates(gates, ["b0"], "block", fixed)
    speedups = {0: 1.0, 1: 1.3, 2: 1.5, 3: 1.2, 4: 1.1}

    def reuses(decisions):
        return decisions["b0"].count("D")

    ctx = SimpleNamespace(
        plan=lambda decisions, **made: SimpleNamespace(decisions=decisions, **made),
        evaluate=lambda plan: SimpleNamespace(predicted_speedup=speedups[reuses(plan.decisions)],
                                              error=0.1 * reuses(plan.decisions)),
    )
    plan = choose_plan(ctx, Budget.parse(None, max_error=0.35), [g], "l2c")
    assert reuses(plan.decisions) == 2 and plan.evaluation.predicted_speedup == 1.5  # not 3 reuses at 1.2x


def test_checkpoints_get_the_file_mode_of_every_other_artifact(tmp_path):
    from planner.io import write_text_atomic

    checkpoint = save_checkpoint(tmp_path / "ck.safetensors", {"x": torch.arange(3.0)}, {"a": 1})
    text = write_text_atomic(tmp_path / "t.txt", "x")
    assert checkpoint.stat().st_mode & 0o777 == text.stat().st_mode & 0o777  # the umask decides both
    tensors, meta = load_checkpoint(checkpoint)
    assert torch.equal(tensors["x"], torch.arange(3.0)) and meta == {"a": 1}


def test_checkpoint_restores_the_optimizer_exactly(tmp_path):
    def run(router, opt, n):
        for _ in range(n):
            loss = ((router.gates() - 0.3) ** 2).sum() + router.gates()[1:].sum() * 0.1
            opt.zero_grad()
            loss.backward()
            opt.step()
            router.clamp_()

    names = ["x.attn1", "x.ff"]
    straight = Router(names, 6, "sublayer")
    opt = torch.optim.AdamW([straight.scores], lr=0.05, weight_decay=0.0)
    run(straight, opt, 10)

    half = Router(names, 6, "sublayer")
    opt_half = torch.optim.AdamW([half.scores], lr=0.05, weight_decay=0.0)
    run(half, opt_half, 5)
    tensors, meta = optimizer_tensors(opt_half)
    save_checkpoint(tmp_path / "ck.safetensors", {**tensors, **half.tensors()}, {"optim": meta, "router": half.meta()})
    loaded, lmeta = load_checkpoint(tmp_path / "ck.safetensors")
    resumed = Router.from_saved(loaded, lmeta["router"])
    opt_resumed = torch.optim.AdamW([resumed.scores], lr=0.05, weight_decay=0.0)
    restore_optimizer(opt_resumed, loaded, lmeta["optim"])
    run(resumed, opt_resumed, 5)
    assert torch.equal(resumed.scores, straight.scores)

    save_router(tmp_path, straight, {"theta": 0.4})
    again, rmeta = load_router(tmp_path)
    assert torch.equal(again.scores, straight.scores) and rmeta["theta"] == 0.4 and again.modules == names
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PlannerError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(PlannerError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_training_curve_is_written_as_csv(tmp_path):
    curve = TrainingCurve()
    for i in range(3):
        curve.add(iteration=i, loss=1.0 / (i + 1), mse=0.5 / (i + 1), predicted_speedup=1.0 + i / 10)
    path = curve.save(tmp_path)
    lines = path.read_text().splitlines()
    assert lines[0] == "iteration,loss,mse,predicted_speedup" and len(lines) == 4
    assert (tmp_path / "training_curve.png").stat().st_size > 0


# --------------------------------------------------------------------------- on digits-dit, 10 steps


@pytest.mark.parametrize("level", ["sublayer", "block"])
def test_hardened_gates_reproduce_the_hard_plan(digits10, level):
    runner, sampler = digits10.runner, digits10.sampler
    names = gated_modules(runner.modules(), level)
    router = Router(names, sampler.steps, level, max_run=2)
    router.load_scores(torch.randn(sampler.steps, len(names), generator=torch.Generator().manual_seed(1)) * 2)
    theta = 0.5
    decisions = router.decisions(theta)
    assert any(c != "C" for codes in decisions.values() for c in codes)
    conds, seeds = [3, 7], [0, 1]
    plan = plan_for_runner(runner, sampler, decisions)
    with apply_plan(runner.pipe, plan):
        hard = runner.run(conds, seeds, sampler, output="latent")
    with apply_gates(runner.pipe, router.hard_gates(theta), names, cfg_layout=CfgLayout.COND_UNCOND):
        soft = runner.run(conds, seeds, sampler, output="latent")
    full = runner.run(conds, seeds, sampler, output="latent")
    assert (hard - full).abs().max() > 1e-3  # the plan really reuses
    tol = 0.0 if level == "sublayer" else 1e-5  # blocks: x_now + (m - x_prev) differs from D's by float rounding
    assert (soft - hard).abs().max().item() <= tol


def test_gradients_reach_the_scores_and_not_the_model(digits10):
    runner, sampler = digits10.runner, digits10.sampler
    calls = record_calls(runner, [3, 7], [0, 1], sampler, calls_per_step=1)
    assert calls.steps == sampler.steps and calls.outputs[0][0].shape[0] == 4  # 2 samples x 2 CFG branches
    names = gated_modules(runner.modules(), "sublayer")
    router = Router(names, sampler.steps, "sublayer", init=0.0)
    transformer = runner.transformer
    with frozen(transformer):
        with apply_gates(runner.pipe, router.gates(), names, cfg_layout=CfgLayout.COND_UNCOND, detach_cache=False) as h:
            with torch.no_grad(), h.at_step(3):
                calls.replay(transformer, 3)  # fills the cache
            with h.at_step(4):
                (student,) = calls.replay(transformer, 4)
        loss = torch.nn.functional.mse_loss(student, calls.teacher(4)[0]) + 1e-3 * router.gates()[4].sum()
        loss.backward()
    grad = router.scores.grad
    assert grad[4].abs().min() > 0  # every gated module of step 4
    assert grad[:4].abs().max() == 0 and grad[5:].abs().max() == 0
    assert all(p.grad is None for p in transformer.parameters())
    assert all(p.requires_grad for p in transformer.parameters())  # restored after training
