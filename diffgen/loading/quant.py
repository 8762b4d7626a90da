"""diffgen's own expert (and linear) quantisation, shared by encoder and decoder.

bitsandbytes' ``BitsAndBytesConfig`` only touches ``nn.Linear``: DiffusionGemma's fused 3-D
expert tensors (88% of the weights) stay bf16, and the tied encoder/decoder keys land in its
skip list (docs/architecture.md, "Facts the code relies on"). So diffgen replaces each layer's experts module with a
:class:`QuantizedExperts` that stores every expert's weights compactly and runs all experts at
once in grouped products (:mod:`diffgen.kernels.moe`: routed on the device, no per-expert loop,
no host sync, so a denoising step can be graph-captured). One instance serves encoder layer i
and decoder layer i, so the tie survives and the weights exist once.

Formats (per expert matrix ``W`` of shape ``(out, in)``):

* ``int8``: ``round(W / s)`` with one fp32 scale ``s = absmax(row) / 127`` per output row;
* ``fp8``: ``W / s`` as float8 e4m3 with ``s = absmax(row) / 448`` per output row;
* ``nf4``: 4-bit NormalFloat in blocks of 64 with an fp32 absmax per block, packed two per
  byte (high nibble first), quantised through bitsandbytes' functional API where it runs, else
  the same format in torch; dequantised by diffgen (torch or the Triton kernel) from a code
  table kept on the device.

* ``nvfp4``: NVIDIA's NVFP4 layout (:mod:`diffgen.kernels.nvfp4`): e2m1 codes two per byte
  (even element in the low nibble), an e4m3 scale per 16 weights of a row and an fp32 scale per
  output row; quantised from bf16 by ``--quant nvfp4``, or copied byte for byte from a published
  NVFP4 checkpoint (:mod:`diffgen.loading.prequant`). The 4-bit format ``auto`` picks.

Buffers per :class:`QuantizedStack` (``E`` matrices of ``(out, in)``): int8/fp8 ``q``
``(E, out, in)`` and ``scale`` ``(E, out, 1)`` fp32; nf4 ``q`` ``(E, out*in/2)`` uint8, ``scale``
``(E, out*in/64)`` fp32 and ``code`` (16 fp32, not saved in the state dict); nvfp4 ``q``
``(E, out, in/2)`` uint8, ``scale`` ``(E, out, in/16)`` float8 e4m3 and ``scale2`` ``(E, out, 1)`` fp32.
A published FP8 checkpoint (per-channel e4m3 with an fp32 or bf16 scale per output row) is the
``fp8`` layout exactly, and is copied into it.
"""

from __future__ import annotations


import torch
from torch import nn

from diffgen.kernels import expert_formats, moe, nvfp4
from diffgen.kernels.expert_formats import bnb_functional
from diffgen.planning.sizes import NF4_BLOCK

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


def nf4_quantize_torch(weight: torch.Tensor, levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch NF4: ``(packed uint8 [numel/2], absmax fp32 [numel/64])``."""
    flat = weight.reshape(-1, NF4_BLOCK).float()
    absmax = flat.abs().amax(dim=1)
    scaled = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = NF4_LEVELS.to(weight.device) if levels is None else levels
    index = (scaled.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8).reshape(-1)
    packed = (index[0::2] << 4) | index[1::2]
    return packed, absmax


def nf4_dequantize_torch(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size,
                         dtype: torch.dtype, levels: torch.Tensor | None = None) -> torch.Tensor:
    levels = NF4_LEVELS.to(packed.device) if levels is None else levels
    shape = torch.Size(shape)
    return expert_formats.nf4_dequantize(packed.reshape(1, -1), absmax.reshape(1, -1), levels, shape.numel(), 1,
                              dtype).reshape(shape)


class NF4Codec:
    """NF4 quantisation through bitsandbytes where it runs on the device, else through torch
    (same format). Dequantisation is diffgen's own (:func:`diffgen.kernels.expert_formats.dequantize` and
    the grouped kernels), from the code table the stack keeps on the device."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bnb = bnb_functional(self.device.type)

    @property
    def backend(self) -> str:
        return "bitsandbytes" if self.bnb is not None else "torch"

    def quantize(self, weight: torch.Tensor, levels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bnb is None:
            return nf4_quantize_torch(weight, levels)
        packed, state = self.bnb.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        return packed.reshape(-1), state.absmax.float()


# -- one quantised matrix stack -------------------------------------------------------------------


class QuantizedStack(nn.Module):
    """``count`` matrices of shape ``(out, in)`` stored in ``scheme``; :meth:`weight` rebuilds one,
    :meth:`grouped` multiplies expert-sorted rows by all of them at once.

    ``backend`` (``"auto"``, ``"triton"``, ``"torch"``) and ``fp8_activations`` (fp8 only: use
    fp8 x fp8 products where the card has them; ``None``, the default, follows
    ``DIFFGEN_FP8_SCALED``, off unless set: the weight-only kernel is faster and 7x more accurate)
    choose the grouped path; benchmarks set them.
    """

    def __init__(self, scheme: str, count: int, out_dim: int, in_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.scheme, self.shape, self.dtype = scheme, torch.Size((out_dim, in_dim)), dtype
        self.backend, self.fp8_activations = "auto", None
        numel = out_dim * in_dim
        if scheme in ("int8", "fp8"):
            storage = torch.int8 if scheme == "int8" else torch.float8_e4m3fn
            self.register_buffer("q", torch.empty((count, out_dim, in_dim), dtype=storage, device=device))
            self.register_buffer("scale", torch.empty((count, out_dim, 1), dtype=torch.float32, device=device))
            self.register_buffer("code", None, persistent=False)
        elif scheme == "nf4":
            if numel % NF4_BLOCK:
                raise ValueError(f"nf4 needs matrices whose size is a multiple of {NF4_BLOCK} (got {out_dim}x{in_dim})")
            self.codec = NF4Codec(device)
            self.register_buffer("q", torch.empty((count, numel // 2), dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty((count, numel // NF4_BLOCK), dtype=torch.float32, device=device))
            self.register_buffer("code", NF4_LEVELS.to(device, copy=True), persistent=False)
        elif scheme == "nvfp4":
            if in_dim % nvfp4.BLOCK:
                raise ValueError(f"nvfp4 needs rows whose length is a multiple of {nvfp4.BLOCK} (got {in_dim})")
            self.register_buffer("q", torch.empty((count, out_dim, in_dim // 2), dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.empty((count, out_dim, in_dim // nvfp4.BLOCK),
                                                      dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer("scale2", torch.empty((count, out_dim, 1), dtype=torch.float32, device=device))
            self.register_buffer("code", None, persistent=False)
        else:
            raise ValueError(f"unknown quantisation scheme {scheme!r}")

    @torch.no_grad()
    def store(self, index: int, weight: torch.Tensor) -> None:
        """Quantise one ``(out, in)`` matrix into slot ``index``."""
        weight = weight.to(self.q.device, torch.float32)
        if self.scheme == "nvfp4":
            packed, scale, scale2 = nvfp4.quantize(weight)
            self.q[index], self.scale[index] = packed, scale
            self.scale2[index] = scale2
            return
        if self.scheme == "nf4":
            packed, absmax = self.codec.quantize(weight, self.code)
            self.q[index] = packed
            self.scale[index] = absmax
            return
        limit = 127.0 if self.scheme == "int8" else FP8_MAX
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / limit
        scaled = weight / scale
        self.q[index] = scaled.round().clamp(-127, 127).to(torch.int8) if self.scheme == "int8" else \
            scaled.to(torch.float8_e4m3fn)
        self.scale[index] = scale

    @torch.no_grad()
    def copy_rows(self, index: int, rows: slice, part: str, tensor: torch.Tensor) -> None:
        """Copy one already-quantised checkpoint tensor into rows ``rows`` of matrix ``index``:
        ``part`` ``"q"`` (the codes or fp8 values), ``"scale"`` (nvfp4's e4m3 block scales; fp8's
        per-row scales) or ``"scale2"`` (nvfp4's per-tensor multiplier, broadcast over the rows).
        Values are copied as they are (fp8 row scales widened to fp32 exactly); nothing is requantised."""
        target = getattr(self, part)[index, rows]
        if part == "q" or (part == "scale" and self.scheme == "nvfp4"):
            target.copy_(tensor.view(target.shape))
        else:
            target.copy_(tensor.to(torch.float32).reshape(-1, 1).expand(target.shape))

    def weight(self, index: int) -> torch.Tensor:
        """Matrix ``index`` dequantised to the compute dtype."""
        if self.scheme == "nvfp4":
            i = slice(index, index + 1)
            return nvfp4.dequantize(self.q[i], self.scale[i], self.scale2[i], *self.shape, self.dtype)[0]
        return expert_formats.dequantize(self.q[index:index + 1], self.scale[index:index + 1], self.code, self.scheme,
                              *self.shape, self.dtype)[0]

    @property
    def stack(self) -> expert_formats.Stack:
        """What the kernels need of this stack (:class:`diffgen.kernels.expert_formats.Stack`)."""
        return expert_formats.Stack(self.q, self.scale, self.code, self.scheme, *self.shape)

    def grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` ``(S, in)`` sorted by matrix (``ends``: int32 cumulative row counts, one
        per matrix) times their matrix, transposed: ``(S, out)`` in ``x``'s dtype."""
        out_dim, in_dim = self.shape
        if self.scheme == "nvfp4":
            return nvfp4.grouped_mm(x, self.q, self.scale, self.scale2, ends, out_dim, in_dim, self.backend)
        return moe.grouped_mm(x, self.q, self.scale, self.code, ends, self.scheme, out_dim, in_dim, self.backend,
                              self.fp8_activations)


class QuantizedExperts(nn.Module):
    """Drop-in for ``DiffusionGemmaTextExperts``: same forward, compact weights."""

    def __init__(self, original: nn.Module, scheme: str, dtype: torch.dtype, device: torch.device | str):
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
        """Every token through its top-k experts, weighted and summed (as transformers' experts).

        Grouped (:func:`diffgen.kernels.moe.experts_forward`): the (token, k) pairs are sorted by
        expert on the device and both projections run as one grouped product each; where the
        Triton kernel runs, the gate_up kernel gathers the rows and applies the activation and the
        down kernel applies the routing weights and unpermutes, leaving one sum over k (fp32, as
        transformers' ``grouped_mm`` experts do). No per-expert loop, no host sync.
        """
        gate_up, down = self.gate_up_proj, self.down_proj
        if gate_up.scheme == "nvfp4":  # its own grouped kernel (diffgen.kernels.nvfp4), unfused epilogues
            perm, ends = moe.route(top_k_index, self.num_experts, moe.boundaries(self.num_experts, hidden_states.device))
            rows = hidden_states[perm // top_k_index.shape[1]]
            gate, up = gate_up.grouped(rows, ends).chunk(2, dim=-1)
            out = down.grouped(self.act_fn(gate) * up, ends)
            return moe.combine(out, top_k_weights, perm, hidden_states.device.type == "cpu").to(hidden_states.dtype)
        return moe.experts_forward(hidden_states, top_k_index, top_k_weights, gate_up.stack, down.stack, self.act_fn,
                                   gate_up.backend, gate_up.fp8_activations,
                                   moe.boundaries(self.num_experts, hidden_states.device))


class QuantizedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is stored quantised: NF4 for ``nf4-all``; fp8 or
    nvfp4 where a published checkpoint stores a linear so (run weight-only)."""

    def __init__(self, original: nn.Linear, dtype: torch.dtype, device: torch.device | str, scheme: str = "nf4"):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.stack = QuantizedStack(scheme, 1, self.out_features, self.in_features, dtype, device)

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        self.stack.store(0, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``: a grouped product with one group (the Triton kernel dequantises ``W`` in
        registers where it runs; torch dequantises it and calls ``linear``)."""
        flat = x.reshape(-1, self.in_features)
        ends = torch.full((1,), flat.shape[0], dtype=torch.int32, device=x.device)
        return self.stack.grouped(flat, ends).view(*x.shape[:-1], self.out_features)
