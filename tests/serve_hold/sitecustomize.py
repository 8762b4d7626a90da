"""Test-only: a ``diffgen serve`` started with this directory on ``PYTHONPATH`` and
``DIFFGEN_SERVE_HOLD=<file>`` in its environment holds its batcher at canvas boundaries while the
file says so (tests/test_serve_batching.py): no file, run; a number ``N > 0``, run one canvas and
write ``N - 1``; any other content (``0``, empty), wait at the boundary (cancelled rows are still
dropped and waiting ones admitted there). Python imports ``sitecustomize`` at startup, so the
server's own code carries no such hook.
"""

import os
import time
from pathlib import Path

HOLD_ENV = "DIFFGEN_SERVE_HOLD"
POLL = 0.02  # seconds between two looks at the file while held (how often, not a deadline)


def held(file: Path) -> bool:
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        return False
    if not text.isdigit() or int(text) <= 0:
        return True
    file.write_text(str(int(text) - 1))
    return False


def install(path: str) -> None:
    from diffgen.denoise.batcher import Batcher

    file = Path(path)

    def at_boundary(self) -> bool:
        if not held(file):
            return False
        time.sleep(POLL)
        return True

    Batcher._at_boundary = at_boundary


if os.environ.get(HOLD_ENV):
    install(os.environ[HOLD_ENV])
