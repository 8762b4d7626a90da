"""The load plan: where the model goes and in which dtype.

For now a simple choice — CUDA in bf16 when present, Apple MPS in bf16 where it works, else
the CPU in fp32 — behind ``--device``. The loader takes a :class:`LoadPlan`, so a plan that
also carries quantisation and a device map can replace this without touching the loader's
callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffgen.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class LoadPlan:
    """Attributes: ``device`` a torch device string (``"cpu"``, ``"cuda:0"``, ``"mps"``);
    ``dtype`` the torch dtype name of the weights (``"float32"``, ``"bfloat16"``)."""

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}"


def simple_plan(device: str = "auto") -> LoadPlan:
    """Pick the device and dtype for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    request = (device or "auto").strip().lower()
    if request == "auto":
        if torch.cuda.is_available():
            request = "cuda"
        elif _mps_available(torch):
            request = "mps"
        else:
            request = "cpu"
    if request == "cpu":
        return LoadPlan("cpu", "float32")
    if request == "mps":
        if not _mps_available(torch):
            raise DeviceError("--device mps was asked for, but this machine has no usable Apple MPS device",
                              "use --device cpu")
        return LoadPlan("mps", "bfloat16")
    if request == "cuda" or request.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but torch sees no CUDA GPU",
                              "install a CUDA build of torch, or use --device cpu")
        index = int(request.split(":", 1)[1]) if ":" in request else 0
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceError(f"--device {device}: there is no CUDA device {index}",
                              f"this machine has {torch.cuda.device_count()}")
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return LoadPlan(f"cuda:{index}", dtype)
    raise DeviceError(f"unknown device {device!r}", f"use one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def _mps_available(torch: Any) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())
