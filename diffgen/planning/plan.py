"""The load plan: where the model goes, in which dtype, with which expert quantisation, and
whether it fits.

The sizes it compares come from :mod:`diffgen.planning.sizes` (parameters counted on the meta
device from ``config.json``, each scheme's storage, the runtime's memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffgen.errors import DeviceError, UsageError
from diffgen.planning.sizes import (DEFAULT_CONTEXT, GB, UNQUANTISED, ParameterCounts, dtype_bytes, human,
                                    runtime_bytes, weight_bytes)

if TYPE_CHECKING:
    from types import ModuleType

    import torch

    from diffgen.planning.hardware import HardwareProfile

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
SCHEMES = ("fp32", "bf16", "fp16", "fp8", "int8", "nvfp4", "nf4", "nf4-all")
QUANT_CHOICES = ("auto", *SCHEMES)


@dataclass(frozen=True)
class LoadPlan:
    """How to load a model.

    Attributes:
        device: torch device string (``"cpu"``, ``"cuda:0"``, ``"mps"``).
        dtype: dtype name of the unquantised weights and of compute (``"bfloat16"``, ...).
        quant: ``"none"``, ``"fp8"``, ``"int8"``, ``"nf4"`` or ``"nf4-all"``.
        offload_bytes: bytes of weights planned onto the CPU (0: everything on ``device``).
        device_map: with offload, (module prefix, device) pairs for transformers' loader.
        stored: for a pre-quantised checkpoint, its format (``ModelOpt NVFP4``...), loaded as stored.
    """

    device: str
    dtype: str
    quant: str = "none"
    offload_bytes: int = 0
    device_map: tuple[tuple[str, str], ...] = ()
    stored: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def scheme(self) -> str:
        if self.quant != "none":
            return self.quant
        return {v: k for k, v in UNQUANTISED.items()}[self.dtype]

    def describe(self) -> str:
        text = f"{self.device}, {self.scheme}"
        if self.quant != "none":
            text += f" experts (rest {self.dtype})"
        if self.stored:
            text += f", as stored ({self.stored} checkpoint)"
        if self.offload_bytes:
            text += f", {human(self.offload_bytes)} offloaded to the CPU"
        return text


def device_dtype(device: str = "auto") -> tuple[str, str]:
    """The device for ``device`` and its default dtype: CUDA bf16 (fp16 before Ampere), MPS bf16, CPU fp32."""
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
        return "cpu", "float32"
    if request == "mps":
        if not _mps_available(torch):
            raise DeviceError("--device mps was asked for, but this machine has no usable Apple MPS device",
                              "use --device cpu")
        return "mps", "bfloat16"
    if request == "cuda" or request.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but torch sees no CUDA GPU",
                              "install a CUDA build of torch, or use --device cpu")
        index = int(request.split(":", 1)[1]) if ":" in request and request.split(":", 1)[1].isdigit() else 0
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceError(f"--device {device}: there is no CUDA device {index}",
                              f"this machine has {torch.cuda.device_count()}")
        return f"cuda:{index}", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    raise DeviceError(f"unknown device {device!r}", f"use one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def simple_plan(device: str = "auto") -> LoadPlan:
    """The unquantised plan for ``device`` (no memory check)."""
    return LoadPlan(*device_dtype(device))


def _mps_available(torch: ModuleType) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


# -- choosing a scheme -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """One scheme's memory: ``weights`` and ``runtime`` bytes, ``fits`` the budget or not,
    ``available`` whether this device can run the scheme at all (and ``why`` not)."""

    scheme: str
    weights: int
    runtime: int
    fits: bool
    available: bool = True
    why: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.runtime

    def to_dict(self) -> dict[str, Any]:
        return {"quant": self.scheme, "weights_gb": round(self.weights / GB, 3),
                "runtime_gb": round(self.runtime / GB, 3), "total_gb": round(self.total / GB, 3),
                "fits": self.fits, "available": self.available, "why": self.why or None}


def candidate_schemes(device: str, dtype: str, hardware: HardwareProfile | None) -> list[tuple[str, bool, str]]:
    """Schemes in quality order with whether this device can run them (and why not)."""
    cuda = device.startswith("cuda")
    profile = hardware.devices[0] if hardware is not None and hardware.devices else None
    # fp8 storage: CUDA with compute capability >= 8.9, or the CPU (weight-only, for tests); not MPS.
    fp8 = (profile.fp8 if profile is not None else False) if cuda else device == "cpu"
    bf16 = dtype != "float16"
    out = [("fp32", device == "cpu", "fp32 is the CPU scheme; GPUs use bf16"),
           ("bf16", bf16, "this GPU has no bf16 (compute capability < 8.0); use fp16"),
           ("fp16", not bf16 or device != "cpu", "fp16 is for GPUs without bf16"),
           ("fp8", fp8, "fp8 experts need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)"),
           ("int8", True, ""), ("nvfp4", True, ""), ("nf4", True, ""), ("nf4-all", True, "")]
    return out


def estimates(config: dict[str, Any], counts: ParameterCounts, *, device: str, dtype: str, budget: int | None,
              hardware: HardwareProfile | None = None, context: int = DEFAULT_CONTEXT,
              batch: int = 1, images: int = 0, only: str | None = None, linears: str | None = None,
              ) -> list[Estimate]:
    """Each scheme's memory; ``images``: images per generation (the vision workspace; their tokens
    belong in ``context``). ``only``: just that scheme (a pre-quantised checkpoint loads in its own
    format), with ``linears`` how it stores the text linears (see :func:`weight_bytes`)."""
    out = []
    for scheme, available, why in candidate_schemes(device, dtype, hardware):
        if only is not None and scheme != only:
            continue
        compute = UNQUANTISED.get(scheme, dtype)
        weights = weight_bytes(counts, scheme, dtype, linears=linears)
        runtime = sum(runtime_bytes(config, compute, context=context, batch=batch, device=device,
                                    images=images).values())
        fits = budget is None or weights + runtime <= budget
        out.append(Estimate(scheme, weights, runtime, fits, available, "" if available else why))
    return out


def choose(table: list[Estimate], requested: str, budget: int | None, *, offload: bool = False,
           can_offload: bool = True) -> Estimate:
    """The scheme to load: ``requested``, or with ``auto`` the best-quality available one that fits.

    Never over-commits: a requested scheme that does not fit, or ``auto`` with nothing that
    fits, is refused (naming the nearest option) unless ``offload`` allows the excess on the CPU.
    ``can_offload`` is false where there is no GPU to offload from: then it is not suggested.
    """
    by_name = {e.scheme: e for e in table}
    if requested != "auto":
        estimate = by_name.get(requested)
        if estimate is None:
            raise UsageError(f"unknown --quant {requested!r}", f"use one of {', '.join(QUANT_CHOICES)}")
        if not estimate.available:
            raise UsageError(f"--quant {requested} cannot run here: {estimate.why}")
        if estimate.fits or offload:
            return estimate
        raise _too_big(estimate, table, budget, can_offload)
    usable = [e for e in table if e.available]
    for estimate in usable:
        if estimate.fits:
            return estimate
    if offload:  # only unquantised weights can be offloaded: the best of those, partly on the CPU
        return next(e for e in usable if e.scheme in UNQUANTISED)
    raise _too_big(min(usable, key=lambda e: e.total), table, budget, can_offload)


def check_scheme(requested: str, device: str, dtype: str, hardware: HardwareProfile | None) -> None:
    """Refuse, before any config or weights are read, a ``--quant`` this device cannot run."""
    if requested not in QUANT_CHOICES:
        raise UsageError(f"unknown --quant {requested!r}", f"use one of {', '.join(QUANT_CHOICES)}")
    for scheme, available, why in candidate_schemes(device, dtype, hardware):
        if scheme == requested and not available:
            raise UsageError(f"--quant {requested} cannot run on {device}: {why}")


def _too_big(estimate: Estimate, table: list[Estimate], budget: int | None, can_offload: bool = True) -> UsageError:
    fitting = [e for e in table if e.available and e.fits]
    have = f"{human(budget)} usable" if budget is not None else "the budget"
    retry: tuple[tuple[str, str | None | bool], ...] = ()
    if fitting:
        hint = f"--quant {fitting[0].scheme} fits ({human(fitting[0].total)})"
        retry = (("--quant", fitting[0].scheme),)
    elif can_offload:
        hint = ("free memory, raise --max-memory if the budget is too cautious, or pass --offload "
                "(slow: offloaded layers cross PCIe at every step)")
        unquantised = next((e.scheme for e in table if e.available and e.scheme in UNQUANTISED), None)
        retry = (("--offload", None),) if estimate.scheme in UNQUANTISED or unquantised is None else (
            ("--quant", unquantised), ("--offload", None))
    else:
        hint = "free memory, or raise --max-memory if the budget is too cautious"
    return UsageError(f"--quant {estimate.scheme} needs {human(estimate.total)} "
                      f"({human(estimate.weights)} weights + {human(estimate.runtime)} runtime) and {have}", hint,
                      retry=retry)


MAX_AUTO_BATCH = 32

# The published checkpoints of the model, and the scheme each is stored in (issue 19): the bf16
# original, and ready-quantised ones that download only what runs.
PUBLISHED = (
    ("bf16", "google/diffusiongemma-26B-A4B-it"),
    ("fp8", "RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic"),
    ("nvfp4", "nvidia/diffusiongemma-26B-A4B-it-NVFP4"),
)


# Parameters of the released model (25.82B); configs at least this large are the released model's.
RELEASED_PARAMETERS = 25 * 10**9


def published_choice(table: list[Estimate]) -> tuple[str, str] | None:
    """``(scheme, Hub id)`` of the published checkpoint to pick on this machine: the best-quality
    one whose scheme is available here and fits, judged from ``table`` (the bf16 checkpoint's
    plan). ``None`` when none fits."""
    by_name = {e.scheme: e for e in table}
    for scheme, repo in PUBLISHED:
        estimate = by_name.get(scheme)
        if estimate is not None and estimate.available and estimate.fits:
            return scheme, repo
    return None


def rows_that_fit(config: dict[str, Any], estimate: Estimate, *, dtype: str, budget: int, device: str,
                  context: int = DEFAULT_CONTEXT, cap: int = MAX_AUTO_BATCH) -> int:
    """The most batch rows (up to ``cap``, at least 1) whose runtime fits next to the weights."""
    compute = UNQUANTISED.get(estimate.scheme, dtype)
    rows = 1
    for candidate in range(2, cap + 1):
        runtime = sum(runtime_bytes(config, compute, context=context, batch=candidate, device=device).values())
        if estimate.weights + runtime > budget:
            break
        rows = candidate
    return rows


def parse_size(text: str) -> int:
    """``"20GB"``, ``"18.5 GiB"``, ``"512MB"`` or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", text or "", re.IGNORECASE)
    if not match:
        raise UsageError(f"cannot read memory size {text!r}", "write it like 20GB, 18.5GiB or 512MB")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    base = 1024 if "I" in unit else 1000
    return int(value * base ** powers[unit.rstrip("IB")])


def make_plan(estimate: Estimate, device: str, dtype: str, budget: int | None,
              counts: ParameterCounts | None = None) -> LoadPlan:
    """The plan for a chosen estimate; over budget (only reachable with ``--offload``) the top text
    layers go to the CPU, which works for unquantised schemes only."""
    quant = "none" if estimate.scheme in UNQUANTISED else estimate.scheme
    dtype = UNQUANTISED.get(estimate.scheme, dtype)
    if budget is None or estimate.fits:
        return LoadPlan(device, dtype, quant)
    if not device.startswith("cuda"):
        raise UsageError(f"{estimate.scheme} does not fit ({human(estimate.total)} for {human(budget)} usable), and "
                         f"--offload only moves layers from a CUDA GPU to the CPU",
                         "free memory, or raise --max-memory if the budget is too cautious")
    if quant != "none":
        unquantised = {v: k for k, v in UNQUANTISED.items()}.get(dtype, "bf16")
        raise UsageError(f"--offload works with unquantised weights; {estimate.scheme} does not fit "
                         f"({human(estimate.total)} for {human(budget)} usable)",
                         f"use --quant {unquantised} --offload, or free memory", retry=(("--quant", unquantised),))
    if counts is None:
        raise ValueError("an offload plan needs the parameter counts")
    mapping = offload_device_map(counts, dtype, device, budget, estimate.runtime)
    return LoadPlan(device, dtype, quant, max(0, estimate.total - budget), tuple(mapping.items()))


def offload_device_map(counts: ParameterCounts, dtype: str, device: str, budget: int, runtime: int) -> dict[str, str]:
    """A device map that keeps everything but the last text layers on ``device``.

    Layers go to the CPU from the top down until the rest fits ``budget - runtime``; encoder
    layer i and decoder layer i always land on the same device (they share their weights).
    """
    size = dtype_bytes(dtype)
    resident = weight_bytes(counts, {v: k for k, v in UNQUANTISED.items()}[dtype], dtype)
    room = budget - runtime
    mapping = {"": device}
    for index in range(len(counts.layers) - 1, -1, -1):
        if resident <= room:
            break
        mapping[f"model.encoder.language_model.layers.{index}"] = "cpu"
        mapping[f"model.decoder.layers.{index}"] = "cpu"
        resident -= counts.layers[index] * size
    return mapping
