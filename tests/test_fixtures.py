"""Tiny real pipelines with text encoders and tokenizers (planner.zoo.fixtures): built offline, saved with
save_pretrained, loaded back with plain from_pretrained (also from a hub cache with the hub offline), and
sampled from a prompt with an out-of-vocabulary word; plus the CFG facts docs/pipelines.md states."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.errors import PlannerError
from planner.zoo import fixtures as F
from planner.zoo.fixtures import vocab
from planner.zoo.fixtures.hub import hub_cache_dir, install_in_hub_cache

# Tiny models run fastest on one thread, and a loaded 2-core machine makes two threads wait on each other.
TORCH_THREADS = 1

PROMPT = "a red cat flibbertigibbet Zürich"  # two words the vocabulary lacks, one with a letter it lacks

# The text components each pipeline class ships, by the transformers class a real checkpoint loads.
TEXT_COMPONENTS = {
    "dit": {},
    "pixart-alpha": {"text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer"},
    "pixart-sigma": {"text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer"},
    "sd3": {"text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
            "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
            "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5Tokenizer"},
    "sd3.5": {"text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
              "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
              "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5Tokenizer"},
    "flux": {"text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
             "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer"},
    "chroma": {"text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer"},
    "sana": {"text_encoder": "Gemma2Model", "tokenizer": "GemmaTokenizer"},
    "qwen-image": {"text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer"},
    "z-image": {"text_encoder": "Qwen3Model", "tokenizer": "Qwen2Tokenizer"},
    "flux2": {"text_encoder": "Mistral3ForConditionalGeneration", "tokenizer": "TokenizersBackend"},
    "flux2-klein": {"text_encoder": "Qwen3ForCausalLM", "tokenizer": "Qwen2Tokenizer"},
    "wan": {"text_encoder": "UMT5EncoderModel", "tokenizer": "T5Tokenizer"},
    "wan2.2": {"text_encoder": "UMT5EncoderModel", "tokenizer": "T5Tokenizer"},
    "ltx": {"text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer"},
    "cogvideox": {"text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer"},
    "hunyuanvideo-1.5": {"text_encoder": "Qwen2_5_VLTextModel", "tokenizer": "Qwen2Tokenizer",
                         "text_encoder_2": "T5EncoderModel", "tokenizer_2": "ByT5Tokenizer"},
}

# Output shape of one sample: images [C, H, W] (DiT: numpy [H, W, C]), videos [frames, C, H, W].
OUTPUT_SHAPES = {
    "dit": (16, 16, 3), "pixart-alpha": (3, 16, 16), "pixart-sigma": (3, 16, 16), "sd3": (3, 16, 16), "sd3.5": (3, 16, 16),
    "flux": (3, 16, 16), "chroma": (3, 16, 16), "sana": (3, 32, 32), "qwen-image": (3, 16, 16),
    "z-image": (3, 16, 16), "flux2": (3, 16, 16), "flux2-klein": (3, 16, 16), "wan": (5, 3, 32, 32),
    "wan2.2": (5, 3, 32, 32), "ltx": (9, 3, 32, 32), "cogvideox": (8, 3, 16, 16), "hunyuanvideo-1.5": (5, 3, 16, 16),
}

# hunyuanvideo-1.5: a 27 MB folder (diffusers fixes its ByT5 projection at 2048 wide, 17 MB alone, and the blocks
# are made wide enough to outweigh it, so that a 2x plan exists: planner/zoo/fixtures/videos.py)
SLOW_KINDS = {"hunyuanvideo-1.5"}


def _kinds(slow=SLOW_KINDS):
    return [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in F.kinds()]


def _sample(pipe, kind, **kw):
    out = pipe(**F.call_kwargs(kind, **kw))
    return torch.as_tensor(getattr(out, F.spec(kind).output))


def test_every_kind_has_its_facts():
    assert set(F.kinds()) == set(TEXT_COMPONENTS) == set(OUTPUT_SHAPES)


@pytest.mark.parametrize("kind", _kinds())
def test_save_load_and_sample_from_a_prompt(kind, tmp_path):
    import diffusers

    pipe = F.build_fixture(kind)
    folder = F.save_fixture(kind, tmp_path / kind)
    assert [p.name for p in tmp_path.iterdir()] == [kind]  # nothing temporary left beside it
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pkl"))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < (32 if kind in SLOW_KINDS else 4) * 2**20

    loaded = F.load_fixture(folder)
    assert type(loaded) is getattr(diffusers, F.spec(kind).pipeline)
    index = json.loads((folder / "model_index.json").read_text())
    for name, value in index.items():  # every component the folder names is really there
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None:
            assert getattr(loaded, name) is not None, name
    for name, cls in TEXT_COMPONENTS[kind].items():
        assert type(getattr(loaded, name)).__name__ == cls, name
        assert index[name][1] == cls, name

    first = _sample(loaded, kind, prompt=PROMPT)
    assert tuple(first.shape[1:]) == OUTPUT_SHAPES[kind] and first.shape[0] == 1
    assert torch.isfinite(first).all()
    torch.testing.assert_close(_sample(loaded, kind, prompt=PROMPT), first, rtol=0, atol=0)
    # The same weights as built (up to float rounding: loaded tensors sit at other addresses)
    torch.testing.assert_close(_sample(pipe, kind, prompt=PROMPT), first, rtol=0, atol=1e-5)
    if F.spec(kind).prompt:  # the prompt reaches the transformer through the text encoders
        assert not torch.equal(_sample(loaded, kind, prompt="a blue dog"), first)


@pytest.mark.parametrize("kind", ["sd3", "qwen-image"])
def test_build_is_deterministic_and_leaves_the_global_rng_alone(kind):
    before = torch.random.get_rng_state()
    a, b = F.build_fixture(kind), F.build_fixture(kind)
    assert torch.equal(torch.random.get_rng_state(), before)
    for name, component in a.components.items():
        if isinstance(component, torch.nn.Module):
            sa, sb = component.state_dict(), b.components[name].state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        elif hasattr(component, "get_vocab"):
            assert component.get_vocab() == b.components[name].get_vocab(), name


@pytest.mark.parametrize("make", [vocab.t5_tokenizer, vocab.clip_tokenizer, vocab.qwen2_tokenizer,
                                  vocab.gemma_tokenizer, vocab.mistral_tokenizer])
def test_tokenizers_take_any_text_and_round_trip(make, tmp_path):
    tok = make()
    ids = tok(PROMPT).input_ids
    assert len(ids) > 3 and max(ids) < len(tok)
    known = tok.convert_ids_to_tokens(tok("a red cat").input_ids)
    assert any("red" in t for t in known) and any("cat" in t for t in known)  # whole words of the vocabulary
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again(PROMPT).input_ids == ids
    assert make().get_vocab() == tok.get_vocab()  # built the same way every time


def test_t5_tokenizer_maps_unknown_characters_to_unk():
    tok = vocab.t5_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("Zürich").input_ids)
    assert "<unk>" in tokens and tokens[-1] == "</s>"
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.unk_token_id == 2


def test_chat_templates_render():
    q = vocab.qwen2_tokenizer()
    text = q.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False,
                                 add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    m = vocab.mistral_tokenizer()
    msgs = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "a red cat"}]}]
    assert m.apply_chat_template(msgs, tokenize=False) == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]a red cat[/INST]"


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(PlannerError, match="unknown fixture kind 'sdxl'"):
        F.build_fixture("sdxl")
    with pytest.raises(PlannerError, match="no model_index.json"):
        F.load_fixture(tmp_path)
    with pytest.raises(PlannerError, match="no model_index.json"):
        install_in_hub_cache(tmp_path, "org/name", tmp_path / "hub")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(PlannerError, match="must look like 'org/name'"):
        install_in_hub_cache(tmp_path, "no-slash", tmp_path / "hub")


def test_save_replaces_an_existing_folder(tmp_path):
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    F.save_fixture("dit", folder)
    assert not (folder / "stale.txt").exists() and (folder / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]


@pytest.mark.parametrize("kind", ["pixart-sigma", "wan"])
def test_hub_cache_layout_loads_with_the_hub_offline(kind, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    repo = f"tiny-org/{kind}"
    folder = F.save_fixture(kind, tmp_path / "folder")
    cache = hub_cache_dir(tmp_path / "hf_home")
    snapshot = install_in_hub_cache(folder, repo, cache)
    assert install_in_hub_cache(folder, repo, cache) == snapshot  # same content, same commit
    storage = cache / f"models--tiny-org--{kind}"
    assert (storage / "refs" / "main").read_text() == snapshot.name
    link = snapshot / "transformer" / "diffusion_pytorch_model.safetensors"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link)) and link.resolve().parent == storage / "blobs"
    assert Path(snapshot_download(repo, cache_dir=cache, local_files_only=True)) == snapshot
    assert Path(try_to_load_from_cache(repo, "model_index.json", cache_dir=cache)) == snapshot / "model_index.json"

    # huggingface_hub refuses every request while offline; diffusers then resolves the repo from the cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with F.quiet_hf_logging():
        via_repo = DiffusionPipeline.from_pretrained(repo, cache_dir=str(cache))
    via_repo.set_progress_bar_config(disable=True)
    expected = _sample(F.load_fixture(folder), kind, prompt=PROMPT)
    torch.testing.assert_close(_sample(via_repo, kind, prompt=PROMPT), expected, rtol=0, atol=1e-5)


_OFFLINE_LOAD = """
import sys, torch
from safetensors.torch import save_file
from diffusers import DiffusionPipeline
from planner.zoo import fixtures as F
torch.set_num_threads(1)
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])  # no cache_dir: HF_HOME's hub cache
pipe.set_progress_bar_config(disable=True)
out = getattr(pipe(**F.call_kwargs(sys.argv[2], prompt=sys.argv[3])), F.spec(sys.argv[2]).output)
save_file({"out": torch.as_tensor(out).contiguous()}, sys.argv[4])
"""


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and transformers again (~10 s)
def test_hub_offline_load_in_a_fresh_process(tmp_path):
    from safetensors.torch import load_file

    kind = "flux"
    folder = F.save_fixture(kind, tmp_path / "folder")
    hf_home = tmp_path / "hf_home"
    install_in_hub_cache(folder, "tiny-org/flux", hub_cache_dir(hf_home))
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_HUB_CACHE", None)
    result = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_LOAD, "tiny-org/flux", kind, PROMPT, str(result)],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = _sample(F.load_fixture(folder), kind, prompt=PROMPT)
    torch.testing.assert_close(load_file(result)["out"], expected, rtol=0, atol=1e-5)


# How the two CFG branches reach the transformer in each pipeline's default call, as measured by
# planner.zoo.fixtures.probe (two runs differing only in the prompt): docs/pipelines.md states these.
CFG_FACTS = {
    "dit": ("cond_uncond", [1], ["None"]),
    "pixart-alpha": ("uncond_cond", [1], ["None"]),
    "pixart-sigma": ("uncond_cond", [1], ["None"]),
    "sd3": ("uncond_cond", [1], ["None"]),
    "sd3.5": ("uncond_cond", [1], ["None"]),
    "flux": ("none", [1], ["cond"]),
    "chroma": ("separate", [2], ["None"]),
    "sana": ("uncond_cond", [1], ["None"]),
    "qwen-image": ("separate", [2], ["cond", "uncond"]),
    "z-image": ("cond_uncond", [1], ["None"]),
    "flux2": ("none", [1], ["None"]),
    "flux2-klein": ("separate", [2], ["cond", "uncond"]),
    "wan": ("separate", [2], ["cond", "uncond"]),
    "wan2.2": ("separate", [2], ["cond", "uncond"]),
    "ltx": ("uncond_cond", [1], ["cond_uncond"]),
    "cogvideox": ("uncond_cond", [1], ["cond_uncond"]),
    "hunyuanvideo-1.5": ("separate", [2], ["pred_cond", "pred_uncond"]),
}


@pytest.mark.parametrize("kind", _kinds())
def test_cfg_layout_is_as_documented(kind):
    from planner.zoo.fixtures.probe import probe_kind

    facts = probe_kind(kind, steps=2)
    layout, calls, contexts = CFG_FACTS[kind]
    assert (facts["layout"], facts["calls_per_step"], facts["contexts"]) == (layout, calls, contexts)
    if facts["layout"] == "separate":
        assert facts["call_order"] == [["cond", "uncond"]]


def test_flux_true_cfg_is_two_calls_cond_first():
    from planner.zoo.fixtures.probe import probe_kind

    facts = probe_kind("flux", steps=2, true_cfg_scale=4.0)
    assert facts["layout"] == "separate" and facts["call_order"] == [["cond", "uncond"]]
    assert facts["contexts"] == ["cond", "uncond"]


def test_wan22_hands_late_steps_to_the_second_transformer():
    from planner.zoo.fixtures.probe import probe_kind

    facts = probe_kind("wan2.2", steps=4)
    assert facts["transformers_by_step"] == {"0": ["transformer"], "1": ["transformer"],
                                             "2": ["transformer_2"], "3": ["transformer_2"]}
    assert facts["context_step_index"]  # Wan passes the global step index in its cache context
