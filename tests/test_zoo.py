"""digits-dit: its pipeline, its shipped weights, and the training recipe that rebuilds them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from planner.runner import Runner, Sampler, load_runner
from planner.zoo.digits import (
    WEIGHTS_DIR,
    DigitsDiTPipeline,
    DigitsFamily,
    TrainConfig,
    load_digits_pipeline,
    train_digits_dit,
)


@pytest.fixture(scope="module")
def pipe():
    return load_digits_pipeline()


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_shipped_weights_are_small_and_deep_enough():
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20
    config = json.loads((WEIGHTS_DIR / "transformer" / "config.json").read_text())
    assert config["num_layers"] >= 8
    assert (WEIGHTS_DIR / "MODEL_CARD.md").read_text().count("wall time") == 1
    assert not any(WEIGHTS_DIR.rglob("*.bin")), "weights must be safetensors"


def test_shipped_model_draws_digits_the_classifier_recognises():
    from planner.metrics import digit_accuracy

    runner = load_runner("digits-dit")
    conditions = runner.conditions(20)
    images = runner.run(conditions, list(range(20)), Sampler("ddim", 20, 3.0))
    assert digit_accuracy(images, conditions) >= 0.9


def test_output_types(pipe):
    kw = dict(class_labels=[3, 5], num_inference_steps=3, guidance_scale=3.0)
    pt = pipe(**kw, generator=_gens([0, 1]), output_type="pt").images
    assert pt.shape == (2, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    npy = pipe(**kw, generator=_gens([0, 1]), output_type="np").images
    assert npy.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(npy[..., 0], pt[:, 0].numpy(), atol=1e-6)
    pil = pipe(**kw, generator=_gens([0, 1]), output_type="pil").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    latent = pipe(**kw, generator=_gens([0, 1]), output_type="latent").images
    torch.testing.assert_close((latent / 2 + 0.5).clamp(0, 1), pt)


def test_cfg_uses_the_null_class_and_guidance_changes_the_output(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        guided = pipe([4], num_inference_steps=2, guidance_scale=3.0, generator=_gens([0]), output_type="pt").images
        plain = pipe([4], num_inference_steps=2, guidance_scale=1.0, generator=_gens([0]), output_type="pt").images
    finally:
        handle.remove()
    assert seen[0] == [4, 10] and seen[-1] == [4]
    assert not torch.equal(guided, plain)


def test_bad_labels_are_refused(pipe):
    with pytest.raises(ValueError, match="class labels"):
        pipe([10], num_inference_steps=1)


def test_other_schedulers_work(pipe):
    runner = Runner(pipe, DigitsFamily(), "digits-dit")
    for name in ("dpm", "euler"):
        out = runner.run([1, 7], [0, 1], Sampler(name, 8, 3.0))
        assert torch.isfinite(out).all() and out.std() > 0.05


def test_save_and_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    again = DigitsDiTPipeline.from_pretrained(tmp_path)
    kw = dict(class_labels=[2], num_inference_steps=3, output_type="pt")
    assert torch.equal(pipe(**kw, generator=_gens([5])).images, again(**kw, generator=_gens([5])).images)


@pytest.mark.slow  # a training: CI runs it (pytest --slow)
def test_training_lowers_the_loss_writes_a_model_and_is_deterministic(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=32, warmup_steps=5)
    pipe, record = train_digits_dit(cfg, out_dir=tmp_path / "m", progress=False)
    losses = record["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model_index.json", "transformer", "scheduler", "MODEL_CARD.md", "loss_curve.csv"}
    assert len((tmp_path / "m" / "loss_curve.csv").read_text().splitlines()) == 41
    reloaded = load_digits_pipeline(tmp_path / "m")
    assert not reloaded.transformer.training
    for a, b in zip(reloaded.transformer.parameters(), pipe.transformer.parameters()):
        assert torch.equal(a, b)
    _, again = train_digits_dit(TrainConfig(steps=3, batch_size=8), progress=False)
    _, third = train_digits_dit(TrainConfig(steps=3, batch_size=8), progress=False)
    assert again["losses"] == third["losses"]


@pytest.mark.parametrize("name", ["digits-dit-wide", "digits-dit-deep"])
def test_the_suite_models_ship_with_their_architecture_and_draw_digits(name):
    from planner.metrics import digit_accuracy
    from planner.zoo.digits import ARCHITECTURES, WEIGHTS_ROOT

    config = json.loads((WEIGHTS_ROOT / name / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in ARCHITECTURES[name]} == ARCHITECTURES[name]
    assert f"# {name}" in (WEIGHTS_ROOT / name / "MODEL_CARD.md").read_text()
    runner = load_runner(name)
    labels = list(range(10))
    images = runner.run(labels, list(range(10)), Sampler("ddim", 20, 3.0))
    assert digit_accuracy(images, labels) >= 0.8
    assert runner.meter(images, labels)["accuracy"] == digit_accuracy(images, labels)


def test_zoo_train_builds_the_named_shape(tmp_path):
    from planner.cli import main

    out = tmp_path / "deep"
    assert main(["zoo", "train", "digits-dit-deep", "--steps", "2", "--out", str(out), "--json"]) == 0
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["patch_size"]) == (12, 2)
    assert load_runner(str(out)).family.name == "digits"
