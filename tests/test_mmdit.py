"""digits-mmdit: captions and their meter, tokenizers, the shipped FluxPipeline folder, the training recipe."""

import json
import random

import numpy as np
import pytest
import torch

from planner.zoo import captions as cap
from planner.zoo.mmdit import (
    MAX_SEQUENCE_LENGTH,
    WEIGHTS_DIR,
    Architecture,
    TrainConfig,
    build_tokenizers,
    load_digits_mmdit_pipeline,
    pipeline_call_kwargs,
    train_digits_mmdit,
)

TORCH_THREADS = 2


@pytest.fixture(scope="module")
def real():
    from planner.zoo.digits import load_digits_data

    images, labels = load_digits_data()
    return (images + 1) / 2, labels


@pytest.fixture(scope="module")
def pipe():
    return load_digits_mmdit_pipeline()


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- captions ------------------------------------------------------------------------------------


def _stroke(width: int, shear: float) -> torch.Tensor:
    """A vertical bar ``width`` pixels wide whose column moves ``shear`` pixels right per row upwards."""
    img = torch.zeros(1, 1, 8, 8)
    for row in range(8):
        col = int(round(3 + shear * (3.5 - row)))
        img[0, 0, row, col : col + width] = 1.0
    return img


def test_attributes_of_drawn_strokes():
    thin, thick = cap.measure_attributes(_stroke(1, 0.0)), cap.measure_attributes(_stroke(2, 0.0))
    assert thick["thickness"][0] == 2 * thin["thickness"][0]
    assert abs(thin["slant"][0]) < 1e-9
    right, left = cap.measure_attributes(_stroke(1, 0.5)), cap.measure_attributes(_stroke(1, -0.5))
    assert right["slant"][0] > 0.3 and left["slant"][0] < -0.3
    assert thick["size"][0] > thin["size"][0]
    blank = cap.measure_attributes(torch.zeros(2, 1, 8, 8))
    assert all(np.all(v == 0) for v in blank.values())


def test_levels_on_real_digits_split_each_class_evenly_and_order_the_ink(real):
    images, labels = real
    levels = cap.attribute_levels(images, labels)
    values = cap.measure_attributes(images)
    for name in cap.ATTRIBUTES:
        n = len(cap.LEVEL_WORDS[name])
        for d in range(10):
            share = np.bincount(levels[name][labels.numpy() == d], minlength=n) / (labels == d).sum().item()
            np.testing.assert_allclose(share, 1 / n, atol=0.03)
        means = [values[name][levels[name] == k].mean() for k in range(n)]
        assert means == sorted(means), (name, means)


def test_captions_name_the_digit_and_round_trip_through_the_parser():
    rng = random.Random(0)
    seen_numeral = seen_word = 0
    for _ in range(500):
        digit = rng.randrange(10)
        levels = {"thickness": rng.randrange(3), "slant": rng.randrange(3), "size": rng.randrange(2)}
        text = cap.make_caption(digit, levels, rng)
        parsed = cap.parse_prompt(text)
        assert parsed.digit == digit, text
        assert parsed.levels == {k: levels[k] for k in parsed.levels}, text
        assert set(cap.split_words(text)) <= set(cap.caption_vocabulary()), text
        seen_numeral += str(digit) in text
        seen_word += cap.DIGIT_WORDS[digit] in text.lower()
    assert seen_numeral > 100 and seen_word > 100


@pytest.mark.parametrize(
    "prompt, digit, levels",
    [
        ("A THICK Seven, leaning RIGHT.", 7, {"thickness": 2, "slant": 2}),
        ("the number 3 with thin strokes", 3, {"thickness": 0}),
        ("an upright, big eight", 8, {"slant": 1, "size": 1}),  # "upright" is not "right"
        ("small 0 slanted to the left", 0, {"size": 0, "slant": 0}),
        ("a zebra", None, {}),
        ("", None, {}),
    ],
)
def test_parse_prompt(prompt, digit, levels):
    parsed = cap.parse_prompt(prompt)
    assert parsed.digit == digit and parsed.levels == levels


def test_adherence_meter_is_perfect_on_own_captions_and_near_chance_on_shuffled_ones(real):
    images, labels = real
    images, labels = images[:600], labels[:600]
    levels = cap.attribute_levels(images, labels)
    every = cap.CaptionConfig(attribute_prob=1.0)
    rng = random.Random(1)
    prompts = [
        cap.make_caption(int(d), {a: int(v[i]) for a, v in levels.items()}, rng, every) for i, d in enumerate(labels)
    ]
    own = cap.prompt_adherence(images, prompts)
    assert own["digit_accuracy"] > 0.97
    for name, a in own["attributes"].items():
        assert a["accuracy"] == 1.0 and a["spearman"] > 0.8, name
    # Same digits, attributes of other images: accuracy falls to chance.
    perm = np.random.default_rng(0).permutation(len(labels))
    shuffled = [
        cap.make_caption(int(d), {a: int(v[perm[i]]) for a, v in levels.items()}, rng, every)
        for i, d in enumerate(labels)
    ]
    other = cap.prompt_adherence(images, shuffled)
    for name, a in other["attributes"].items():
        assert abs(a["accuracy"] - a["chance"]) < 0.08 and abs(a["spearman"]) < 0.15, name


def test_evaluation_prompts_cover_every_digit_and_level():
    prompts = cap.evaluation_prompts()
    parsed = [cap.parse_prompt(p) for p in prompts]
    assert len(prompts) == 180 and len(set(prompts)) > 170
    assert sorted({p.digit for p in parsed}) == list(range(10))
    for name in cap.ATTRIBUTES:
        counts = np.bincount([p.levels[name] for p in parsed])
        assert len(set(counts)) == 1, (name, counts)


# --- tokenizers ----------------------------------------------------------------------------------


def test_tokenizers_are_deterministic_and_keep_caption_words_whole():
    clip_a, t5_a = build_tokenizers()
    clip_b, t5_b = build_tokenizers()
    assert clip_a.get_vocab() == clip_b.get_vocab() and t5_a.get_vocab() == t5_b.get_vocab()
    for word in cap.caption_vocabulary():
        assert len(clip_a(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5_a(word, add_special_tokens=False).input_ids) == 1, word


def test_unknown_words_become_unknown_tokens_not_errors(pipe):
    t5, clip = pipe.tokenizer_2, pipe.tokenizer
    ids = t5("a thick zebra seven").input_ids
    assert ids.count(t5.unk_token_id) == 1 and t5.convert_ids_to_tokens(ids[-2]) == "\u2581seven"
    ids = clip("a thick sëven!").input_ids  # characters outside the vocabulary
    assert clip.unk_token_id in ids and ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    # Over-long prompts are truncated, as the pipeline asks: still one EOS for CLIP's pooled output.
    long = clip("seven " * 40, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True).input_ids
    assert len(long) == MAX_SEQUENCE_LENGTH and long[-1] == clip.eos_token_id


# --- the shipped folder --------------------------------------------------------------------------


def test_shipped_folder_is_small_safetensors_and_documented():
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 16 * 2**20
    assert not any(WEIGHTS_DIR.rglob("*.bin")) and not any(WEIGHTS_DIR.rglob("*.pt")), "weights must be safetensors"
    index = json.loads((WEIGHTS_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    transformer = json.loads((WEIGHTS_DIR / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] >= 1 and transformer["num_single_layers"] >= 1
    card = (WEIGHTS_DIR / "MODEL_CARD.md").read_text()
    assert card.count("wall time") == 1 and "digit accuracy" in card
    quality = json.loads((WEIGHTS_DIR / "quality.json").read_text())
    assert {(r["steps"], r["guidance"]) for r in quality["runs"]} >= {(28, 1.0), (28, 4.0), (50, 4.0)}


def test_shipped_folder_loads_with_from_pretrained_and_draws_from_a_prompt(pipe):
    from diffusers import FluxPipeline

    assert type(pipe) is FluxPipeline and pipe.vae_scale_factor == 1
    out = pipe(prompt="a thick seven", generator=torch.Generator().manual_seed(0), output_type="pt", **pipeline_call_kwargs(4))
    assert out.images.shape == (1, 1, 8, 8)
    assert out.images.min() >= 0 and out.images.max() <= 1
    pil = pipe(prompt=["a thin 1", "zebra"], generator=_gens([0, 1]), output_type="pil", **pipeline_call_kwargs(2, 1.0))
    assert pil.images[0].size == (8, 8) and pil.images[0].mode == "L"


def test_empty_prompt_is_the_unconditional_branch(pipe):
    """True CFG's second call gets the encoding of "" (what training dropped captions to)."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["pooled_projections"])),
        with_kwargs=True,
    )
    try:
        pipe(prompt="a thick seven", generator=torch.Generator().manual_seed(0), output_type="pt", **pipeline_call_kwargs(1, 3.0))
    finally:
        handle.remove()
    assert len(seen) == 2  # one step: cond, then uncond
    empty, empty_pooled, _ = pipe.encode_prompt("", max_sequence_length=MAX_SEQUENCE_LENGTH)
    cond, cond_pooled, _ = pipe.encode_prompt("a thick seven", max_sequence_length=MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(seen[1][0], empty)
    torch.testing.assert_close(seen[1][1], empty_pooled)
    torch.testing.assert_close(seen[0][0], cond)
    assert not torch.allclose(cond_pooled, empty_pooled)


def test_training_drops_captions_to_the_empty_prompt():
    from planner.zoo.mmdit import _CaptionSampler

    labels = torch.tensor([7, 3])
    levels = {"thickness": np.array([2, 0]), "slant": np.array([1, 1]), "size": np.array([0, 1])}
    clip, _ = build_tokenizers()
    draw = _CaptionSampler(labels, levels, TrainConfig(), clip)
    texts = draw([0, 1, 0, 1], [False, False, True, True])
    assert texts[2:] == ["", ""]
    assert cap.parse_prompt(texts[0]).digit == 7 and cap.parse_prompt(texts[1]).digit == 3


# --- slow: training and sampling many images -----------------------------------------------------

_TINY = Architecture(double_layers=1, single_layers=1, heads=1, head_dim=16, rope_axes=(4, 6, 6), text_width=16, text_heads=1, vae_channels=8)


@pytest.mark.slow
def test_short_training_run_is_deterministic(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=8, warmup_steps=1, vae_steps=2, architecture=_TINY, unknown_word_prob=0.5)
    a, rec_a = train_digits_mmdit(cfg, tmp_path / "a", progress=False)
    b, rec_b = train_digits_mmdit(cfg, None, progress=False)
    assert rec_a["losses"] == rec_b["losses"]
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    c, _ = train_digits_mmdit(TrainConfig(**{**cfg.__dict__, "seed": 1}), None, progress=False)
    assert not torch.equal(c.transformer.proj_out.weight, a.transformer.proj_out.weight)
    # The saved folder loads back through FluxPipeline.from_pretrained with the same weights.
    loaded = load_digits_mmdit_pipeline(tmp_path / "a")
    torch.testing.assert_close(loaded.transformer.state_dict(), a.transformer.state_dict())
    assert (tmp_path / "a" / "MODEL_CARD.md").is_file() and (tmp_path / "a" / "loss_curve.csv").is_file()


@pytest.mark.slow
def test_shipped_model_draws_the_prompted_digit(pipe):
    from planner.metrics import digit_accuracy

    prompts = [f"{cap.DIGIT_WORDS[d]}" if i % 2 else f"the digit {d}" for d in range(10) for i in range(4)]
    images = pipe(prompt=prompts, generator=_gens(range(40)), output_type="pt", **pipeline_call_kwargs(28, 4.0)).images
    assert digit_accuracy(images, [d for d in range(10) for _ in range(4)]) >= 0.95


@pytest.mark.slow
def test_shipped_model_follows_thickness_words(pipe):
    seeds = list(range(100, 130))
    digits = [i % 10 for i in range(len(seeds))]
    kw = dict(output_type="pt", **pipeline_call_kwargs(28, 4.0))
    thick = pipe(prompt=[f"a thick {cap.DIGIT_WORDS[d]}" for d in digits], generator=_gens(seeds), **kw).images
    thin = pipe(prompt=[f"a thin {cap.DIGIT_WORDS[d]}" for d in digits], generator=_gens(seeds), **kw).images
    ink_thick = cap.measure_attributes(thick)["thickness"]
    ink_thin = cap.measure_attributes(thin)["thickness"]
    assert (ink_thick > ink_thin).mean() >= 0.8


def test_the_readme_prompt_example_runs_the_committed_plan():
    """The README's digits-mmdit example, as written: the committed 2x plan on prompt strings."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "digits-mmdit-default28" in b)
    code = code.replace('"plans/', f'"{root}/plans/')
    namespace: dict = {"__name__": "readme_mmdit"}
    exec(compile(code.replace("with planner.apply_plan(pipe, plan):", "with planner.apply_plan(pipe, plan) as handle:"),
                 "README.md", "exec", dont_inherit=True), namespace)
    assert len(namespace["images"]) == 2
    assert namespace["handle"].stats()["computed_fraction"] < 0.6  # a 2x plan skips most module calls
