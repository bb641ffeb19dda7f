"""Memory on the host and on the device: what is available, and the peak a block of work reached.

Host figures come from ``/proc`` (Linux): ``MemAvailable`` of ``/proc/meminfo``, capped by a
cgroup v2 limit when the process runs under one, and the process's peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``). Device figures come from torch's CUDA allocator
(``mem_get_info``, ``max_memory_allocated``). Where a figure cannot be read it is ``None``, never a
guess.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

GiB = 1024**3


def _meminfo_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes the process's cgroup (v2) still allows, or None without a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError, IndexError):
        return None


def host_available() -> int | None:
    """Bytes of host memory a new allocation can take without swapping (MemAvailable, cgroup-capped)."""
    kib = _meminfo_kib("MemAvailable")
    avail = kib * 1024 if kib is not None else None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def host_total() -> int | None:
    kib = _meminfo_kib("MemTotal")
    return kib * 1024 if kib is not None else None


def device_available(device: torch.device) -> int | None:
    """Bytes free on a CUDA device, counting what torch's caching allocator holds but does not use;
    None for the CPU (whose memory is the host's)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def device_total(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[1])


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_host_peak() -> bool:
    """Reset the process's peak resident set (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    """Extra memory a block of work reached above where it started, in bytes (None: not measurable)."""

    host: int | None = None
    device: int | None = None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Measure the peak extra memory of the ``with`` block: on CUDA torch's allocated bytes, on the
    host the resident set (its high-water mark is reset first, so the figure belongs to the block)."""
    device = torch.device(device)
    peak = Peak()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        dev_before = torch.cuda.memory_allocated(device)
    host_ok = _reset_host_peak()
    rss_before = _status_kib("VmRSS")
    try:
        yield peak
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            peak.device = int(torch.cuda.max_memory_allocated(device) - dev_before)
        hwm = _status_kib("VmHWM")
        if host_ok and hwm is not None and rss_before is not None:
            peak.host = max(0, (hwm - rss_before) * 1024)


def fmt_bytes(n: float | None) -> str:
    """``1.5 GiB``, ``320 MiB``, ``12 KiB``; ``?`` for None."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
