"""How the planner's costs grow to real model sizes (issue 19): transformer configs of DiT-XL/2 (256
and 512), PixArt-Sigma 1024, SD3.5-medium 1024, Flux.1-dev 1024 and Wan 2.1 1.3B 480p x 81 frames
with random weights (speed and memory only; the outputs mean nothing).

Per config, in this order (each measurement is skipped when the time left cannot hold it):

1. build: parameters, weight memory, build time;
2. dry run: the profile estimate of a one-step probe (calls, memory, time; planner.profile.estimate);
3. device reads: transformer runs with no plan, an all-compute plan and a mixed plan, counting the
   synchronisations (CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` warnings; CPU: reads of tensor
   values into Python), total and those made by planner/executor code;
4. executor overhead: an all-compute plan vs no plan, interleaved timed runs (median ratio);
5. profile: ``profile_model`` at micro-batch 1 (time, peak memory against the estimate, the latency
   model's error against the plain runs it timed);
6. a 2x plan: every block reuses its residual on all but every N-th step, N the smallest whose
   predicted speedup is >= 2; realized (interleaved timed runs) vs predicted speedup;
7. greedy search time (``--greedy`` configs; the target is DiT-XL/2 256 under 5 minutes on a GPU);
8. torch.compile (``--compile`` configs): graph breaks with a mixed plan, compiled speedup of the
   2x plan, and ``mode="reduce-overhead"`` (CUDA graphs) with the plan: does it run, does it match
   eager, what it is worth.

On a GPU the models run in bf16 at full size; on a CPU (``--device cpu``) at reduced width and depth
(``REDUCED``) so that the whole run fits a few minutes on 2 cores: a smoke run of every code path,
whose figures describe the CPU run only. Results are written after every measurement (also when
the time limit stops the run) to ``--out``/scale-<device>.json and .md.

    python benchmarks/scale.py --device cuda --time-limit 540                 # the GPU run, one command
    OMP_NUM_THREADS=1 python benchmarks/scale.py --device cpu --time-limit 600   # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from planner.executor import apply_plan  # noqa: E402
from planner.io import write_json_atomic, write_text_atomic  # noqa: E402
from planner.plan import plan_for_runner  # noqa: E402
from planner.profile import TimingConfig, profile_model  # noqa: E402
from planner.profile.estimate import estimate_profile  # noqa: E402
from planner.profile.memory import fmt_bytes, peak_memory  # noqa: E402
from planner.runner import Runner, Sampler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the configs


@dataclass
class ScaleConfig:
    """One real model's transformer at full size, how its pipeline is driven, and its CPU reduction."""

    name: str
    kind: str  # dit, pixart, sd3, flux, wan
    transformer: dict
    guidance: float
    steps: int  # the steps people run it with (reported; runs use --steps)
    text_tokens: int = 0
    video: tuple[int, int, int] | None = None  # frames, height, width (Wan)
    image_tokens: int = 0  # for the report
    reduced: dict = field(default_factory=dict)  # transformer overrides on a CPU
    reduced_video: tuple[int, int, int] | None = None
    reduced_text_tokens: int = 16


DIT_XL2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
SMALL = dict(num_attention_heads=2, attention_head_dim=32)  # width 64 on a CPU

CONFIGS = {c.name: c for c in [
    ScaleConfig("dit-xl-2-256", "dit", {**DIT_XL2, "sample_size": 32}, guidance=4.0, steps=50, image_tokens=256,
                reduced={**SMALL, "num_layers": 28, "sample_size": 32}),
    ScaleConfig("dit-xl-2-512", "dit", {**DIT_XL2, "sample_size": 64}, guidance=4.0, steps=50, image_tokens=1024,
                reduced={**SMALL, "num_layers": 16, "sample_size": 64}),
    ScaleConfig("pixart-sigma-1024", "pixart",
                dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                     norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2,
                     use_additional_conditions=False, num_embeds_ada_norm=1000),
                guidance=4.5, steps=20, text_tokens=300, image_tokens=4096,
                reduced={**SMALL, "num_layers": 8, "sample_size": 64, "cross_attention_dim": 64, "caption_channels": 64}),
    ScaleConfig("sd3.5-medium-1024", "sd3",
                dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                     dual_attention_layers=tuple(range(13))),
                guidance=4.5, steps=40, text_tokens=333, image_tokens=4096,
                reduced={**SMALL, "num_layers": 8, "sample_size": 32, "caption_projection_dim": 64,
                         "joint_attention_dim": 64, "pooled_projection_dim": 64, "pos_embed_max_size": 32,
                         "dual_attention_layers": (0, 1, 2)}),
    ScaleConfig("flux.1-dev-1024", "flux",
                dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
                guidance=1.0, steps=28, text_tokens=512, image_tokens=4096,
                reduced={**SMALL, "num_layers": 4, "num_single_layers": 8, "joint_attention_dim": 64,
                         "pooled_projection_dim": 64, "axes_dims_rope": (8, 12, 12)}),
    ScaleConfig("wan2.1-1.3b-480p", "wan",
                dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                     text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                     qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
                guidance=5.0, steps=50, text_tokens=512, video=(81, 480, 832), image_tokens=21 * 30 * 52,
                reduced={**SMALL, "num_layers": 8, "text_dim": 64, "freq_dim": 32, "ffn_dim": 128},
                reduced_video=(5, 128, 128)),
]}
# Image size of the reduced configs (latent side): Flux packs 2x2 latents per token.
REDUCED_FLUX_TOKENS = 256


def _vae(kind: str, latent_channels: int, image_size: int):
    """A small VAE with the latent channels the transformer needs (decode cost is not what is measured)."""
    from planner.zoo.fixtures.images import kl_vae

    if kind in ("sd3", "flux"):
        return kl_vae(latent_channels, image_size, shift_factor=0.0, scaling_factor=1.0,
                      use_quant_conv=False, use_post_quant_conv=False)
    return kl_vae(latent_channels, image_size)


class RandomEmbeddings:
    """Stands in for a pipeline's text encoders (the runner's prompt encoder): embeddings of the real
    shapes, random, the same for a prompt every time. What the transformer sees is what it would see
    from T5-XXL / UMT5 / CLIP at these sequence lengths; the values are noise (speed and memory only)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], masks: dict[str, int] | None = None):
        self.shapes = shapes
        self.masks = masks or {}

    def encode(self, prompts) -> dict[str, torch.Tensor]:
        import hashlib

        def seeded(text: str) -> torch.Generator:
            return torch.Generator("cpu").manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))

        rows = []
        for p in prompts:
            # the negative embeddings depend on the negative prompt only (the empty one: the same for every
            # prompt), as a real encoder's do; the probe of the CFG layout relies on that
            pos, neg = seeded(p.prompt), seeded(p.negative_prompt or "")
            row = {name: torch.randn((1, *shape), generator=neg if name.startswith("negative_") else pos)
                   for name, shape in self.shapes.items()}
            row.update({name: torch.ones((1, length), dtype=torch.long) for name, length in self.masks.items()})
            rows.append(row)
        return {name: torch.cat([r[name] for r in rows]) for name in rows[0]}


def _text_encoder_shapes(kind: str, kw: dict, tokens: int) -> tuple[dict, dict]:
    if kind == "pixart":
        e = {"prompt_embeds": (tokens, kw["caption_channels"])}
        masks = {"prompt_attention_mask": tokens, "negative_prompt_attention_mask": tokens}
    elif kind == "sd3":
        e = {"prompt_embeds": (tokens, kw["joint_attention_dim"]), "pooled_prompt_embeds": (kw["pooled_projection_dim"],)}
        masks = {}
    elif kind == "flux":
        return {"prompt_embeds": (tokens, kw["joint_attention_dim"]), "pooled_prompt_embeds": (kw["pooled_projection_dim"],)}, {}
    else:  # wan
        e = {"prompt_embeds": (tokens, kw["text_dim"])}
        masks = {}
    return {**e, **{f"negative_{k}": v for k, v in e.items()}}, masks


def build_runner(cfg: ScaleConfig, device: str, dtype: torch.dtype, reduced: bool) -> Runner:
    """A Runner of ``cfg``'s pipeline with random weights on ``device`` in ``dtype`` (reduced: CPU sizes)."""
    import diffusers

    from planner.pipelines.classes import DiTFamily
    from planner.pipelines.text import text_family

    kw = {**cfg.transformer, **(cfg.reduced if reduced else {})}
    if cfg.kind == "sd3" and reduced:
        kw["caption_projection_dim"] = kw["num_attention_heads"] * kw["attention_head_dim"]
    classes = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
               "flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel"}
    cls = getattr(diffusers, classes[cfg.kind])
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if device.startswith("cuda") else []):
        torch.manual_seed(0)
        try:
            torch.set_default_dtype(dtype)  # weights made in their final dtype, on the device: no fp32 copy
            with torch.device(device):
                transformer = cls(**kw)
        finally:
            torch.set_default_dtype(previous)
    transformer.to(device=device, dtype=dtype).eval()

    call_args: dict[str, Any] = {}
    if cfg.kind == "dit":
        vae = _vae("dit", 4, kw["sample_size"] * 2)
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                     scheduler=diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False))
    elif cfg.kind == "pixart":
        size = kw["sample_size"] * 2  # the small VAE's factor
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae("pixart", 4, size), transformer=transformer,
                                             scheduler=diffusers.DPMSolverMultistepScheduler(beta_schedule="linear"))
        call_args = {"height": size, "width": size}
    elif cfg.kind == "sd3":
        size = kw["sample_size"] * 2
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae("sd3", kw["in_channels"], size),
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        call_args = {"height": size, "width": size}
    elif cfg.kind == "flux":
        tokens = REDUCED_FLUX_TOKENS if reduced else cfg.image_tokens
        size = int(round(tokens ** 0.5)) * 4  # the small VAE's factor 2, and Flux packs 2x2 latents per token
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                              base_image_seq_len=256, max_image_seq_len=4096)
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=_vae("flux", kw["in_channels"] // 4, size), text_encoder=None,
                                      tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
        call_args = {"height": size, "width": size}
    else:  # wan: the small Wan VAE keeps the real factors (8 in space, 4 in time)
        frames, height, width = (cfg.reduced_video if reduced else cfg.video)
        z = kw["in_channels"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                             temperal_downsample=[False, True, True],
                                             latents_mean=[0.0] * z, latents_std=[1.0] * z)
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
        call_args = {"height": height, "width": width, "num_frames": frames}
    pipe.vae.to(device=device, dtype=dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    if cfg.kind == "dit":
        return Runner(pipe, DiTFamily(), spec=cfg.name)
    runner = Runner(pipe, text_family(pipe), spec=cfg.name, call_args=call_args)
    tokens = cfg.reduced_text_tokens if reduced else cfg.text_tokens
    shapes, masks = _text_encoder_shapes(cfg.kind, kw, tokens)
    runner._encoder = RandomEmbeddings(shapes, masks)  # no text encoders at these sizes: see RandomEmbeddings
    return runner


# --------------------------------------------------------------------------- measurement helpers


class TimeUp(BaseException):
    """The --time-limit passed (a BaseException, so no measurement's ``except Exception`` swallows it)."""


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(runner, conds, seeds, sampler) -> float:
    _sync(runner.device)
    t0 = time.perf_counter()
    runner.run(conds, seeds, sampler, output="latent")
    _sync(runner.device)
    return time.perf_counter() - t0


def interleaved(runner, conds, seeds, sampler, plan, repeats: int) -> tuple[list[float], list[float]]:
    """(no-plan seconds, plan seconds) of alternating runs, the order flipping every pair."""
    base, planned = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                base.append(timed_run(runner, conds, seeds, sampler))
            else:
                with apply_plan(runner, plan):
                    planned.append(timed_run(runner, conds, seeds, sampler))
    return base, planned


def mixed_plan(runner, sampler):
    """A plan using every action (reuse, reuse_residual, forecast, share_cfg where CFG is on)."""
    n = sampler.steps
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    subs = [m.name for m in runner.modules() if m.kind != "block" and not m.name.startswith(blocks[1] + ".")
            and not m.name.startswith(blocks[-1] + ".")]
    alt = "".join("RC"[k % 2] if k else "C" for k in range(n))
    dec = {blocks[1]: "".join("DC"[k % 2] if k else "C" for k in range(n)),
           blocks[-1]: "CC" + "".join("FC"[k % 2] for k in range(n - 2)) if n > 2 else "C" * n,
           subs[0]: alt}
    if runner.cfg_layout(sampler) != "none" and n > 2:
        dec[subs[-1]] = {"cond": "C" * n, "uncond": "C" + "S" * (n - 2) + "C"}
    return plan_for_runner(runner, sampler, dec, strategy="benchmark:mixed")


def uniform_block_plan(runner, sampler, interval: int):
    codes = "".join("C" if k % interval == 0 else "D" for k in range(sampler.steps))
    return plan_for_runner(runner, sampler, {m.name: codes for m in runner.modules() if m.kind == "block"},
                           strategy=f"benchmark:blocks-every-{interval}")


def plan_near_2x(runner, sampler, latency):
    """The uniform block plan with the smallest interval whose predicted speedup is >= 2 (else the fastest)."""
    best = None
    for interval in range(2, sampler.steps + 1):
        plan = uniform_block_plan(runner, sampler, interval)
        pred = latency.predict_speedup(plan)
        best = (plan, pred, interval)
        if pred >= 2.0:
            break
    return best


class ReadCounter:
    """Reads of tensor values into Python (a device-to-host sync on a GPU), all and the executor's."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self):
        self.total = self.executor = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self):
        for name in self.METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)

    def _wrap(self, original):
        counter = self

        def read(self, *args, **kwargs):
            counter.total += 1
            if "/planner/executor/" in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counter.executor += 1
            return original(self, *args, **kwargs)

        return read


@contextlib.contextmanager
def cuda_sync_warnings(device):
    """Record the synchronisations torch's sync debug mode reports inside the block."""
    found = {"total": 0, "executor": 0, "where": {}}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            yield found
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in rec:
        if "synchroniz" not in str(w.message).lower():
            continue
        where = w.filename.replace("\\", "/")
        found["total"] += 1
        found["executor"] += "/planner/executor/" in where
        key = f"{Path(where).name}:{w.lineno}"
        found["where"][key] = found["where"].get(key, 0) + 1


def count_syncs(runner, conds, seeds, sampler, plan=None, deferred: bool | None = None) -> dict:
    """Synchronisations (CUDA) or tensor reads (CPU) of one run, total and by planner/executor code.
    ``deferred=True`` makes the executor track steps as it does for a timestep on a GPU (on a CPU
    the timestep is read at every call, which costs nothing there)."""
    handle = apply_plan(runner, plan) if plan is not None else contextlib.nullcontext()
    with handle:
        if plan is not None and deferred is not None:
            handle._engine.deferred_timesteps = deferred
        if runner.device.type == "cuda":
            timed_run(runner, conds, seeds, sampler)  # warm: first-run lazy inits sync too
            with cuda_sync_warnings(runner.device) as found:
                runner.run(conds, seeds, sampler, output="latent")
            return {"method": "torch.cuda.set_sync_debug_mode('warn')", **found}
        with ReadCounter() as c:
            runner.run(conds, seeds, sampler, output="latent")
        return {"method": "reads of tensor values into Python (CPU stand-in)", "total": c.total, "executor": c.executor}


def compile_check(runner, conds, seeds, sampler, plan, mode: str | None) -> dict:
    """torch.compile of the transformer with ``plan`` applied: graph breaks, match with eager, speed of
    the compiled run with and without the plan against the eager run with it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    with apply_plan(runner, plan):
        eager = runner.run(conds, seeds, sampler, output="latent")
        eager_s = statistics.median(timed_run(runner, conds, seeds, sampler) for _ in range(3))
    original = runner.pipe.transformer
    torch._dynamo.reset()
    counters.clear()
    out: dict[str, Any] = {"mode": mode or "default"}
    try:
        compiled = torch.compile(original, mode=mode) if mode else torch.compile(original)
        with apply_plan(original, plan) as handle:
            runner.pipe.transformer = compiled
            t0 = time.perf_counter()
            first = runner.run(conds, seeds, sampler, output="latent")
            out["first_run_s"] = time.perf_counter() - t0
            times = [timed_run(runner, conds, seeds, sampler) for _ in range(3)]
            last = runner.run(conds, seeds, sampler, output="latent")
            out["fallbacks"] = handle.stats()["fallbacks"]
        breaks = dict(counters.get("graph_break", {}))
        graphs = int(counters.get("stats", {}).get("unique_graphs", 0))
        timed_run(runner, conds, seeds, sampler)  # compiles the model without hooks
        no_plan = [timed_run(runner, conds, seeds, sampler) for _ in range(3)]
    finally:
        runner.pipe.transformer = original
    out.update({
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": sorted(breaks)[:8],
        "unique_graphs": graphs,
        "compiled_plan_s": statistics.median(times),
        "compiled_no_plan_s": statistics.median(no_plan),
        "eager_plan_s": eager_s,
        "speedup_vs_eager_plan": eager_s / statistics.median(times),
        "plan_speedup_compiled": statistics.median(no_plan) / statistics.median(times),
        "max_abs_diff_vs_eager": float((first.float() - eager.float()).abs().max()),
        "max_abs_eager": float(eager.float().abs().max()),
        "repeat_run_equal": bool(torch.equal(first, last)),
    })
    return out


# --------------------------------------------------------------------------- the run


class Bench:
    """Runs the measurements within the time limit and keeps the results written."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.reduced = not self.cuda if args.reduced is None else args.reduced
        self.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if self.cuda else torch.float32)
        self.start = time.perf_counter()
        self.deadline = self.start + args.time_limit
        tag = ("cuda" if self.cuda else "cpu") + (f"-{args.tag}" if args.tag else "")
        self.out_json = Path(args.out) / f"scale-{tag}.json"
        self.out_md = Path(args.out) / f"scale-{tag}.md"
        self.config_deadline = self.deadline
        self.kept: dict[str, dict] = {}  # per config: the profile and the 2x plan's interval, for phase 2
        self.results: dict[str, Any] = {"environment": self._environment(), "configs": {}, "stopped": None}

    def _environment(self) -> dict:
        import diffusers

        env = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": self.device, "torch": torch.__version__, "diffusers": diffusers.__version__,
               "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
               "dtype": str(self.dtype).replace("torch.", ""), "reduced": self.reduced, "steps": self.args.steps,
               "time_limit_s": self.args.time_limit}
        if self.cuda:
            env["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            try:
                env["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                  if line.startswith("model name"))
            except (OSError, StopIteration):
                env["cpu"] = platform.processor()
        return env

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def left_for_config(self) -> float:
        """Time this config may still use: its share of what was left when it started (an estimate
        may run over it by half), never past the deadline."""
        return min(self.left(), self.config_deadline - time.perf_counter())

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", flush=True)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_json_atomic(self.out_json, self.results)
        write_text_atomic(self.out_md, markdown(self.results))

    def measure(self, entry: dict, key: str, fn: Callable[[], Any], need_s: float | None = None) -> Any:
        """Run one measurement into ``entry[key]``: skipped when ``need_s`` exceeds the time left, an
        exception recorded as an error; results written afterwards."""
        if need_s is not None and need_s > self.left_for_config():
            entry[key] = {"skipped": f"needs about {need_s:.0f} s, {self.left_for_config():.0f} s left for this config"}
            self.log(f"  {key}: skipped ({entry[key]['skipped']})")
            self.save()
            return None
        self.log(f"  {key} ...")
        t0 = time.perf_counter()
        try:
            value = fn()
        except TimeUp:
            entry[key] = {"error": "stopped by the time limit", "after_s": round(time.perf_counter() - t0, 1)}
            self.save()
            raise
        except Exception as exc:  # a measurement that fails is a result too
            entry[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if self.cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
                gc.collect()
                torch.cuda.empty_cache()
            self.log(f"  {key}: {entry[key]['error']}")
            if self.args.verbose:
                traceback.print_exc()
            self.save()
            return None
        entry[key] = value
        self.log(f"  {key}: done in {time.perf_counter() - t0:.1f} s")
        self.save()
        return value

    def run(self) -> int:
        def alarm(signum, frame):
            raise TimeUp()

        names = list(CONFIGS) if self.args.configs == "all" else [c.strip() for c in self.args.configs.split(",") if c.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            print(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        later = [n for n in names if n in self.args.greedy.split(",") or n in self.args.compile.split(",")]
        if self.args.only == "estimate":
            later = []
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(max(1, int(self.args.time_limit)))
        try:
            # Phase 1, every config: build, estimate, device reads, executor overhead, profile, 2x plan.
            # Phase 2, with the time left: greedy search and torch.compile on the configs asked for.
            reserve = self.args.reserve * self.args.time_limit if later else 0.0
            for i, name in enumerate(names):
                if self.left() - reserve < 5:
                    self.results["stopped"] = f"time limit: {', '.join(names[i:])} not run"
                    break
                self.with_config(CONFIGS[name], (self.left() - reserve) / (len(names) - i), self.core)
            for i, name in enumerate(later):
                if name in self.results["configs"] and "profile" in self.kept.get(name, {}) and self.left() > 5:
                    self.with_config(CONFIGS[name], self.left() / (len(later) - i), self.extra)
        except TimeUp:
            self.results["stopped"] = f"time limit of {self.args.time_limit:.0f} s reached"
            self.log(self.results["stopped"])
        finally:
            signal.alarm(0)
            self.save()
        self.log(f"wrote {self.out_json} and {self.out_md}")
        return 0

    def with_config(self, cfg: ScaleConfig, share: float, body: Callable) -> None:
        """Build ``cfg`` (deterministic weights: a rebuild is the same model), run ``body`` on it within about
        ``share`` seconds, free it."""
        args = self.args
        entry = self.results["configs"].setdefault(cfg.name, {
            "kind": cfg.kind, "real_steps": cfg.steps, "full_size_tokens": cfg.image_tokens,
            "full_size_text_tokens": cfg.text_tokens})
        self.config_deadline = time.perf_counter() + 1.5 * share
        self.log(f"{cfg.name}: building ({'reduced' if self.reduced else 'full size'}, {cfg.kind}); {share:.0f} s for it")
        t0 = time.perf_counter()
        built: list[Runner] = []
        key = "build" if "build" not in entry else "rebuild"
        self.measure(entry, key, lambda: built.append(build_runner(cfg, self.device, self.dtype, self.reduced)) or {})
        if not built:
            return
        runner = built.pop()
        t = runner.transformer
        entry[key] = {"s": round(time.perf_counter() - t0, 2), "params": sum(p.numel() for p in t.parameters()),
                      "weight_bytes": sum(p.numel() * p.element_size() for p in t.parameters())}
        if key == "build":
            entry[key]["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(t.config).items()
                                    if not k.startswith("_")}
        sampler = runner.resolve(Sampler("default", args.steps, cfg.guidance))
        entry.update(layout=str(runner.cfg_layout(sampler)), steps=args.steps, cacheable_modules=len(runner.modules()))
        try:
            body(cfg, entry, runner, sampler, runner.conditions(1, 0), [0])
        finally:
            del runner, t  # `built` is empty since the pop: the runner and its transformer are the references left
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    def timing(self) -> TimingConfig:
        return TimingConfig(warmup=1, repeats=5 if self.cuda else 3, run_repeats=self.args.run_repeats)

    def core(self, cfg, entry, runner, sampler, conds, seeds) -> None:
        """Phase 1 (see :meth:`run`)."""
        args = self.args
        timing = self.timing()
        kept = self.kept.setdefault(cfg.name, {})

        found: list = []

        def estimate():
            from planner.profile.estimate import probe

            conds1 = runner.conditions(1, 0)
            found.append(probe(runner, runner.modules(), sampler, conds1, [0]))
            return estimate_profile(runner, sampler, samples=args.samples, batch_size=1, lags=args.lags, timing=timing,
                                    probe_result=found[0]).to_dict()

        est = self.measure(entry, "estimate", estimate)
        if est and args.only == "estimate":  # the same probe, all samples in one micro-batch (the default)
            self.measure(entry, "estimate_one_batch", lambda: estimate_profile(
                runner, sampler, samples=args.samples, lags=args.lags, timing=timing, probe_result=found[0]).to_dict())
        run_s = None
        if est and "max_tokens" in est:
            entry["tokens"] = est["max_tokens"]  # the longest token axis of a module output in this run
        if est and est.get("time_s", {}).get("total"):
            p = est["probe"]
            run_s = max(0.0, p["run_s"] - p["calls_per_step"] * p["call_s"]) + sampler.steps * p["calls_per_step"] * p["call_s"]
            entry["estimated_run_s"] = run_s
        kept["run_s"] = run_guess = run_s or 1.0

        # Device reads per run: the executor's own must not grow with the steps.
        plan_mixed = mixed_plan(runner, sampler)

        def syncs():
            out = {"none": count_syncs(runner, conds, seeds, sampler),
                   "all_compute": count_syncs(runner, conds, seeds, sampler, plan_for_runner(runner, sampler)),
                   "mixed": count_syncs(runner, conds, seeds, sampler, plan_mixed)}
            if not self.cuda:  # the GPU path of the step tracker, run on the CPU
                out["mixed_gpu_path"] = count_syncs(runner, conds, seeds, sampler, plan_mixed, deferred=True)
            gpu_path = out["mixed"] if self.cuda else out["mixed_gpu_path"]
            out["executor_reads_per_run_gpu_path"] = gpu_path["executor"]
            out["executor_reads_per_step_gpu_path"] = gpu_path["executor"] / sampler.steps
            return out

        if args.only == "estimate":
            return
        self.measure(entry, "syncs", syncs, need_s=8 * run_guess)

        def overhead():
            timed_run(runner, conds, seeds, sampler)
            base, planned = interleaved(runner, conds, seeds, sampler, plan_for_runner(runner, sampler), args.repeats)
            b, p = statistics.median(base), statistics.median(planned)
            return {"no_plan_s": b, "all_compute_plan_s": p, "overhead_pct": 100 * (p / b - 1),
                    "fastest_overhead_pct": 100 * (min(planned) / min(base) - 1), "repeats": args.repeats}

        self.measure(entry, "executor_overhead", overhead, need_s=(2 * args.repeats + 1) * run_guess)

        def profile():
            with peak_memory(runner.device) as peak:
                t0 = time.perf_counter()
                prof = profile_model(runner, sampler, samples=args.samples, batch_size=1, lags=args.lags, timing=timing,
                                     flops=False)
                total = time.perf_counter() - t0
            lat = prof.meta.latency
            out = {"s": total, "durations_s": prof.meta.durations_s, "peak_device_bytes": peak.device,
                   "peak_host_bytes": peak.host, "ring_buffer_peak_bytes": prof.meta.extra["memory"]["ring_buffer_peak_bytes"],
                   "latency_model_error": lat.get("relative_error"), "predicted_run_s": lat.get("predicted_run_s"),
                   "measured_run_s": lat.get("measured_run_s"), "warnings": list(prof.meta.warnings)}
            if est:
                out["estimated_peak_bytes"] = est["memory"]["peak"]
                out["estimated_rings_bytes"] = est["memory"]["rings"]
                out["estimated_s"] = est["time_s"].get("total")
            kept["profile"] = prof
            return out

        self.measure(entry, "profile", profile, need_s=(est or {}).get("time_s", {}).get("total") or None)
        prof = kept.get("profile")
        if prof is None:
            return

        def plan2x():
            plan, pred, interval = plan_near_2x(runner, sampler, prof.latency_model())
            base, planned = interleaved(runner, conds, seeds, sampler, plan, args.repeats)
            realized = statistics.median(base) / statistics.median(planned)
            kept["interval"] = interval
            return {"plan": f"every block reuses its residual on all but every {interval}-th step", "predicted": pred,
                    "realized": realized, "realized_over_predicted": realized / pred,
                    "fastest_realized": min(base) / min(planned), "repeats": args.repeats}

        self.measure(entry, "plan_2x", plan2x, need_s=2 * args.repeats * run_guess)

    def extra(self, cfg, entry, runner, sampler, conds, seeds) -> None:
        """Phase 2 (see :meth:`run`): greedy search, torch.compile."""
        args = self.args
        kept = self.kept[cfg.name]
        run_guess = kept["run_s"]
        if cfg.name in args.greedy.split(","):
            g_sampler = runner.resolve(replace(sampler, steps=args.greedy_steps))
            g_run = run_guess * args.greedy_steps / sampler.steps

            def greedy():
                from planner.search.api import run_search

                g_prof, profile_s = kept["profile"], 0.0
                if g_sampler.steps != sampler.steps:
                    t0 = time.perf_counter()
                    g_prof = profile_model(runner, g_sampler, samples=args.samples, batch_size=1, lags=args.lags,
                                           timing=self.timing(), flops=False)
                    profile_s = time.perf_counter() - t0
                outcome = run_search(runner, "2x", strategy="greedy", sampler=g_sampler, profile=g_prof,
                                     calib_samples=args.greedy_samples)
                pred = outcome.plan.prediction
                return {"search_s": outcome.search_s, "profile_s": profile_s, "calib_samples": args.greedy_samples,
                        "steps": g_sampler.steps, "predicted_speedup": pred.speedup, "calib_error": pred.calib_error,
                        "evaluations": outcome.context.evaluations}

            self.measure(entry, "greedy", greedy, need_s=60 * g_run)

        if cfg.name in args.compile.split(",") and "interval" in kept:
            plan = uniform_block_plan(runner, sampler, kept["interval"])
            need = max(60.0, 12 * run_guess)
            self.measure(entry, "compile_default", lambda: compile_check(runner, conds, seeds, sampler, plan, None), need_s=need)
            if self.cuda:  # CUDA graphs; on a CPU "reduce-overhead" is the default mode
                self.measure(entry, "compile_reduce_overhead",
                             lambda: compile_check(runner, conds, seeds, sampler, plan, "reduce-overhead"), need_s=need)
            self.measure(entry, "compile_mixed_plan",
                         lambda: compile_check(runner, conds, seeds, sampler, mixed_plan(runner, sampler), None), need_s=need)


# --------------------------------------------------------------------------- the report


def _f(x, fmt="{:.2f}") -> str:
    if x is None:
        return ""
    if isinstance(x, dict):
        return x.get("error") or x.get("skipped") or ""
    return fmt.format(x)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# Scale benchmark on {env.get('gpu') or env.get('cpu')} ({env['device']}, {env['dtype']}"
        f"{', reduced widths and depths' if env['reduced'] else ', full size'})",
        "",
        f"Command: `{env['command']}`; {env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, "
        f"{env['torch_threads']} torch threads; {env['steps']} sampling steps per run; elapsed {results.get('elapsed_s')} s"
        + (f"; **stopped: {results['stopped']}**" if results.get("stopped") else "") + ".",
        "",
        "| config | params | tokens | layout | profile s (est.) | profile peak mem (est.) | ring buffers (est.) | latency model error | executor overhead | 2x plan realized / predicted | device reads per run: no plan / mixed plan; by the executor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["configs"].items():
        b = e.get("build") or {}
        p = e.get("profile") or {}
        o = e.get("executor_overhead") or {}
        x = e.get("plan_2x") or {}
        s = e.get("syncs") or {}
        peak = p.get("peak_device_bytes") if p.get("peak_device_bytes") is not None else p.get("peak_host_bytes")
        reads = ""
        if "mixed" in s:
            gpu = s.get("mixed_gpu_path", s["mixed"])
            reads = f"{s['none']['total']} / {gpu['total']}; {gpu['executor']}"
        lines.append("| " + " | ".join([
            name,
            f"{b.get('params', 0) / 1e6:.1f} M" if b.get("params") else _f(e.get("build")),
            f"{e.get('tokens')}" + (f" (full size {e.get('full_size_tokens')})" if env["reduced"] else ""),
            str(e.get("layout", "")),
            (f"{p['s']:.1f} ({_f(p.get('estimated_s'), '{:.1f}')})" if "s" in p else _f(p)),
            (f"{fmt_bytes(peak)} ({fmt_bytes(p.get('estimated_peak_bytes'))})" if "s" in p else ""),
            (f"{fmt_bytes(p.get('ring_buffer_peak_bytes'))} ({fmt_bytes(p.get('estimated_rings_bytes'))})" if "s" in p else ""),
            (f"{100 * p['latency_model_error']:+.1f} %" if p.get("latency_model_error") is not None else ""),
            (f"{o['overhead_pct']:+.2f} %" if "overhead_pct" in o else _f(o)),
            (f"{x['realized']:.2f}x / {x['predicted']:.2f}x ({100 * x['realized_over_predicted']:.0f} %)" if "realized" in x else _f(x)),
            reads or _f(s),
        ]) + " |")
    extra = []
    for name, e in results["configs"].items():
        g = e.get("greedy")
        if g:
            extra.append(f"- {name}: greedy search for 2x: " + (
                f"{g['search_s']:.1f} s ({g['steps']} steps, {g['calib_samples']} calibration samples, "
                f"{g['evaluations']} evaluations; predicted {g['predicted_speedup']:.2f}x)" if "search_s" in g else _f(g)))
        for key in ("compile_default", "compile_reduce_overhead", "compile_mixed_plan"):
            c = e.get(key)
            if c:
                extra.append(f"- {name}: torch.compile {key.replace('compile_', '').replace('_', ' ')}: " + (
                    f"{c['graph_breaks']} graph breaks, {c['unique_graphs']} graphs; compiled plan run {c['compiled_plan_s']:.3f} s "
                    f"vs eager plan {c['eager_plan_s']:.3f} s ({c['speedup_vs_eager_plan']:.2f}x); plan speedup when compiled "
                    f"{c['plan_speedup_compiled']:.2f}x; max abs diff vs eager {c['max_abs_diff_vs_eager']:.2g} "
                    f"(outputs up to {c['max_abs_eager']:.2g}); first run {c['first_run_s']:.1f} s"
                    if "graph_breaks" in c else _f(c)))
        for key in ("estimate", "estimate_one_batch"):
            est = e.get(key)
            if not (isinstance(est, dict) and "memory" in est):
                continue
            m = est["memory"]
            extra.append(
                f"- {name}: dry run, {est['samples']} samples in micro-batches of {est['batch']}, {est['lags']} lags, "
                f"{est['steps']} steps: {est['calls']['total']} model calls, est. {_f(est['time_s'].get('total'), '{:.1f}')} s; "
                f"ring buffers {fmt_bytes(m['rings'])}, activations {fmt_bytes(m['activations'])}, peak {fmt_bytes(m['peak'])} "
                f"of {fmt_bytes(est['available'])} available; fits: {est['fits']}" + (f" (fix: {', '.join(est['fixes'])})" if est["fixes"] else ""))
    if extra:
        lines += ["", *extra]
    lines += ["", "Figures of a reduced (CPU) run describe that run only: widths and depths are cut, and a shared CPU is noisy."
              if env["reduced"] else "Random weights: speed and memory only.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default="all", help=f"comma-separated, or all: {', '.join(CONFIGS)}")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds; the run stops cleanly within it")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for scale-<device>.json/.md")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps per run (default 10 on a GPU, 4 on a CPU)")
    ap.add_argument("--samples", type=int, default=2, help="calibration samples of the profile (micro-batch 1)")
    ap.add_argument("--lags", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved timed runs per figure (default 5 GPU, 3 CPU)")
    ap.add_argument("--run-repeats", type=int, default=None, help="timing rounds of the profile's cost pass (default 2 GPU, 1 CPU)")
    ap.add_argument("--greedy", default="dit-xl-2-256", help="configs to run the greedy search on (comma-separated)")
    ap.add_argument("--greedy-samples", type=int, default=None, help="calibration samples of the greedy search (default 8 GPU, 2 CPU)")
    ap.add_argument("--compile", default="dit-xl-2-256", help="configs to run the torch.compile checks on ('' for none)")
    ap.add_argument("--reserve", type=float, default=0.35,
                    help="share of --time-limit kept for the greedy search and torch.compile after every config's "
                         "core measurements (default 0.35; 0 when neither is asked for)")
    ap.add_argument("--reduced", action=argparse.BooleanOptionalAction, default=None,
                    help="reduced widths and depths (default: on a CPU only)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="model dtype (default bfloat16 on a GPU, float32 on a CPU)")
    ap.add_argument("--greedy-steps", type=int, default=None,
                    help="sampling steps of the greedy search (default 50 on a GPU: DiT-XL/2's; --steps on a CPU); "
                         "other than --steps it profiles again at those steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    ap.add_argument("--only", choices=("estimate",), default=None,
                    help="estimate: build each config and run only the dry-run estimate (cheap; full-size configs on a CPU)")
    ap.add_argument("--tag", default="", help="suffix of the results files: scale-<device>-<tag>.json/.md")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failed measurements")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.steps = args.steps or (10 if cuda else 4)
    args.repeats = args.repeats or (5 if cuda else 3)
    args.run_repeats = args.run_repeats or (2 if cuda else 1)
    args.greedy_samples = args.greedy_samples or (8 if cuda else 2)
    args.greedy_steps = args.greedy_steps or (50 if cuda else args.steps)
    if args.steps < 3:
        print("--steps must be at least 3 (the mixed plan needs a forecast step)", file=sys.stderr)
        return 2
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
