"""The command line: entry points, --json, and one-line errors for bad input."""

import json
import subprocess
import sys

import planner
from planner.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_version_and_help(capsys):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"planner {planner.__version__}"
    assert main(["--help"]) == 0  # in process: one real process above is enough
    out = capsys.readouterr().out
    assert "zoo" in out and "sample" in out


def test_zoo_list_json(capsys):
    assert main(["zoo", "list", "--json"]) == 0
    specs = [m["spec"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert specs[0] == "digits-dit" and "tiny:flux" in specs


def test_sample_writes_a_grid_and_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--n", "10", "--steps", "10", "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert out.is_file() and payload["n"] == 10
    assert payload["meter"]["accuracy"] >= 0.8
    from PIL import Image

    assert Image.open(out).size[0] > 8 * 10


def test_bad_input_gives_one_line_and_exit_2(tmp_path, cli):
    """In process (the exit status of a real process is checked in test_plan.py and test_bad_input.py)."""
    for args in (
        ["sample", "--model", "no-such-model"],
        ["sample", "--scheduler", "no-such-scheduler", "--n", "1"],
        ["sample", "--n", "0"],
        ["zoo", "train", "nothing"],
        ["sample", "--steps", "many"],
    ):
        out = ["--out", str(tmp_path / "x.png")] if args[0] == "sample" else []
        r = cli(*args, *out, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.png").exists()
