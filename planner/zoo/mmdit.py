"""`digits-mmdit`: a small text-to-image MMDiT (diffusers' Flux) trained by the project on sklearn's digits.

Why it exists: digits-dit is class-conditional, so nothing in it depends on text. This model is
sampled through diffusers' own ``FluxPipeline`` with prompt strings ("a thick seven, slanted
right"), through real tokenizers and text encoders, so that cache plans meet a joint-attention
transformer whose output depends on the prompt. Everything is built here from tiny configs; the
weights it produced ship in ``planner/zoo/weights/digits-mmdit``.

The parts, all stock diffusers / transformers classes:

* ``tokenizer``: a ``CLIPTokenizer`` (byte-level BPE) whose merges are learned from the caption
  vocabulary, so every caption word is one token; an unseen word splits into pieces it knows,
  unseen characters become ``<|unk|>``.
* ``tokenizer_2``: a ``T5Tokenizer`` (Unigram) whose pieces are the caption words; any unseen word
  is ``<unk>``.
* ``text_encoder`` (``CLIPTextModel``, pooled output) and ``text_encoder_2`` (``T5EncoderModel``,
  per-token output), tiny, trained together with the transformer.
* ``transformer``: ``FluxTransformer2DModel`` with double-stream (MMDiT) and single-stream blocks,
  no guidance embedding: CFG is FluxPipeline's true CFG with the negative prompt ``""``.
* ``vae``: an ``AutoencoderKL`` with one level (scale factor 1) trained to be the identity: the
  diffusion runs in pixel space, normalised by the VAE's ``shift_factor`` / ``scaling_factor``.
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (rectified flow, no shift).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from planner.zoo import captions as cap

WEIGHTS_DIR = Path(__file__).parent / "weights" / "digits-mmdit"
IMAGE_SIZE = 8
# Text tokens per prompt. FluxPipeline's default (512) would pad every prompt to 512 tokens: pass
# this as ``max_sequence_length`` (``pipeline_call_kwargs`` does). Captions have at most 13 tokens.
MAX_SEQUENCE_LENGTH = 16
DEFAULT_STEPS = 28  # FluxPipeline's own default
DEFAULT_GUIDANCE = 4.0  # true CFG scale against the empty prompt

# Special tokens of the CLIP tokenizer; a separate <|unk|>: CLIP's default unk is its EOS, which
# would move the pooled (first-EOS) position onto an unknown word.
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>", "<|pad|>")
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's fixed ids 0, 1, 2


@dataclass
class Architecture:
    """Sizes of the transformer, text encoders and VAE (the shipped model uses the defaults)."""

    double_layers: int = 2
    single_layers: int = 4
    heads: int = 2
    head_dim: int = 32
    rope_axes: tuple[int, int, int] = (8, 12, 12)  # (text/unused, row, column); sums to head_dim
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    vae_channels: int = 16


@dataclass
class TrainConfig:
    """The recipe that produced the shipped weights (see the model card)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # captions replaced by "" (the negative prompt of true CFG)
    unknown_word_prob: float = 0.05  # a made-up word inserted, so unknown tokens learn to mean nothing
    timestep_sampling: str = "logit-normal"  # or "uniform"
    vae_steps: int = 800
    vae_lr: float = 2e-3
    seed: int = 0
    architecture: Architecture = field(default_factory=Architecture)


# --- tokenizers ----------------------------------------------------------------------------------


def _learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word one symbol; ties go to the smallest pair, so runs agree.

    (``tokenizers``' BpeTrainer breaks count ties in hash order, which changes token ids from run
    to run and with them the trained embeddings.)
    """
    symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in symbols.values():
            for pair in itertools.pairwise(s):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, s in symbols.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            symbols[w] = tuple(out)


def build_tokenizers(vocabulary: list[str] | None = None):
    """``(CLIPTokenizer, T5Tokenizer)`` built offline from the caption vocabulary; deterministic.

    Every caption word is one token in both. CLIP's normaliser lower-cases the prompt; T5's pieces
    are cased, so they include the capitalised form of each word, as a cased sentencepiece
    vocabulary would.
    """
    from transformers import CLIPTokenizer, T5Tokenizer

    words = vocabulary or cap.caption_vocabulary()
    merges = _learn_bpe_merges(words)
    chars = sorted({c for w in words for c in w[:-1]} | {w[-1] + "</w>" for w in words} | {c for w in words for c in w})
    merged = [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*_CLIP_SPECIALS, *chars, *merged]))}
    clip = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=_CLIP_SPECIALS[0],
        eos_token=_CLIP_SPECIALS[1],
        unk_token=_CLIP_SPECIALS[2],
        pad_token=_CLIP_SPECIALS[3],
        model_max_length=MAX_SEQUENCE_LENGTH,
    )
    pieces = [(s, 0.0) for s in _T5_SPECIALS]
    pieces += [("\u2581" + w, -1.0) for w in words if w.isalnum()]
    pieces += [("\u2581" + w.capitalize(), -1.0) for w in words if w.isalpha()]
    pieces += [(p, -1.0) for w in words if not w.isalnum() for p in (w, "\u2581" + w)]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
    return clip, t5


# --- components ----------------------------------------------------------------------------------


def _text_encoders(arch: Architecture, clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=arch.text_width,
            intermediate_size=2 * arch.text_width,
            projection_dim=arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,  # pooled output: the first EOS
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=arch.text_width,
            d_kv=arch.text_width // arch.text_heads,
            d_ff=2 * arch.text_width,
            num_layers=arch.text_layers,
            num_heads=arch.text_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=MAX_SEQUENCE_LENGTH,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    return clip, t5


def _transformer(arch: Architecture):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # one latent channel packed 2x2 by FluxPipeline
        num_layers=arch.double_layers,
        num_single_layers=arch.single_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        joint_attention_dim=arch.text_width,
        pooled_projection_dim=arch.text_width,
        guidance_embeds=False,  # true CFG, not guidance distillation
        axes_dims_rope=arch.rope_axes,
    )


def _vae(arch: Architecture, shift: float, scale: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(arch.vae_channels,),  # one level: vae_scale_factor 1
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scale,
        shift_factor=shift,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # 16 image tokens: no resolution-dependent shift (FluxPipeline passes mu; it is ignored).
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def pipeline_call_kwargs(steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int | None = None) -> dict:
    """FluxPipeline keyword arguments of the default sampler: 8x8 images, 16 text tokens, true CFG.

    ``guidance > 1`` adds ``negative_prompt=""`` and ``true_cfg_scale=guidance`` (two transformer
    calls per step, cond then uncond); otherwise one call per step, no guidance. With
    ``batch_size`` the negative prompt is a list of that many ``""`` (the uncond call then gets
    a full batch of text embeddings; a single ``""`` gives one row that broadcasts, same images).
    """
    kwargs = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "num_inference_steps": int(steps),
    }
    if guidance > 1:
        kwargs.update(negative_prompt="" if batch_size is None else [""] * batch_size, true_cfg_scale=float(guidance))
    return kwargs


def load_digits_mmdit_pipeline(path: str | Path | None = None):
    """The shipped (or a given) digits-mmdit folder as a diffusers ``FluxPipeline``: eval mode, float32, CPU."""
    from planner.zoo.fixtures import quiet_hf_logging

    # "Loading pipeline components", and at import transformers' notes on missing torchvision, are
    # noise for a small model
    with quiet_hf_logging():
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(path or WEIGHTS_DIR))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- training ------------------------------------------------------------------------------------


def _train_identity_vae(vae, pixels: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> dict:
    """Make the VAE the identity on pixels: encoder mean = image, decoder(u) = u near the data.

    The decoder also sees noisy images: the sampler's output is never exactly on the data.
    """
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    for step in range(cfg.vae_steps):
        x = pixels[torch.randint(0, len(pixels), (cfg.batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        sigma = 0.3 * torch.rand(cfg.batch_size, 1, 1, 1, generator=gen)
        u = x + sigma * torch.randn(x.shape, generator=gen)
        loss = (
            F.mse_loss(posterior.mean, x)
            + 1e-3 * F.mse_loss(posterior.logvar, torch.full_like(posterior.logvar, -10.0))
            + F.mse_loss(vae.decode(u).sample, u)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    from planner.metrics import psnr

    return {"vae_reconstruction_psnr_db": round(psnr((recon + 1) / 2, (pixels + 1) / 2), 2), "vae_final_loss": loss.item()}


def _sample_sigmas(n: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "uniform":
        return torch.rand(n, generator=gen)
    if cfg.timestep_sampling == "logit-normal":  # SD3's choice: most weight on the middle noise levels
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}: use 'uniform' or 'logit-normal'")


def _unknown_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))


class _CaptionSampler:
    """Fresh captions for image indices: a random phrasing of the digit and its measured attributes."""

    def __init__(self, labels: torch.Tensor, levels: dict[str, np.ndarray], cfg: TrainConfig, clip_tok):
        self.labels, self.levels, self.cfg, self.clip_tok = labels.tolist(), levels, cfg, clip_tok
        self.rng = random.Random(cfg.seed)

    def __call__(self, indices: list[int], drop: list[bool]) -> list[str]:
        out = []
        for i, dropped in zip(indices, drop):
            text = cap.make_caption(self.labels[i], {a: int(v[i]) for a, v in self.levels.items()}, self.rng)
            if self.rng.random() < self.cfg.unknown_word_prob:
                words = text.split(" ")
                words.insert(self.rng.randint(0, len(words)), _unknown_word(self.rng))
                noisy = " ".join(words)
                # Only where CLIP's pieces of the made-up word still fit: no truncation in training.
                if len(self.clip_tok.backend_tokenizer.encode(noisy).ids) <= MAX_SEQUENCE_LENGTH:
                    text = noisy
            out.append("" if dropped else text)
        return out


def train_digits_mmdit(cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True):
    """Train digits-mmdit from scratch; deterministic for a given ``cfg`` and thread count.

    First the identity VAE, then transformer and both text encoders together with the rectified
    flow loss (velocity ``noise - x0`` at ``x_t = (1 - sigma) x0 + sigma noise``), captions drawn
    afresh each step and replaced by ``""`` with ``cfg.caption_dropout``. Returns the pipeline
    with the EMA weights and a record (loss curve, wall time, ...); with ``out_dir`` it is saved
    there (``save_digits_mmdit``).
    """
    from diffusers import FluxPipeline
    from tqdm.auto import tqdm

    from planner.zoo.digits import load_digits_data, warmup_cosine
    from planner.zoo.fixtures import quiet_hf_logging

    arch = cfg.architecture
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pixels, labels = load_digits_data()  # [-1, 1]
    levels = cap.attribute_levels((pixels + 1) / 2, labels)
    # Latent normalisation: zero mean, unit variance over all pixels of the data set.
    shift, scale = round(pixels.mean().item(), 4), round(1 / pixels.std().item(), 4)

    start, cpu_start = time.perf_counter(), time.process_time()
    with quiet_hf_logging():
        clip_tok, t5_tok = build_tokenizers()
        clip, t5 = _text_encoders(arch, clip_tok, t5_tok)
    transformer = _transformer(arch)
    vae = _vae(arch, shift, scale)
    vae_record = _train_identity_vae(vae, pixels, cfg, gen)
    vae_wall = time.perf_counter() - start

    pipe = FluxPipeline(
        scheduler=_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    modules = [transformer, clip, t5]
    for m in modules:
        m.train()
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps))

    latents = FluxPipeline._pack_latents((pixels - shift) * scale, len(pixels), 1, IMAGE_SIZE, IMAGE_SIZE)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, IMAGE_SIZE // 2, IMAGE_SIZE // 2, "cpu", torch.float32)
    draw_captions = _CaptionSampler(labels, levels, cfg, clip_tok)

    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train digits-mmdit", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout).tolist()
        prompts = draw_captions(idx.tolist(), drop)
        # The pipeline's own text path, so that training and sampling encode prompts alike.
        prompt_embeds, pooled, txt_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
        x0 = latents[idx]
        sigma = _sample_sigmas(cfg.batch_size, cfg, gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = transformer(
            hidden_states=xt, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for ema, m in zip(emas, modules):
                for p_ema, p in zip(ema.parameters(), m.parameters()):
                    p_ema.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    wall = time.perf_counter() - start

    pipe = FluxPipeline(
        scheduler=_scheduler(), vae=vae, text_encoder=emas[1], tokenizer=clip_tok,
        text_encoder_2=emas[2], tokenizer_2=t5_tok, transformer=emas[0],
    )
    pipe.set_progress_bar_config(disable=True)
    record = {
        "train_config": asdict(cfg),
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(time.process_time() - cpu_start, 1),
        "vae_wall_time_s": round(vae_wall, 1),
        "threads": torch.get_num_threads(),
        "load_average_at_end": _load_average(),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "latent_shift": shift,
        "latent_scale": scale,
        **vae_record,
        "losses": losses,
    }
    if out_dir is not None:
        save_digits_mmdit(pipe, record, out_dir)
    return pipe, record


def _load_average() -> list[float] | None:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- saving --------------------------------------------------------------------------------------


def save_digits_mmdit(pipe, record: dict, out_dir: str | Path, quality: dict | None = None) -> Path:
    """Write the pipeline folder (safetensors), ``loss_curve.csv``, ``train_record.json`` and ``MODEL_CARD.md``.

    The whole folder is written next to ``out_dir`` and swapped in at the end, so an interrupted
    save leaves the old model (or nothing), never half of one.
    """
    from planner.io import atomic_folder, write_json_atomic, write_text_atomic
    from planner.zoo.digits import loss_curve_csv

    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.rglob("*"):  # diffusers writes weight shards private (0600); the model is meant to be shared
            f.chmod(0o755 if f.is_dir() else 0o644)
        write_text_atomic(tmp / "loss_curve.csv", loss_curve_csv(record["losses"]))
        write_json_atomic(tmp / "train_record.json", {k: v for k, v in record.items() if k != "losses"})
        if quality is not None:
            write_json_atomic(tmp / "quality.json", quality)
        write_text_atomic(tmp / "MODEL_CARD.md", model_card(pipe, record, quality))
    return Path(out_dir)


def update_model_card(folder: str | Path, quality: dict) -> Path:
    """Store ``quality`` (a ``benchmarks/mmdit_quality.py`` result) in the folder and rewrite its model card."""
    from planner.io import write_json_atomic, write_text_atomic

    folder = Path(folder)
    record = json.loads((folder / "train_record.json").read_text())
    record["losses"] = [float(line.split(",")[1]) for line in (folder / "loss_curve.csv").read_text().splitlines()[1:]]
    pipe = load_digits_mmdit_pipeline(folder)
    write_json_atomic(folder / "quality.json", quality)
    return write_text_atomic(folder / "MODEL_CARD.md", model_card(pipe, record, quality))


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _repeat(quality: dict) -> str:
    r = quality.get("repeat_comparison")
    if r is None:
        return "not measured"
    return f"{r['images']} images, {r['steps']} steps, guidance {r['guidance']}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}"


def _quality_table(quality: dict) -> str:
    rows = [
        "| steps | guidance | digit accuracy | thickness acc. (chance) / rho | slant acc. (chance) / rho | size acc. (chance) / rho | Frechet | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in quality["runs"]:
        a = run["adherence"]["attributes"]
        cells = [
            f"{a[n]['accuracy']:.3f} ({a[n]['chance']:.3f}) / {a[n]['spearman']:.2f}" if n in a else "-"
            for n in cap.ATTRIBUTES
        ]
        rows.append(
            f"| {run['steps']} | {run['guidance']} | {run['adherence']['digit_accuracy']:.3f} | "
            + " | ".join(cells)
            + f" | {run['frechet_distance']:.1f} | {run['seconds_per_image']:.4f} |"
        )
    return "\n".join(rows)


def model_card(pipe, record: dict, quality: dict | None = None) -> str:
    """The MODEL_CARD.md text: architecture, data, captions, recipe, wall time and measured quality."""
    import diffusers
    import transformers

    import planner

    cfg = record["train_config"]
    arch = cfg["architecture"]
    losses = record["losses"]
    checkpoints = [0, 99, 499, 999, 1999, 2999, len(losses) - 1]
    curve = "\n".join(
        f"| {i + 1} | {np.mean(losses[max(0, i - 49): i + 1]):.4f} |" for i in sorted(set(checkpoints)) if i < len(losses)
    )
    sizes = {name: _n_params(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    total = sum(sizes.values())
    size_line = ", ".join(f"{k} {v:,}" for k, v in sizes.items())
    levels = "; ".join(f"{a}: " + " / ".join(cap.LEVEL_NAMES[a]) for a in cap.ATTRIBUTES)
    layers = f"{arch['text_layers']} layer" + ("s" if arch["text_layers"] != 1 else "")
    cpu = f", CPU time {record['cpu_time_s']} s" if "cpu_time_s" in record else ""
    if quality is None:
        quality_text = "Not measured yet: run `python benchmarks/mmdit_quality.py --card`."
    else:
        quality_text = f"""Measured by `{quality['command']}` ({quality['prompts']} prompts: every digit x every
thickness x slant x size combination, phrased at random; seeds {quality['seeds']}; {quality['threads']} CPU
thread(s); timings on a shared machine, the load averages are in `quality.json`). Digit accuracy: the project's digit classifier against the prompt's digit. Attributes:
accuracy of the level measured from the image against the level asked for (chance: the accuracy if
they were independent, from the two marginals; 1/3 for thickness and slant, 1/2 for size when
balanced) and Spearman rho between the asked level and the measured value (z-scored within the
class). Frechet: distance of classifier features to the 1797 real digits
(the floor at this sample size is {quality['frechet_floor']:.1f}: that of {quality['prompts']} real digits).

{_quality_table(quality)}

Same seeds, 28 against 50 steps (guidance {quality['steps_comparison']['guidance']}): PSNR
{quality['steps_comparison']['psnr']:.2f} dB, SSIM {quality['steps_comparison']['ssim']:.4f}. A repeated run against the first
(the uncached reference of a cache plan; {_repeat(quality)}).
Unconditional (prompt `""`, guidance 1): the classifier's digit histogram is
{quality['unconditional_digit_histogram']}."""
    return f"""# digits-mmdit

A small text-to-image MMDiT (diffusers `FluxTransformer2DModel`: double-stream joint-attention
blocks, then single-stream blocks) trained by this project on scikit-learn's bundled digits, with
captions written from each image. It is sampled through diffusers' own `FluxPipeline` with prompt
strings, so its output depends on real text through real tokenizers and text encoders.

```python
from planner.zoo.mmdit import load_digits_mmdit_pipeline
pipe = load_digits_mmdit_pipeline()          # = FluxPipeline.from_pretrained(this folder)
images = pipe(prompt=["a thick seven, slanted right", "the digit 3"], negative_prompt="", true_cfg_scale={DEFAULT_GUIDANCE},
              height={IMAGE_SIZE}, width={IMAGE_SIZE}, max_sequence_length={MAX_SEQUENCE_LENGTH}, num_inference_steps={DEFAULT_STEPS},
              output_type="pt").images   # [2, 1, 8, 8] in [0, 1]
```

`height`, `width` and `max_sequence_length` must be passed (FluxPipeline's defaults are 128x128
pixels and 512 text tokens). `guidance_scale` is not used (no guidance embedding): CFG is true CFG,
`negative_prompt=""` with `true_cfg_scale > 1` (two transformer calls per step, cond then uncond).
Without a negative prompt a step is one call, unguided. The empty prompt is the unconditional branch.

| | |
|---|---|
| transformer | `FluxTransformer2DModel`: {arch['double_layers']} double + {arch['single_layers']} single blocks, {arch['heads']} heads x {arch['head_dim']}, RoPE axes {tuple(arch['rope_axes'])}, patch 1 on 1 latent channel packed 2x2 (16 image tokens), no guidance embedding |
| text | `tokenizer`: `CLIPTokenizer` (BPE learned from the caption vocabulary, every caption word one token; unseen words split into known pieces, unseen characters `<\\|unk\\|>`); `text_encoder`: `CLIPTextModel` {layers} x width {arch['text_width']} (pooled output); `tokenizer_2`: `T5Tokenizer` (Unigram over the caption words and their capitalised forms; unseen words `<unk>`); `text_encoder_2`: `T5EncoderModel` {layers} x width {arch['text_width']} ({MAX_SEQUENCE_LENGTH} tokens) |
| vae | `AutoencoderKL`, one level ({arch['vae_channels']} channels, scale factor 1, 1 latent channel), trained {cfg['vae_steps']} steps to be the identity on pixels (reconstruction PSNR {record['vae_reconstruction_psnr_db']} dB on the data); latents = (pixels in [-1, 1] - shift_factor) x scaling_factor, shift_factor {record['latent_shift']}, scaling_factor {record['latent_scale']} (zero mean, unit variance on the data) |
| parameters | {total:,} ({total * 4 / 2**20:.1f} MiB fp32): {size_line} |
| data | `sklearn.datasets.load_digits`: 1797 grey 8x8 images, 10 classes |
| captions | drawn afresh for every sample: the digit as a word or numeral in one of several phrasings, each measured attribute named with p=0.6 (levels binned within the digit's class on the real data: {levels}); e.g. "a thick, upright seven", "the digit 3, thin and slanted left", "number two, small"; first letter capitalised with p=0.2; a made-up word inserted with p={cfg['unknown_word_prob']}; replaced by "" with p={cfg['caption_dropout']} (CFG) |
| objective | rectified flow: velocity `noise - x0` at `x_t = (1 - s) x0 + s noise`, s {cfg['timestep_sampling']}; transformer and both text encoders trained together |
| optimiser | AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}, {cfg['warmup_steps']} warm-up steps then cosine decay, batch {cfg['batch_size']} |
| steps | {cfg['steps']}, EMA decay {cfg['ema_decay']} (the EMA weights of transformer and text encoders are shipped) |
| seed | {cfg['seed']} (training is deterministic for a given thread count) |
| wall time | {record['wall_time_s']} s on {record['threads']} CPU threads{cpu}, VAE included ({record['vae_wall_time_s']} s); load average at the end {record['load_average_at_end']} on 2 cores: the machine was shared, so this is an upper bound |
| final loss | {record['final_loss_mean_last_100']:.4f} (mean of the last 100 steps) |
| sampler | `FlowMatchEulerDiscreteScheduler`, shift 1, {DEFAULT_STEPS} steps, true CFG {DEFAULT_GUIDANCE} against "" |
| versions | planner {planner.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__} |

## Quality

{quality_text}

## Loss

Mean of the 50 steps up to the step shown; the whole curve is `loss_curve.csv`.

| step | loss |
|---|---|
{curve}

Rebuild with `OMP_WAIT_POLICY=PASSIVE planner zoo train digits-mmdit --threads 2` (that is
`train_digits_mmdit(TrainConfig(), out_dir)` under `torch.set_num_threads(2)`; the passive wait
policy only matters on a busy machine, where spinning OpenMP threads slow training many times
over), then `python benchmarks/mmdit_quality.py --card`.
"""
