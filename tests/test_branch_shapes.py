"""CFG branches whose outputs differ in shape, and pipelines that take fewer samples per call than a
profile's micro-batch.

* Qwen-Image encodes a prompt and its negative prompt to their own lengths, so with separate CFG calls a
  joint block's text stream is longer in one branch than in the other. The profile's CFG comparison
  (lag 0) takes only the output tensors whose shapes agree and records the rest (``cfg_comparison`` in
  meta.json); ``share_cfg`` on such a module is a one-line PlannerError in the executor and never offered
  by the greedy search.
* HunyuanVideo 1.5 takes one sample per pipeline call: a profile's micro-batch is capped there, so that
  one micro-batch is one pipeline run and the steps are counted once.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from planner.cfg import COND, UNCOND, CfgLayout
from planner.errors import PlannerError
from planner.modules import CacheableModule
from planner.profile import load_profile, profile_model
from planner.profile.artifact import ProfileError
from planner.profile.batching import micro_batch
from planner.profile.branch_parts import PartialComparisons, agreeing_parts, merge_records, shares_cfg
from planner.profile.capture import StepTracker
from planner.profile.similarity import METRICS, SimilarityCollector
from planner.profile.tokens import TokenSampler
from planner.search.budget import Budget

TORCH_THREADS = 1
CALIB = ["a red fox asleep in fresh snow", "a lighthouse on a cliff at dusk, oil painting"]
REL, COS = METRICS.index("rel_l1"), METRICS.index("cos")


def test_agreeing_parts_compare_positions_of_equal_shape():
    assert agreeing_parts([(7, 4), (5, 4)], [(3, 4), (5, 4)]) == [1]
    assert agreeing_parts([(5, 4)], [(5, 4)]) == [0]
    assert agreeing_parts([(7, 4)], [(3, 4)]) == []
    assert agreeing_parts([(5, 4)], [(5, 4), (3, 4)]) == []  # another number of tensors: positions mean nothing


def test_records_unite_left_out_positions_and_merge_across_shards():
    rec = PartialComparisons()
    rec.note("b.0", 2, [1])
    rec.note("b.0", 2, [0, 1][:0])  # a call where nothing agreed
    rec.note("b.0.txt", 1, [])
    meta = rec.to_meta()["cfg_comparison"]
    assert meta == {"b.0": {"outputs": 2, "left_out": [0, 1], "measured": True},
                    "b.0.txt": {"outputs": 1, "left_out": [0], "measured": False}}
    merged = merge_records([{"b.0.txt": meta["b.0.txt"]}, None, {"b.0.txt": {"outputs": 1, "left_out": [], "measured": True}}])
    assert merged == {"b.0.txt": {"outputs": 1, "left_out": [0], "measured": True}}
    assert not shares_cfg({"cfg_comparison": meta}, "b.0") and shares_cfg({"cfg_comparison": meta}, "b.1")
    assert shares_cfg({}, "b.0") and PartialComparisons().to_meta() == {}


def _separate_collector(token_sample=None) -> tuple[SimilarityCollector, StepTracker]:
    modules = [CacheableModule("transformer_blocks.0", "block", 0, "Block"),
               CacheableModule("transformer_blocks.0.txt_mlp", "mlp", 0, "MLP")]
    col = SimilarityCollector(modules, "separate", steps=2, k=1, device="cpu", token_sample=token_sample)
    tracker = StepTracker(CfgLayout.SEPARATE)
    col.tracker, col.batch = tracker, 1
    return col, tracker


@pytest.mark.parametrize("token_sample", [None, 2])
def test_cfg_comparison_takes_the_output_tensors_whose_shapes_agree(token_sample):
    """A joint block returns (text, image): text of 7 tokens in the cond branch and 3 in the uncond branch.
    Lag 0 compares the image streams alone (also when token sampling would make both text streams 2 tokens
    long); a module that returns the text stream alone has no lag-0 value and says so."""
    col, tracker = _separate_collector(TokenSampler(token_sample) if token_sample else None)
    g = torch.Generator().manual_seed(0)
    img = {b: torch.randn(1, 5, 4, generator=g) for b in (COND, UNCOND)}
    txt = {COND: torch.randn(1, 7, 4, generator=g), UNCOND: torch.randn(1, 3, 4, generator=g)}
    for step in range(2):
        for b in (COND, UNCOND):
            tracker.pre_forward(None)
            assert (tracker.step, tracker.branch) == (step, b)
            hid_in, txt_in = img[b] * 0.5, txt[b] * 0.5
            col(0, (), {"hidden_states": hid_in, "encoder_hidden_states": txt_in}, (txt[b], img[b]))
            col(1, (txt_in,), {}, txt[b])
    s = col.stats
    expect = float((img[COND] - img[UNCOND]).abs().mean() / img[UNCOND].abs().mean())  # cond replaced by uncond's
    if token_sample:
        idx = TokenSampler(token_sample).indices(5, "cpu")
        a, b = img[COND][:, idx], img[UNCOND][:, idx]
        expect = float((a - b).abs().mean() / b.abs().mean())
    for step in range(2):
        assert s.n[step, 0, 0, 0, REL] == 1
        assert float(s.sum[step, 0, 0, 0, REL]) == pytest.approx(expect, rel=1e-5)
        assert s.n[step, 1, :, 0, :].sum() == 0  # the text-only module: nothing comparable
    # lag 1 within a branch compares the whole output (text and image, same lengths step to step)
    assert s.n[1, 0, 1, 1, REL] == 1 and float(s.sum[1, 0, 1, 1, REL]) == pytest.approx(0.0, abs=1e-7)
    assert col.partial.to_meta() == {"cfg_comparison": {
        "transformer_blocks.0": {"outputs": 2, "left_out": [0], "measured": True},
        "transformer_blocks.0.txt_mlp": {"outputs": 1, "left_out": [0], "measured": False}}}


def test_cfg_comparison_of_outputs_of_equal_shapes_stays_whole():
    col, tracker = _separate_collector()
    g = torch.Generator().manual_seed(1)
    outs = {b: (torch.randn(1, 3, 4, generator=g), torch.randn(1, 5, 4, generator=g)) for b in (COND, UNCOND)}
    for b in (COND, UNCOND):
        tracker.pre_forward(None)
        col(0, (), {}, outs[b])
    c, u = (torch.cat([t.flatten() for t in outs[b]]) for b in (COND, UNCOND))
    assert float(col.stats.sum[0, 0, 0, 0, REL]) == pytest.approx(float((c - u).abs().mean() / u.abs().mean()), rel=1e-5)
    assert col.partial.to_meta() == {}


# ----------------------------------------------------------------------------- on the Qwen-Image fixture
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The Qwen-Image fixture as a runner on two prompts (negative prompt ""), a 3-step sampler, and its profile."""
    from planner.runner import as_runner, make_sampler
    from planner.zoo.fixtures import build_fixture

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANNER_EMBEDDING_CACHE", str(tmp_path_factory.mktemp("embeddings")))
        runner = as_runner(build_fixture("qwen-image"), prompts=CALIB)
        sampler = make_sampler(runner, steps=3, height=16, width=16, guidance=4.0)
        folder = tmp_path_factory.mktemp("qwen") / "prof"
        profile_model(runner, sampler, samples=2, costs="flops", out=folder)
        yield runner, sampler, folder


def test_qwen_image_profile_compares_the_image_stream_across_branches(qwen):
    runner, sampler, folder = qwen
    p = load_profile(folder)
    assert p.meta.schema_version == "1.2.0" and p.meta.cfg_layout == "separate"
    rec = p.meta.extra["cfg_comparison"]
    blocks = [m.name for m in p.meta.modules if m.kind == "block"]
    assert blocks and all(rec[b] == {"outputs": 2, "left_out": [0], "measured": True} for b in blocks)  # (text, image)
    txt = [m.name for m in p.meta.modules if m.name.endswith("txt_mlp")]
    img = [m.name for m in p.meta.modules if m.name.endswith("img_mlp")]
    assert txt and all(not rec[t]["measured"] for t in txt) and not set(img) & set(rec)
    cfg = p.similarity[p.similarity.lag == 0]
    assert np.isfinite(cfg[cfg.module.isin(blocks + img)].rel_l1_mean).all()
    assert cfg[cfg.module.isin(txt)].rel_l1_mean.isna().all()
    assert any("cfg_comparison" in w for w in p.meta.warnings)


def test_profile_refuses_empty_cfg_rows_without_the_record(qwen, tmp_path):
    """NaN at lag 0 is accepted only for the modules meta.json names as not measured; a record of a module
    the profile does not have is refused too."""
    _, _, folder = qwen
    copy = tmp_path / "prof"
    shutil.copytree(folder, copy)
    meta_path = copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    txt = next(m for m in meta["cfg_comparison"] if m.endswith("txt_mlp"))
    del meta["cfg_comparison"][txt]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="NaN .* where the comparison exists"):
        load_profile(copy)
    meta["cfg_comparison"]["no_such.module"] = {"outputs": 1, "left_out": [0], "measured": False}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match="does not have: no_such.module"):
        load_profile(copy)


def test_committed_profile_of_an_older_format_still_loads():
    from planner.artifact import parse_version
    from tests.conftest import DIGITS_PROFILE

    p = load_profile(DIGITS_PROFILE)
    assert parse_version(p.meta.schema_version) < (1, 2, 0) and "cfg_comparison" not in p.meta.extra


def _run(runner, sampler, plan):
    from planner.executor import apply_plan

    with apply_plan(runner.pipe, plan) as handle:
        runner.run(runner.conditions(1), [0], sampler, output="latent")
        return handle.stats()


def test_share_cfg_of_a_stream_of_another_length_is_a_planner_error(qwen):
    """``S`` on a joint block (its text stream differs in length) stops the run with one line; ``S`` on the
    image MLP (same shapes in both branches) runs and shares."""
    from planner.plan.build import plan_for_runner

    runner, sampler, _ = qwen
    block, img_mlp = "transformer_blocks.0", "transformer_blocks.0.img_mlp"
    plan = plan_for_runner(runner, sampler, {block: {"cond": "CCC", "uncond": "CSC"}})
    with pytest.raises(PlannerError) as err:
        _run(runner, sampler, plan)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{block}: share_cfg (S) at step 1 on the uncond branch")
    assert "differ in shape" in msg
    # at the first step this branch has no output of its own yet: the calls' arguments decide
    plan = plan_for_runner(runner, sampler, {block: {"cond": "CCC", "uncond": "SCC"}})
    with pytest.raises(PlannerError, match="inputs differ in shape"):
        _run(runner, sampler, plan)
    stats = _run(runner, sampler, plan_for_runner(runner, sampler, {img_mlp: {"cond": "CCC", "uncond": "CSS"}}))
    assert stats["runs"] == 1 and stats["computed_fraction"] < 1.0


def test_greedy_offers_share_cfg_only_where_the_branches_agree(qwen):
    """With ``share_cfg`` the greedy search's candidates for the uncond branch include ``S`` on the image MLP
    (same shapes in both branches) and on no module the profile saw differ between the branches."""
    from planner.search.context import SearchContext
    from planner.search.greedy import DEFAULT_ACTIONS, _GreedyPass

    runner, sampler, folder = qwen
    profile = load_profile(folder)
    ctx = SearchContext.build(runner, sampler, profile, samples=1)
    trial = _GreedyPass(ctx, 0.1, DEFAULT_ACTIONS, share_cfg=True)
    rec = profile.meta.extra["cfg_comparison"]
    offered = {m.name for m in ctx.modules if any("S" in c.values() for c in trial._candidates(m, (UNCOND,), 1))}
    assert offered and not offered & set(rec)
    assert {m for m in offered if m.endswith("img_mlp")} == {m.name for m in ctx.modules if m.name.endswith("img_mlp")}


# ----------------------------------------------------------------------------- samples per pipeline call
@pytest.fixture(scope="module")
def one_per_call(tmp_path_factory):
    """The PixArt-Sigma fixture as a runner whose family takes one sample per pipeline call (as HunyuanVideo
    1.5's does), a 3-step sampler, and its FLOP-costed profile on two samples."""
    from planner.pipelines.text import TextFamily
    from planner.runner import as_runner, make_sampler
    from planner.zoo.fixtures import build_fixture

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANNER_EMBEDDING_CACHE", str(tmp_path_factory.mktemp("embeddings")))
        runner = as_runner(build_fixture("pixart-sigma"), prompts=CALIB)
        assert micro_batch(runner, 4) == 4 and micro_batch(runner, 4, 3) == 3 and micro_batch(runner, 2, 8) == 2
        runner.family = TextFamily(runner.family.name, replace(runner.family.facts, max_batch=1))
        sampler = make_sampler(runner, steps=3, height=16, width=16)
        yield runner, sampler, profile_model(runner, sampler, samples=2, costs="flops")


def test_profile_runs_one_pipeline_call_per_micro_batch(one_per_call):
    """The runner splits a run into pipeline calls of one sample; the profile then takes one sample per
    micro-batch and counts each run's steps once (before: two samples of 3 steps looked like 6 steps)."""
    runner, sampler, p = one_per_call
    assert micro_batch(runner, 4) == 1 and micro_batch(runner, 4, 3) == 1
    assert p.meta.batch == 1 and p.meta.samples == 2 and len(p.meta.timesteps) == 3
    assert all(math.isfinite(t) for t in p.meta.timesteps)
    lag1 = p.similarity[(p.similarity.lag == 1) & (p.similarity.step >= 1)]
    assert (lag1.n == 2).all()  # both samples in every comparison: every step was seen in both runs


def test_greedy_searches_over_several_pipeline_calls(one_per_call):
    """The greedy pass sees the calibration inputs as one pipeline call each, every call from step 0; a choice
    made on the first sample stays only where the second sample accepts it too."""
    from planner.search import search_plan

    runner, sampler, p = one_per_call
    plan = search_plan(runner, "1.2x", strategy="greedy", sampler=sampler, profile=p, calib_samples=2)
    assert plan.steps == 3 and Budget.parse("1.2x").speed_met(plan.prediction.speedup)
    assert plan.served_steps() or any(c != "C" for per in plan.decisions.values() for codes in per.values() for c in codes)
