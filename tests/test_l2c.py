"""Tests of the ``l2c`` strategy (search/l2c.py) on digits-dit at 10 steps (2 calibration samples):
parameter checks, the training windows, one training step reaching the scores and not the model,
resume after an interruption continuing exactly from the checkpoint, budgets met with the router
and curve saved beside the plan and the provenance filled, and the CLI path (--json, --resume)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from planner.errors import PlannerError
from planner.search import get_strategy
from planner.search._router import (
    CHECKPOINT_FILE,
    CURVE_FILE,
    ROUTER_FILE,
    Router,
    frozen,
    gated_modules,
    load_checkpoint,
    load_router,
    max_speedup,
    record_calls,
    save_checkpoint,
)
from planner.search.budget import Budget
from planner.search.l2c import L2CSettings, L2CTrainer
from planner.search.settings import parse_settings

SMALL = {"lambdas": [0.01, 0.1], "iterations": 6, "checkpoint_every": 2, "log_every": 2, "max_distance": 2}


TORCH_THREADS = 2  # see conftest.py


def settings(**values) -> L2CSettings:
    return parse_settings(L2CSettings, values, "l2c")


# --------------------------------------------------------------------------- settings and windows


def test_lambda_alone_is_a_grid_of_one():
    assert settings(**{"lambda": 0.02, "seed": 3}).lambdas == (0.02,)
    with pytest.raises(PlannerError, match="lambdas must not be negative"):
        settings(lambdas=[0.01, -1])


def test_windows_follow_the_mode(digits10, context_of):
    ctx = context_of(digits10)
    paper = L2CTrainer(ctx, settings(mode="paper", level="sublayer"))
    for _ in range(50):
        t0, t1 = paper.window()
        assert t1 == t0 + 1 and t0 % 2 == 0  # fill at an even step, learn at the odd one after it
    assert paper.router.decisions(0.5)["transformer_blocks.0.attn1"][0::2] == "C" * 5
    assert paper.windows() == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]  # tiled: every pair each iteration
    rollout = L2CTrainer(ctx, settings(max_distance=3, sampling="random", level="sublayer"))
    seen = {rollout.window() for _ in range(300)}
    assert {t1 - t0 for t0, t1 in seen} == {1, 2, 3}
    assert all(0 <= t0 < t1 <= ctx.steps - 1 for t0, t1 in seen)
    assert len(rollout.windows()) == 1
    tiled = L2CTrainer(ctx, settings(max_distance=3, level="sublayer"))
    for _ in range(20):
        windows = tiled.windows()
        covered = [t for t0, t1 in windows for t in range(t0, t1 + 1)]
        assert covered == list(range(covered[-1] + 1)) and covered[-1] >= ctx.steps - 2  # fill, gated, fill, ...
        assert windows[0][0] == 0 and all(1 <= t1 - t0 <= 3 for t0, t1 in windows)


# --------------------------------------------------------------------------- training


def test_a_training_step_moves_only_the_window_scores_and_no_weight(digits10, context_of):
    ctx = context_of(digits10)
    trainer = L2CTrainer(ctx, settings(max_distance=2, init=0.0))
    trainer.calls = record_calls(ctx.runner, ctx.conditions, ctx.seeds, ctx.sampler, calls_per_step=1)
    trainer.windows = lambda: [(3, 5)]
    before = trainer.router.scores.detach().clone()
    with frozen(ctx.runner.transformer):
        parts = trainer.train_unit(0.01, index=0)
    after = trainer.router.scores.detach()
    moved = (after != before).any(dim=1).tolist()
    assert moved == [False, False, False, False, True, True, False, False, False, False]
    assert parts["mse"] > 0 and parts["penalty"] > 0
    assert all(p.grad is None for p in ctx.runner.transformer.parameters())


@pytest.mark.slow  # three trainings: CI runs it (pytest --slow)
def test_resume_after_an_interruption_continues_from_the_checkpoint(digits10, context_of, tmp_path, monkeypatch):
    cfg = settings(**SMALL)
    straight = L2CTrainer(context_of(digits10, tmp_path / "a"), cfg)
    expected = straight.train()

    ctx = context_of(digits10, tmp_path / "b")
    interrupted = L2CTrainer(ctx, cfg)
    real_unit, calls = L2CTrainer.train_unit, []

    def unit_then_stop(self, weight, index):
        if len(calls) == 9:  # in the second lambda's stage, one iteration after a checkpoint (at 8)
            raise KeyboardInterrupt
        calls.append(weight)
        return real_unit(self, weight, index)

    monkeypatch.setattr(L2CTrainer, "train_unit", unit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.setattr(L2CTrainer, "train_unit", real_unit)
    _, meta = load_checkpoint(tmp_path / "b" / "block" / CHECKPOINT_FILE)
    assert (meta["stage"], meta["iteration"]) == (1, 2)  # 6 + 2 iterations done at the last checkpoint

    resumed = L2CTrainer(ctx, cfg.model_copy(update={"resume": True}))
    got = resumed.train()
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert torch.equal(a.gates, b.gates) and a.params == b.params
    assert torch.equal(resumed.router.scores, straight.router.scores)
    assert [r["iteration"] for r in resumed.curve.rows] == [r["iteration"] for r in straight.curve.rows]

    other = L2CTrainer(ctx, settings(**SMALL, lr=0.5, resume=True))
    with pytest.raises(PlannerError, match="another training"):
        other.train()
    with pytest.raises(PlannerError, match="nothing to resume"):
        L2CTrainer(context_of(digits10, tmp_path / "c"), settings(**SMALL, resume=True)).train()
    # a generator state torch refuses is a damaged checkpoint, said in one line
    path = tmp_path / "b" / "block" / CHECKPOINT_FILE
    tensors, meta = load_checkpoint(path)
    save_checkpoint(path, {**tensors, "rng": torch.zeros(3, dtype=torch.uint8)}, meta)
    with pytest.raises(PlannerError, match="damaged"):
        L2CTrainer(ctx, cfg.model_copy(update={"resume": True})).train()


@pytest.mark.slow  # a training per level: CI runs it (pytest --slow)
@pytest.mark.parametrize("level", ["sublayer", "block"])
def test_plans_meet_the_budget_and_keep_router_and_curve(digits10, context_of, tmp_path, level):
    ctx = context_of(digits10, tmp_path)
    # ask for 60 % of what the level can reach on this (FLOP-costed) profile
    names = gated_modules(ctx.modules, level)
    reach = max_speedup(ctx, Router(names, ctx.steps, level, max_run=SMALL["max_distance"]))
    b = Budget(speedup=1 + 0.6 * (reach - 1))
    plan = get_strategy("l2c")(**SMALL, level=level, seed=1).search(ctx, b)
    assert b.speed_met(plan.prediction.speedup)
    assert plan.prediction.speedup == pytest.approx(ctx.predict(plan)[0])
    params = plan.provenance.params
    assert plan.provenance.strategy == "l2c"
    assert {"lambda", "theta", "iterations", "lr", "seed"} <= set(params) and params["seed"] == 1
    assert params["lambda"] in SMALL["lambdas"] and params["level"] == level
    router, meta = load_router(tmp_path / ROUTER_FILE)
    assert meta["theta"] == params["theta"] and meta["lambda"] == params["lambda"]
    reuse = "R" if level == "sublayer" else "D"
    decisions = router.decisions(params["theta"])
    assert any(reuse in codes for codes in decisions.values())
    for name, codes in decisions.items():  # the saved router gives back the plan
        assert plan.codes(name, "cond") == codes == plan.codes(name, "uncond")
    rows = (tmp_path / CURVE_FILE).read_text().splitlines()
    assert rows[0].startswith("iteration,stage,lambda,loss,mse,penalty") and len(rows) == 1 + 6


@pytest.mark.slow  # a training per bisection point: CI runs it (pytest --slow)
def test_an_error_target_gives_the_fastest_plan_within_it(digits10, context_of):
    ctx = context_of(digits10)
    params = {**SMALL, "lambdas": [0.01], "max_distance": 1}
    plan = get_strategy("l2c")(**params, level="block").search(ctx, Budget.parse(None, max_error=0.05))
    assert plan.prediction.calib_error <= 0.05 and plan.prediction.speedup > 1.0


@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_cli_search_json_then_resume_the_finished_training(digits10, context_of, tmp_path):
    profile = digits10.folder
    out = tmp_path / "plan.json"
    params = {"level": "block", "iterations": 2, "lambdas": [0.01], "max_distance": 2}
    cmd = [sys.executable, "-m", "planner", "search", "--strategy", "l2c", "--budget", "1.3x", "--steps", "10",
           "--profile", str(profile), "--calib-samples", "2", "--out", str(out), "--seed", "2", "--json"]
    cmd += [arg for k, v in params.items() for arg in ("--param", f"{k}={json.dumps(v)}")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)  # one JSON object on stdout
    assert payload["predicted_speedup"] >= 1.3 and payload["params"]["seed"] == 2 and out.is_file()
    assert (tmp_path / "plan" / ROUTER_FILE).is_file() and (tmp_path / "plan" / "block" / CHECKPOINT_FILE).is_file()
    # --resume on a finished training: no more iterations, the same router, the same plan
    again = get_strategy("l2c")(**params, seed=2, resume=True).search(context_of(digits10, tmp_path / "plan"),
                                                                      Budget.parse("1.3x"))
    assert again.provenance.params["theta"] == payload["params"]["theta"]
    assert again.provenance.params["iterations"] == payload["params"]["iterations"] == 2
