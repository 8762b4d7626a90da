"""``GET /metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4).

Written by hand rather than with ``prometheus-client``: a dozen counters and gauges read from the
engine at scrape time are a few lines of text, and the client's process-wide default registry
would collide when tests build several apps in one process (a registry per app would work, but
adds a dependency for what ``render`` does in twenty lines).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffgen.server.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def values(engine: Engine) -> list[tuple[str, str, str, float]]:
    """``(name, type, help, value)`` for every metric, from the engine's counts (the batcher's
    :class:`~diffgen.denoise.tickets.Counters`, which every request goes through) and its queue's."""
    counts = engine.counters()
    queue = engine.admission
    return [
        ("diffgen_requests_served_total", "counter", "Requests answered to the end.", counts.requests_served),
        ("diffgen_requests_cancelled_total", "counter", "Requests whose client went away first.",
         counts.requests_cancelled),
        ("diffgen_requests_failed_total", "counter", "Requests ended by a server error.", counts.requests_failed),
        ("diffgen_requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
         queue.rejected),
        ("diffgen_queue_depth", "gauge", "Requests waiting to start (for a batch slot or the model).", queue.queued),
        ("diffgen_rows_in_flight", "gauge", "Rows (choices) being denoised now.", counts.rows_in_flight),
        ("diffgen_rows_queued", "gauge", "Rows (choices) waiting to start.", counts.rows_queued),
        ("diffgen_rows_served_total", "counter", "Rows (choices) answered to the end.", counts.rows_served),
        ("diffgen_batches_total", "counter", "Batches formed (a batch lives until its last row leaves).",
         counts.batches),
        ("diffgen_batch_canvases_total", "counter", "Canvases denoised by batches (one per batch and boundary).",
         counts.canvases),
        ("diffgen_decoder_forwards_total", "counter",
         "Decoder forward passes (a batched pass counts once, whatever its rows).", counts.decoder_forwards),
        ("diffgen_row_forwards_total", "counter",
         "Decoder passes summed over rows (what one row at a time would have run).", counts.row_forwards),
        ("diffgen_encoder_forwards_total", "counter", "Encoder passes of batches (new prompts, committed canvases).",
         counts.encoder_forwards),
        ("diffgen_max_batch", "gauge", "Rows a batch may hold (serve --max-batch).", engine.max_batch),
        ("diffgen_max_queue", "gauge", "Requests that may wait (serve --max-queue).", engine.max_queue),
    ]


def render(engine: Engine) -> str:
    """The exposition text: ``# HELP``, ``# TYPE`` and one sample per metric."""
    lines = []
    for name, kind, help_, value in values(engine):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {sample(value)}"]
    return "\n".join(lines) + "\n"


def sample(value: float) -> str:
    """One sample's value, exact: an int in full (``:g`` would round a counter past 10**6 to six
    digits, e.g. 1234567 -> 1.23457e+06), a float as ``repr`` (the shortest text that reads back
    as the same float; ``inf``/``nan`` in Prometheus' spelling)."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def parse(text: str) -> dict[str, float]:
    """The samples of :func:`render`'s text by name (for clients and tests)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
