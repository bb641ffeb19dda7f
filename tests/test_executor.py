"""The executor: every action against hand-computed values on a toy transformer, step and branch
tracking, checks, soft gates, removal, and each model family with a mixed plan."""

import pytest
import torch
from diffusers.models.cache_utils import CacheMixin

from planner.errors import PlannerError
from planner.executor import PlanHandle, apply_plan
from planner.executor.session import apply_gates, open_session
from planner.plan import plan_for_model, plan_for_runner
from planner.runner import Sampler, load_runner


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Intra-op threads stall for a scheduler tick per op when the 2-core CI box is busy: run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a toy transformer
# block(x, t): a = attn1(x) = 2x; h = x + t * a (the gate is this step's t); out = h + ff(h) = 2h + 1
class Attn(torch.nn.Module):
    def forward(self, hidden_states):
        return 2 * hidden_states


class FF(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states + 1


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attn()
        self.ff = FF()
        self.batches = []  # batch size of every real call

    def forward(self, hidden_states, temb):
        self.batches.append(hidden_states.shape[0])
        h = hidden_states + temb * self.attn1(hidden_states)
        return h + self.ff(h)


class Toy(torch.nn.Module, CacheMixin):
    def __init__(self, n=1):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block() for _ in range(n))

    def forward(self, hidden_states, timestep=None):
        temb = 1.0 if timestep is None else timestep.reshape(-1, 1).to(hidden_states.dtype)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states


def blk(x, t):
    return 2 * (x + t * 2 * x) + 1


T = [4.0, 3.0, 2.0, 1.0]
X = [torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 3.0]]), torch.tensor([[-1.5, 0.25]]), torch.tensor([[2.0, 1.0]])]
XU = [x * 0.5 - 1 for x in X]  # the uncond rows


def toy_plan(model, decisions, layout="none", steps=4):
    return plan_for_model(model, steps=steps, cfg_layout=layout, decisions=decisions)


def run(model, xs=X, ts=T):
    """One 'run': a call per step with that step's input and timestep."""
    return [model(hidden_states=x, timestep=torch.full((x.shape[0],), t)) for x, t in zip(xs, ts)]


def run_batched(model, order=("cond", "uncond")):
    rows = {"cond": X, "uncond": XU}
    xs = [torch.cat([rows[order[0]][k], rows[order[1]][k]]) for k in range(4)]
    return run(model, xs)


def applied(model, decisions, layout="none", **kw):
    """The plan applied through the strategies' session (the same hooks as apply_plan, plus at_step)."""
    return open_session(model, toy_plan(model, decisions, layout), **kw)


# --------------------------------------------------------------------------- actions, by hand
def test_compute_plan_is_bit_identical_and_installs_no_module_hooks():
    model = Toy(2)
    base = run(model)
    with apply_plan(model, toy_plan(model, {})) as h:
        out = run(model)
        assert h.hooked_modules == []
        assert h.stats()["computed_fraction"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(out, base))
    # the public handle reports and removes; driving steps and editing decisions are the session's
    assert type(h) is PlanHandle and not hasattr(h, "at_step") and not hasattr(h, "set_codes")


def test_reuse_block_and_reuse_sublayer_before_gate():
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CRCC"}):
        out = run(model)
    assert torch.equal(out[1], blk(X[0], T[0]))
    with applied(model, {"transformer_blocks.0.attn1": "CRCC"}):
        out = run(model)
    # the cached attention output 2*x0 gets the current step's gate t1
    assert torch.equal(out[1], 2 * (X[1] + T[1] * 2 * X[0]) + 1)
    assert torch.equal(out[2], blk(X[2], T[2]))


def test_reuse_residual_adds_cached_residual_to_current_input():
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CDDC"}) as h:
        out = run(model)
    o0 = blk(X[0], T[0])
    assert torch.equal(out[1], X[1] + (o0 - X[0]))
    assert torch.equal(out[2], X[2] + (o0 - X[0]))  # stale: refreshed only by a compute
    assert h.stats()["reuse_hits"]["reuse_residual"] == 2


def test_residuals_of_consecutive_blocks_telescope_to_the_range_residual():
    model = Toy(3)
    with applied(model, {"transformer_blocks.0": "CDCC", "transformer_blocks.1": "CDCC", "transformer_blocks.2": "CDCC"}):
        out = run(model)
    o0 = blk(blk(blk(X[0], T[0]), T[0]), T[0])
    torch.testing.assert_close(out[1], X[1] + (o0 - X[0]), rtol=1e-6, atol=1e-5)


def test_forecast_extrapolates_by_step_distance_and_falls_back_to_reuse():
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CRCF"}) as h:
        out = run(model)
    o0, o2 = blk(X[0], T[0]), blk(X[2], T[2])
    assert torch.equal(out[3], o2 + (o2 - o0) * 0.5)  # computed at 0 and 2, asked at 3
    assert h.stats()["fallbacks"] == 0
    with applied(model, {"transformer_blocks.0": "CFCF"}) as h:
        out = run(model)
    assert torch.equal(out[1], o0)  # one entry only: reuse
    stats = h.stats()
    assert stats["fallbacks"] == 1 and stats["fallback_kinds"] == {"computed": 0, "reused": 1}
    assert stats["executed"]["transformer_blocks.0"] == "CRCF"


def test_output_action_serves_whole_steps_without_running_the_transformer():
    model = Toy(2)
    base = run(model)
    for block in model.transformer_blocks:
        block.batches.clear()
    plan = plan_for_model(model, steps=4, decisions={"transformer_blocks.1.ff": "CCCR"}, output="CRCF")
    with apply_plan(model, plan) as h:
        out = run(model)
        stats = h.stats()
    assert [len(b.batches) for b in model.transformer_blocks] == [2, 2]  # steps 0 and 2 only
    assert torch.equal(out[1], base[0])  # R: the last computed output
    assert torch.equal(out[3], base[2] + (base[2] - base[0]) * 0.5)  # F: through steps 0 and 2, at step 3
    assert stats["output"] == "CRCF" and stats["computed_fraction"] == 0.5
    # the block decisions of a served step are not taken: skipped with the transformer, not fallbacks
    assert stats["fallbacks"] == 0 and stats["executed"]["transformer_blocks.1.ff"] == "C-C-"


def test_output_forecasts_keep_each_cfg_branch_apart_and_fall_back_to_lower_orders():
    model = Toy()
    base = [model(hidden_states=x, timestep=torch.tensor([t])) for k, t in enumerate(T) for x in (X[k], XU[k])]
    plan = plan_for_model(model, steps=4, cfg_layout="separate", decisions={}, output="CQCQ")
    with apply_plan(model, plan) as h:
        out = [model(hidden_states=x, timestep=torch.tensor([t])) for k, t in enumerate(T) for x in (X[k], XU[k])]
        assert h.stats()["output"] == "CRCF"  # one kept output: reuse; two: first order
    for branch in (0, 1):  # cond calls first, then uncond: each from its own history
        assert torch.equal(out[2 + branch], base[branch])
        o0, o2 = base[branch], base[4 + branch]
        assert torch.equal(out[6 + branch], o2 + (o2 - o0) * 0.5)


def test_limited_forecast2_cuts_only_the_samples_whose_curve_bends_harder_than_it_moves():
    def xs_for(outputs):  # inputs that make block(x, t) give these outputs at the steps' timesteps
        return [(o - 1) / (2 * (1 + 2 * t)) for o, t in zip(outputs, T)]

    straight = [torch.full((1, 2), v) for v in (1.0, 2.0, 3.0, 5.0)]  # o = 5 - t at steps 0-2
    bent = [torch.full((1, 2), v) for v in (0.0, 10.0, 0.0, 5.0)]  # a zig-zag
    batch = [torch.cat([a, b]) for a, b in zip(xs_for(straight), xs_for(bent))]
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CCCQ"}):
        q = run(model, batch)[3]
    with applied(model, {"transformer_blocks.0": "CCCL"}) as h:
        lim = run(model, batch)[3]
    assert h.stats()["reuse_hits"]["forecast2_limited"] == 1
    # one step on, evenly spaced: first-order term o2 - o1, second-order term o0 - 2 o1 + o2
    torch.testing.assert_close(q, torch.tensor([[4.0, 4.0], [-30.0, -30.0]]))
    torch.testing.assert_close(lim[:1], q[:1])  # a straight line: nothing to cut, L is Q (and F)
    # the zig-zag's second-order term (-20) is twice its first (-10): cut to the first's size
    torch.testing.assert_close(lim[1:], torch.tensor([[-20.0, -20.0]]))
    # any output shape: the leading dimension is the sample, a 0-d output one sample
    from planner.executor.hooks import limited_forecast2

    for shape in [(), (2,), (2, 3, 4)]:
        zigzag = (torch.zeros(shape), torch.full(shape, 10.0), torch.zeros(shape))
        torch.testing.assert_close(limited_forecast2(zigzag, [1.0, -3.0, 3.0], 1.0, 1.0), torch.full(shape, -20.0))


def test_share_cfg_copies_the_other_branch_fresh_output():
    model = Toy()
    with applied(model, {"transformer_blocks.0.attn1": {"cond": "CCCC", "uncond": "CSCC"}}, "cond_uncond"):
        out = run_batched(model)
    # the uncond row gets cond's attention output 2*x1 (gated by t1)
    assert torch.equal(out[1][1:], 2 * (XU[1] + T[1] * 2 * X[1]) + 1)
    assert torch.equal(out[1][:1], blk(X[1], T[1]))


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_one_half_computes_on_half_the_batch(order):
    model = Toy()
    layout = "_".join(order)
    with applied(model, {"transformer_blocks.0": {"cond": "CCCC", "uncond": "CRDC"}}, layout):
        out = run_batched(model, order)
    c, u = order.index("cond"), order.index("uncond")
    assert torch.equal(out[1][c : c + 1], blk(X[1], T[1]))
    assert torch.equal(out[1][u : u + 1], blk(XU[0], T[0]))
    # step 2: the uncond residual comes from its own last compute (step 0), added to its own input
    assert torch.equal(out[2][u : u + 1], XU[2] + (blk(XU[0], T[0]) - XU[0]))
    assert torch.equal(out[2][c : c + 1], blk(X[2], T[2]))
    assert model.transformer_blocks[0].batches == [2, 1, 1, 2]


def test_half_batch_slicing_spares_rotary_embeddings():
    from planner.executor.tree import slice_call

    class Mod(torch.nn.Module):
        def forward(self, hidden_states, temb, image_rotary_emb=None, extra=None):
            pass

    full = torch.arange(4.0).reshape(4, 1)
    rope = (torch.ones(4, 2), torch.zeros(4, 2))  # 4 tokens, the same count as the batch
    args, kwargs = slice_call(Mod, (full, full * 2), {"image_rotary_emb": rope, "extra": {"mask": full, "n": 3}}, 2, 4, 4)
    assert torch.equal(args[0], full[2:]) and torch.equal(args[1], full[2:] * 2)
    assert kwargs["image_rotary_emb"] is rope
    assert torch.equal(kwargs["extra"]["mask"], full[2:]) and kwargs["extra"]["n"] == 3


def test_reuse_with_nothing_cached_computes_and_counts():
    model = Toy()
    with applied(model, {"transformer_blocks.0": {"cond": "CCCC", "uncond": "SRCC"}}, "cond_uncond") as h:
        out = run_batched(model)
    assert torch.equal(out[0][1:], blk(X[0], T[0]))  # step 0: uncond shares cond's output
    assert torch.equal(out[1][1:], blk(XU[1], T[1]))  # step 1: nothing of its own cached -> computed
    s = h.stats()
    assert s["fallbacks"] == 1 and s["fallback_kinds"]["computed"] == 1
    assert s["fallback_examples"] == ["transformer_blocks.0 uncond step 1: planned reuse, did compute"]
    assert s["decisions"] == s["as_planned"] + s["skipped_with_parent"] + s["fallbacks"] == 3 * 2 * 4
    assert s["skipped_with_parent"] == 2  # attn1 and ff of uncond at step 0
    assert s["executed"]["transformer_blocks.0.attn1"] == {"cond": "CCCC", "uncond": "-CCC"}


def test_soft_gates_mix_fresh_and_cached_and_are_differentiable():
    model = Toy()
    gates = torch.tensor([[1.0], [0.25], [1.0], [1.0]], requires_grad=True)
    with apply_gates(model, gates, ["transformer_blocks.0.attn1"]) as h:
        out = run(model)
        s = gates[1, 0]
        expected = 2 * (X[1] + T[1] * (s * 2 * X[1] + (1 - s) * 2 * X[0])) + 1
        torch.testing.assert_close(out[1], expected)
        out[1].sum().backward()
        # d/ds of sum(2 * t1 * (s * a1 + (1 - s) * a0)) = 2 * t1 * sum(a1 - a0)
        assert gates.grad[1, 0].item() == pytest.approx(2 * T[1] * (2 * X[1] - 2 * X[0]).sum().item())
        assert gates.grad[0, 0].item() == 0  # the cache is detached between steps
        assert h.stats()["mode"] == "gates"


def test_soft_gates_all_one_equal_the_compute_path_and_keep_the_graph_when_asked():
    model = Toy(2)
    base = run(model)
    ones = torch.ones(4, 4, requires_grad=True)
    with apply_gates(model, ones) as h:  # default: every sub-layer
        assert h.hooked_modules == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
        out = run(model)
    assert all(torch.equal(a, b) for a, b in zip(out, base))
    half = torch.full((4, 1), 0.5, requires_grad=True)
    model = Toy()
    with apply_gates(model, half, ["transformer_blocks.0.attn1"], detach_cache=False):
        out = run(model)
    out[2].sum().backward()
    assert half.grad[1, 0] != 0  # step 2 reaches step 1's gate through the stored mixed output


# --------------------------------------------------------------------------- steps, branches, runs
def test_separate_calls_use_the_context_name_or_call_order():
    model = Toy()
    plan = {"transformer_blocks.0": {"cond": "CRCC", "uncond": "CCCC"}}
    with applied(model, plan, "separate"):
        outs = []
        for k in range(4):  # uncond first, but named: the names decide the branch
            t = torch.full((1,), T[k])
            with model.cache_context("uncond"):
                u = model(hidden_states=XU[k], timestep=t)
            with model.cache_context("cond"):
                c = model(hidden_states=X[k], timestep=t)
            outs.append((c, u))
    assert torch.equal(outs[1][0], blk(X[0], T[0])) and torch.equal(outs[1][1], blk(XU[1], T[1]))
    with applied(model, {"transformer_blocks.0.attn1": {"cond": "CCCC", "uncond": "CSCC"}}, "separate"):
        outs = [run(model, [X[k], XU[k]], [T[k], T[k]]) for k in range(4)]  # unnamed: cond first
    assert torch.equal(outs[1][1], 2 * (XU[1] + T[1] * 2 * X[1]) + 1)


def test_runs_reset_and_mismatched_calls_are_refused():
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CRRR"}) as h:
        run(model)
        second = run(model, [X[2], X[0], X[1], X[3]])  # a fresh run: nothing from the first survives
        assert torch.equal(second[1], blk(X[2], T[0]))
        run(model, X[:2], T[:2])  # interrupted after two steps ...
        third = run(model, [X[3], X[0], X[0], X[0]])  # ... a rising timestep starts a new run
        assert torch.equal(third[3], blk(X[3], T[0]))
        assert h.stats()["runs"] == 4
        with pytest.raises(PlannerError, match="plan was made for 4 steps, the pipeline runs more"):
            run(model, X + [X[0]], T + [0.5])
        with pytest.raises(PlannerError, match="no timestep argument"):
            model(hidden_states=X[0])
        with h.at_step(2):  # driven steps need no timestep
            out = model(hidden_states=X[1])
        assert out.shape == X[1].shape
    with applied(model, {}, "separate"):
        with pytest.raises(PlannerError, match="'separate' expects 2 transformer calls per step, step 0 made 1"):
            run(model)
    with applied(model, {}, "none"):
        with pytest.raises(PlannerError, match="expects 1 transformer call per step, step 0 got a second"):
            run(model, [X[0], X[0]], [T[0], T[0]])
    with applied(model, {}, "cond_uncond"):
        with pytest.raises(PlannerError, match="needs an even batch"):
            run(model)


def test_at_step_drives_steps_explicitly():
    model = Toy()
    with applied(model, {"transformer_blocks.0": "CCCR"}) as h:
        with h.at_step(1):
            model(hidden_states=X[1], timestep=torch.tensor([9.0]))
        with h.at_step(3):
            out = model(hidden_states=X[2], timestep=torch.tensor([9.0]))
        assert torch.equal(out, blk(X[1], 9.0))
        with pytest.raises(PlannerError, match="outside the plan's 4 steps"):
            with h.at_step(4):
                pass


# --------------------------------------------------------------------------- install / remove / checks
def test_remove_leaves_nothing_behind_and_handles_are_independent():
    a, b = Toy(2), Toy(2)
    before = {name: dict(vars(m)) for name, m in a.named_modules()}
    ha = applied(a, {"transformer_blocks.0": "CRCR", "transformer_blocks.1.ff": "CFFC"})
    hb = applied(b, {"transformer_blocks.1": "CDCD"})
    with pytest.raises(PlannerError, match="already applied"):
        applied(a, {})
    out_a, out_b = [], []
    for k in range(4):  # interleaved runs of two models share no state
        out_a.append(a(hidden_states=X[k], timestep=torch.tensor([T[k]])))
        out_b.append(b(hidden_states=X[k], timestep=torch.tensor([T[k]])))
    ha.remove()
    hb.remove()
    ha.remove()  # idempotent
    # step 1 of a: block 0 reused; block 1 runs on it, its ff forecast falls back to step 0's ff output
    o = blk(X[0], T[0])
    assert torch.equal(out_a[1], o + T[1] * 2 * o + (o + T[0] * 2 * o + 1))
    with applied(b, {"transformer_blocks.1": "CDCD"}):
        again_b = run(b)
    assert all(torch.equal(x, y) for x, y in zip(out_b, again_b))
    after = {name: dict(vars(m)) for name, m in a.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    assert not any(hasattr(m, "_diffusers_hook") for m in a.modules())
    assert all(torch.equal(x, y) for x, y in zip(run(a), run(Toy(2))))


def test_plans_for_another_model_are_refused():
    plan = toy_plan(Toy(2), {})
    with pytest.raises(PlannerError, match="plan was made for a model with 2 blocks, this Toy has 3"):
        apply_plan(Toy(3), plan)
    with pytest.raises(PlannerError, match="gates must have shape \\[4, 1\\]"):
        apply_gates(Toy(), torch.ones(4, 2), ["transformer_blocks.0.attn1"])
    with pytest.raises(PlannerError, match="gates replace the plan's actions"):
        open_session(Toy(), toy_plan(Toy(), {"transformer_blocks.0": "CRCC"}), gates=torch.ones(4, 2))
    assert not hasattr(Toy(), "_diffusers_hook")


@pytest.mark.slow  # several processes or a compile: CI runs it (pytest --slow)
def test_torch_compile_matches_eager():
    import torch._dynamo

    model = Toy(2)
    plan = {"transformer_blocks.0": {"cond": "CCRC", "uncond": "CDCF"}, "transformer_blocks.1.attn1": "CRCR"}
    with applied(model, plan, "cond_uncond"):
        eager = run_batched(model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with applied(model, plan, "cond_uncond"):
        out = run_batched(compiled)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- real pipelines


def test_digits_identity_remove_repeat_and_gates(digits):
    s = Sampler("ddim", 8, 3.0)
    conds, seeds = digits.conditions(4), [0, 1, 2, 3]
    base = digits.run(conds, seeds, s, output="latent")
    with apply_plan(digits, plan_for_runner(digits, s)) as h:
        assert torch.equal(digits.run(conds, seeds, s, output="latent"), base)
        assert h.stats()["as_planned_fraction"] == 1.0
    mixed = {
        "transformer_blocks.2": "CRCDCFCC",
        "transformer_blocks.4.attn1": {"cond": "CCRCRCCC", "uncond": "CSCSRCCC"},
        "transformer_blocks.6.ff": {"cond": "CCCCCCCC", "uncond": "CRRCCRCC"},
    }
    with apply_plan(digits.pipe, plan_for_runner(digits, s, mixed)) as h:
        one = digits.run(conds, seeds, s, output="latent")
        two = digits.run(conds, seeds, s, output="latent")
        stats = h.stats()
    assert torch.equal(one, two) and not torch.equal(one, base)
    assert stats["runs"] == 2 and stats["fallbacks"] == 0
    assert stats["executed"]["transformer_blocks.2"] == "CRCDCFCC"
    # step 1 of 16 leaves x 2 branches: block 2 reused (2 x 2), 4.attn1 shared (1), 6.ff reused (1)
    assert stats["computed_fraction_per_step"][1] == pytest.approx(1 - 6 / 32)
    assert torch.equal(digits.run(conds, seeds, s, output="latent"), base)
    with apply_gates(digits, torch.ones(8, 16), cfg_layout="cond_uncond"):
        assert torch.equal(digits.run(conds, seeds, s, output="latent"), base)
    with apply_plan(digits, plan_for_runner(digits, s, {})):
        with pytest.raises(PlannerError, match="plan was made for 8 steps, the pipeline runs 10"):
            digits.run(conds, seeds, Sampler("ddim", 10, 3.0), output="latent")
        # the failed call left nothing half-done: the next run is exact again
        assert torch.equal(digits.run(conds, seeds, s, output="latent"), base)


FAMILIES = [("tiny:dit", 4.0), ("tiny:pixart-sigma", 4.5), ("tiny:sd3", 5.0), ("tiny:flux", 1.0), ("tiny:flux", 3.0), ("tiny:wan", 5.0)]


def _capture_calls(runner, conds, seeds, sampler):
    calls = []

    def keep(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:  # DiTPipeline passes hidden_states positionally
            kwargs["hidden_states"] = args[0]
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    hook = runner.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        runner.run(conds, seeds, sampler, output="latent")
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("spec, guidance", FAMILIES, ids=[f"{s}-{g}" for s, g in FAMILIES])
def test_model_families_run_mixed_plans(spec, guidance):
    runner = load_runner(spec)
    s = runner.resolve(Sampler(runner.default_sampler.scheduler, 5, guidance))
    layout = runner.cfg_layout(s)
    conds, seeds = runner.conditions(2), [0, 1]
    base = runner.run(conds, seeds, s, output="latent")
    mods = runner.modules()
    blocks = [m.name for m in mods if m.kind == "block"]
    subs = [m.name for m in mods if m.kind != "block"]
    two = layout != "none"
    decisions = {
        blocks[0]: "CDCCR",
        subs[0]: "CCCFC",  # a sub-layer of block 0: computed at 0 and 2 (block 0 skips 1), forecast at 3
        subs[1]: {"cond": "CCRCC", "uncond": "CCCRC"} if two else "CCRCC",  # one CFG half reuses
        blocks[-1]: "CDFDC",  # SD3: the last block returns encoder_hidden_states=None
        subs[-1]: {"cond": "CCCCC", "uncond": "SCCCS"} if two else "CRCCC",
    }
    plan = plan_for_runner(runner, s, decisions)
    with apply_plan(runner, plan) as h:
        out = runner.run(conds, seeds, s, output="latent")
        again = runner.run(conds, seeds, s, output="latent")
        stats = h.stats()
    assert torch.equal(out, again) and torch.isfinite(out).all()
    assert not torch.equal(out, base)
    assert torch.equal(runner.run(conds, seeds, s, output="latent"), base)
    nb = len(plan.branches)
    # the only fallback: the last block's forecast at step 2 has one computed output (step 0) -> reuse
    assert stats["runs"] == 2 and stats["fallbacks"] == 2 * nb
    assert stats["fallback_kinds"] == {"computed": 0, "reused": 2 * nb}
    assert stats["reuse_hits"]["reuse_residual"] == 2 * 3 * nb
    assert stats["reuse_hits"]["forecast"] == 2 * nb
    # per run and branch: block 0 at step 4, subs[1] once, and the forecast that fell back to reuse
    assert stats["reuse_hits"]["reuse"] == 2 * 3 * nb
    assert stats["executed"][blocks[0]] == "CDCCR"
    assert stats["executed"][subs[0]] == "C-CF-"
    if two:
        assert stats["reuse_hits"]["share_cfg"] == 2 * 2
        assert stats["executed"][subs[1]] == {"cond": "C-RC-", "uncond": "C-CR-"}

    if layout in ("cond_uncond", "uncond_cond"):
        # one CFG half computing alone gives the same rows as the full batch
        calls = _capture_calls(runner, conds, seeds, s)
        target = blocks[-1]
        half = plan_for_runner(runner, s, {target: {"cond": "CCCCC", "uncond": "CRCCC"}})
        ref = runner.transformer(**calls[1])[0]
        with open_session(runner.transformer, half) as h:
            with h.at_step(0):
                runner.transformer(**calls[0])
            with h.at_step(1):
                got = runner.transformer(**calls[1])[0]
        c = slice(0, 2) if layout == "cond_uncond" else slice(2, 4)
        u = slice(2, 4) if layout == "cond_uncond" else slice(0, 2)
        torch.testing.assert_close(got[c], ref[c], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[u], ref[u])


def test_pipeline_cfg_switch_must_match_the_plan():
    runner = load_runner("tiny:sd3")
    s = Sampler("default", 3, 5.0)
    with apply_plan(runner, plan_for_runner(runner, s, {})):
        # two samples without CFG make an even batch too: only the pipeline's CFG switch tells
        with pytest.raises(PlannerError, match="CFG layout 'uncond_cond', but the pipeline runs with CFG off"):
            runner.run(runner.conditions(2), [0, 1], Sampler("default", 3, 1.0), output="latent")
