"""Check every fixture pipeline against the executor: an all-compute plan, a plan where every block
reuses its residual ("D") at odd steps, and one where every sub-layer (attention, cross-attention,
MLP) reuses its output ("R") at odd steps, each applied with ``apply_plan`` to a real run.

Per kind (and per transformer for Wan 2.2) it reports: the plan could be made, applied, the run
finished, the all-compute output equals the un-hooked output bit for bit, the "D" run's stats, and
the exact error of whatever failed. Usage (from the repository root)::

    python benchmarks/fixture_executor_check.py [KIND ...] [--steps 4] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.executor import apply_plan  # noqa: E402
from planner.modules import cacheable_modules  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.zoo.fixtures import build_fixture, call_kwargs, kinds, spec  # noqa: E402
from planner.zoo.fixtures.probe import probe_kind  # noqa: E402

PLANS = (
    ("all-compute", None, ()),
    ("D at odd steps", "CD", ("block",)),
    ("R sub-layers at odd steps", "CR", ("attn", "cross_attn", "mlp")),
)

# Call variants checked besides the default call, per kind.
VARIANTS = {
    "flux": {"true cfg": {"true_cfg_scale": 4.0}},
    "z-image": {"cfg off (guidance 0)": {"guidance_scale": 0.0}},
}


def _output(pipe, kind: str, steps: int, overrides: dict):
    out = pipe(**call_kwargs(kind, steps=steps, **overrides))
    return torch.as_tensor(getattr(out, spec(kind).output))


def _error(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {Path(frame.filename).name}:{frame.lineno})"


def check(kind: str, steps: int, overrides: dict | None = None) -> dict:
    """Both plans on every transformer of ``kind``'s fixture, each over two pipeline runs."""
    overrides = dict(overrides or {})
    facts = probe_kind(kind, steps=steps, **overrides)
    layout = facts["layout"] if facts["layout"] in ("none", "cond_uncond", "uncond_cond", "separate") else None
    result: dict = {"kind": kind, "overrides": overrides, "layout": facts["layout"],
                    "steps_by_transformer": facts["transformers_by_step"], "transformers": {}}
    pipe = build_fixture(kind)
    base = _output(pipe, kind, steps, overrides)
    for attr in ("transformer", "transformer_2"):
        transformer = getattr(pipe, attr, None)
        if transformer is None:
            continue
        r: dict = {"class": type(transformer).__name__}
        result["transformers"][attr] = r
        mods = cacheable_modules(transformer)
        r["cacheable_modules"] = len(mods)
        r["blocks"] = sum(m.kind == "block" for m in mods)
        target = pipe if attr == "transformer" else transformer  # apply_plan hooks pipe.transformer only
        for label, code, kinds_ in PLANS:
            try:
                decisions = None
                if code:
                    pattern = (code * steps)[:steps]
                    decisions = {m.name: pattern for m in mods if m.kind in kinds_}
                    if not decisions:
                        r[label] = {"ok": False, "stage": "plan", "error": "no cacheable module of that kind"}
                        continue
                plan = Plan.for_model(transformer, steps=steps, cfg_layout=layout or "none", decisions=decisions)
            except Exception as e:  # noqa: BLE001 - we report whatever fails
                r[label] = {"ok": False, "stage": "plan", "error": _error(e)}
                continue
            try:
                handle = apply_plan(target, plan)
            except Exception as e:  # noqa: BLE001
                r[label] = {"ok": False, "stage": "apply", "error": _error(e)}
                continue
            try:
                out = _output(pipe, kind, steps, overrides)
                entry = {"ok": True, "finite": bool(torch.isfinite(out).all()),
                         "max_abs_diff_vs_plain": float((out - base).abs().max())}
                if code is None:
                    entry["bit_identical"] = bool(torch.equal(out, base))
                r[label] = entry
                stats = handle.stats()
                entry.update(runs_after_first=stats["runs"], run_in_progress=stats["run_in_progress"],
                             as_planned_fraction=stats["as_planned_fraction"], fallbacks=stats["fallbacks"],
                             hits={k: v for k, v in (stats.get("reuse_hits") or {}).items() if v})
                again = _output(pipe, kind, steps, overrides)  # a second run: run boundaries and caches reset
                entry["second_run_equal"] = bool(torch.equal(again, out))
                entry["runs_after_second"] = handle.stats()["runs"]
            except Exception as e:  # noqa: BLE001
                r[label] = {"ok": False, "stage": "run", "error": _error(e)}
            finally:
                handle.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kinds", nargs="*")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for kind in args.kinds or kinds():
        for overrides in [{}, *VARIANTS.get(kind, {}).values()]:
            res = check(kind, args.steps, overrides)
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.json:
        from planner.io import write_json_atomic

        write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
