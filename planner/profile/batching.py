"""How many calibration samples a profile pass runs at once (a *micro-batch*)."""

from __future__ import annotations


def micro_batch(runner, samples: int, batch_size: int | None = None) -> int:
    """Samples per micro-batch of a profile run: ``batch_size`` (default all ``samples``), at most
    ``samples``, and at most what one pipeline call of the runner's family takes (its ``max_batch``).

    Every pass of a profile counts steps with a hook on the transformer, one micro-batch being one
    pipeline run. A micro-batch larger than ``max_batch`` would make :meth:`planner.runner.Runner.run`
    split it into several pipeline calls, whose steps the hook would count one after the other
    (HunyuanVideo 1.5 takes one sample per call: two samples of a 6-step run looked like 12 steps).
    """
    batch = min(samples, batch_size or samples)
    limit = getattr(getattr(runner, "family", None), "max_batch", None)
    return max(1, min(batch, int(limit))) if limit is not None else batch
