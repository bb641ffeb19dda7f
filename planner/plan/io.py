"""Plan files: the JSON document, its layout on disk, loading (checked) and saving (atomic).

On disk a plan is JSON with a schema name and a semantic version (``planner/schemas/plan.schema.json``);
:func:`load_plan` checks it with :mod:`planner.artifact` (version, schema), then against the rules the
schema cannot express (:meth:`Plan.validate`). Never pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from planner.artifact import DocumentFormat, loads_json
from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.plan.build import as_number
from planner.plan.components import ComponentRef
from planner.plan.model import ModelRef, Plan, Prediction, Provenance, SamplerRef, normalize_decisions

# 1.1.0: the sampler also records its scheduler's config hash and, when known, resolution and frames.
# 1.2.0: the provenance also records the model's revision, the dtype and the calibration prompts.
# 1.3.0: the sampler also records, when known, the shape of one sample of the transformer's input.
# 1.4.0: model.components, for pipelines that run several transformers (Wan 2.2); see planner.plan.components.
# 1.5.0: prediction.costs, what the predicted speedup is in (measured time or FLOPs).
# 1.6.0: the forecast2_limited action (L).
# 1.7.0: output, the transformer's whole output reused or forecast at some steps (absent: it always runs).
PLAN_FORMAT = DocumentFormat(name="dit-cache-plan", version="1.7.0", noun="cache plan", version_key="version",
                             schema_file="plan.schema.json")
PREDICTION_KEYS = ("speedup", "latency_fraction", "calib_error", "metric", "costs")


def plan_to_dict(plan: Plan) -> dict:
    """The JSON document (branches that agree collapse to one string; modules in forward order)."""
    decisions = {}
    for m in plan._all_modules():
        if m not in plan.decisions:
            continue
        per_branch = plan.decisions[m]
        values = list(per_branch.values())
        decisions[m] = values[0] if all(v == values[0] for v in values) else {b: per_branch[b] for b in plan.branches}
    s, p, pv = plan.sampler, plan.prediction, plan.provenance
    return {
        "schema": PLAN_FORMAT.name,
        "version": PLAN_FORMAT.version,
        "model": {"class": plan.model.cls, "fingerprint": plan.model.fingerprint, "spec": plan.model.spec,
                  "modules": list(plan.model.modules), **_components_to_dict(plan.model.components)},
        "sampler": {"scheduler": s.scheduler, "scheduler_class": s.scheduler_class,
                    "scheduler_config": s.scheduler_config, "steps": s.steps,
                    "guidance": s.guidance, "cfg_layout": CfgLayout(s.cfg_layout).value,
                    "timesteps": [as_number(x) for x in s.timesteps],
                    "resolution": list(s.resolution) if s.resolution is not None else None, "frames": s.frames,
                    "input_shape": list(s.input_shape) if s.input_shape is not None else None},
        **({"output": plan.output} if plan.output is not None else {}),
        "decisions": decisions,
        "prediction": {k: getattr(p, k) for k in PREDICTION_KEYS},
        "provenance": {"strategy": pv.strategy, "params": pv.params, "profile_id": pv.profile_id,
                       "calib_seeds": list(pv.calib_seeds), "versions": dict(pv.versions), "device": pv.device,
                       "created": pv.created, "model_revision": pv.model_revision, "dtype": pv.dtype,
                       "prompts": pv.prompts},
    }


def _components_to_dict(components: dict | None) -> dict:
    """``{"components": ...}`` for a multi-transformer plan; nothing for a single-transformer one (its file
    reads as before)."""
    if not components:
        return {}
    return {"components": {c: {"class": r.cls, "fingerprint": r.fingerprint, "steps": list(r.steps)}
                           for c, r in components.items()}}


def _components_from_dict(doc: dict | None) -> dict | None:
    if not doc:
        return None
    return {c: ComponentRef(cls=r["class"], fingerprint=r["fingerprint"], steps=list(r["steps"])) for c, r in doc.items()}


def plan_to_json(plan: Plan) -> str:
    """The plan as JSON text: indented, one line per module decision with the codes aligned in a column."""
    from planner.io import json_safe

    return _format(json_safe(plan_to_dict(plan))) + "\n"


def plan_from_dict(doc: Any, source: str = "plan") -> Plan:
    """A plan from a parsed JSON document: version and schema check, then the plan rules (:meth:`Plan.validate`)."""
    doc = PLAN_FORMAT.check(doc, source)
    s, p, pv = doc["sampler"], doc.get("prediction", {}), doc.get("provenance", {})
    layout = CfgLayout(s["cfg_layout"])
    try:
        plan = Plan(
            model=ModelRef(cls=doc["model"]["class"], fingerprint=doc["model"]["fingerprint"],
                           modules=list(doc["model"]["modules"]), spec=doc["model"].get("spec"),
                           components=_components_from_dict(doc["model"].get("components"))),
            sampler=SamplerRef(scheduler=s["scheduler"], steps=s["steps"], guidance=float(s["guidance"]),
                               cfg_layout=layout, timesteps=list(s.get("timesteps", [])),
                               scheduler_class=s.get("scheduler_class"), scheduler_config=s.get("scheduler_config"),
                               resolution=list(s["resolution"]) if s.get("resolution") is not None else None,
                               frames=s.get("frames"),
                               input_shape=list(s["input_shape"]) if s.get("input_shape") is not None else None),
            decisions=normalize_decisions(doc["decisions"], layout.branches, s["steps"], strict_branches=True),
            prediction=Prediction(**{k: p.get(k) for k in PREDICTION_KEYS}),
            provenance=Provenance(strategy=pv.get("strategy", "manual"), params=dict(pv.get("params", {})),
                                  profile_id=pv.get("profile_id"), calib_seeds=list(pv.get("calib_seeds", [])),
                                  versions=dict(pv.get("versions", {})), device=pv.get("device"),
                                  created=pv.get("created"), model_revision=pv.get("model_revision"),
                                  dtype=pv.get("dtype"), prompts=pv.get("prompts")),
            output=doc.get("output"),
        )
        return plan.validate()
    except PlannerError as exc:
        raise PlannerError(f"{source}: {exc}") from None


def loads_plan(text: str, source: str = "plan") -> Plan:
    """Parse and check plan JSON text; PlannerError (one line, naming ``source`` and the JSON path) if bad."""
    return plan_from_dict(loads_json(text, source), source)


def load_plan(path: str | Path) -> Plan:
    """Load a plan file (JSON only, never pickle), checked against the schema and the plan rules."""
    from planner.io import read_text_limited

    path = Path(path)
    return loads_plan(read_text_limited(path, "plan file"), str(path))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Validate ``plan`` and write it to ``path`` atomically (complete or absent, never half-written)."""
    from planner.io import write_text_atomic

    plan.validate()
    return write_text_atomic(path, plan_to_json(plan))


# --------------------------------------------------------------------- a plan and its by-product folder
BUNDLE_DIGEST = "plan.sha256"


def artifacts_dir(plan_path: str | Path) -> Path:
    """The folder for a search's by-products: ``plans/NAME/`` beside ``plans/NAME.json``."""
    return Path(plan_path).with_suffix("")


class StagedPlan:
    """A plan being written with its by-products: ``folder`` is where they go until :func:`staged_plan`
    publishes them; set ``plan`` before the block ends."""

    def __init__(self, path: Path, folder: Path):
        self.path = path
        self.folder = folder
        self.plan: Plan | None = None


@contextlib.contextmanager
def staged_plan(path: str | Path) -> Iterator[StagedPlan]:
    """Write a plan file and its by-product folder (``plans/NAME.json`` and ``plans/NAME/``).

    The block writes the by-products into ``staged.folder`` (a temporary folder) and sets
    ``staged.plan``. When it ends without error: the subfolders of the old ``plans/NAME/`` that the
    block did not write (resumable training state: checkpoints) are carried over, the folder is
    swapped in as a whole, then the plan file is renamed into place; on error nothing is published.
    The folder records the sha256 of the plan file it belongs to (``plan.sha256``), so that a reader
    can tell a folder left beside an older plan by a search killed between the two renames
    (:func:`bundle_mismatch`). A plan without by-products gets no folder (an old one is removed).
    """
    from planner.io import atomic_folder, carry_over, write_text_atomic

    path = Path(path)
    if path.suffix != ".json":
        raise PlannerError(f"a plan file name ends in .json: {path}")
    folder = artifacts_dir(path)
    with atomic_folder(folder, keep_empty=False) as staging:
        staged = StagedPlan(path, staging)
        yield staged
        if staged.plan is None:
            raise PlannerError(f"no plan to write to {path}")
        text = plan_to_json(staged.plan.validate())
        carry_over(folder, staging, lambda entry: entry.is_dir() and not entry.is_symlink())
        if any(staging.iterdir()):
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            (staging / BUNDLE_DIGEST).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    write_text_atomic(path, text)


def bundle_mismatch(folder: str | Path) -> str | None:
    """Why the by-product folder ``folder`` does not belong to the plan file beside it (it records the
    digest of another one), or ``None`` when it does or nothing is recorded."""
    from planner.io import read_text_limited

    folder = Path(folder)
    record, plan_file = folder / BUNDLE_DIGEST, folder.with_suffix(".json")
    if not record.is_file() or not plan_file.is_file():
        return None
    want = read_text_limited(record, "plan digest", 4096).split()[0:1]
    have = hashlib.sha256(read_text_limited(plan_file, "plan file").encode("utf-8")).hexdigest()
    if want == [have]:
        return None
    return (f"{folder} was written for another version of {plan_file} (a search interrupted between writing "
            "them, or an edited plan)")


# --------------------------------------------------------------------- JSON layout
def _format(doc: dict) -> str:
    """Indented JSON where each decision sits on its own line, codes aligned, and number lists stay inline."""
    lines = ["{"]
    keys = list(doc)
    for i, key in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        if key == "decisions":
            lines.append(f'  "decisions": {_format_decisions(doc[key])}{comma}')
        else:
            lines.append(f"  {json.dumps(key)}: {_format_value(doc[key], 1)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def _format_value(value: Any, level: int) -> str:
    pad = "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {_format_value(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list):
        if not value or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return json.dumps(value)
        items = [f"{pad}{_format_value(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(value)


def _format_decisions(decisions: dict) -> str:
    if not decisions:
        return "{}"
    width = max(len(json.dumps(k)) for k in decisions) + 1
    lines = []
    for i, (k, v) in enumerate(decisions.items()):
        comma = "," if i < len(decisions) - 1 else ""
        key = (json.dumps(k) + ":").ljust(width + 1)
        val = json.dumps(v) if isinstance(v, str) else "{" + ", ".join(f"{json.dumps(b)}: {json.dumps(c)}" for b, c in v.items()) + "}"
        lines.append(f"    {key} {val}{comma}")
    return "{\n" + "\n".join(lines) + "\n  }"
