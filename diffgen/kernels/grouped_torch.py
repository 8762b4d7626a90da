"""Grouped products through torch's own kernels: the fallback for every format, and fp8 x fp8.

* :func:`grouped_mm_torch` (CPU, MPS, no triton): dequantise the stack (vectorised over experts;
  on the CPU in cache-sized chunks of experts, where reading ``ends`` on the host is free) and
  call torch's grouped matmul — exact against the dequantised weights;
* :func:`fp8_scaled_grouped_mm` (``DIFFGEN_FP8_SCALED=1`` only, where
  :func:`~diffgen.kernels.capability.fp8_scaled_runs`): activations quantised per row to e4m3,
  ``torch._scaled_grouped_mm`` with row-wise scales.

Each call adds one to :data:`diffgen.kernels.launches.GROUPED_PATHS` under its path.
"""

from typing import Optional

import torch

from diffgen.kernels.capability import grouped_mm_runs
from diffgen.kernels.expert_formats import dequantize
from diffgen.kernels.launches import GROUPED_PATHS

FP8_MAX = 448.0
# On the CPU the torch path dequantises about this many weights at a time (fp32: 4 MiB), so each
# chunk is used while it sits in cache and its buffer is reused rather than mapped afresh (at
# least one expert per chunk). Elsewhere it dequantises the whole stack: no host reads.
CPU_CHUNK_ELEMENTS = 1 << 20


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x`` rows sorted by group times ``w[g].T`` per group (``offs`` cumulative ends)."""
    if grouped_mm_runs(x.device.type, x.dtype):
        fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        if x.data_ptr() % 16:  # CPU kernels of torch <= 2.10 want 16-byte aligned rows
            x = x.clone()
        return fn(x, w.transpose(-2, -1), offs=offs)
    # Last resort (old torch, devices without the kernel): one product per group, bounds on the host.
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[group].T, out=out[start:end])
        start = end
    return out


def grouped_mm_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, code: Optional[torch.Tensor],
                     ends: torch.Tensor, fmt: str, n: int, k: int, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """The torch path: dequantise (vectorised over experts, in chunks on the CPU) and run a grouped matmul.

    ``chunk_elements``: weights dequantised at a time; default :data:`CPU_CHUNK_ELEMENTS` on the
    CPU (reading ``ends`` there is free), unbounded elsewhere (no host read of ``ends``).
    """
    GROUPED_PATHS["torch"] += 1
    experts = q.shape[0]
    if experts == 1:
        return torch.nn.functional.linear(x, dequantize(q, scale, code, fmt, n, k, x.dtype)[0])
    if chunk_elements is None:
        chunk_elements = CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else experts * n * k
    per_chunk = max(1, chunk_elements // (n * k))
    if per_chunk >= experts:
        return _grouped(x, dequantize(q, scale, code, fmt, n, k, x.dtype), ends)
    bounds = [0, *ends.tolist()]
    out = x.new_empty(x.shape[0], n)
    for first in range(0, experts, per_chunk):
        last = min(experts, first + per_chunk)
        low, high = bounds[first], bounds[last]
        if high > low:
            weights = dequantize(q[first:last], scale[first:last], code, fmt, n, k, x.dtype)
            out[low:high] = _grouped(x[low:high], weights, ends[first:last] - low)
    return out


def fp8_scaled_grouped_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """fp8 x fp8 grouped product: ``x`` (bf16, sorted rows) quantised per row to e4m3 with an fp32
    scale ``absmax / 448``, times ``q`` ``(E, n, k)`` e4m3 with its per-output-row ``scale``
    ``(E, n, 1)``, through ``torch._scaled_grouped_mm`` (bf16 out)."""
    GROUPED_PATHS["fp8_scaled"] += 1
    row_scale = x.abs().amax(dim=-1).to(torch.float32).clamp(min=1e-12) / FP8_MAX
    xq = (x.to(torch.float32) / row_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_grouped_mm(xq, q.transpose(-2, -1), row_scale, scale.squeeze(-1), offs=ends,
                                    out_dtype=torch.bfloat16)
