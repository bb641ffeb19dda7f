"""Shared test set-up: session-wide models and profiles, the fast timing config, torch threads, and the
``slow`` marker.

* ``python -m pytest`` runs the fast suite; ``python -m pytest --slow`` adds the tests marked
  ``slow`` (training, whole-sampler comparisons, torch.compile), as CI does.
* A test module that sets ``TORCH_THREADS = n`` runs with at most n torch threads.
* Searches and budgets in tests run on FLOP-costed profiles (``costs="flops"``) or the committed
  digits-dit profile, never on timings measured during the test: a busy machine cannot move them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from planner.profile import TimingConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS_PROFILE = ROOT / "profiles" / "digits-dit_ddim50_g3_cpu"
# The fewest rounds that still exercise every part of the timing pass (tests that time things check
# structure, not figures).
FAST_TIMING = TimingConfig(warmup=1, repeats=3, run_repeats=1)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    kept = [item for item in items if "slow" not in item.keywords]
    dropped = [item for item in items if "slow" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(autouse=True, scope="module")
def torch_threads(request):
    limit = getattr(request.module, "TORCH_THREADS", None)
    if limit is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(limit, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The shipped digits-dit runner, loaded once; tests apply plans to it and remove them again."""
    from planner.runner import load_runner

    return load_runner("digits-dit")


@pytest.fixture(scope="session")
def digits_profile():
    """The committed digits-dit profile (DDIM 50 steps, guidance 3)."""
    from planner.profile import load_profile

    return load_profile(DIGITS_PROFILE)


@pytest.fixture(scope="session")
def digits10(digits, tmp_path_factory):
    """digits-dit at DDIM 10 steps, guidance 3, with a FLOP-costed profile of 2 calibration samples."""
    from planner.profile import profile_model
    from planner.runner import Sampler

    sampler = Sampler("ddim", 10, 3.0)
    folder = tmp_path_factory.mktemp("profile") / "digits10"
    profile = profile_model(digits, sampler, samples=2, lags=2, costs="flops", out=folder)
    return SimpleNamespace(runner=digits, sampler=sampler, profile=profile, folder=folder)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(kind)``: the tiny pipeline of that kind (``dit``, ``pixart``, ``sd3``, ``flux``, ``wan``), built once."""
    from planner.runner import load_runner

    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = load_runner(f"tiny:{kind}")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def context_of():
    """``context_of(bundle, artifacts=None, samples=2)``: a search context on a ``digits10``-like bundle."""
    from planner.search.context import SearchContext

    def make(bundle, artifacts=None, samples: int = 2):
        return SearchContext.build(bundle.runner, bundle.sampler, bundle.profile, samples=samples, artifacts=artifacts)

    return make


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``planner ARGS`` in this process (a subprocess would spend seconds importing torch) inside ``cwd``."""
    from planner.cli import main

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        code = main(list(args))
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return run
