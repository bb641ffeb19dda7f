"""How far similarity statistics from a random subset of token positions (``--token-sample N``) are
from the exact ones (issue 19, item 2; target: within 1 % relative).

One pipeline run per model feeds several collectors at once (planner.profile.similarity.watch_runs):
the exact statistics and one set per token-sample size, so every figure compares the same outputs.
Per distance metric (the mean over samples of the output's relative L1, the residual's relative L1,
and the error a residual reuse puts on the output) the error of a cell (step x module x branch x
lag, CFG comparisons included) is ``|sampled - exact| / |exact|``; for the cosine metrics it is
the same on ``1 - cos`` (cosines near 1 would make any estimate look exact), over the cells where
``1 - cos >= 1e-3``: below that a float32 cosine of 10^5 elements is itself only good to a few
1e-6, which is all the difference there (the cells left out and the largest absolute cosine error
over all cells are reported). Reported: the median, 95th percentile and maximum over cells, and the
aggregate ``sum|sampled - exact| / sum|exact|``.

Models: the trained digit models, ``digits-dit`` (class-conditional DiT, 16 tokens, DDIM 50 steps,
guidance 3, the committed profile's 8 calibration samples) and ``digits-mmdit`` (text-to-image Flux
MMDiT, 16 image and 16 text tokens, its zoo defaults: 28 flow steps, true CFG 4, its calibration
captions), and a random-weight ``DiTTransformer2DModel`` with 4096 tokens (sample size
128, patch 2) at reduced width (2 heads x 32) and depth (``--layers``) so that it runs on a CPU.

    OMP_NUM_THREADS=1 python benchmarks/token_sample_accuracy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from planner.io import write_json_atomic, write_text_atomic  # noqa: E402
from planner.profile.similarity import SimilarityCollector, watch_runs  # noqa: E402
from planner.profile.tokens import TokenSampler  # noqa: E402
from planner.runner import Runner, Sampler, load_runner  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DISTANCES = ("rel_l1", "res_rel_l1", "res_reuse_rel_l1")
COSINES = ("cos", "res_cos")
COS_FLOOR = 1e-3  # 1 - cos below this is within a float32 cosine's rounding of 0 (see the docstring)


def random_dit_4096(layers: int) -> Runner:
    """DiTPipeline with a random-weight DiT of 4096 tokens at width 64 (2 heads x 32)."""
    import diffusers

    from planner.pipelines.classes import DiTFamily
    from planner.zoo.fixtures.images import kl_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = diffusers.DiTTransformer2DModel(
            sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=layers, num_attention_heads=2,
            attention_head_dim=32, num_embeds_ada_norm=1000)
        vae = kl_vae(4, 256)
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(),
                                 scheduler=diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    return Runner(pipe, DiTFamily(), spec=f"random-dit-4096tok-{layers}layers-w64")


def errors(exact, sampled) -> dict:
    """Per metric: median, p95 and max per-cell relative error, and the aggregate one (see the docstring)."""
    out = {}
    for metric in (*DISTANCES, *COSINES):
        e = exact[f"{metric}_mean"].to_numpy(float)
        s = sampled[f"{metric}_mean"].to_numpy(float)
        extra = {}
        if metric in COSINES:
            finite = np.isfinite(e) & np.isfinite(s)
            extra = {"abs_max_all_cells": float(np.abs(s[finite] - e[finite]).max()),
                     "cells_below_floor": int((finite & (1 - e < COS_FLOOR)).sum())}
            e, s = 1 - e, 1 - s
        ok = np.isfinite(e) & np.isfinite(s) & (np.abs(e) > (COS_FLOOR if metric in COSINES else 1e-9))
        rel = np.abs(s[ok] - e[ok]) / np.abs(e[ok])
        out[metric] = {**extra,
            "cells": int(ok.sum()),
            "median": float(np.median(rel)),
            "p95": float(np.percentile(rel, 95)),
            "max": float(rel.max()),
            "aggregate": float(np.abs(s[ok] - e[ok]).sum() / np.abs(e[ok]).sum()),
        }
    return out


def measure(runner: Runner, sampler: Sampler, samples: int, batch: int, lags: int, sizes: list[int]) -> dict:
    sampler = runner.resolve(sampler)
    modules = runner.modules()
    layout = runner.cfg_layout(sampler)
    collectors = [SimilarityCollector(modules, layout, sampler.steps, lags, runner.device)]
    collectors += [SimilarityCollector(modules, layout, sampler.steps, lags, runner.device, TokenSampler(n)) for n in sizes]
    t0 = time.perf_counter()
    timesteps, _ = watch_runs(runner, modules, sampler, runner.conditions(samples, 0), list(range(samples)), collectors,
                              batch_size=batch)
    seconds = time.perf_counter() - t0
    exact = collectors[0].table(timesteps)
    rows = {}
    for n, c in zip(sizes, collectors[1:]):
        rows[str(n)] = {"errors": errors(exact, c.table(timesteps)), "ring_buffer_bytes": c.peak_ring_bytes}
    return {"model": runner.spec, "sampler": sampler.to_dict(), "samples": samples, "batch": batch, "lags": lags,
            "modules": len(modules), "exact_ring_buffer_bytes": collectors[0].peak_ring_bytes, "run_s": round(seconds, 1),
            "token_samples": rows}


def markdown(results: dict) -> str:
    lines = [
        "# Token-sampled similarity statistics vs exact",
        "",
        f"Command: `{results['command']}`; {results['date']}; torch {results['torch']}, {results['torch_threads']} torch "
        "thread(s). Per cell (step x module x branch x lag), relative error of the mean over samples; cosines as `1 - cos` "
        "over the cells with 1 - cos >= 1e-3 (below, a float32 cosine is only good to a few 1e-6: the last column gives "
        "the largest absolute cosine error over all cells). p95 / max over cells; aggregate = sum|sampled - exact| / sum|exact|.",
        "",
    ]
    for r in results["models"]:
        tokens = r["tokens"]
        lines += [
            f"## {r['model']} ({tokens} tokens, {r['sampler']['scheduler']} {r['sampler']['steps']} steps, guidance "
            f"{r['sampler']['guidance']:g}, {r['samples']} samples, {r['lags']} lags; {r['run_s']} s)",
            "",
            "| token sample | ring buffers | " + " | ".join(f"{m} p95 / max (aggregate)" for m in (*DISTANCES, *COSINES))
            + " | cos, res_cos: largest absolute error, all cells |",
            "|---|---|" + "---|" * (len(DISTANCES) + len(COSINES) + 1),
        ]
        lines.append(f"| all {tokens} | {r['exact_ring_buffer_bytes'] / 2**20:.2f} MiB | "
                     + " | ".join("exact" for _ in range(len(DISTANCES) + len(COSINES) + 1)) + " |")
        for n, row in r["token_samples"].items():
            errs = row["errors"]
            cells = [f"{100 * e['p95']:.2f} % / {100 * e['max']:.2f} % ({100 * e['aggregate']:.2f} %)" for e in errs.values()]
            cells.append(f"{errs['cos']['abs_max_all_cells']:.1e}, {errs['res_cos']['abs_max_all_cells']:.1e}")
            lines.append(f"| {n} ({100 * int(n) / tokens:.0f} %) | {row['ring_buffer_bytes'] / 2**20:.2f} MiB | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [results["note"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--layers", type=int, default=4, help="blocks of the random 4096-token DiT")
    ap.add_argument("--steps", type=int, default=10, help="steps of the random 4096-token DiT")
    ap.add_argument("--quick", action="store_true", help="a shorter run (digits at 10 steps, random DiT at 4 steps, 2 blocks)")
    args = ap.parse_args(argv)
    results = {"command": " ".join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
               "models": [],
               "note": "Token counts: digits-dit 16; digits-mmdit 16 image and 16 text tokens (both streams sampled alike); "
                       "the random DiT 4096."}
    digits = load_runner("digits-dit")
    print("digits-dit ...", flush=True)
    r = measure(digits, Sampler("ddim", 10 if args.quick else 50, 3.0), samples=8, batch=8, lags=3, sizes=[4, 8, 12])
    r["tokens"] = 16
    results["models"].append(r)
    print(json.dumps({n: v["errors"]["rel_l1"] for n, v in r["token_samples"].items()}), flush=True)
    print("digits-mmdit ...", flush=True)
    mmdit = load_runner("digits-mmdit")
    r = measure(mmdit, replace(mmdit.default_sampler, steps=10 if args.quick else mmdit.default_sampler.steps), samples=8,
                batch=8, lags=3, sizes=[4, 8, 12])
    r["tokens"] = 16
    results["models"].append(r)
    print(json.dumps({n: v["errors"]["rel_l1"] for n, v in r["token_samples"].items()}), flush=True)
    layers, steps = (2, 4) if args.quick else (args.layers, args.steps)
    print(f"random DiT, 4096 tokens, {layers} blocks, {steps} steps ...", flush=True)
    r = measure(random_dit_4096(layers), Sampler("ddim", steps, 4.0), samples=2, batch=2, lags=3, sizes=[256, 512, 1024, 2048])
    r["tokens"] = 4096
    results["models"].append(r)
    print(json.dumps({n: v["errors"]["rel_l1"] for n, v in r["token_samples"].items()}), flush=True)
    out = Path(args.out)
    write_json_atomic(out / "token_sample_accuracy.json", results)
    write_text_atomic(out / "token_sample_accuracy.md", markdown(results))
    print(f"wrote {out / 'token_sample_accuracy.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
