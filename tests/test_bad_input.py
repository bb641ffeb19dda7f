"""Hostile and clumsy input, as a table: every case must end in exit status 2 and exactly one stderr line
``planner: error: ...`` (no traceback), and leave the files around it as they were (no new, changed or
removed file: no partial artifact, no damaged one).

The CLI runs in-process (``planner.cli.main``) with the working directory set to the case's own
``tmp_path``; files are made by small builder functions from the committed plan and profile; faults
(a full disk, a failing rename) are injected with monkeypatch. Every case fails before a model runs
(most before one loads), so the table runs in seconds per case. Further down: the Python API, atomic
artifacts under injected failures at every write and rename step, and the journal lock.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "plans" / "digits-dit-ddim50-g3-greedy-2x.json"
PROFILE = ROOT / "profiles" / "digits-dit_ddim20_g3_cpu"
WEIGHTS = ROOT / "planner" / "zoo" / "weights" / "digits-dit"
SECRET = "S3cretPassw0rd"
TORCH_THREADS = 1


# --------------------------------------------------------------------------- builders
def text(t: Path, name: str, data: str | bytes) -> str:
    """A file ``name`` in ``t`` holding ``data``; returns its name."""
    path = t / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return name


def plan_doc() -> dict:
    return json.loads(PLAN.read_text())


def set_path(doc: dict, path: str, value) -> dict:
    """``doc`` with the value at ``a/b/c`` set (``KeyError`` as value: deleted)."""
    *parents, last = path.split("/")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


def plan_with(path: str, value, raw: str | None = None, name: str = "p.json"):
    """A builder of plan file ``name`` with one field changed (or the JSON text edited by ``raw``: ``old=>new``)."""

    def build(t: Path) -> str:
        doc = set_path(plan_doc(), path, value) if path else plan_doc()
        body = json.dumps(doc)
        if raw:
            old, new = raw.split("=>")
            assert old in body, old
            body = body.replace(old, new, 1)
        return text(t, name, body)

    return build


def decisions_with(module: str, codes) -> callable:
    def build(t: Path) -> str:
        doc = plan_doc()
        doc["decisions"][module] = codes
        return text(t, "p.json", json.dumps(doc))

    return build


def copy_plan(t: Path) -> str:
    shutil.copy(PLAN, t / "p.json")
    return "p.json"


def copy_profile(t: Path, name: str = "prof") -> str:
    shutil.copytree(PROFILE, t / name)
    return name


def profile_meta(change) -> callable:
    """A builder of a profile copy whose meta.json is changed by ``change(meta)`` (a dict) or replaced by
    ``change`` when it is text/bytes."""

    def build(t: Path) -> str:
        name = copy_profile(t)
        meta = t / name / "meta.json"
        if isinstance(change, (str, bytes)):
            meta.write_bytes(change if isinstance(change, bytes) else change.encode())
        else:
            doc = json.loads(meta.read_text())
            out = change(doc)
            meta.write_text(out if isinstance(out, str) else json.dumps(doc))
        return name

    return build


def profile_table(table: str, change, fix_checksum: bool = True) -> callable:
    """A builder of a profile copy whose table (``similarity`` or ``cost``) is changed by ``change(df)``, with
    meta.json's checksum and row count updated (so only the values are wrong) unless told otherwise."""

    def build(t: Path) -> str:
        import pandas as pd

        name = copy_profile(t)
        folder = t / name
        meta = json.loads((folder / "meta.json").read_text())
        info = meta["tables"][table]
        path = folder / info["file"]
        df = pd.read_csv(path)
        df = change(df)
        data = df.to_csv(index=False, lineterminator="\n").encode()
        if path.name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        path.write_bytes(data)
        if fix_checksum:
            info["sha256"] = hashlib.sha256(data).hexdigest()
            info["rows"] = len(df)
            (folder / "meta.json").write_text(json.dumps(meta))
        return name

    return build


def front(change=None, trials: str | None = None) -> callable:
    """A builder of a front folder ``front/`` with a small valid front.json, changed by ``change(doc)``."""

    def build(t: Path) -> str:
        doc = {
            "format": "dit-cache-planner-front", "version": 1, "model": "digits-dit",
            "sampler": {"scheduler": "ddim", "steps": 50, "guidance": 3.0},
            "budget": {"speedup": 2.0, "max_error": None}, "study": {"trials_complete": 3, "sampler": "nsga2"},
            "best": 1, "points": [{"trial": 1, "fraction": 0.5, "speedup": 2.0, "error": 0.01, "feasible": True,
                                   "plan": "front-trial-00001.json", "params": {}}],
            "baselines": [{"name": "uniform", "fraction": 0.5, "speedup": 2.0, "error": 0.05, "plan": "b.json"}],
        }
        if change is not None:
            out = change(doc)
            body = out if isinstance(out, str) else json.dumps(doc)
        else:
            body = json.dumps(doc)
        text(t, "front/front.json", body)
        if trials is not None:
            text(t, "front/trials.csv", trials)
        return "front"

    return build


def model_folder(damage) -> callable:
    """A builder of a copy of the digits-dit weights folder, damaged by ``damage(folder)``."""

    def build(t: Path) -> str:
        folder = t / "model"
        shutil.copytree(WEIGHTS, folder)
        damage(folder)
        return "model"

    return build


def truncate(rel: str, keep: int):
    def damage(folder: Path) -> None:
        path = folder / rel
        path.write_bytes(path.read_bytes()[:keep])

    return damage


def replace_text(rel: str, data: str):
    def damage(folder: Path) -> None:
        (folder / rel).write_text(data)

    return damage


def unet_pipeline_folder(t: Path) -> str:
    """A real saved pipeline without a transformer (a tiny DDPM UNet)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8,),
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(t / "unet")
    return "unet"


def plan_with_prompts(*texts: str):
    """A builder of the committed plan recording ``texts`` as its calibration prompts (format 1.2.0)."""
    from planner.pipelines.prompts import Prompt

    def build(t: Path) -> str:
        doc = plan_doc()
        doc["version"] = "1.2.0"
        doc["provenance"]["prompts"] = {"digest": "0" * 16, "count": len(texts),
                                        "keys": sorted(Prompt(x).text_key for x in texts)}
        return text(t, "p.json", json.dumps(doc))

    return build


def deep(n: int = 5000) -> str:
    return "[" * n + "]" * n


def sparse(t: Path, name: str, size: int) -> str:
    with open(t / name, "wb") as f:
        f.truncate(size)
    return name


def nested_dir_file(t: Path) -> str:
    """``afile`` is a regular file: a path under it cannot be written."""
    text(t, "afile", "x")
    return "afile/out"


def existing_dir(t: Path, name: str = "outdir") -> str:
    (t / name).mkdir()
    return name


# Faults injected into the OS calls a write goes through (what a full disk or a failing device does).
def fail_os(name: str, err: int):
    def inject(monkeypatch) -> None:
        real = getattr(os, name)

        def failing(*args, **kwargs):
            path = str(args[-1] if name in ("replace", "rename") else args[0])
            if "/.venv/" in path or "site-packages" in path or "__pycache__" in path:
                return real(*args, **kwargs)
            raise OSError(err, os.strerror(err), path)

        monkeypatch.setattr(os, name, failing)

    return inject


# --------------------------------------------------------------------------- the table
# Each case: (id, builder of the argv from the case folder, fault or None, extra check of stderr or None).
P = copy_plan
LONG = "9" * 30


def argv(*parts):
    """An argv builder: each part a string or a builder ``f(t) -> str``."""
    return lambda t: [p(t) if callable(p) else p for p in parts]


def no_secret(err: str) -> None:
    assert SECRET not in err


CASES = [
    # --- numbers on the command line: non-finite, out of range, not numbers
    ("sample-guidance-nan", argv("sample", "--guidance", "nan"), None, None),
    ("sample-guidance-inf", argv("sample", "--guidance", "inf"), None, None),
    ("sample-guidance-minus-inf", argv("sample", "--guidance", "-inf"), None, None),
    ("sample-guidance-overflow", argv("sample", "--guidance", "1e999"), None, None),
    ("sample-guidance-word", argv("sample", "--guidance", "high"), None, None),
    ("sample-steps-huge", argv("sample", "--steps", "99999999999"), None, None),
    ("sample-steps-over-cap", argv("sample", "--steps", "10001"), None, None),
    ("sample-steps-zero", argv("sample", "--steps", "0"), None, None),
    ("sample-steps-negative", argv("sample", "--steps", "-5"), None, None),
    ("sample-steps-float", argv("sample", "--steps", "2.5"), None, None),
    ("sample-steps-empty", argv("sample", "--steps", ""), None, None),
    ("sample-n-zero", argv("sample", "--n", "0"), None, None),
    ("sample-n-huge", argv("sample", "--n", "99999999999"), None, None),
    ("sample-seed-negative", argv("sample", "--seed", "-1"), None, None),
    ("sample-seed-overflow", argv("sample", "--seed", "99999999999999999999999"), None, None),
    ("sample-device-bogus", argv("sample", "--device", "tpu"), None, None),
    ("sample-model-unknown", argv("sample", "--model", "no-such-model"), None, None),
    ("sample-out-dir", argv("sample", "--n", "1", "--out", existing_dir), None, None),
    ("sample-out-under-file", argv("sample", "--n", "1", "--out", nested_dir_file), None, None),
    ("profile-guidance-nan", argv("profile", "--guidance", "nan"), None, None),
    ("profile-steps-huge", argv("profile", "--steps", "10000000000"), None, None),
    ("profile-samples-zero", argv("profile", "--samples", "0"), None, None),
    ("profile-samples-huge", argv("profile", "--samples", "1000000000000"), None, None),
    ("profile-lags-negative", argv("profile", "--lags", "-1"), None, None),
    ("profile-lags-zero", argv("profile", "--lags", "0"), None, None),
    ("profile-batch-zero", argv("profile", "--batch-size", "0"), None, None),
    ("profile-seed-negative", argv("profile", "--seed", "-3"), None, None),
    ("profile-out-is-file", argv("profile", "--out", lambda t: text(t, "f.txt", "x")), None, None),
    ("profile-out-under-file", argv("profile", "--out", nested_dir_file), None, None),
    ("search-budget-empty", argv("search", "--budget", ""), None, None),
    ("search-budget-word", argv("search", "--budget", "fast"), None, None),
    ("search-budget-huge-word", argv("search", "--budget", "9" * 100_000 + "x"), None, lambda err: len(err) < 1000),
    ("search-budget-zero", argv("search", "--budget", "0x"), None, None),
    ("search-budget-below-one", argv("search", "--budget", "0.5x"), None, None),
    ("search-budget-nan", argv("search", "--budget", "nanx"), None, None),
    ("search-budget-inf", argv("search", "--budget", "infx"), None, None),
    ("search-budget-overflow", argv("search", "--budget", "9" * 400 + "x"), None, None),
    ("search-budget-zero-percent", argv("search", "--budget", "0%"), None, None),
    ("search-budget-over-percent", argv("search", "--budget", "101%"), None, None),
    ("search-budget-negative", argv("search", "--budget", "-2x"), None, None),
    ("search-budget-fullwidth-digits", argv("search", "--budget", "\uff12x"), None, None),
    ("search-budget-and-error", argv("search", "--budget", "2x", "--max-error", "0.1"), None, None),
    ("search-max-error-nan", argv("search", "--max-error", "nan"), None, None),
    ("search-max-error-inf", argv("search", "--max-error", "inf"), None, None),
    ("search-max-error-negative", argv("search", "--max-error", "-1"), None, None),
    ("search-max-error-zero", argv("search", "--max-error", "0"), None, None),
    ("search-calib-zero", argv("search", "--calib-samples", "0"), None, None),
    ("search-calib-huge", argv("search", "--calib-samples", "1000000000000"), None, None),
    ("search-strategy-unknown", argv("search", "--strategy", "magic"), None, None),
    ("search-greedy-storage-secret", argv("search", "--strategy", "greedy", "--storage",
                                          f"postgresql://user:{SECRET}@host/db"), None, no_secret),
    ("search-greedy-n-trials", argv("search", "--strategy", "greedy", "--n-trials", "3"), None, None),
    ("search-greedy-study", argv("search", "--strategy", "greedy", "--study", "s"), None, None),
    ("search-greedy-resume", argv("search", "--strategy", "greedy", "--resume"), None, None),
    ("search-uniform-storage", argv("search", "--strategy", "uniform", "--storage", "sqlite:///x.db"), None, None),
    ("search-optuna-storage-no-scheme-secret", argv("search", "--strategy", "optuna", "--storage",
                                                    f"user:{SECRET}@host/db"), None, no_secret),
    ("search-optuna-storage-nonsense", argv("search", "--strategy", "optuna", "--storage", "nonsense"), None, None),
    ("search-optuna-storage-bad-url-secret", argv("search", "--strategy", "optuna", "--storage",
                                                  f"postgresql://user:{SECRET}@host:port/db"), None, no_secret),
    ("search-optuna-journal-no-folder", argv("search", "--strategy", "optuna", "--storage", "journal:nodir/x.log"),
     None, None),
    ("search-optuna-journal-no-file", argv("search", "--strategy", "optuna", "--storage", "journal:"), None, None),
    ("search-optuna-n-trials-zero-memory", argv("search", "--strategy", "optuna", "--n-trials", "0"), None, None),
    ("search-param-no-equals", argv("search", "--param", "delta"), None, None),
    ("search-param-no-key", argv("search", "--param", "=1"), None, None),
    ("search-param-unknown", argv("search", "--param", "nope=1"), None, None),
    ("search-param-nan", argv("search", "--strategy", "optuna", "--param", "n_trials=NaN"), None, None),
    ("search-param-deep", argv("search", "--param", "x=" + deep()), None, None),
    ("search-param-huge-int", argv("search", "--strategy", "optuna", "--param", "n_trials=" + "9" * 5000), None, None),
    ("search-n-trials-huge", argv("search", "--strategy", "optuna", "--n-trials", "99999999999"), None, None),
    ("search-param-overflow", argv("search", "--strategy", "optuna", "--param", "n_trials=1e999"), None, None),
    ("search-seed-negative", argv("search", "--strategy", "optuna", "--seed", "-1"), None, None),
    ("search-out-dir", argv("search", "--out", lambda t: existing_dir(t, "x.json")), None, None),
    ("search-out-under-file", argv("search", "--out", lambda t: nested_dir_file(t) + ".json"), None, None),
    ("search-out-not-json", argv("search", "--out", "plan.txt"), None, None),
    ("search-out-folder-is-file", argv("search", "--out", lambda t: text(t, "x", "in the way") + ".json"), None, None),
    # --- plan files
    ("plan-show-missing", argv("plan", "show", "missing.json"), None, None),
    ("plan-show-folder", argv("plan", "show", existing_dir), None, None),
    ("plan-show-dev-zero", argv("plan", "show", "/dev/zero"), None, None),
    ("plan-show-fifo", argv("plan", "show", lambda t: (os.mkfifo(t / "fifo"), "fifo")[1]), None, None),
    ("plan-show-oversized", argv("plan", "show", lambda t: sparse(t, "big.json", 65 * 2**20)), None, None),
    # a value the error quotes is shortened in the middle: the line stays readable and keeps its reason
    ("plan-show-huge-module-name", argv("plan", "show", lambda t: text(
        t, "p.json", json.dumps(set_path(plan_doc(), "decisions", {"x" * 100_000: "C" * 50})))), None,
     lambda err: len(err) < 1000 and "characters left out" in err and err.rstrip().endswith("this plan")),
    ("plan-show-empty", argv("plan", "show", lambda t: text(t, "p.json", "")), None, None),
    ("plan-show-not-utf8", argv("plan", "show", lambda t: text(t, "p.json", b"\xff\xfe{\x00")), None, None),
    ("plan-show-binary", argv("plan", "show", lambda t: text(t, "p.json", bytes(range(256)) * 4)), None, None),
    ("plan-show-truncated", argv("plan", "show", lambda t: text(t, "p.json", PLAN.read_text()[:700])), None, None),
    ("plan-show-array", argv("plan", "show", lambda t: text(t, "p.json", "[1, 2]")), None, None),
    ("plan-show-null", argv("plan", "show", lambda t: text(t, "p.json", "null")), None, None),
    ("plan-show-deep", argv("plan", "show", lambda t: text(t, "p.json", deep(100000))), None, None),
    ("plan-show-deep-object", argv("plan", "show", lambda t: text(t, "p.json", '{"a":' * 5000 + "1" + "}" * 5000)),
     None, None),
    ("plan-show-nan-guidance", argv("plan", "show", plan_with("", None, raw='"guidance": 3.0=>"guidance": NaN')),
     None, None),
    ("plan-show-inf-guidance", argv("plan", "show", plan_with("", None, raw='"guidance": 3.0=>"guidance": Infinity')),
     None, None),
    ("plan-show-overflow-guidance", argv("plan", "show", plan_with("", None, raw='"guidance": 3.0=>"guidance": 1e999')),
     None, None),
    ("plan-show-inf-timestep", argv("plan", "show", plan_with("", None, raw='"timesteps": [980=>"timesteps": [-Infinity')),
     None, None),
    ("plan-show-huge-int", argv("plan", "show", plan_with("", None, raw='"steps": 50=>"steps": ' + "9" * 5000)),
     None, None),
    ("plan-show-steps-1e10", argv("plan", "show", plan_with("sampler/steps", 10**10)), None, None),
    ("plan-show-steps-over-cap", argv("plan", "show", plan_with("sampler/steps", 10001)), None, None),
    ("plan-show-steps-zero", argv("plan", "show", plan_with("sampler/steps", 0)), None, None),
    ("plan-show-steps-negative", argv("plan", "show", plan_with("sampler/steps", -3)), None, None),
    ("plan-show-steps-string", argv("plan", "show", plan_with("sampler/steps", "fifty")), None, None),
    ("plan-show-steps-float", argv("plan", "show", plan_with("sampler/steps", 50.5)), None, None),
    ("plan-show-guidance-string", argv("plan", "show", plan_with("sampler/guidance", "3")), None, None),
    ("plan-show-timestep-string", argv("plan", "show", plan_with("sampler/timesteps/0", "x")), None, None),
    ("plan-show-timesteps-short", argv("plan", "show", plan_with("sampler/timesteps", [1, 2, 3])), None, None),
    ("plan-show-layout-bogus", argv("plan", "show", plan_with("sampler/cfg_layout", "sideways")), None, None),
    ("plan-show-schema-other", argv("plan", "show", plan_with("schema", "something-else")), None, None),
    ("plan-show-schema-missing", argv("plan", "show", plan_with("schema", KeyError)), None, None),
    ("plan-show-version-major", argv("plan", "show", plan_with("version", "2.0.0")), None, None),
    ("plan-show-version-old-major", argv("plan", "show", plan_with("version", "0.9.0")), None, None),
    ("plan-show-version-word", argv("plan", "show", plan_with("version", "one")), None, None),
    ("plan-show-version-number", argv("plan", "show", plan_with("version", 1)), None, None),
    ("plan-show-model-missing", argv("plan", "show", plan_with("model", KeyError)), None, None),
    ("plan-show-class-empty", argv("plan", "show", plan_with("model/class", "")), None, None),
    ("plan-show-modules-empty", argv("plan", "show", plan_with("model/modules", [])), None, None),
    ("plan-show-modules-dup", argv("plan", "show", plan_with("model/modules/1", "transformer_blocks.0")), None, None),
    ("plan-show-module-bad-name", argv("plan", "show", plan_with("model/modules/1", "x\x1b[2J")), None, None),
    ("plan-show-extra-field", argv("plan", "show", plan_with("sampler/flavour", 1)), None, None),
    ("plan-show-output-short", argv("plan", "show", plan_with("output", "CRC")), None, None),
    ("plan-show-output-bad-code", argv("plan", "show", plan_with("output", "C" + "D" * 49)), None, None),
    ("plan-show-output-first-forecast", argv("plan", "show", plan_with("output", "F" + "C" * 49)), None, None),
    ("plan-show-output-number", argv("plan", "show", plan_with("output", 7)), None, None),
    ("plan-show-codes-short", argv("plan", "show", decisions_with("transformer_blocks.1", "CRC")), None, None),
    ("plan-show-codes-unknown", argv("plan", "show", decisions_with("transformer_blocks.1", "C" + "X" * 49)), None, None),
    ("plan-show-codes-number", argv("plan", "show", decisions_with("transformer_blocks.1", 7)), None, None),
    ("plan-show-step0-reuse", argv("plan", "show", decisions_with("transformer_blocks.1", "R" * 50)), None, None),
    ("plan-show-residual-sublayer", argv("plan", "show", decisions_with("transformer_blocks.1.attn1", "C" + "D" * 49)),
     None, None),
    ("plan-show-share-both", argv("plan", "show", decisions_with("transformer_blocks.1", "C" + "S" * 49)), None, None),
    ("plan-show-unknown-module", argv("plan", "show", decisions_with("transformer_blocks.99", "C" * 50)), None, None),
    ("plan-show-one-branch", argv("plan", "show", decisions_with("transformer_blocks.1", {"cond": "C" * 50})),
     None, None),
    ("plan-show-extra-branch", argv("plan", "show", decisions_with("transformer_blocks.1",
                                                                    {"cond": "C" * 50, "uncond": "C" * 50, "x": "C"})),
     None, None),
    ("plan-show-speedup-negative", argv("plan", "show", plan_with("prediction/speedup", -1)), None, None),
    ("plan-show-calib-seed-string", argv("plan", "show", plan_with("provenance/calib_seeds", ["a"])), None, None),
    ("plan-show-escape-name", argv("plan", "show", lambda t: text(t, "\x1b[31mevil\x07.json", "{")),
     None, lambda err: "\x1b" not in err and "\x07" not in err),
    ("plan-validate-steps-zero", argv("plan", "validate", P, "--steps", "0"), None, None),
    ("plan-validate-steps-huge", argv("plan", "validate", P, "--steps", "99999999999"), None, None),
    ("plan-validate-steps-differ", argv("plan", "validate", P, "--steps", "10"), None, None),
    ("plan-validate-guidance-nan", argv("plan", "validate", P, "--model", "digits-dit", "--guidance", "nan"), None, None),
    ("plan-validate-guidance-no-model", argv("plan", "validate", P, "--guidance", "2"), None, None),
    ("plan-validate-model-unknown", argv("plan", "validate", P, "--model", "nope"), None, None),
    ("plan-validate-nan-guidance", argv("plan", "validate", plan_with("", None, raw='"guidance": 3.0=>"guidance": NaN')),
     None, None),
    ("plan-validate-nan-timestep", argv("plan", "validate", plan_with("", None, raw='"timesteps": [980=>"timesteps": [NaN')),
     None, None),
    ("plan-plot-out-dir", argv("plan", "plot", P, "--out", existing_dir), None, None),
    ("plan-plot-out-under-file", argv("plan", "plot", P, "--out", nested_dir_file), None, None),
    ("plan-plot-disk-full", argv("plan", "plot", P, "--out", "x.png"), fail_os("replace", errno.ENOSPC), None),
    ("plan-plot-read-only", argv("plan", "plot", P, "--out", "x.png"), fail_os("open", errno.EACCES), None),
    ("plan-plot-missing", argv("plan", "plot", "missing.json"), None, None),
    # --- eval: seeds, counts, outputs (all refused before the model loads)
    ("eval-plan-missing", argv("eval", "--plan", "missing.json"), None, None),
    # a plan naming a pipeline function: importing and calling it is the user's decision (--model), not the file's
    ("eval-plan-names-a-function", argv("eval", "--plan", plan_with("model/spec", "os.path:join")), None,
     lambda err: "--model os.path:join" in err),
    ("eval-function-spec-fails", argv("eval", "--plan", P, "--model", "os.path:join"), None,
     lambda err: "calling join() failed" in err),
    ("eval-png-not-png", argv("eval", "--plan", P, "--png", "grid.jpg"), None, lambda err: ".png" in err),
    ("plan-plot-not-png", argv("plan", "plot", P, "--out", "plan.txt"), None, lambda err: ".png" in err),
    ("sample-out-not-png", argv("sample", "--out", "grid.jpeg"), None, lambda err: ".png" in err),
    ("eval-out-empty", argv("eval", "--plan", P, "--out", ""), None, lambda err: "--out" in err),
    ("search-out-empty", argv("search", "--out", ""), None, lambda err: "--out" in err),
    ("eval-against-missing", argv("eval", "--plan", P, "--against", "missing.json"), None,
     lambda err: "missing.json" in err),
    ("eval-against-dev-zero", argv("eval", "--plan", P, "--against", "/dev/zero"), None, None),
    ("eval-against-calibration-seeds", argv("eval", "--plan", P, "--against", plan_with("provenance/calib_seeds",
                                                                                         [1000001], name="q.json"),
                                            "--seeds", "1000000..1000003"), None, lambda err: "1000001" in err),
    ("eval-against-itself", argv("eval", "--plan", P, "--against", P), None, lambda err: "itself" in err),
    ("eval-plan-dev-zero", argv("eval", "--plan", "/dev/zero"), None, None),
    ("eval-plan-folder", argv("eval", "--plan", existing_dir), None, None),
    ("eval-seeds-backwards", argv("eval", "--plan", P, "--seeds", "1000005..1000001"), None, None),
    ("eval-seeds-word", argv("eval", "--plan", P, "--seeds", "some"), None, None),
    ("eval-seeds-empty", argv("eval", "--plan", P, "--seeds", ""), None, None),
    ("eval-seeds-empty-item", argv("eval", "--plan", P, "--seeds", "1000000,,1000001"), None, None),
    ("eval-seeds-negative", argv("eval", "--plan", P, "--seeds", "-5"), None, None),
    ("eval-seeds-range-huge", argv("eval", "--plan", P, "--seeds", "1000000..99999999999"), None, None),
    ("eval-seeds-overflow", argv("eval", "--plan", P, "--seeds", "99999999999999999999999"), None, None),
    ("eval-seeds-range-overflow", argv("eval", "--plan", P, "--seeds", f"1000000..{LONG}"), None, None),
    ("eval-seeds-many-ranges", argv("eval", "--plan", P, "--seeds", ",".join(f"{1000000 + i * 90000}..{1000000 + i * 90000 + 60000}"
                                                                         for i in range(3))), None, None),
    ("eval-seeds-calibration", argv("eval", "--plan", P, "--seeds", "0..7"), None, None),
    ("eval-repeats-zero", argv("eval", "--plan", P, "--repeats", "0"), None, None),
    ("eval-repeats-huge", argv("eval", "--plan", P, "--repeats", "1000000000"), None, None),
    ("eval-warmup-negative", argv("eval", "--plan", P, "--warmup", "-1"), None, None),
    ("eval-max-repeats-below-repeats", argv("eval", "--plan", P, "--repeats", "3", "--max-repeats", "2"), None,
     lambda err: "--max-repeats" in err),
    ("eval-out-md", argv("eval", "--plan", P, "--out", "r.md"), None, None),
    ("eval-out-dir", argv("eval", "--plan", P, "--out", lambda t: existing_dir(t, "r.json")), None, None),
    ("eval-out-under-file", argv("eval", "--plan", P, "--out", lambda t: nested_dir_file(t) + ".json"), None, None),
    ("eval-png-dir", argv("eval", "--plan", P, "--png", lambda t: existing_dir(t, "plans")), None, None),
    ("eval-png-under-file", argv("eval", "--plan", P, "--png", nested_dir_file), None, None),
    ("eval-bad-plan", argv("eval", "--plan", decisions_with("transformer_blocks.1", "R" * 50)), None, None),
    # --- profile folders
    ("profile-show-missing", argv("profile", "show", "nope"), None, None),
    ("profile-show-file", argv("profile", "show", lambda t: text(t, "f.json", "{}")), None, None),
    ("profile-show-empty-folder", argv("profile", "show", existing_dir), None, None),
    ("profile-show-top-zero", argv("profile", "show", copy_profile, "--top", "0"), None, None),
    ("profile-show-meta-invalid", argv("profile", "show", profile_meta("{not json")), None, None),
    ("profile-show-meta-empty", argv("profile", "show", profile_meta("")), None, None),
    ("profile-show-meta-not-utf8", argv("profile", "show", profile_meta(b"\xff\xfe\xfd")), None, None),
    ("profile-show-meta-deep", argv("profile", "show", profile_meta(deep(100000))), None, None),
    ("profile-show-meta-oversized", argv("profile", "show", lambda t: (copy_profile(t), sparse(t, "prof/meta.json", 65 * 2**20))[0]),
     None, None),
    ("profile-show-meta-bare-nan", argv("profile", "show", profile_meta(
        lambda d: json.dumps(d).replace('"guidance": 3.0', '"guidance": NaN'))), None, None),
    ("profile-show-meta-array", argv("profile", "show", profile_meta("[]")), None, None),
    ("profile-show-meta-schema", argv("profile", "show", profile_meta(lambda d: d.update(schema="x"))), None, None),
    ("profile-show-meta-major", argv("profile", "show", profile_meta(lambda d: d.update(schema_version="9.0.0"))), None, None),
    ("profile-show-meta-steps-1e10", argv("profile", "show", profile_meta(lambda d: d["sampler"].update(steps=10**10))),
     None, None),
    ("profile-show-meta-steps-zero", argv("profile", "show", profile_meta(lambda d: d["sampler"].update(steps=0))), None, None),
    ("profile-show-meta-lags-huge", argv("profile", "show", profile_meta(lambda d: d.update(lags=10**9))), None, None),
    ("profile-show-meta-no-seeds", argv("profile", "show", profile_meta(lambda d: d["calibration"].update(seeds=[]))),
     None, lambda err: "0 seeds" in err),
    ("profile-show-meta-conditions-short", argv("profile", "show", profile_meta(
        lambda d: d["calibration"].update(conditions=d["calibration"]["conditions"][:1]))), None, None),
    ("profile-show-meta-duration-text", argv("profile", "show", profile_meta(lambda d: d["durations_s"].update(total="1 s"))),
     None, None),
    ("profile-show-meta-hook-ms-text", argv("profile", "show", profile_meta(lambda d: d["latency"].update(hook_ms="x"))),
     None, None),
    ("profile-show-meta-lags-over-steps", argv("profile", "show", profile_meta(lambda d: d.update(lags=25))), None, None),
    ("profile-show-meta-rows-huge", argv("profile", "show", profile_meta(
        lambda d: d["tables"]["similarity"].update(rows=10**12))), None, None),
    ("profile-show-meta-branches", argv("profile", "show", profile_meta(
        lambda d: d["sampler"].update(branches=["cond"]))), None, None),
    ("profile-show-meta-no-tables", argv("profile", "show", profile_meta(lambda d: d.pop("tables"))), None, None),
    ("profile-show-meta-table-path", argv("profile", "show", profile_meta(
        lambda d: d["tables"]["cost"].update(file="../../etc/passwd"))), None, None),
    ("profile-show-meta-module-kind", argv("profile", "show", profile_meta(
        lambda d: d["model"]["modules"][0].update(kind="gizmo"))), None, None),
    ("profile-show-table-missing", argv("profile", "show", lambda t: (copy_profile(t), os.remove(t / "prof" / "cost.csv"))[0]),
     None, None),
    ("profile-show-table-edited", argv("profile", "show", profile_table("cost", lambda df: df.assign(latency_ms=df.latency_ms * 2),
                                                                          fix_checksum=False)), None, None),
    ("profile-show-table-truncated", argv("profile", "show", lambda t: (copy_profile(t), truncate("similarity.csv.gz", 100)(t / "prof"))[0]),
     None, None),
    ("profile-show-table-dev-zero", argv("profile", "show", lambda t: (copy_profile(t), os.remove(t / "prof" / "cost.csv"),
                                                                       os.symlink("/dev/zero", t / "prof" / "cost.csv"))[0]),
     None, None),
    ("profile-show-cost-negative", argv("profile", "show", profile_table("cost", lambda df: df.assign(latency_ms=-df.latency_ms))),
     None, None),
    ("profile-show-cost-nan", argv("profile", "show", profile_table("cost", lambda df: df.assign(self_ms=float("nan")))),
     None, None),
    ("profile-show-cost-inf", argv("profile", "show", profile_table("cost", lambda df: df.assign(reuse_ms=float("inf")))),
     None, None),
    ("profile-show-cost-text", argv("profile", "show", profile_table("cost", lambda df: df.assign(hook_ms="slow"))),
     None, None),
    ("profile-show-cost-missing-column", argv("profile", "show", profile_table("cost", lambda df: df.drop(columns="self_ms"))),
     None, None),
    ("profile-show-cost-scope-unknown", argv("profile", "show", profile_table("cost", lambda df: df.assign(scope="abc"))),
     None, lambda err: "scope" in err),
    ("profile-show-cost-parent-wrong", argv("profile", "show", profile_table("cost", lambda df: df.assign(parent="abc"))),
     None, lambda err: "meta.json gives" in err),
    ("profile-show-cost-block-wrong", argv("profile", "show", profile_table("cost", lambda df: df.assign(block=-1))),
     None, lambda err: "meta.json gives" in err),
    ("profile-show-sim-branch-unknown", argv("profile", "show", profile_table("similarity", lambda df: df.assign(branch="abc"))),
     None, lambda err: "disagrees with meta.json" in err),
    ("profile-show-sim-kind-wrong", argv("profile", "show", profile_table("similarity", lambda df: df.assign(kind="mlp"))),
     None, lambda err: "disagrees with meta.json" in err),
    ("profile-show-sim-count-negative", argv("profile", "show", profile_table("similarity", lambda df: df.assign(n=-1))),
     None, lambda err: "negative count" in err),
    ("profile-show-sim-text", argv("profile", "show", profile_table("similarity", lambda df: df.assign(rel_l1_mean="abc"))),
     None, lambda err: "rel_l1_mean" in err),
    ("profile-show-sim-step-text", argv("profile", "show", profile_table("similarity", lambda df: df.assign(lag="abc"))),
     None, lambda err: "lag" in err),
    ("profile-show-sim-nan", argv("profile", "show", profile_table("similarity", lambda df: df.assign(rel_l1_mean=float("nan")))),
     None, None),
    ("profile-show-sim-inf", argv("profile", "show", profile_table("similarity", lambda df: df.assign(cos_max=float("inf")))),
     None, None),
    ("profile-show-sim-negative", argv("profile", "show", profile_table("similarity", lambda df: df.assign(rel_l1_mean=-1.0))),
     None, None),
    ("profile-show-sim-rows", argv("profile", "show", profile_table("similarity", lambda df: df.iloc[:-5])), None, None),
    ("profile-show-sim-modules", argv("profile", "show", profile_table("similarity", lambda df: df.assign(module="x"))),
     None, None),
    ("profile-plot-missing", argv("profile", "plot", "nope"), None, None),
    ("profile-plot-out-file", argv("profile", "plot", copy_profile, "--out", lambda t: text(t, "f.txt", "x")), None, None),
    # --- Pareto fronts
    ("pareto-missing", argv("plan", "pareto", "nope"), None, None),
    ("pareto-no-front", argv("plan", "pareto", existing_dir), None, None),
    ("pareto-invalid-json", argv("plan", "pareto", front(lambda d: "{")), None, None),
    ("pareto-deep", argv("plan", "pareto", front(lambda d: deep(100000))), None, None),
    ("pareto-not-front", argv("plan", "pareto", front(lambda d: d.update(format="x"))), None, None),
    ("pareto-version-newer", argv("plan", "pareto", front(lambda d: d.update(version=99))), None, None),
    ("pareto-version-word", argv("plan", "pareto", front(lambda d: d.update(version="one"))), None, None),
    ("pareto-points-missing", argv("plan", "pareto", front(lambda d: d.pop("points"))), None, None),
    ("pareto-points-object", argv("plan", "pareto", front(lambda d: d.update(points={}))), None, None),
    ("pareto-point-not-object", argv("plan", "pareto", front(lambda d: d.update(points=[1]))), None, None),
    ("pareto-point-no-fraction", argv("plan", "pareto", front(lambda d: d["points"][0].pop("fraction"))), None, None),
    ("pareto-point-fraction-text", argv("plan", "pareto", front(lambda d: d["points"][0].update(fraction="fast"))),
     None, None),
    ("pareto-point-trial-text", argv("plan", "pareto", front(lambda d: d["points"][0].update(trial="one"))), None, None),
    ("pareto-baselines-object", argv("plan", "pareto", front(lambda d: d.update(baselines={}))), None, None),
    ("pareto-baseline-no-error", argv("plan", "pareto", front(lambda d: d["baselines"][0].pop("error"))), None, None),
    ("pareto-budget-text", argv("plan", "pareto", front(lambda d: d.update(budget="2x"))), None, None),
    ("pareto-bare-nan", argv("plan", "pareto", front(lambda d: json.dumps(d).replace('"error": 0.01', '"error": NaN'))),
     None, None),
    ("pareto-trials-garbage", argv("plan", "pareto", front(trials="\x00\x01garbage\n1,2")), None, None),
    ("pareto-out-dir", argv("plan", "pareto", front(), "--out", existing_dir), None, None),
    # --- model folders
    ("model-index-invalid", argv("sample", "--model", model_folder(replace_text("model_index.json", "{")), "--n", "1"),
     None, None),
    ("model-index-array", argv("sample", "--model", model_folder(replace_text("model_index.json", "[]")), "--n", "1"),
     None, None),
    ("model-index-class-unknown", argv("sample", "--model", model_folder(replace_text("model_index.json",
                                                                                      '{"_class_name": "Nope"}')), "--n", "1"),
     None, None),
    ("model-index-deep", argv("sample", "--model", model_folder(replace_text("model_index.json", deep())), "--n", "1"),
     None, None),
    ("model-weights-truncated", argv("sample", "--model", model_folder(
        truncate("transformer/diffusion_pytorch_model.safetensors", 1000)), "--n", "1"), None, None),
    ("model-weights-empty", argv("sample", "--model", model_folder(
        truncate("transformer/diffusion_pytorch_model.safetensors", 0)), "--n", "1"), None, None),
    ("model-config-invalid", argv("sample", "--model", model_folder(replace_text("transformer/config.json", "{")),
                                  "--n", "1"), None, None),
    ("model-config-wrong-shape", argv("sample", "--model", model_folder(
        lambda f: (f / "transformer/config.json").write_text(
            (f / "transformer/config.json").read_text().replace('"attention_head_dim": 16', '"attention_head_dim": 8'))),
                                      "--n", "1"), None, None),
    ("model-config-not-object", argv("sample", "--model", model_folder(replace_text("transformer/config.json", "[1]")),
                                     "--n", "1"),
     None, None),
    ("model-scheduler-config-invalid", argv("sample", "--model", model_folder(
        replace_text("scheduler/scheduler_config.json", "{oops")), "--n", "1"), None, None),
    # --- your own model, prompts, sizes, dtype and offload (the planner's pipelines and CLI flags)
    ("model-repo-id-not-cached", argv("profile", "--model", "planner-tests/never-downloaded", "--out", "p"), None,
     lambda err: "not in the local Hugging Face cache" in err),
    ("model-revision-for-zoo", argv("profile", "--model", "tiny:pixart-sigma", "--revision", "main"), None, None),
    ("model-without-transformer", argv("profile", "--model", unet_pipeline_folder, "--out", "p"), None,
     lambda err: "no transformer" in err),
    ("prompts-missing", argv("profile", "--model", "tiny:pixart-sigma", "--prompts", "nope.txt"), None,
     lambda err: "no such prompt file" in err),
    ("prompts-empty", argv("profile", "--model", "tiny:pixart-sigma", "--prompts",
                           lambda t: text(t, "p.txt", "\n# only a comment\n\n")), None, lambda err: "no prompts" in err),
    ("prompts-not-utf8", argv("search", "--model", "tiny:pixart-sigma", "--prompts",
                              lambda t: text(t, "p.txt", b"a cat\n\xff\xfe\x80 a dog\n")), None,
     lambda err: "not UTF-8" in err),
    ("prompts-wrong-suffix", argv("profile", "--prompts", lambda t: text(t, "p.csv", "a cat\n")), None, None),
    ("prompts-jsonl-bad-line", argv("profile", "--model", "tiny:pixart-sigma", "--prompts",
                                    lambda t: text(t, "p.jsonl", '{"prompt": "a cat"}\n{"prompt": 3}\n')), None,
     lambda err: "p.jsonl:2" in err),
    ("eval-prompts-missing", argv("search", "--eval-prompts", "nope.jsonl"), None, None),
    ("eval-prompts-share-calibration", argv("bench", "--prompts", lambda t: text(t, "c.txt", "a cat\na dog\n"),
                                            "--eval-prompts", lambda t: text(t, "e.jsonl", '{"prompt": "a  dog"}\n')),
     None, lambda err: "held-out prompts must be new" in err),
    ("eval-prompts-overlap-calibration", argv("eval", "--plan", plan_with_prompts("a red fox in snow"), "--prompts",
                                              lambda t: text(t, "e.txt", "a red fox in snow\n"), "--out", "r.json"),
     None, lambda err: "calibration prompt" in err),
    ("prompts-for-class-model", argv("profile", "--model", "tiny:dit", "--prompts",
                                     lambda t: text(t, "p.txt", "a cat\n"), "--out", "p"), None,
     lambda err: "class-conditional" in err),
    ("class-labels-for-text-model", argv("profile", "--model", "tiny:pixart-sigma", "--class-labels", "1"), None, None),
    ("class-labels-word", argv("sample", "--class-labels", "cat,dog"), None, None),
    ("class-labels-out-of-range", argv("sample", "--class-labels", "3,10", "--n", "1"), None,
     lambda err: "classes 0..9" in err),
    ("call-arg-no-equals", argv("profile", "--call-arg", "max_sequence_length"), None, None),
    ("call-arg-reserved", argv("search", "--call-arg", "prompt=a cat"), None, lambda err: "--prompts" in err),
    ("call-arg-return-dict", argv("sample", "--call-arg", "return_dict=false"), None, lambda err: "return_dict" in err),
    ("call-arg-unknown", argv("profile", "--model", "tiny:pixart-sigma", "--call-arg", "frobnicate=1", "--out", "p"),
     None, lambda err: "takes no argument" in err),
    ("height-not-vae-multiple", argv("profile", "--model", "tiny:pixart-sigma", "--height", "20", "--width", "16",
                                     "--out", "p"), None, lambda err: "multiples of 8" in err),
    ("width-not-packing-multiple", argv("search", "--model", "tiny:flux", "--height", "16", "--width", "18"), None,
     lambda err: "multiples of 4" in err),
    ("frames-not-1-plus-4k", argv("profile", "--model", "tiny:wan", "--num-frames", "6", "--out", "p"), None,
     lambda err: "1 + 4k" in err),
    ("frames-for-image-model", argv("profile", "--model", "tiny:sd3", "--num-frames", "5"), None,
     lambda err: "takes no num_frames" in err),
    ("height-for-class-model", argv("sample", "--height", "64", "--n", "1"), None, None),
    ("height-zero", argv("profile", "--height", "0"), None, None),
    ("dtype-unknown", argv("profile", "--dtype", "float64"), None, None),
    ("offload-unknown", argv("profile", "--offload", "disk"), None, None),
    ("offload-sequential-on-cpu", argv("profile", "--model", "tiny:pixart-sigma", "--device", "cpu",
                                       "--offload", "sequential", "--out", "p"), None,
     lambda err: "--offload sequential" in err),
    ("eval-size-for-class-model", argv("eval", "--plan", P, "--num-frames", "5"), None, None),
    # --- bench and zoo arguments
    ("bench-budgets-empty", argv("bench", "--budgets", ""), None, None),
    ("bench-peer-unknown", argv("bench", "--peers", "nope"), None, lambda err: "nope" in err),
    ("bench-sweep-nan", argv("bench", "--sweep", "diffusers-fbcache=nan"), None, lambda err: "finite" in err),
    ("bench-peer-warmups-no-knob", argv("bench", "--peer-warmups", "diffusers-fbcache=1"), None,
     lambda err: "no warm-up knob" in err),
    ("bench-peer-warmups-zero", argv("bench", "--peer-warmups", "diffusers-taylorseer=0,2"), None,
     lambda err: "at least 1" in err),
    ("bench-peer-warmups-fraction", argv("bench", "--peer-warmups", "diffusers-magcache=1.5"), None, None),
    ("bench-param-unknown-setting", argv("bench", "--param", "greedy:nope=1"), None, lambda err: "nope" in err),
    ("bench-budgets-word", argv("bench", "--budgets", "fast"), None, None),
    ("bench-budgets-twice", argv("bench", "--budgets", "2x,1.5x,2.0x"), None, lambda err: "2x twice" in err),
    ("bench-repeats-zero", argv("bench", "--repeats", "0"), None, None),
    ("bench-max-repeats-below-repeats", argv("bench", "--max-repeats", "4"), None, lambda err: "--max-repeats" in err),
    ("bench-max-repeats-huge", argv("bench", "--max-repeats", "1000000000"), None, None),
    ("bench-threads-zero", argv("bench", "--threads", "0"), None, None),
    ("bench-param-no-colon", argv("bench", "--param", "x=1"), None, None),
    ("bench-param-deep", argv("bench", "--param", "greedy:x=" + deep()), None, None),
    ("bench-seeds-huge", argv("bench", "--seeds", "1000000..99999999999"), None, None),
    ("bench-out-file", argv("bench", "--out", lambda t: text(t, "f.txt", "x")), None, None),
    ("bench-timed-seeds-beyond-seeds", argv("bench", "--seeds", "1000000..1000003", "--timed-seeds", "5"), None,
     lambda err: "--timed-seeds" in err),
    ("bench-timed-seeds-zero", argv("bench", "--timed-seeds", "0"), None, None),
    ("zoo-train-unknown", argv("zoo", "train", "nope"), None, None),
    ("zoo-train-steps-negative", argv("zoo", "train", "digits-dit", "--steps", "-1"), None, None),
    ("zoo-train-out-under-file", argv("zoo", "train", "digits-classifier", "--out", nested_dir_file), None, None),
    ("unknown-command", argv("frobnicate"), None, None),
    ("unknown-flag", argv("sample", "--frobnicate"), None, None),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of what it is (file bytes, link target, folder)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_files_alone(case, tmp_path, monkeypatch, capsys):
    from planner.cli import main

    _, build, fault, check = case
    monkeypatch.chdir(tmp_path)
    args = build(tmp_path)
    before = snapshot(tmp_path)
    if fault is not None:
        fault(monkeypatch)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # before the fix, argparse errors left main this way
        code = exc.code
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("planner: error: "), err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, "files changed, appeared or went"
    if check is not None:
        assert check(err) is not False, err


def test_the_table_is_large_enough():
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- printing what files say
def test_control_characters_are_escaped_in_text_reports(tmp_path, monkeypatch, capsys):
    """A plan whose model class and strategy hold terminal escape sequences is shown with them escaped."""
    from planner.cli import main

    doc = plan_doc()
    doc["model"]["class"] = "DiT\x1b]0;owned\x07\x1b[2J"
    doc["provenance"]["strategy"] = "greedy\x1b[31m\u202e"
    (tmp_path / "p.json").write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "show", "p.json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;owned\\x07" in out and "\\u202e" in out


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    from planner.cli import main
    from planner.errors import PlannerError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlannerError, match="no such plan file"):
        main(["--debug", "plan", "show", "missing.json"])


def test_a_real_bug_still_shows_as_a_bug(monkeypatch):
    """Errors that are not the user's (here a KeyError inside a command) are not dressed up as one-liners."""
    import planner.commands.plan as plan_cmd
    from planner.cli import main

    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(plan_cmd, "cmd_show", broken)
    with pytest.raises(KeyError):
        main(["plan", "show", "x.json"])


# --------------------------------------------------------------------------- the Python API
def _api_cases():
    many = 100_000  # planner.limits.MAX_SEEDS (read lazily below: the table is built at collection)

    return [
        ("seeds-huge-range", lambda: __import__("planner.seeds").seeds.parse_seeds("0..99999999999")),
        ("seeds-total", lambda: __import__("planner.seeds").seeds.parse_seeds(
            ",".join(f"{i * many}..{i * many + many // 2}" for i in range(3)))),
        ("seeds-overflow", lambda: __import__("planner.seeds").seeds.parse_seeds(LONG)),
        ("eval-seeds-overflow", lambda: __import__("planner.seeds").seeds.evaluation_seeds(10, 2**63)),
        ("budget-empty", lambda: __import__("planner.search.budget").search.budget.Budget.parse("")),
        ("budget-nan", lambda: __import__("planner.search.budget").search.budget.Budget(speedup=float("nan"))),
        ("loads-json-nan", lambda: __import__("planner.artifact").artifact.loads_json('{"a": NaN}', "x")),
        ("loads-json-overflow", lambda: __import__("planner.artifact").artifact.loads_json('{"a": 1e400}', "x")),
        ("loads-json-huge-int", lambda: __import__("planner.artifact").artifact.loads_json("9" * 5000, "x")),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _api_cases()])
def test_api_bad_values_are_one_line_planner_errors(name):
    from planner.errors import PlannerError

    fn = dict(_api_cases())[name]
    with pytest.raises(PlannerError) as info:
        fn()
    assert "\n" not in str(info.value)


def test_plan_objects_with_non_finite_numbers_are_refused():
    from dataclasses import replace

    from planner.errors import PlannerError
    from planner.plan import load_plan, save_plan

    plan = load_plan(PLAN)
    for bad in (replace(plan.sampler, guidance=float("nan")), replace(plan.sampler, timesteps=[float("inf")] * 50),
                replace(plan.sampler, steps=10**10)):
        with pytest.raises(PlannerError):
            replace(plan, sampler=bad).validate()
    with pytest.raises(PlannerError, match="prediction"):
        save_plan(replace(plan, prediction=replace(plan.prediction, calib_error=float("nan"))), "/nonexistent/x.json")


def test_runner_refuses_non_finite_guidance_and_huge_steps(digits):
    from planner.errors import PlannerError
    from planner.runner import Sampler

    for sampler in (Sampler("ddim", 10, float("nan")), Sampler("ddim", 10, float("inf")), Sampler("ddim", 10**10, 3.0),
                    Sampler("ddim", 0, 3.0)):
        with pytest.raises(PlannerError):
            digits.resolve(sampler)


# --------------------------------------------------------------------------- plans that do not fit the run
@pytest.fixture(scope="module")
def digits_plan10(digits):
    from planner.plan import plan_for_runner
    from planner.runner import Sampler

    return plan_for_runner(digits, Sampler("ddim", 10, 3.0), {"transformer_blocks.3": "CCDDCDDCDD"})


def _first_call_count(runner, sampler, plan, strict=True):
    """Run ``sampler`` under ``plan``; returns the number of transformer calls that got through."""
    from planner.executor import apply_plan

    calls = []
    hook = runner.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with apply_plan(runner.pipe, plan, strict=strict):
            runner.run(runner.conditions(2), [0, 1], sampler, output="latent")
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("sampler_args, words", [
    (("dpm", 10, 3.0), "DDIMScheduler, the pipeline's scheduler is a DPMSolverMultistepScheduler"),
    (("ddim", 20, 3.0), "made for 10 steps, the pipeline runs 20"),
    (("ddim", 5, 3.0), "made for 10 steps, the pipeline runs 5"),
    (("ddim", 10, 1.0), "CFG off"),
])
def test_apply_plan_refuses_another_run_at_the_first_call(digits, digits_plan10, sampler_args, words):
    from planner.errors import PlannerError
    from planner.runner import Sampler

    with pytest.raises(PlannerError, match=re.escape(words)) as info:
        _first_call_count(digits, Sampler(*sampler_args), digits_plan10)
    assert "\n" not in str(info.value)


def test_apply_plan_refuses_another_scheduler_config(digits, digits_plan10):
    from dataclasses import replace

    from planner.errors import PlannerError
    from planner.runner import Sampler

    plan = replace(digits_plan10, sampler=replace(digits_plan10.sampler, scheduler_config="0" * 12))
    with pytest.raises(PlannerError, match="with another config"):
        _first_call_count(digits, Sampler("ddim", 10, 3.0), plan)


def test_strict_false_runs_a_mismatch_with_one_warning(digits, digits_plan10):
    import warnings

    from planner.runner import Sampler

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calls = _first_call_count(digits, Sampler("ddim", 20, 3.0), digits_plan10, strict=False)
    assert calls == 20  # the whole run, its last 10 steps uncached
    mine = [w for w in caught if "strict=False" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]


def test_bare_transformer_refuses_another_step_count_at_the_first_call(digits, digits_plan10):
    """No pipeline to ask: the first call's timestep tells a 5-step (or DPM) run from the planned 10-step DDIM."""
    import torch

    from planner.errors import PlannerError
    from planner.executor import apply_plan

    t = digits.transformer
    x = torch.zeros(4, 1, 8, 8)
    labels = torch.tensor([1, 2, 10, 10])
    for first_t in (801.0, 999.0):  # DDIM 5 steps; DPM 10 steps
        with apply_plan(t, digits_plan10) as handle:
            with pytest.raises(PlannerError, match="timestep"):
                t(x, timestep=torch.full((4,), first_t), class_labels=labels)
            assert handle.stats()["runs"] == 0
    with apply_plan(t, digits_plan10):  # the planned one passes
        t(x, timestep=torch.full((4,), float(digits_plan10.sampler.timesteps[0])), class_labels=labels)


def test_bare_transformer_refuses_another_input_shape_at_the_first_call(digits, digits_plan10):
    """A plan records one sample's input shape; a bare transformer fed another (a run at another resolution)
    is refused at its first call, before anything is cached; a plan that does not record it runs."""
    from dataclasses import replace

    import torch

    from planner.errors import PlannerError
    from planner.executor import apply_plan

    t, labels = digits.transformer, torch.tensor([1, 2, 10, 10])
    first = torch.full((4,), float(digits_plan10.sampler.timesteps[0]))
    assert digits_plan10.sampler.input_shape == [1, 8, 8]
    with apply_plan(t, digits_plan10) as handle:
        with pytest.raises(PlannerError, match=r"shape \[1, 8, 8\] per sample, this run's are \[1, 16, 16\]"):
            t(torch.zeros(4, 1, 16, 16), timestep=first, class_labels=labels)
        assert handle.stats()["runs"] == 0
    unknown = replace(digits_plan10, sampler=replace(digits_plan10.sampler, input_shape=None))
    with apply_plan(t, unknown):  # plans older than format 1.3.0 do not record it: not checked
        t(torch.zeros(4, 1, 16, 16), timestep=first, class_labels=labels)


def test_plan_records_the_scheduler_and_1_0_files_still_load(digits_plan10):
    from planner.plan import PLAN_FORMAT, load_plan, loads_plan, plan_to_json

    assert PLAN_FORMAT.version == "1.7.0"
    doc = json.loads(plan_to_json(digits_plan10))
    assert doc["sampler"]["input_shape"] == list(digits_plan10.sampler.input_shape) and len(doc["sampler"]["input_shape"]) == 3
    assert re.fullmatch(r"[0-9a-f]{12}", doc["sampler"]["scheduler_config"])
    assert doc["sampler"]["resolution"] is None and doc["sampler"]["frames"] is None
    assert loads_plan(plan_to_json(digits_plan10)).sampler.scheduler_config == doc["sampler"]["scheduler_config"]
    old = load_plan(ROOT / "plans" / "digits-dit-ddim50-g3-optuna-2x.json")  # a committed 1.0.0 plan
    assert old.sampler.scheduler_config is None


def test_search_refuses_a_profile_of_another_scheduler(digits, digits10):
    from planner.errors import PlannerError
    from planner.runner import Sampler
    from planner.search.context import SearchContext

    with pytest.raises(PlannerError, match=r"made with scheduler ddim \(DDIMScheduler\), the search runs dpm"):
        SearchContext.build(digits, Sampler("dpm", 10, 3.0), digits10.profile, samples=1)


def test_search_cli_refuses_a_ddim_profile_for_a_dpm_search(tmp_path, monkeypatch, capsys):
    from planner.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(PROFILE, tmp_path / "prof")
    before = snapshot(tmp_path)
    code = main(["search", "--profile", "prof", "--scheduler", "dpm", "--steps", "20", "--calib-samples", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the search runs dpm" in err, err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- atomic artifacts under failures
class Injected(OSError):
    pass


def fail_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th file write, mkdir, rename or exchange (counted from 1) fail with an I/O error; returns
    the log of the operations seen."""
    import planner.io as pio

    seen: list[str] = []

    def wrap(name, real, owner):
        def call(*args, **kwargs):
            seen.append(name)
            if len(seen) == k:
                raise Injected(errno.EIO, "injected I/O error")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    wrap("rename", os.rename, os)
    wrap("replace", os.replace, os)
    wrap("mkdir", os.mkdir, os)
    wrap("rename_exchange", pio.rename_exchange, pio)
    wrap("write_bytes", Path.write_bytes, Path)
    wrap("write_text", Path.write_text, Path)
    return seen


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_profile_save_is_atomic_under_a_failure_at_every_step(digits10, tmp_path, monkeypatch, exchange):
    """An I/O error at any write, mkdir or rename of Profile.save leaves the old profile, complete, and a
    one-line error naming the folder; the next save cleans up and succeeds."""
    import dataclasses

    import planner.io as pio
    from planner.errors import PlannerError
    from planner.profile import load_profile

    old = digits10.profile
    new = type(old)(dataclasses.replace(old.meta, name="the-new-one"), old.similarity, old.cost)
    target = tmp_path / "prof"
    k = 1
    while True:
        old.save(target)
        if not exchange:
            monkeypatch.setattr(pio, "rename_exchange", lambda a, b: False)
        seen = fail_at(monkeypatch, k)
        try:
            new.save(target)
            failed = False
        except PlannerError as exc:
            failed = True
            assert "\n" not in str(exc) and str(target) in str(exc)
        finally:
            monkeypatch.undo()
        name = load_profile(target).meta.name  # complete, checksums and all
        if not failed:
            assert name == "the-new-one"  # the failed call was absorbed (mkdir of a folder that exists)
            if len(seen) < k:
                break  # every step has had its failure
        else:
            assert name == old.meta.name  # a failed save leaves the old profile
        old.save(target)  # the next write succeeds and leaves nothing behind
        assert _leftovers(tmp_path) == []
        k += 1
    assert k > 5


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import planner.io as pio
    k, target, exchange = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
    count = [0]
    def killer(name, real, owner):
        def call(*a, **kw):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
            return real(*a, **kw)
        setattr(owner, name, call)
    if not exchange:
        pio.rename_exchange = lambda a, b: False
    for name, owner in (("rename", os), ("replace", os), ("mkdir", os), ("rename_exchange", pio)):
        killer(name, getattr(owner, name), owner)
    killer("write_text", Path.write_text, Path)
    with pio.atomic_folder(target) as tmp:
        for part in ("a", "b", "c"):
            (tmp / part).write_text("new " + part)
    print("finished")
""")


def _folder_state(folder: Path) -> str:
    files = {p.name: p.read_text() for p in folder.iterdir()}
    assert set(files) == {"a", "b", "c"}, files
    versions = {v.split()[0] for v in files.values()}
    assert len(versions) == 1, files  # never mixed
    return versions.pop()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_folder_survives_sigkill_at_every_step(tmp_path, exchange):
    """A writer SIGKILLed at each write, mkdir or rename in turn leaves the old folder or the new one (after
    recovery by the next reader); the next writer removes what the killed one left."""
    import planner.io as pio

    target = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    k, outcomes = 1, []
    while True:
        if target.exists():
            shutil.rmtree(target)
        with pio.atomic_folder(target) as tmp:
            for part in ("a", "b", "c"):
                (tmp / part).write_text("old " + part)
        run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(k), str(target), "1" if exchange else "0"],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
        if run.returncode == 0:
            assert "finished" in run.stdout
            break
        assert run.returncode == -9, run.stderr
        pio.recover_folder(target)  # what every reader does first
        outcomes.append(_folder_state(target))
        with pio.atomic_folder(target) as tmp:  # the next write cleans up after the dead one
            for part in ("a", "b", "c"):
                (tmp / part).write_text("next " + part)
        assert _folder_state(target) == "next"
        assert _leftovers(tmp_path) == []
        k += 1
    assert len(outcomes) >= 4 and set(outcomes) <= {"old", "new"}


def test_concurrent_writers_leave_one_complete_folder(tmp_path):
    import planner.io as pio

    target = tmp_path / "art"
    with pio.atomic_folder(target) as first:
        (first / "a").write_text("first")
        with pio.atomic_folder(target) as second:  # another writer starts and finishes meanwhile
            (second / "a").write_text("second")
            (second / "b").write_text("second")
        assert (target / "a").read_text() == "second"
        (first / "b").write_text("first")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "first", "b": "first"}
    assert _leftovers(tmp_path) == []


def test_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    import planner.io as pio

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    host = pio._HOST
    (tmp_path / f".x.json.tmp-{host}-{pid}-abcdef").write_text("half")
    (tmp_path / f".x.json.tmp-{host}-{os.getpid()}-abcdef").write_text("mine, in flight")  # a live writer's
    (tmp_path / f".x.json.tmp-{host}-1-abcdef").write_text("pid 1 is alive")
    pio.write_text_atomic(tmp_path / "x.json", "{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["x.json", f".x.json.tmp-{host}-{os.getpid()}-abcdef", f".x.json.tmp-{host}-1-abcdef"])


def test_plan_and_by_products_publish_together(tmp_path, monkeypatch):
    """staged_plan: the by-product folder is swapped in whole, then the plan file; a failure before the end
    publishes nothing; subfolders (checkpoints) of the old folder are carried over; a stale folder is told."""
    from planner.errors import PlannerError
    from planner.plan import load_plan, plan_to_json, staged_plan
    from planner.plan.io import BUNDLE_DIGEST, bundle_mismatch

    plan = load_plan(PLAN)
    out = tmp_path / "plans" / "x.json"
    (tmp_path / "plans" / "x" / "block").mkdir(parents=True)
    (tmp_path / "plans" / "x" / "block" / "checkpoint.safetensors").write_text("ckpt")
    (tmp_path / "plans" / "x" / "router.safetensors").write_text("old router")
    with pytest.raises(PlannerError), staged_plan(out) as staged:
        (staged.folder / "router.safetensors").write_text("new router")
        raise PlannerError("search failed")
    assert not out.exists() and (tmp_path / "plans" / "x" / "router.safetensors").read_text() == "old router"
    with staged_plan(out) as staged:
        (staged.folder / "router.safetensors").write_text("new router")
        staged.plan = plan
    folder = tmp_path / "plans" / "x"
    assert (folder / "router.safetensors").read_text() == "new router"
    assert (folder / "block" / "checkpoint.safetensors").read_text() == "ckpt"
    assert out.read_text() == plan_to_json(plan) and (folder / BUNDLE_DIGEST).is_file()
    assert bundle_mismatch(folder) is None
    out.write_text(plan_to_json(plan).replace('"greedy"', '"edited"'))
    assert "another version" in bundle_mismatch(folder)
    assert _leftovers(tmp_path / "plans") == []


def test_front_folder_is_replaced_whole(tmp_path):
    from planner.plan import load_plan
    from planner.search._pareto import load_front, write_front

    plan = load_plan(PLAN)
    doc = front()(tmp_path) and json.loads((tmp_path / "front" / "front.json").read_text())
    folder = tmp_path / "f"
    write_front(folder, doc, {"front-trial-00001.json": plan, "front-trial-00002.json": plan}, [])
    write_front(folder, doc, {"front-trial-00001.json": plan}, [{"trial": 1, "fraction": 0.5, "error": 0.1}])
    assert sorted(p.name for p in folder.iterdir()) == ["front-trial-00001.json", "front.csv", "front.json", "trials.csv"]
    assert load_front(folder)["points"][0]["fraction"] == 0.5
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the journal lock
JOURNAL_SCRIPT = textwrap.dedent("""
    import os, sys, socket, optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from planner.search._optuna_storage import open_storage
    storage = open_storage("journal:runs/study.log")
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    print(len(study.trials))
""")


@pytest.mark.parametrize("stale", ["optuna-symlink", "dead-worker"])
def test_journal_in_a_subfolder_with_a_stale_lock_finishes(tmp_path, stale):
    """The hang of issue 15: a journal in runs/, a worker killed while holding the lock, the same command
    again. The rerun must finish (bounded here by a timeout, so a regression fails instead of hanging)."""
    (tmp_path / "runs").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-c", JOURNAL_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    lock = tmp_path / "runs" / "study.log.lock"
    if stale == "optuna-symlink":
        # what Optuna's default lock leaves when its holder is killed: a relative link that dangles from runs/
        os.symlink("runs/study.log", lock)
        os.utime(lock, (1, 1), follow_symlinks=False)
    else:
        import socket

        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True)

        lock.write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")
    again = subprocess.run([sys.executable, "-c", JOURNAL_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[-1] == "4"


def test_journal_lock_held_by_a_live_worker_ends_in_a_clear_error(tmp_path):
    import socket

    from planner.errors import PlannerError
    from planner.search._journal_lock import JournalLock

    journal = tmp_path / "study.log"
    (tmp_path / "study.log.lock").write_text(f"{socket.gethostname()} {os.getppid()}\n")  # alive, and fresh
    with pytest.raises(PlannerError, match=r"held for more than 0\.3 s .*delete it"):
        JournalLock(str(journal), grace_s=60, timeout_s=0.3).acquire()

