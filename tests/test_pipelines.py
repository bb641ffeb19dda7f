"""Your own pipeline and prompts: prompt files, the shipped prompt sets, prompts encoded once (cached in
memory and on disk, text encoders releasable), and loading from folders, the Hugging Face cache and
``module:function``."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

from planner.errors import PlannerError
from planner.pipelines import prompts as shipped
from planner.pipelines.encoding import PromptEncoder, release_text_encoders
from planner.pipelines.prompts import Prompt, check_held_out_prompts, load_prompts
from planner.runner import Runner, Sampler, load_runner
from planner.seeds import EVAL_SEED_BASE

QUICK = Sampler("default", 2, 4.0)


TORCH_THREADS = 1  # see conftest.py


@pytest.fixture(autouse=True)
def private_embedding_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLANNER_EMBEDDING_CACHE", str(tmp_path / "embeddings"))
    return tmp_path / "embeddings"


# --------------------------------------------------------------------------- prompts


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\na red cat\n\n  a blue dog  \n", encoding="utf-8")
    assert [p.prompt for p in load_prompts(txt)] == ["a red cat", "a blue dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "negative_prompt": "blurry", "seed": 7, "call_args": {"height": 32}}\n'
                     '{"prompt": "a dog"}\n', encoding="utf-8")
    first, second = load_prompts(jsonl)
    assert (first.negative_prompt, first.seed, first.args()) == ("blurry", 7, {"height": 32})
    assert second == Prompt("a dog")
    assert load_prompts(txt).digest != load_prompts(jsonl).digest
    assert load_prompts(txt).digest == load_prompts(txt).digest


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such prompt file"),
    ("empty.txt", "\n# only a comment\n", "no prompts in it"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("p.csv", "a cat", "prompts are a .txt file"),
    ("bad.jsonl", '{"prompt": "a cat"\n', r"bad.jsonl:1: not a JSON object"),
    ("keys.jsonl", '{"prompt": "a cat", "promt": 1}\n', "unknown key 'promt'"),
    ("noprompt.jsonl", '{"negative_prompt": "x"}\n', 'expected an object with a "prompt" string'),
    ("seed.jsonl", '{"prompt": "a", "seed": -1}\n', "seed must be a whole number"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(PlannerError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_shipped_sets_are_disjoint_and_feed_calibration_and_evaluation_seeds():
    calibration, evaluation = shipped.calibration_prompts(), shipped.evaluation_prompts()
    assert len(calibration) >= 30 and len(evaluation) >= 30
    assert not calibration.keys() & evaluation.keys()
    runner = load_runner("tiny:pixart-sigma")
    assert runner.conditions(3, seed=0) == list(calibration.prompts[:3])
    assert runner.conditions(2, seed=EVAL_SEED_BASE) == list(evaluation.prompts[:2])
    check_held_out_prompts(evaluation, calibration.keys())  # no overlap: no error
    with pytest.raises(PlannerError, match="was a calibration prompt of this plan"):
        check_held_out_prompts(calibration.prompts[:2], calibration.keys())
    check_held_out_prompts(calibration.prompts[:2], calibration.keys(), force=True)


def test_a_prompts_own_seed_negative_and_call_args_are_used(tmp_path):
    runner = load_runner("tiny:pixart-sigma")
    plain = runner.run([Prompt("a red cat")], [5], QUICK)
    own_seed = runner.run([Prompt("a red cat", seed=5)], [99], QUICK)
    assert torch.equal(plain, own_seed)
    negative = runner.run([Prompt("a red cat", negative_prompt="blurry")], [5], QUICK)
    assert not torch.allclose(plain, negative)
    tall = runner.run([Prompt("a red cat", call_args=(("height", 32),))], [5], QUICK)
    assert tall.shape[-2] == 32
    with pytest.raises(PlannerError, match="different call_args"):
        runner.run([Prompt("a", call_args=(("height", 32),)), Prompt("b")], [0, 1], QUICK)


# --------------------------------------------------------------------------- encoding


def test_prompts_are_encoded_once_then_read_from_disk(monkeypatch, private_embedding_cache):
    runner = load_runner("tiny:sd3")
    calls = []
    encode = type(runner.pipe).encode_prompt

    @functools.wraps(encode)  # the encoder reads encode_prompt's signature
    def counting(self, *args, **kwargs):
        if kwargs.get("prompt") is not None:  # SD3's __call__ passes given embeddings through it too
            calls.append(kwargs["prompt"])
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(type(runner.pipe), "encode_prompt", counting)
    conditions = runner.conditions(3)
    first = runner.run(conditions, [0, 1, 2], QUICK)
    runner.run(conditions, [0, 1, 2], QUICK)
    assert len(calls) == 3  # one encode per prompt, then memory
    assert len(list(private_embedding_cache.rglob("*.safetensors"))) == 3
    again = load_runner("tiny:sd3")  # a new process would be the same: the disk cache answers
    again.prepare(conditions, release=True)
    assert again.pipe.text_encoder is None and again.pipe.text_encoder_3 is None
    assert torch.equal(again.run(conditions, [0, 1, 2], QUICK), first)
    assert len(calls) == 3
    with pytest.raises(PlannerError, match="text encoders were released"):
        again.run([Prompt("a prompt never encoded")], [0], QUICK)


def test_the_cache_key_changes_with_the_text_encoder(private_embedding_cache):
    a, b = load_runner("tiny:pixart-sigma"), load_runner("tiny:pixart-sigma")
    with torch.no_grad():
        b.pipe.text_encoder.shared.weight.mul_(2)
    assert a.encoder.key != b.encoder.key
    prompt = [Prompt("a red cat")]
    assert not torch.equal(a.encoder.encode(prompt)["prompt_embeds"], b.encoder.encode(prompt)["prompt_embeds"])


def test_unknown_words_and_empty_prompts_encode_without_error():
    runner = load_runner("tiny:flux")
    out = runner.run([Prompt("a zyxquorvian flibbertigibbet"), Prompt("")], [0, 1], QUICK)
    assert torch.isfinite(out).all()


def test_variable_length_embeddings_are_padded_with_their_masks():
    runner = load_runner("tiny:qwen-image")  # Qwen-Image's encoder does not pad to a fixed length
    embeds = runner.encoder.encode([Prompt("a cat"), Prompt("a very long prompt about a small red cat on a mat")])
    short = embeds["prompt_embeds_mask"][0]
    assert embeds["prompt_embeds"].shape[:2] == embeds["prompt_embeds_mask"].shape
    assert short.sum() < embeds["prompt_embeds_mask"][1].sum() and short[-1] == 0


def test_a_pipeline_without_text_encoders_says_so():
    runner = load_runner("tiny:pixart-sigma")
    release_text_encoders(runner.pipe)
    with pytest.raises(PlannerError, match="without its text encoders"):
        PromptEncoder(runner.pipe, runner.family.facts.returns, True)


# --------------------------------------------------------------------------- loading


def test_a_saved_folder_loads_back_with_its_text_encoders(tmp_path):
    from planner.zoo.fixtures import save_fixture

    folder = save_fixture("flux", tmp_path / "flux")
    original, loaded = load_runner("tiny:flux"), load_runner(str(folder))
    assert loaded.spec == str(folder) and loaded.pipe.text_encoder is not None
    assert loaded.fingerprint() == original.fingerprint()
    conditions = original.conditions(2)
    a = original.run(conditions, [0, 1], Sampler("default", 2, 4.0, height=16, width=16))
    b = loaded.run(conditions, [0, 1], Sampler("default", 2, 4.0, height=16, width=16))
    assert torch.allclose(a, b, atol=1e-5)  # saved weights are equal; kernels may round the last bit


def test_a_repo_id_loads_from_the_local_hugging_face_cache_only(tmp_path, monkeypatch):
    from planner.zoo.fixtures import install_in_hub_cache, save_fixture

    cache = tmp_path / "hub"
    install_in_hub_cache(save_fixture("pixart-sigma", tmp_path / "pixart"), "planner-tests/tiny-pixart", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    runner = load_runner("planner-tests/tiny-pixart")
    assert runner.spec == "planner-tests/tiny-pixart" and len(runner.revision) == 40
    out = runner.run(runner.conditions(1), [0], Sampler("default", 2, 4.0, height=16, width=16))
    assert torch.isfinite(out).all()
    with pytest.raises(PlannerError, match=r"not in the local Hugging Face cache.*huggingface-cli download"):
        load_runner("planner-tests/not-downloaded")


def test_module_function_specs(tmp_path, monkeypatch):
    (tmp_path / "my_pipelines.py").write_text(
        "from planner.zoo.fixtures import build_fixture\n"
        "def tiny_sd3():\n    return build_fixture('sd3')\n"
        "def not_a_pipeline():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = load_runner("my_pipelines:tiny_sd3")
    assert type(runner.pipe).__name__ == "StableDiffusion3Pipeline"
    with pytest.raises(PlannerError, match="not a pipeline with a transformer"):
        load_runner("my_pipelines:not_a_pipeline")
    with pytest.raises(PlannerError, match="has no function"):
        load_runner("my_pipelines:nothing")
    sys.modules.pop("my_pipelines", None)


def test_a_pipeline_object_you_hold_is_a_runner(tmp_path):
    from planner.runner import as_runner
    from planner.zoo.fixtures import build_fixture

    pipe = build_fixture("pixart-sigma")
    runner = as_runner(pipe, call_args={"height": 16, "width": 16})
    assert isinstance(runner, Runner) and runner.family.text
    assert runner.run(runner.conditions(1), [0], QUICK).shape[-1] == 16
    assert json.dumps(runner.conditions(1)[0].prompt)
