"""What machine is this, and how much memory can a model really use here?

:func:`detect` builds a :class:`HardwareProfile` from probes — small functions that ask torch,
NVML and ``/proc/meminfo`` — which tests replace with simulated machines. Memory is measured
the right way for each kind (docs/architecture.md, "Facts the code relies on"):

* integrated GPUs (DGX Spark / GB10 and other unified-memory parts): ``mem_get_info`` counts
  the page cache as used, so the budget is ``MemAvailable`` from ``/proc/meminfo``, capped by
  the device total, minus a reserve; over-committing can freeze the host instead of raising;
* discrete GPUs: the free memory (system-wide), minus 0.5 GiB headless or 1.5 GiB when the GPU
  drives a display;
* Apple MPS: Metal's recommended working set, capped by available RAM, minus a reserve;
* CPU only: available RAM minus a reserve.

Host memory comes from psutil (``MemAvailable`` on Linux).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
HEADLESS_RESERVE = int(0.5 * GiB)
DISPLAY_RESERVE = int(1.5 * GiB)
HOST_RESERVE = 2 * GiB

KINDS = {
    "dgx-spark": "DGX Spark (GB10, unified memory)",
    "unified-gpu": "unified-memory GPU",
    "consumer-rtx": "consumer GeForce RTX",
    "workstation": "workstation GPU",
    "datacenter": "datacenter GPU",
    "apple-mps": "Apple silicon (MPS)",
    "cpu": "CPU only",
}
_DATACENTER = re.compile(r"\b(H100|H200|H800|H20|A100|A800|A30|A40|A10G?|B100|B200|B300|GB200|GB300|L40S?|L4|V100|"
                         r"T4|P100)\b")
_WORKSTATION = ("RTX A", "RTX PRO", "ADA GENERATION", "QUADRO", "BLACKWELL WORKSTATION", "RTX 5000", "RTX 6000")


@dataclass(frozen=True)
class GpuInfo:
    """What a probe reports about one CUDA device (bytes for memory)."""

    name: str
    capability: tuple[int, int]
    total: int
    free: int
    integrated: bool = False
    display: bool = False


@dataclass(frozen=True)
class Probes:
    """Where facts come from. Each field is a callable; tests pass simulated ones."""

    cuda_devices: Callable[[], list[GpuInfo]]
    meminfo: Callable[[], dict[str, int]]  # /proc/meminfo fields in bytes (MemTotal, MemAvailable)
    mps: Callable[[], int | None]  # Metal's recommended max working set, or None without MPS
    nvml: Callable[[int], tuple[int, int] | None] = lambda index: None  # (total, free) or None


@dataclass(frozen=True)
class DeviceProfile:
    """One accelerator (or the CPU) as diffgen plans for it.

    Attributes:
        device: torch device string (``cuda:0``, ``mps``, ``cpu``).
        name: marketing name as reported.
        capability: CUDA compute capability, ``None`` elsewhere.
        total, free, usable: bytes; ``usable`` is what a plan may fill.
        measured: how ``usable`` was measured, in words.
        bf16, fp8: whether the device computes in bf16 / has fp8 tensor cores (cc >= 8.9).
    """

    device: str
    name: str
    capability: tuple[int, int] | None
    total: int
    free: int
    usable: int
    measured: str
    bf16: bool
    fp8: bool


@dataclass(frozen=True)
class HardwareProfile:
    """The machine: its kind, devices (the accelerators, or the CPU alone) and host RAM."""

    kind: str
    devices: tuple[DeviceProfile, ...]
    host_total: int
    host_available: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kind_label(self) -> str:
        return KINDS.get(self.kind, self.kind)

    @property
    def usable(self) -> int:
        """The memory budget for one model: the first device's usable bytes."""
        return self.devices[0].usable

    @property
    def unified(self) -> bool:
        return self.kind in {"dgx-spark", "unified-gpu", "apple-mps", "cpu"}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["kind_label"] = self.kind_label
        return data


def classify(gpu: GpuInfo) -> str:
    name = gpu.name.upper()
    if "GB10" in name or (gpu.integrated and gpu.capability == (12, 1)):
        return "dgx-spark"
    if gpu.integrated:
        return "unified-gpu"
    if any(tag in name for tag in _WORKSTATION):
        return "workstation"
    if "GEFORCE" in name or "RTX" in name or "GTX" in name:
        return "consumer-rtx"
    if _DATACENTER.search(name):
        return "datacenter"
    return "workstation"


def _gpu_profile(index: int, gpu: GpuInfo, meminfo: dict[str, int], nvml: tuple[int, int] | None) -> DeviceProfile:
    bf16 = gpu.capability >= (8, 0)
    fp8 = gpu.capability >= (8, 9)
    if gpu.integrated:
        available = min(meminfo.get("MemAvailable", gpu.free), gpu.total)
        reserve = max(HOST_RESERVE, gpu.total // 20)
        usable = max(0, available - reserve)
        measured = (f"unified memory: MemAvailable {available / GiB:.1f} GiB (capped by the device total) minus a "
                    f"{reserve / GiB:.1f} GiB reserve; cudaMemGetInfo under-reports here (page cache counts as used)")
        return DeviceProfile(f"cuda:{index}", gpu.name, gpu.capability, gpu.total, available, usable, measured,
                             bf16, fp8)
    total, free = nvml if nvml is not None else (gpu.total, gpu.free)
    reserve = DISPLAY_RESERVE if gpu.display else HEADLESS_RESERVE
    usable = max(0, free - reserve)
    source = "NVML" if nvml is not None else "cudaMemGetInfo"
    why = "it drives a display" if gpu.display else "headless"
    measured = f"free memory from {source} minus a {reserve / GiB:.1f} GiB reserve ({why})"
    return DeviceProfile(f"cuda:{index}", gpu.name, gpu.capability, total, free, usable, measured, bf16, fp8)


def detect(probes: Probes | None = None) -> HardwareProfile:
    """Profile this machine (or the one ``probes`` simulate)."""
    probes = probes or default_probes()
    meminfo = probes.meminfo()
    host_total = meminfo.get("MemTotal", 0)
    host_available = meminfo.get("MemAvailable", host_total)
    gpus = probes.cuda_devices()
    if gpus:
        devices = tuple(_gpu_profile(i, gpu, meminfo, probes.nvml(i)) for i, gpu in enumerate(gpus))
        kind = classify(gpus[0])
        notes = []
        if kind == "dgx-spark":
            notes.append("unified memory: over-committing can freeze the host instead of failing; diffgen "
                         "never plans past the usable budget")
        if len(gpus) > 1:
            notes.append(f"{len(gpus)} GPUs; the plan uses {devices[0].device} (encoder and decoder layer i "
                         "always stay on one device)")
        return HardwareProfile(kind, devices, host_total, host_available, tuple(notes))
    recommended = probes.mps()
    if recommended is not None:
        available = min(recommended, host_available)
        usable = max(0, available - HOST_RESERVE)
        device = DeviceProfile("mps", f"Apple {platform.machine()} GPU", None, host_total, available, usable,
                               f"Metal recommended working set capped by available RAM, minus "
                               f"{HOST_RESERVE / GiB:.0f} GiB", True, False)
        return HardwareProfile("apple-mps", (device,), host_total, host_available)
    usable = max(0, host_available - HOST_RESERVE)
    device = DeviceProfile("cpu", platform.processor() or platform.machine() or "CPU", None, host_total,
                           host_available, usable, f"available RAM minus {HOST_RESERVE / GiB:.0f} GiB", True, False)
    return HardwareProfile("cpu", (device,), host_total, host_available)


# -- the real probes ---------------------------------------------------------------------------


def read_meminfo() -> dict[str, int]:
    """Host memory in bytes as ``{"MemTotal": ..., "MemAvailable": ...}``, from psutil.

    On Linux psutil's ``available`` is the kernel's ``MemAvailable`` from ``/proc/meminfo`` (page
    cache counted as reclaimable), which is what a DGX Spark budget needs (docs/architecture.md, "Facts the code relies on"); on
    macOS and Windows it is the platform's own estimate.
    """
    import psutil

    memory = psutil.virtual_memory()
    return {"MemTotal": int(memory.total), "MemAvailable": int(memory.available)}


def _cuda_devices() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        out.append(GpuInfo(props.name, (props.major, props.minor), total, free,
                           integrated=bool(getattr(props, "is_integrated", False)), display=_display_active(index)))
    return out


def _nvml_handle(index: int) -> Any:
    import pynvml  # type: ignore[import-not-found]

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


def _display_active(index: int) -> bool:
    try:
        pynvml, handle = _nvml_handle(index)
        return bool(pynvml.nvmlDeviceGetDisplayActive(handle))
    except Exception:  # noqa: BLE001 - no NVML, or unsupported (e.g. on GB10): assume headless
        return False


def _nvml_memory(index: int) -> tuple[int, int] | None:
    try:
        pynvml, handle = _nvml_handle(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free)
    except Exception:  # noqa: BLE001 - NVML missing or not meaningful (unified memory)
        return None


def _mps() -> int | None:
    import torch

    backend = getattr(torch.backends, "mps", None)
    if not (backend and backend.is_available()):
        return None
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    return int(recommended()) if callable(recommended) else None


def default_probes() -> Probes:
    return Probes(cuda_devices=_cuda_devices, meminfo=read_meminfo, mps=_mps, nvml=_nvml_memory)
