"""Where benchmark scripts keep their figures: ``benchmarks/results/<name>.json`` (everything measured,
with the command and the machine) and ``<name>.md`` (the text the script prints). The docs quote
these files, never figures measured by hand."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def psnr_text(scores: dict) -> str:
    """``pooled / mean / worst`` PSNR of a :func:`planner.metrics.psnr_summary`, as the benchmarks' tables print it."""
    return f"{scores['psnr']:.2f} / {scores['psnr_mean']:.2f} / {scores['psnr_worst']:.2f}"


def machine() -> dict[str, Any]:
    """What the figures depend on: versions, device, threads, load."""
    import os
    import platform

    import torch

    import planner

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"planner": planner.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1_5_15": list(load) if load else None}


def finish(name: str, payload: dict, render: Callable[[], None], as_json: bool, out: str | None = None) -> int:
    """Write ``payload`` and the text ``render()`` prints to the results folder (or ``out``), then print
    one of them. Returns the exit status."""
    from planner.io import write_json_atomic, write_text_atomic

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        render()
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    folder = Path(out) if out else RESULTS
    record = {"command": command, "machine": machine(), **payload}
    write_json_atomic(folder / f"{name}.json", record)
    write_text_atomic(folder / f"{name}.md", f"Written by `{command}`.\n\n{text.getvalue()}")
    print(json.dumps(record, indent=2, default=float) if as_json else text.getvalue(), end="" if not as_json else "\n")
    return 0
