"""One place that every Triton launch site reports to, so kernels can be counted without a GPU.

A fused step is judged by how many kernels it launches (``bench/kernel_count.py``). On the CPU the
torch side is counted with a dispatch mode (every non-view aten op is one kernel on a GPU); the
Triton side is counted here: each launch site wraps its launch in :func:`launch`, which adds one to
:data:`COUNTS` under the kernel's name and marks the thread as inside a launch. Under
``TRITON_INTERPRET=1`` the interpreter copies arguments with torch ops of its own; a counting
dispatch mode asks :func:`inside` and skips those, so one Triton kernel counts once, as on CUDA.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

#: Triton launches so far in this process, by kernel name.
COUNTS: collections.Counter = collections.Counter()
#: Grouped expert products so far, by the path that ran them (``triton``, ``torch``,
#: ``fp8_scaled``): for tests and benchmarks that must know which path ran.
GROUPED_PATHS: collections.Counter = collections.Counter()
_STATE = threading.local()


@contextlib.contextmanager
def launch(name: str) -> Iterator[None]:
    """Wrap one Triton kernel launch: counts it and marks the thread as inside a launch."""
    COUNTS[name] += 1
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


def inside() -> bool:
    """Whether this thread is inside a Triton launch (its interpreter's own torch ops are not kernels)."""
    return getattr(_STATE, "depth", 0) > 0


def total() -> int:
    """Triton launches so far, all kernels."""
    return sum(COUNTS.values())
