"""diffgen's own expert (and linear) quantisation, weight-only, shared by encoder and decoder.

bitsandbytes' ``BitsAndBytesConfig`` only touches ``nn.Linear``: DiffusionGemma's fused 3-D
expert tensors (88% of the weights) stay bf16, and the tied encoder/decoder keys land in its
skip list (DESIGN.md §3). So diffgen replaces each layer's experts module with a
:class:`QuantizedExperts` that stores every expert's weights compactly and dequantises one
expert at a time in the forward pass. One instance serves encoder layer i and decoder layer
i, so the tie survives and the weights exist once.

Formats (per expert matrix ``W`` of shape ``(out, in)``):

* ``int8``: ``round(W / s)`` with one fp32 scale ``s = absmax(row) / 127`` per output row;
* ``fp8``: ``W / s`` as float8 e4m3 with ``s = absmax(row) / 448`` per output row;
* ``nf4``: 4-bit NormalFloat in blocks of 64 with an fp32 absmax per block, packed two per
  byte, through bitsandbytes' functional API where it runs, else the same format in torch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from diffgen.planning.plan import NF4_BLOCK

# The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023), as bitsandbytes defines them.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
FP8_MAX = 448.0
# The layout of the quantised modules' persistent buffers (their state_dict: names, shapes, dtypes
# and what the values mean). The quantised-weights cache (qcache.py) restores exactly those
# buffers and keys its entries on this number: bump it whenever that layout changes, so that
# caches written by older code are rebuilt instead of trusted.
QUANT_LAYOUT_VERSION = 1


# -- NF4 ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bnb_functional(device_type: str) -> Any:
    """bitsandbytes' functional module if it quantises on this device type, else ``None``."""
    import logging
    import os

    if not os.environ.get("DIFFGEN_DEBUG"):  # its CPU backend warns about an optional kernel package
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F

        probe = torch.randn(NF4_BLOCK * 2, device=device_type)
        packed, state = F.quantize_4bit(probe, blocksize=NF4_BLOCK, quant_type="nf4")
        F.dequantize_4bit(packed, state)
        return F
    except Exception:  # noqa: BLE001 - not installed, no backend for this device, ...
        return None


def nf4_quantize_torch(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch NF4: ``(packed uint8 [numel/2], absmax fp32 [numel/64])``."""
    flat = weight.reshape(-1, NF4_BLOCK).float()
    absmax = flat.abs().amax(dim=1)
    scaled = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = NF4_LEVELS.to(weight.device)
    index = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    return packed, absmax


def nf4_dequantize_torch(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                         dtype: torch.dtype) -> torch.Tensor:
    index = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()
    values = NF4_LEVELS.to(packed.device)[index].reshape(-1, NF4_BLOCK) * absmax[:, None]
    return values.reshape(shape).to(dtype)


class NF4Codec:
    """NF4 through bitsandbytes where it runs on the device, else through torch (same format)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bnb = bnb_functional(self.device.type)

    @property
    def backend(self) -> str:
        return "bitsandbytes" if self.bnb is not None else "torch"

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bnb is None:
            return nf4_quantize_torch(weight)
        packed, state = self.bnb.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        return packed.reshape(-1), state.absmax.float()

    def dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                   dtype: torch.dtype) -> torch.Tensor:
        if self.bnb is None:
            return nf4_dequantize_torch(packed, absmax, shape, dtype)
        state = self.bnb.QuantState(absmax=absmax, shape=shape, code=NF4_LEVELS.to(packed.device),
                                    blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
        return self.bnb.dequantize_4bit(packed.reshape(-1, 1), state)


# -- one quantised matrix stack -------------------------------------------------------------------


class QuantizedStack(nn.Module):
    """``count`` matrices of shape ``(out, in)`` stored in ``scheme``; :meth:`weight` rebuilds one."""

    def __init__(self, scheme: str, count: int, out_dim: int, in_dim: int, dtype: torch.dtype, device: Any):
        super().__init__()
        self.scheme, self.shape, self.dtype = scheme, torch.Size((out_dim, in_dim)), dtype
        numel = out_dim * in_dim
        if scheme in ("int8", "fp8"):
            storage = torch.int8 if scheme == "int8" else torch.float8_e4m3fn
            self.register_buffer("q", torch.empty((count, out_dim, in_dim), dtype=storage, device=device))
            self.register_buffer("scale", torch.empty((count, out_dim, 1), dtype=torch.float32, device=device))
        elif scheme == "nf4":
            if numel % NF4_BLOCK:
                raise ValueError(f"nf4 needs matrices whose size is a multiple of {NF4_BLOCK} (got {out_dim}x{in_dim})")
            self.codec = NF4Codec(device)
            self.register_buffer("q", torch.empty((count, numel // 2), dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty((count, numel // NF4_BLOCK), dtype=torch.float32, device=device))
        else:
            raise ValueError(f"unknown quantisation scheme {scheme!r}")

    @torch.no_grad()
    def store(self, index: int, weight: torch.Tensor) -> None:
        """Quantise one ``(out, in)`` matrix into slot ``index``."""
        weight = weight.to(self.q.device, torch.float32)
        if self.scheme == "nf4":
            packed, absmax = self.codec.quantize(weight)
            self.q[index] = packed
            self.scale[index] = absmax
            return
        limit = 127.0 if self.scheme == "int8" else FP8_MAX
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / limit
        scaled = weight / scale
        self.q[index] = scaled.round().clamp(-127, 127).to(torch.int8) if self.scheme == "int8" else \
            scaled.to(torch.float8_e4m3fn)
        self.scale[index] = scale

    def weight(self, index: int) -> torch.Tensor:
        """Matrix ``index`` dequantised to the compute dtype."""
        if self.scheme == "nf4":
            return self.codec.dequantize(self.q[index], self.scale[index], self.shape, self.dtype)
        return (self.q[index].to(torch.float32) * self.scale[index]).to(self.dtype)


class QuantizedExperts(nn.Module):
    """Drop-in for ``DiffusionGemmaTextExperts``: same forward, compact weights."""

    def __init__(self, original: nn.Module, scheme: str, dtype: torch.dtype, device: Any):
        super().__init__()
        experts, two_inter, hidden = original.gate_up_proj.shape
        self.num_experts = experts
        self.act_fn = original.act_fn
        self.gate_up_proj = QuantizedStack(scheme, experts, two_inter, hidden, dtype, device)
        self.down_proj = QuantizedStack(scheme, experts, hidden, two_inter // 2, dtype, device)

    @torch.no_grad()
    def store(self, name: str, tensor: torch.Tensor) -> None:
        """Quantise a fused ``(E, out, in)`` checkpoint tensor expert by expert."""
        stack = getattr(self, name)
        for index in range(tensor.shape[0]):
            stack.store(index, tensor[index])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for expert in mask.sum(dim=(-1, -2)).nonzero().flatten().tolist():
            slot, token = torch.where(mask[expert])
            state = hidden_states[token]
            gate, up = nn.functional.linear(state, self.gate_up_proj.weight(expert)).chunk(2, dim=-1)
            out = nn.functional.linear(self.act_fn(gate) * up, self.down_proj.weight(expert))
            final.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(final.dtype))
        return final


class QuantizedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is stored in NF4 (for ``nf4-all``)."""

    def __init__(self, original: nn.Linear, dtype: torch.dtype, device: Any):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.stack = QuantizedStack("nf4", 1, self.out_features, self.in_features, dtype, device)

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        self.stack.store(0, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.stack.weight(0))
