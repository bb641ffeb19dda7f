"""The plan format: round trip, layout on disk, schema and rule errors, versions, helpers, CLI."""

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

from planner.cli import main
from planner.errors import PlannerError
from planner.plan import (
    PLAN_FORMAT,
    load_plan,
    loads_plan,
    plan_for_model,
    plan_for_runner,
    plan_to_dict,
    plan_to_json,
    save_plan,
)
from planner.runner import Sampler

SAMPLER = Sampler("ddim", 6, 3.0)


class ToyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = torch.nn.Identity()
        self.ff = torch.nn.Identity()


class Toy(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(ToyBlock() for _ in range(n))


def toy_plan(decisions=None, steps=6, layout="cond_uncond", n=3):
    return plan_for_model(Toy(n), steps=steps, cfg_layout=layout, decisions=decisions or {}, scheduler="ddim", guidance=3.0)




def test_plan_files_are_read_without_torch():
    import subprocess
    import sys

    code = "import sys, planner.plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_for_runner_fills_model_sampler_provenance_and_round_trips(digits, tmp_path):
    plan = plan_for_runner(
        digits, SAMPLER, {"transformer_blocks.1": "CRCRCC"}, strategy="greedy", params={"delta": 0.1}, calib_seeds=[3, 4]
    )
    assert plan.model.cls == "DiTTransformer2DModel" and plan.model.spec == "digits-dit"
    assert plan.model.fingerprint == digits.fingerprint()
    assert plan.model.modules == [m.name for m in digits.modules()]
    assert plan.sampler.scheduler_class == "DDIMScheduler" and plan.sampler.cfg_layout == "cond_uncond"
    assert len(plan.sampler.timesteps) == 6 and plan.sampler.timesteps[0] > plan.sampler.timesteps[-1]
    assert set(plan.provenance.versions) == {"planner", "torch", "diffusers"}
    assert plan.provenance.device == "cpu" and re.match(r"\d{4}-\d\d-\d\dT", plan.provenance.created)
    assert set(plan.decisions) == set(plan.model.modules)  # one entry per cacheable module
    path = save_plan(plan, tmp_path / "p.json")
    assert load_plan(path) == plan
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_file_layout_one_line_per_module_and_diffable():
    a = toy_plan({"transformer_blocks.1": "CRCRCC", "transformer_blocks.2.ff": {"cond": "CCCCCC", "uncond": "CSSSSC"}})
    text = plan_to_json(a)
    lines = text.splitlines()
    # each decision on its own line; agreeing branches written once, differing ones as a dict
    assert sum('"transformer_blocks.1":' in ln for ln in lines) == 1
    line = next(ln for ln in lines if '"transformer_blocks.1":' in ln)
    assert line.rstrip(",").endswith('"CRCRCC"')
    line = next(ln for ln in lines if '"transformer_blocks.2.ff":' in ln)
    assert '{"cond": "CCCCCC", "uncond": "CSSSSC"}' in line
    # codes line up in one column
    cols = {ln.index('"C') for ln in lines if ln.startswith('    "transformer_blocks') and '": "' in ln}
    assert len(cols) == 1
    # a one-step change is a one-line diff
    b = a.with_decisions({"transformer_blocks.1": "CRCCCC"})
    diff = [(x, y) for x, y in zip(text.splitlines(), plan_to_json(b).splitlines()) if x != y]
    assert len(diff) == 1 and "transformer_blocks.1" in diff[0][0]
    assert json.loads(text)["schema"] == PLAN_FORMAT.name


def test_masks_and_effective_compute_resolve_the_hierarchy():
    plan = toy_plan({"transformer_blocks.0": "CRCDCC", "transformer_blocks.0.attn1": "CCRCCC"}, layout="none")
    mask = plan.compute_mask()
    assert mask["transformer_blocks.0.attn1"]["cond"] == [True, True, False, True, True, True]
    eff = plan.effective_compute()
    # the attention runs only where its block computes and it does not reuse itself
    assert eff["transformer_blocks.0.attn1"]["cond"] == [True, False, False, False, True, True]
    assert eff["transformer_blocks.0.ff"]["cond"] == [True, False, True, False, True, True]
    assert eff["transformer_blocks.1.ff"]["cond"] == [True] * 6
    assert plan.leaf_modules()[:2] == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    # 6 leaves; step 1: block 0 reused -> 2 of 6 skipped; step 2: its attention reused -> 1 of 6
    assert plan.computed_fraction_per_step() == pytest.approx([1, 4 / 6, 5 / 6, 4 / 6, 1, 1])
    assert plan.action_counts()["reuse"] == 2 and plan.action_counts()["reuse_residual"] == 1


@pytest.mark.parametrize(
    "decisions, layout, message",
    [
        ({"transformer_blocks.0": "CRC"}, "none", r'\$\.decisions\["transformer_blocks\.0"\]: expected 6 action codes'),
        ({"transformer_blocks.0": "RCCCCC"}, "none", r"step 0 must compute"),
        ({"transformer_blocks.0.attn1": "CDCCCC"}, "none", r"reuse_residual \(D\) applies to blocks only"),
        ({"transformer_blocks.0": "CSCCCC"}, "none", r"share_cfg \(S\) needs two CFG branches"),
        ({"transformer_blocks.0": "CSCCCC"}, "cond_uncond", r"needs the uncond branch to compute"),
        ({"transformer_blocks.0": {"cond": "CSCCCC", "uncond": "CCCCCC"}}, "separate", r"only uncond may share_cfg"),
        ({"transformer_blocks.0.attn1": {"cond": "CCCCCC", "uncond": "CSCCCC"}, "transformer_blocks.0": "CRCCCC"},
         "cond_uncond", r"cond branch to compute the module there"),
        ({"transformer_blocks.9": "CCCCCC"}, "none", r"not in model.modules"),
    ],
)
def test_rule_violations_name_the_path(decisions, layout, message):
    with pytest.raises(PlannerError, match=message):
        toy_plan(decisions, layout=layout)


def test_output_codes_serve_whole_steps_round_trip_and_name_their_path():
    import jsonschema

    def with_output(output, decisions=None):
        return plan_for_model(Toy(), steps=6, cfg_layout="cond_uncond", decisions=decisions or {}, output=output,
                              scheduler="ddim", guidance=3.0)

    plan = with_output("CCFCQC", {"transformer_blocks.1": "CRCCCC"})
    assert plan.served_steps() == {2, 4}
    eff = plan.effective_compute()  # nothing runs at a served step, whatever the decisions say
    assert eff["transformer_blocks.0.ff"]["cond"] == [True, True, False, True, False, True]
    assert eff["transformer_blocks.1"]["uncond"] == [True, False, False, True, False, True]
    assert plan.computed_fraction_per_step()[2] == 0 and plan.computed_fraction_per_step()[3] == 1
    doc = plan_to_dict(plan)
    assert doc["output"] == "CCFCQC" and doc["version"] == PLAN_FORMAT.version
    jsonschema.validate(doc, PLAN_FORMAT.schema)
    assert loads_plan(plan_to_json(plan)) == plan
    assert "output" not in plan_to_dict(toy_plan())  # a plan without it is written as before
    for bad, message in [("CCF", "expected a string of 6 action codes"), ("CCDCCC", "unknown action code"),
                         ("FCCCCC", "step 0 must compute")]:
        with pytest.raises(PlannerError, match=r"^\$\.output: " + message):
            with_output(bad)
    with pytest.raises(PlannerError, match=r"\$\.output: expected a string of action codes for the transformer's whole output"):
        loads_plan(json.dumps(dict(doc, output="CCSCCC")))


def _doc(**changes):
    doc = plan_to_dict(toy_plan({"transformer_blocks.1": "CRCRCC"}))
    for path, value in changes.items():
        node = doc
        keys = path.split("/")
        for k in keys[:-1]:
            node = node[k]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"schema": "dit-cache-plan",', r"^p\.json: not valid JSON: .* line 1 column \d+$"),
        ("[1, 2]", r"\$: expected a JSON object, got an array"),
        (_doc(schema="something-else"), r"\$\.schema: expected 'dit-cache-plan'"),
        (_doc(**{"sampler/steps": "six"}), r"\$\.sampler\.steps: expected a number of sampling steps >= 1; 'six' is not of type 'integer'"),
        (_doc(**{"sampler/cfg_layout": "sideways"}), r"\$\.sampler\.cfg_layout: expected one of none, cond_uncond"),
        (_doc(**{"decisions/transformer_blocks.1": "CRXRCC"}), r'\$\.decisions\["transformer_blocks\.1"\]: expected a string of action codes'),
        (_doc(**{"decisions/transformer_blocks.1": 7}), r'\$\.decisions\["transformer_blocks\.1"\]: expected a string of action codes'),
        (_doc(**{"model/fingerprint": KeyError}), r"\$\.model: 'fingerprint' is a required property"),
        (_doc(**{"sampler/flavour": 1}), r"\$\.sampler: Additional properties are not allowed \('flavour'"),
        (_doc(**{"decisions/transformer_blocks.1": {"cond": "CRCRCC"}}), r'expected branches \[\'cond\', \'uncond\'\]'),
    ],
)
def test_load_errors_are_one_line_with_json_path(text, message):
    with pytest.raises(PlannerError) as info:
        loads_plan(text, "p.json")
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(message, msg), msg


def test_versions_older_minor_loads_newer_major_refused(monkeypatch):
    import dataclasses

    import planner.plan.io as plan_io

    doc = json.loads(_doc())
    assert loads_plan(json.dumps(doc)).decisions["transformer_blocks.1"]["cond"] == "CRCRCC"
    # a planner at 1.3.0 reads a 1.0.0 file without a word
    monkeypatch.setattr(plan_io, "PLAN_FORMAT", dataclasses.replace(PLAN_FORMAT, version="1.3.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loads_plan(json.dumps(dict(doc, version="1.0.0"))).steps == 6
    monkeypatch.undo()
    # a newer minor loads, ignoring fields it adds
    newer = dict(doc, version="1.99.0")
    newer["sampler"] = dict(doc["sampler"], sigma_schedule="karras")
    with pytest.warns(UserWarning, match=f"newer than {PLAN_FORMAT.version}"):
        assert loads_plan(json.dumps(newer)).steps == 6
    with pytest.raises(PlannerError, match=r"plan format version 2\.0\.0 is newer than this planner reads \(1\.x\); upgrade"):
        loads_plan(json.dumps(dict(doc, version="2.0.0")))
    with pytest.raises(PlannerError, match="expected a semantic version"):
        loads_plan(json.dumps(dict(doc, version="one")))


def test_schema_file_is_valid_json_schema_and_matches_saved_plans():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(PLAN_FORMAT.schema)
    jsonschema.validate(json.loads(plan_to_json(toy_plan())), PLAN_FORMAT.schema)


def test_the_schema_takes_every_action_code_and_no_other():
    """The schema's code pattern is written by hand: a code the executor knows must load, any other not."""
    from planner.plan import ACTION_CODES

    pattern = PLAN_FORMAT.schema["$defs"]["codes"]["pattern"]
    assert all(re.fullmatch(pattern, "C" + code) for code in ACTION_CODES)
    assert sorted(re.fullmatch(r"\^\[(\w+)\]\+\$", pattern).group(1)) == sorted(ACTION_CODES)


def test_check_model_and_steps(digits):
    plan = plan_for_runner(digits, SAMPLER, {})
    plan.check_model(digits)
    plan.check_steps(6)
    with pytest.raises(PlannerError, match="plan was made for 6 steps, the run has 7"):
        plan.check_steps(7)
    with pytest.raises(PlannerError, match="plan was made for a DiTTransformer2DModel, not a Toy"):
        plan.check_model(Toy())
    other = toy_plan()
    other.model.cls = "DiTTransformer2DModel"
    with pytest.raises(PlannerError, match="3 blocks, this DiTTransformer2DModel has 8"):
        other.check_model(digits)
    fp = plan_for_runner(digits, SAMPLER, {})
    fp.model.fingerprint = "0" * 16
    with pytest.raises(PlannerError, match="fingerprint 0000000000000000"):
        fp.check_model(digits)
    fp.check_model(digits, strict=False)
    with pytest.raises(PlannerError, match=r"CFG layout 'cond_uncond', the run has 'none'"):
        plan.check_sampler(digits, Sampler("ddim", 6, 1.0))


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("plans") / "digits.json"
    plan = plan_for_runner(
        digits,
        SAMPLER,
        {"transformer_blocks.1": "CRCRCC", "transformer_blocks.2.attn1": {"cond": "CCCCCC", "uncond": "CSSSSC"}},
        strategy="manual",
    )
    plan.prediction.speedup = 1.25
    return save_plan(plan, path)


def test_cli_show_text_and_json(plan_file, capsys):
    assert main(["plan", "show", str(plan_file)]) == 0
    out = capsys.readouterr().out
    assert "DiTTransformer2DModel (digits-dit)" in out and "6 steps" in out and "speedup 1.250x" in out
    assert re.search(r"transformer_blocks\.1\s+CRCRCC", out)
    assert re.search(r"CSSSSC\s+uncond", out)
    assert main(["plan", "show", str(plan_file), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["sampler"]["steps"] == 6 and payload["actions"]["share_cfg"] == 4
    assert payload["reusing_modules"]["transformer_blocks.2.attn1"] == {"cond": "CCCCCC", "uncond": "CSSSSC"}
    assert payload["computed_fraction_per_step"][0] == 1.0


def test_cli_show_and_plot_a_served_output(digits, tmp_path, capsys):
    path = save_plan(plan_for_runner(digits, SAMPLER, {}, output="CCFCFC"), tmp_path / "out.json")
    assert main(["plan", "show", str(path)]) == 0
    assert "output: CCFCFC (the whole transformer output; not run at 2 steps)" in capsys.readouterr().out
    assert main(["plan", "show", str(path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["output"] == "CCFCFC" and payload["computed_fraction_per_step"] == [1, 1, 0, 1, 0, 1]
    assert main(["plan", "plot", str(path), "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_plot_writes_png(plan_file, tmp_path, capsys):
    out = tmp_path / "map.png"
    assert main(["plan", "plot", str(plan_file), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    from PIL import Image

    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 300


def test_cli_validate_ok(plan_file, capsys):
    assert main(["plan", "validate", str(plan_file), "--model", "digits-dit", "--steps", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checks"] == ["schema", "rules", "steps", "model", "sampler"]


def test_cli_errors_are_one_line_and_exit_2(plan_file, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"schema": ')
    bad_schema = tmp_path / "schema.json"
    doc = json.loads(plan_file.read_text())
    doc["sampler"]["steps"] = 0
    bad_schema.write_text(json.dumps(doc))
    cases = [
        (["plan", "show", str(bad_json)], "not valid JSON"),
        (["plan", "validate", str(bad_schema)], "$.sampler.steps: expected a number of sampling steps >= 1"),
        (["plan", "validate", str(plan_file), "--model", "tiny:dit"], "plan was made for a model with 8 blocks"),
        (["plan", "validate", str(plan_file), "--steps", "10"], "plan was made for 6 steps, the run has 10"),
        (["plan", "validate", str(plan_file), "--model", "digits-dit", "--guidance", "1"], "CFG layout"),
        (["plan", "show", str(tmp_path / "missing.json")], "no such plan file"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, (argv, err)


def test_cli_process_exit_status(plan_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    proc = subprocess.run([sys.executable, "-m", "planner", "plan", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"planner: error: {bad}: not valid JSON: Expecting value at line 1 column 1"]
