"""Shared test set-up: a test module that sets ``TORCH_THREADS = n`` runs with at most n torch threads
(CI has 2 cores; a test that times or trains is steadier and no slower with fewer threads)."""

import pytest
import torch


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
