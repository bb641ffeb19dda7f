"""dit-cache-planner: profile a Diffusion Transformer, search a feature-cache plan, apply it.

The public API is re-exported here lazily, so ``import planner`` stays cheap for the CLI.
"""

__version__ = "0.1.0"

_LAZY = {
    "PlannerError": "planner.errors",
    "Sampler": "planner.runner",
    "Runner": "planner.runner",
    "load_runner": "planner.runner",
    "as_runner": "planner.runner",
    "make_sampler": "planner.runner",
    "Plan": "planner.plan",
    "load_plan": "planner.plan",
    "save_plan": "planner.plan",
    "apply_plan": "planner.executor",
    "profile_model": "planner.profile",
    "load_profile": "planner.profile",
    "Profile": "planner.profile",
    "LatencyModel": "planner.profile",
    "search_plan": "planner.search.api",
    "Budget": "planner.search.budget",
    "strategy_names": "planner.search",
    "evaluate_plan": "planner.evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
