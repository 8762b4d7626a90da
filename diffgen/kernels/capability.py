"""What this device and this torch can run for the grouped expert products (static facts, cached).

The Triton kernels (:func:`triton_runs`), torch's grouped matmul (:func:`grouped_mm_runs`, and
where it is fast: :func:`torch_grouped_mm_is_fast`, read from torch's source), torch's fp8 x fp8
grouped product (:func:`fp8_scaled_runs`), and the card's multiprocessors and shared memory
(:func:`device_limits`) for tile sizing.
"""

import functools
import os
from typing import Optional

import torch

_TRITON_RUNS: dict = {}


def triton_runs(device_type: str) -> bool:
    """Whether the Triton kernel can run for tensors on ``device_type``: CUDA with triton
    importable, or any device while ``TRITON_INTERPRET=1`` (the interpreter, for tests). Decided
    once per device type (a plain dict, which dynamo traces as a constant)."""
    if device_type not in _TRITON_RUNS:
        runs = device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if runs:
            try:
                from diffgen.kernels import moe_triton  # noqa: F401
            except Exception:  # noqa: BLE001 - triton missing or broken
                runs = False
        _TRITON_RUNS[device_type] = runs
    return _TRITON_RUNS[device_type]


@functools.lru_cache(maxsize=None)
def compute_capability(index: int) -> tuple[int, int]:
    """The CUDA device's compute capability ``(major, minor)``."""
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch's grouped matmul runs here for ``dtype`` (CPU: torch >= 2.9; CUDA: bf16, sm80+)."""
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    try:
        a = torch.ones(4, 16, device=device_type, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
        fn(a, b.transpose(-2, -1), offs=offs)
        return True
    except Exception:  # noqa: BLE001 - no kernel for this device or dtype
        return False


def torch_grouped_mm_is_fast(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch's ``_grouped_mm`` / ``F.grouped_mm`` runs its grouped kernel on ``device``
    for ``dtype`` (no device-to-host sync, graph-capturable), rather than failing or taking its
    fallback. Read from torch's source (aten/src/ATen/native/cuda/GroupedBlas.cpp,
    ``_grouped_mm_cuda``):

    * torch 2.6, 2.7: no ``_grouped_mm`` at all;
    * torch 2.8 (native/cuda/Blas.cpp): refuses unless compute capability major == 9
      ("only supported on CUDA devices with compute capability = 9.0");
    * torch 2.9 to 2.13: ``use_fast_path = _scaled_mm_allowed_device(sm90_only=true,
      sm100_only=true) && a, b and out are bf16``, i.e. ``major == 9 || major == 10`` (from 2.12
      the same test is ``scaled_mm_arch_allowed``); anything else calls ``_grouped_mm_fallback``
      (native/GroupedMMUtils.h: ``offs.cpu()`` — the host sync — then one ``mm_out`` per group).
      So fp16/fp32 always, and cc 8.x (A100, RTX 30xx/40xx), 11.x, 12.x (RTX 50xx, DGX Spark) fall
      back (pytorch issue 194227). torch's main branch adds a cuBLASLt grouped GEMM for builds with
      CUDA >= 13.3 on majors 9-11 (fp16, bf16 only when ``preferCublasltGroupedGemm``), which does
      not change the answer for consumer cards and is not relied on here;
    * ROCm: only gfx942/gfx950 with CK (not modelled: ``False``).

    On the CPU torch's kernel (torch >= 2.9) runs without any device to sync with: ``True``.
    """
    device = torch.device(device)
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    if device.type == "cpu":
        return grouped_mm_runs("cpu", dtype)
    if device.type != "cuda" or torch.version.hip or dtype != torch.bfloat16:
        return False
    major = compute_capability(device.index if device.index is not None else torch.cuda.current_device())[0]
    return major in (9, 10)


def fp8_scaled_runs(device: torch.device | str, dtype: torch.dtype, n: int, k: int) -> bool:
    """Whether :func:`fp8_scaled_grouped_mm` runs: CUDA compute capability 9.0 or 10.0 (torch's
    row-wise fp8 grouped kernels), bf16 activations (its only output dtype), ``n`` and ``k``
    multiples of 16 (its alignment)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip or dtype != torch.bfloat16 or n % 16 or k % 16:
        return False
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    capability = compute_capability(device.index if device.index is not None else torch.cuda.current_device())
    return capability == (9, 0) or capability == (10, 0)


@functools.lru_cache(maxsize=None)
def device_limits(device_type: str, index: Optional[int] = None) -> tuple[int, int]:
    """``(multiprocessors, shared memory a program may use in bytes)`` — static properties of the
    card. Elsewhere (the interpreter) a few programs, so the persistent loop runs several times."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0) or 101376
        return int(props.multi_processor_count), smem
    return 3, 232448
