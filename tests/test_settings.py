"""Declared strategy settings: every strategy's settings are typed, documented and checked in one line
before anything runs; ``planner strategies`` prints them from the declaration; ``search_plan`` is the
one-line entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from planner.cli import main
from planner.errors import PlannerError
from planner.search import get_strategy, make_strategy, strategy_names
from planner.search.settings import RUN_OPTIONS, describe, settings_table

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["greedy", "harmonica", "l2c", "optuna", "smoothcache", "uniform"]


def test_every_strategy_is_registered_with_a_summary_and_settings():
    assert strategy_names() == STRATEGIES
    for name in STRATEGIES:
        cls = get_strategy(name)
        assert cls.summary and cls.Settings is not None
        rows = describe(cls.Settings)
        assert rows and all(r["doc"] for r in rows), f"{name}: every setting needs a one-line description"


@pytest.mark.parametrize("name", STRATEGIES)
def test_defaults_are_valid_and_settings_are_frozen(name):
    strategy = make_strategy(name)
    with pytest.raises(Exception):
        strategy.settings.__setattr__(next(iter(type(strategy.settings).model_fields)), None)
    assert json.dumps(strategy.settings.record())  # plain JSON for a plan's provenance


def _first_field(name, kind):
    cls = get_strategy(name).Settings
    for field, info in cls.model_fields.items():
        if field in RUN_OPTIONS:
            continue
        if info.annotation in kind:
            return field
    return None


@pytest.mark.parametrize("name", STRATEGIES)
def test_unknown_keys_name_the_closest_setting(name):
    field = next(f for f in get_strategy(name).Settings.model_fields if len(f) > 3)
    typo = field[:-1] + ("x" if field[-1] != "x" else "y")
    with pytest.raises(PlannerError, match=rf"has no setting '{typo}' \(did you mean '{field}'\?\)") as info:
        make_strategy(name, {typo: 1})
    assert "\n" not in str(info.value)
    with pytest.raises(PlannerError, match="has no setting 'no_such_thing'; `planner strategies"):
        make_strategy(name, {"no_such_thing": 1})


@pytest.mark.parametrize("name", STRATEGIES)
def test_run_options_a_strategy_does_not_declare_are_refused_with_their_flag(name):
    declared = set(get_strategy(name).Settings.model_fields)
    for option, flag in RUN_OPTIONS.items():
        if option in declared:
            continue
        with pytest.raises(PlannerError, match=f"does not use {flag}"):
            make_strategy(name, {option: "sqlite:///x.db" if option == "storage" else 1})


@pytest.mark.parametrize("name", STRATEGIES)
def test_nan_infinity_and_wrong_types_are_refused(name):
    number = _first_field(name, (float, float | None))
    if number is not None:
        for bad in (math.nan, math.inf, "nan", "abc"):
            with pytest.raises(PlannerError, match=number):
                make_strategy(name, {number: bad})
    flag = _first_field(name, (bool,))
    integer = _first_field(name, (int, int | None))
    if integer is not None:
        with pytest.raises(PlannerError, match=integer):
            make_strategy(name, {integer: 1.5})
        with pytest.raises(PlannerError, match=f"{integer} takes int"):
            make_strategy(name, {integer: True})  # a boolean is never a number
    if flag is not None:
        assert getattr(make_strategy(name, {flag: "false"}).settings, flag) is False


def test_lists_take_json_lists_comma_strings_and_lone_values():
    assert make_strategy("optuna", {"shifts": "-1,0,1"}).settings.shifts == (-1, 0, 1)
    assert make_strategy("optuna", {"tolerances": [80, 100]}).settings.tolerances == (80, 100)
    assert make_strategy("l2c", {"lambda": 0.01}).settings.lambdas == (0.01,)
    assert make_strategy("optuna", {"baselines": "none"}).settings.baselines == ()


def test_the_cli_refuses_bad_settings_before_loading_a_model(capsys, monkeypatch):
    import planner.runner

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(planner.runner, "load_runner", no_model)
    for argv, expected in (
        (["search", "--strategy", "uniform", "--n-trials", "5"], "strategy uniform does not use --n-trials"),
        (["search", "--param", "levle=block"], "has no setting 'levle'"),
        (["search", "--param", "delta=abc"], "delta: Input should be a valid number"),
        (["search", "--strategy", "greedy", "--storage", "postgresql://u:secret@h/db"], "does not use --storage"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "secret" not in err[0], err


def test_strategies_command_prints_the_declaration(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STRATEGIES)
    assert main(["strategies", "greedy", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in payload["settings"]] == list(get_strategy("greedy").Settings.model_fields)
    assert main(["search", "--strategy", "l2c", "--list-params"]) == 0
    assert "lambdas" in capsys.readouterr().out


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_docs_show_each_strategy_settings_table_as_declared(name):
    page = ROOT / "docs" / "strategies" / f"{name}.md"
    assert page.is_file(), f"docs/strategies/{name}.md is missing"
    assert settings_table(get_strategy(name).Settings) in page.read_text(), (
        f"docs/strategies/{name}.md is out of date: paste `planner strategies {name} --markdown`")


def test_search_plan_is_one_call(digits10, tmp_path):
    import planner

    out = tmp_path / "plan.json"
    plan = planner.search_plan(digits10.runner, "1.5x", strategy="uniform", level="block", sampler=digits10.sampler,
                               profile=digits10.profile, calib_samples=2, out=out)
    assert plan.prediction.speedup >= 1.5 and plan.provenance.strategy == "uniform" and out.is_file()
    assert plan.provenance.params["level"] == "block"
    with pytest.raises(PlannerError, match="has no setting 'levle'"):
        planner.search_plan(digits10.runner, "1.5x", strategy="uniform", levle="block")
