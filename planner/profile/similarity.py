"""The similarity pass: how much each cacheable module's output changes across steps and between
CFG branches, streamed (only the last ``k`` outputs of a module are ever held).

Metrics, per calibration sample, with ``a`` the module's fresh output and ``b`` the value a reuse
would put in its place (the output ``lag`` steps back, or the other CFG branch's output at the
same step):

* relative L1: ``mean|a - b| / mean|b|``
* cosine similarity of ``a`` and ``b`` flattened

both for the output and for the residual (output minus the input it updates), and the error a
residual reuse puts on the output, ``mean|ra - rb| / mean|b|`` (comparable with the output's
relative L1: which of output reuse and residual reuse errs less). The per-sample values are
aggregated over the calibration inputs as mean, std, min and max.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from planner.cfg import COND, UNCOND, CfgLayout
from planner.modules import CacheableModule
from planner.profile.batching import micro_batch
from planner.profile.branch_parts import PartialComparisons, agreeing_parts
from planner.profile.capture import (
    ModuleWatch,
    StepTracker,
    attach,
    detach_hooks,
    input_tensors,
    output_tensors,
    pair_residual_inputs,
    resolve_modules,
    split_branches,
)
from planner.profile.tokens import TokenSampler

CFG_LAG = 0  # the ``lag`` value of rows comparing a branch with the other branch at the same step
# Metrics, in the order of the statistics array's last axis:
METRICS = (
    "rel_l1",  # output: mean|a - b| / mean|b|
    "cos",  # output: cosine similarity
    "res_rel_l1",  # residual (output - input): mean|ra - rb| / mean|rb|
    "res_cos",  # residual: cosine similarity
    "res_reuse_rel_l1",  # error on the *output* when the residual is reused: mean|ra - rb| / mean|b|
)
AGGS = ("mean", "std", "min", "max")
_EPS = 1e-12


def similarity_columns() -> list[str]:
    """The metric columns of the similarity table, e.g. ``rel_l1_mean``, ``res_cos_min``."""
    return [f"{m}_{a}" for m in METRICS for a in AGGS]


def pair_metrics(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample relative L1 ``mean|a-b|/mean|b|`` and cosine similarity of ``a`` and ``b``.

    ``a`` is ``[n, F]`` (one flattened row per sample); ``b`` is ``[n, F]`` or ``[L, n, F]``
    (several candidates at once); results have ``b``'s leading shape without ``F``. Computed in
    float32 at least, whatever the model's dtype.
    """
    a = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    b = b.float() if b.dtype in (torch.float16, torch.bfloat16) else b
    rel = (a - b).abs().mean(-1) / b.abs().mean(-1).clamp_min(_EPS)
    cos = torch.nn.functional.cosine_similarity(a.expand_as(b), b, dim=-1, eps=1e-8)
    return rel, cos


class _Ring:
    """The last ``k`` values of one (module, branch, target), newest first on read."""

    def __init__(self, k: int):
        self.k = k
        self.buf: torch.Tensor | None = None
        self.filled = 0
        self.pos = 0  # next slot to write
        self.last_step = -1

    def lags(self) -> tuple[torch.Tensor | None, int]:
        """``([L, n, F] newest first, L)`` of what is held."""
        if self.buf is None or self.filled == 0:
            return None, 0
        idx = [(self.pos - j) % self.k for j in range(1, self.filled + 1)]
        return self.buf[idx], self.filled

    def newest(self) -> torch.Tensor | None:
        return None if self.buf is None or self.filled == 0 else self.buf[(self.pos - 1) % self.k]

    def push(self, x: torch.Tensor, step: int) -> None:
        if self.buf is None or self.buf.shape[1:] != x.shape:
            self.buf = torch.empty((self.k, *x.shape), dtype=x.dtype, device=x.device)
            self.filled = self.pos = 0
        self.buf[self.pos].copy_(x)
        self.pos = (self.pos + 1) % self.k
        self.filled = min(self.filled + 1, self.k)
        self.last_step = step


@dataclass
class _Stats:
    """Streaming sum, sum of squares, min, max and count for every table cell."""

    sum: torch.Tensor
    sq: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    n: torch.Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device) -> "_Stats":
        f64 = torch.float32 if torch.device(device).type == "mps" else torch.float64
        z = torch.zeros(shape, dtype=f64, device=device)
        return cls(z.clone(), z.clone(), torch.full_like(z, float("inf")), torch.full_like(z, float("-inf")), z.clone())


class SimilarityCollector:
    """Receives module outputs from the hooks and updates the statistics of every
    (step, module, branch, lag, metric); holds only the last ``k`` outputs of each module and branch.

    The statistics array has shape ``[steps, modules, branches, k + 1, len(METRICS)]``; slot ``0``
    on the lag axis is the CFG comparison, slot ``j`` the comparison with ``j`` steps back.
    """

    def __init__(self, modules: Sequence[CacheableModule], layout: str, steps: int, k: int, device,
                 token_sample: TokenSampler | None = None):
        self.modules = list(modules)
        self.token_sample = token_sample
        self.peak_ring_bytes = 0  # the most bytes the ring buffers held at once (one micro-batch's)
        self.layout = CfgLayout(layout)
        self.branches = self.layout.branches
        self.steps = steps
        self.k = k
        self.device = torch.device(device)
        self.stats = _Stats.zeros((steps, len(modules), len(self.branches), k + 1, len(METRICS)), self.device)
        self.tracker: StepTracker | None = None
        self.batch: int | None = None
        self.skipped: set[str] = set()
        self.partial = PartialComparisons()  # modules whose CFG comparison took only some output tensors
        self._new_run()

    def ring_bytes(self) -> int:
        """Bytes the ring buffers hold now (they are allocated at a module's first output of a run)."""
        return sum(r.buf.nbytes for r in self.rings.values() if r.buf is not None)

    def _new_run(self) -> None:
        if hasattr(self, "rings"):
            self.peak_ring_bytes = max(self.peak_ring_bytes, self.ring_bytes())
        self.rings = {
            (m, b, t): _Ring(self.k) for m in range(len(self.modules)) for b in self.branches for t in range(2)
        }
        self.parts: dict[tuple[int, str], list[tuple]] = {}  # (module, branch) -> its last call's output parts

    def _features(self, index: int, args: tuple, kwargs: dict, output: Any) -> dict[str, list]:
        """Per branch: ``[output features [n, F], residual features [n, F'] or None, parts]``; ``parts``
        lists per output tensor ``(per-sample shape before token sampling, width in F, width in F')``,
        what the CFG comparison needs to take only the tensors whose shapes agree between branches."""
        kind = self.modules[index].kind
        outs = output_tensors(output)
        hidden, enc = input_tensors(args, kwargs)
        pairs = pair_residual_inputs(kind, outs, hidden, enc)
        expected = self.batch * (2 if self.layout.batched else 1)
        keep = [(o, p) for o, p in zip(outs, pairs) if o.dim() >= 1 and o.shape[0] == expected]
        if len(keep) < len(outs):
            self.skipped.add(self.modules[index].name)
        if not keep:
            return {}
        branch = self.tracker.branch
        per_branch: dict[str, list[list]] = {}
        shapes = [tuple(o.shape[1:]) for o, _ in keep]  # per sample, before token sampling: token counts must agree
        if self.token_sample is not None:
            # the same positions of the output and of the input it updates: the residual's
            keep = [(self.token_sample.sample(o), self.token_sample.sample(p) if p is not None and o.shape == p.shape else p)
                    for o, p in keep]
        for (o, p), shape in zip(keep, shapes):
            o_parts = split_branches(o.detach(), self.layout, branch)
            r_parts = split_branches((o - p).detach(), self.layout, branch) if p is not None else None
            for b, ob in o_parts.items():
                slot = per_branch.setdefault(b, [[], [], []])
                slot[0].append(ob.reshape(ob.shape[0], -1))
                width_r = 0
                if r_parts is not None:
                    rb = r_parts[b]
                    slot[1].append(rb.reshape(rb.shape[0], -1))
                    width_r = slot[1][-1].shape[1]
                slot[2].append((shape, slot[0][-1].shape[1], width_r))
        result = {}
        for b, (os_, rs, parts) in per_branch.items():
            out = torch.cat(os_, 1) if len(os_) > 1 else os_[0]
            res = (torch.cat(rs, 1) if len(rs) > 1 else rs[0]) if rs else None
            result[b] = [out, res, parts]
        return result

    def _record(self, step: int, m: int, b: str, slot: int | slice, col: int, *values: torch.Tensor) -> None:
        """Add per-sample ``values`` (each ``[..., n]``) to metric columns ``col, col+1, ...``."""
        bi = self.branches.index(b)
        vals = torch.stack(values, -1).to(self.stats.sum.dtype)  # [..., n, len(values)]
        cols = slice(col, col + len(values))
        s = self.stats
        s.sum[step, m, bi, slot, cols] += vals.sum(-2)
        s.sq[step, m, bi, slot, cols] += (vals * vals).sum(-2)
        s.min[step, m, bi, slot, cols] = torch.minimum(s.min[step, m, bi, slot, cols], vals.amin(-2))
        s.max[step, m, bi, slot, cols] = torch.maximum(s.max[step, m, bi, slot, cols], vals.amax(-2))
        s.n[step, m, bi, slot, cols] += vals.shape[-2]

    def _compare(self, step: int, m: int, b: str, slot, out, res, ref_out, ref_res) -> None:
        """Record how ``out``/``res`` differ from the stand-ins ``ref_out``/``ref_res`` (``[..., n, F]``)."""
        rel, cos = pair_metrics(out, ref_out)
        self._record(step, m, b, slot, 0, rel, cos)
        if res is None or ref_res is None:
            return
        rel_r, cos_r = pair_metrics(res, ref_res)
        # Reusing the residual puts (ref_res - res) on the output; measured against the output's size.
        d = res.float() if res.dtype in (torch.float16, torch.bfloat16) else res
        r = ref_res.float() if ref_res.dtype in (torch.float16, torch.bfloat16) else ref_res
        o = ref_out.float() if ref_out.dtype in (torch.float16, torch.bfloat16) else ref_out
        reuse = (d - r).abs().mean(-1) / o.abs().mean(-1).clamp_min(_EPS)
        self._record(step, m, b, slot, 2, rel_r, cos_r, reuse)

    @torch.no_grad()
    def __call__(self, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        step = self.tracker.step
        if not 0 <= step < self.steps:
            return
        feats = self._features(index, args, kwargs, output)
        for b, (out, res, parts) in feats.items():
            self.parts[(index, b)] = parts
            ring_o, ring_r = self.rings[(index, b, 0)], self.rings[(index, b, 1)]
            held_o, n_lags = ring_o.lags()
            if n_lags:
                held_r, n_res = ring_r.lags() if res is not None else (None, 0)
                self._compare(step, index, b, slice(1, 1 + n_lags), out, res if n_res == n_lags else None,
                              held_o, held_r if n_res == n_lags else None)
            ring_o.push(out, step)
            if res is not None:
                ring_r.push(res, step)
        if len(self.branches) == 2:
            self._cfg(step, index, feats)

    def _cfg(self, step: int, index: int, feats: dict) -> None:
        # Batched CFG gives both branches in one call; with separate calls the cond output of this
        # step is the newest entry of its ring when the uncond call arrives.
        if self.layout is CfgLayout.SEPARATE:
            if self.tracker.branch != UNCOND or UNCOND not in feats:
                return
            ring_o, ring_r = self.rings[(index, COND, 0)], self.rings[(index, COND, 1)]
            if ring_o.last_step != step:
                return
            cond = [ring_o.newest(), ring_r.newest() if ring_r.last_step == step else None, self.parts[(index, COND)]]
            uncond = feats[UNCOND]
        else:
            if COND not in feats or UNCOND not in feats:
                return
            cond, uncond = feats[COND], feats[UNCOND]
        c_shapes, u_shapes = [p[0] for p in cond[2]], [p[0] for p in uncond[2]]
        if c_shapes != u_shapes:
            # e.g. a text stream of the prompt's length in one branch and the negative prompt's in the other
            keep = agreeing_parts(c_shapes, u_shapes)
            self.partial.note(self.modules[index].name, len(u_shapes), keep)
            if not keep:
                return  # nothing comparable: the rows stay empty (NaN), and the record says so
            cond, uncond = _select_parts(cond, keep), _select_parts(uncond, keep)
        c_res, u_res = (cond[1], uncond[1]) if cond[1] is not None and uncond[1] is not None else (None, None)
        if c_res is not None and c_res.shape != u_res.shape:  # residuals exist for different tensors
            c_res = u_res = None
        self._compare(step, index, COND, 0, cond[0], c_res, uncond[0], u_res)  # cond replaced by uncond's
        self._compare(step, index, UNCOND, 0, uncond[0], u_res, cond[0], c_res)

    def raw(self) -> dict[str, np.ndarray]:
        """The streamed statistics as float64 arrays ``sum, sq, min, max, n`` of shape
        ``[steps, modules, branches, k + 1, metrics]``: what a shard keeps so that shards merge exactly."""
        s = self.stats
        return {key: getattr(s, key).double().cpu().numpy() for key in RAW_KEYS}

    def table(self, timesteps: Sequence[float]) -> pd.DataFrame:
        """The statistics as one row per step x module x branch x lag (dense; NaN where undefined)."""
        return stats_table(self.raw(), self.modules, self.branches, self.k, timesteps)


RAW_KEYS = ("sum", "sq", "min", "max", "n")


def _select_parts(feat: list, keep: list[int]) -> list:
    """``[out, res, parts]`` reduced to the output tensors at positions ``keep`` (residuals of those that have one)."""
    out, res, parts = feat
    o_cols, r_cols, o_at, r_at = [], [], 0, 0
    for i, (_, w_o, w_r) in enumerate(parts):
        if i in keep:
            o_cols.append(out.narrow(-1, o_at, w_o))
            if w_r and res is not None:
                r_cols.append(res.narrow(-1, r_at, w_r))
        o_at, r_at = o_at + w_o, r_at + w_r
    kept_res = torch.cat(r_cols, -1) if r_cols and all(parts[i][2] for i in keep) else None
    return [torch.cat(o_cols, -1), kept_res, [parts[i] for i in keep]]


def merge_raw(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Statistics of the union of the samples behind ``parts`` (sums add, min/max combine)."""
    out = {key: parts[0][key].copy() for key in RAW_KEYS}
    for part in parts[1:]:
        for key in ("sum", "sq", "n"):
            out[key] += part[key]
        out["min"] = np.minimum(out["min"], part["min"])
        out["max"] = np.maximum(out["max"], part["max"])
    return out


def stats_table(raw: dict[str, np.ndarray], modules: Sequence, branches: Sequence[str], k: int,
                timesteps: Sequence[float]) -> pd.DataFrame:
    """The similarity table (one row per step x module x branch x lag; NaN where undefined) from raw
    statistics (see :meth:`SimilarityCollector.raw`); ``modules`` need ``name``, ``kind``, ``block``."""
    n = raw["n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = raw["sum"] / n
        var = raw["sq"] / n - mean**2
        std = np.sqrt(np.clip(var, 0, None)) * np.sqrt(n / np.maximum(n - 1, 1))
    mn, mx = raw["min"].copy(), raw["max"].copy()
    empty = n == 0
    for arr in (mean, std, mn, mx):
        arr[empty] = np.nan
    lag_slots = list(range(1, k + 1)) + ([CFG_LAG] if len(branches) == 2 else [])
    S, M, B = n.shape[0], len(modules), len(branches)
    grid = np.array(
        [(st, mi, bi, lg) for st in range(S) for mi in range(M) for bi in range(B) for lg in lag_slots]
    )
    st, mi, bi, lg = grid.T
    data: dict[str, Any] = {
        "step": st,
        "timestep": np.asarray(timesteps, dtype=float)[st],
        "module": np.array([m.name for m in modules])[mi],
        "kind": np.array([m.kind for m in modules])[mi],
        "block": np.array([m.block for m in modules])[mi],
        "branch": np.array(branches)[bi],
        "lag": lg,
        "n": n[st, mi, bi, lg, 0].astype(int),
    }
    for c, metric in enumerate(METRICS):
        for agg, arr in zip(AGGS, (mean, std, mn, mx)):
            data[f"{metric}_{agg}"] = arr[st, mi, bi, lg, c]
    return pd.DataFrame(data)


class _FanOut:
    """One module watch feeding several collectors (exact and sampled statistics from one run)."""

    def __init__(self, collectors: Sequence[SimilarityCollector]):
        self.collectors = list(collectors)

    def __call__(self, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        for c in self.collectors:
            c(index, args, kwargs, output)


def watch_runs(runner, modules: list[CacheableModule], sampler, conditions: list, seeds: list[int],
               collectors: Sequence[SimilarityCollector], *, batch_size: int, progress=None) -> tuple[list[float], list[str]]:
    """Run the calibration inputs in micro-batches of ``batch_size`` with watching hooks on every
    cacheable module, feeding every collector; returns ``(timesteps, warnings)``.

    Each micro-batch starts the collectors' ring buffers afresh, so what is held at any time is one
    micro-batch's ``k`` lags; the statistics accumulate over all of them. ``batch_size`` is capped at
    what one pipeline call takes (:func:`~planner.profile.batching.micro_batch`). The hooks are
    removed afterwards, also on error.
    """
    batch_size = micro_batch(runner, batch_size, batch_size)
    transformer = runner.transformer
    targets = resolve_modules(transformer, modules)
    layout = runner.cfg_layout(sampler)
    timesteps: list[float] = []
    warnings: list[str] = []
    sink = _FanOut(collectors)
    for start in range(0, len(conditions), batch_size):
        conds, sds = conditions[start:start + batch_size], seeds[start:start + batch_size]
        for c in collectors:
            c.batch = len(conds)
            c._new_run()

        def on_call(tr: StepTracker):
            if progress is not None and (tr.branch in (None, COND)) and tr.step < sampler.steps:
                progress.update(1)

        tracker = StepTracker(layout, on_call=on_call)
        for c in collectors:
            c.tracker = tracker
        hooks = [(transformer, tracker, "step")]
        hooks += [(mod, ModuleWatch(i, sink), f"watch.{m.name}") for i, (m, mod) in enumerate(zip(modules, targets))]
        hs = attach(transformer, hooks)
        try:
            runner.run(conds, sds, sampler, output="latent")
        finally:
            detach_hooks(transformer, hs)
        seen = tracker.step + 1
        if seen != sampler.steps:
            from planner.profile.artifact import ProfileError

            raise ProfileError(
                f"the pipeline made {tracker.calls} transformer calls in {seen} steps, expected {sampler.steps} steps "
                "(schedulers with several model calls per step are not supported)"
            )
        timesteps = [float(t) for t in runner.pipe.scheduler.timesteps.flatten().tolist()][: sampler.steps]
    for c in collectors:
        c._new_run()  # folds the last micro-batch into peak_ring_bytes and frees its buffers
    if len(timesteps) < sampler.steps:
        timesteps += [float("nan")] * (sampler.steps - len(timesteps))
    skipped = set().union(*(c.skipped for c in collectors)) if collectors else set()
    if skipped:
        warnings.append(
            "outputs without the batch dimension were left out of the similarity of: " + ", ".join(sorted(skipped))
        )
    partial = sorted({name for c in collectors for name in c.partial.records})
    if partial:
        warnings.append(
            f"the CFG-branch comparison (lag 0) of {len(partial)} module(s) took only the output tensors whose shapes "
            "agree between the branches, and their outputs cannot be shared across branches (cfg_comparison in "
            "meta.json): " + ", ".join(partial[:6]) + (", ..." if len(partial) > 6 else "")
        )
    return timesteps, warnings


def similarity_stats(runner, modules: list[CacheableModule], sampler, conditions: list, seeds: list[int],
                     *, k: int, batch_size: int, token_sample: TokenSampler | None = None,
                     progress=None) -> tuple[SimilarityCollector, list[float], list[str]]:
    """The streamed statistics of the calibration inputs: ``(collector, timesteps, warnings)``; the
    collector's :meth:`~SimilarityCollector.raw` and :meth:`~SimilarityCollector.table` give them."""
    collector = SimilarityCollector(modules, runner.cfg_layout(sampler), sampler.steps, k, runner.device, token_sample)
    timesteps, warnings = watch_runs(runner, modules, sampler, conditions, seeds, [collector], batch_size=batch_size,
                                     progress=progress)
    return collector, timesteps, warnings


def similarity_pass(runner, modules: list[CacheableModule], sampler, conditions: list, seeds: list[int],
                    *, k: int, batch_size: int, token_sample: TokenSampler | None = None,
                    progress=None) -> tuple[pd.DataFrame, list[float], list[str]]:
    """Run the calibration inputs in batches of ``batch_size`` with watching hooks on every cacheable
    module; returns ``(similarity table, timesteps, warnings)``. The hooks are removed afterwards,
    also on error."""
    collector, timesteps, warnings = similarity_stats(runner, modules, sampler, conditions, seeds, k=k,
                                                      batch_size=batch_size, token_sample=token_sample, progress=progress)
    return collector.table(timesteps), timesteps, warnings
