"""Cache plans: the data model (:mod:`.model`), building plans for a model (:mod:`.build`) and plan
files (:mod:`.io`). Importing this package needs neither torch nor diffusers."""

from planner.plan.build import plan_for_model, plan_for_runner
from planner.plan.io import (
    PLAN_FORMAT,
    artifacts_dir,
    load_plan,
    loads_plan,
    plan_from_dict,
    plan_to_dict,
    plan_to_json,
    save_plan,
    staged_plan,
)
from planner.plan.model import (
    ACTION_CODES,
    CODE_OF,
    COMPUTE,
    FORECAST_ORDER,
    OUTPUT_CODES,
    REUSE_CODES,
    ModelRef,
    Plan,
    Prediction,
    Provenance,
    SamplerRef,
    normalize_decisions,
)

__all__ = [
    "ACTION_CODES",
    "CODE_OF",
    "COMPUTE",
    "FORECAST_ORDER",
    "OUTPUT_CODES",
    "PLAN_FORMAT",
    "REUSE_CODES",
    "ModelRef",
    "Plan",
    "Prediction",
    "Provenance",
    "SamplerRef",
    "artifacts_dir",
    "load_plan",
    "loads_plan",
    "normalize_decisions",
    "plan_for_model",
    "plan_for_runner",
    "plan_from_dict",
    "plan_to_dict",
    "plan_to_json",
    "save_plan",
    "staged_plan",
]
