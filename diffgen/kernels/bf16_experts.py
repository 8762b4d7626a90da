"""Unquantised (bf16 / fp16 / fp32) experts: diffgen's Triton experts where they run, transformers'
``grouped_mm`` experts elsewhere, chosen per call and registered with transformers as
:data:`EXPERTS_IMPLEMENTATION`.
"""

import os
from typing import Optional

import torch

from diffgen.kernels.capability import triton_runs
from diffgen.kernels.expert_formats import Stack
from diffgen.kernels.moe import boundaries, experts_forward

# The name diffgen's bf16 experts forward is registered under in transformers' ExpertsInterface.
EXPERTS_IMPLEMENTATION = "diffgen_grouped"


def bf16_experts_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """How unquantised experts run on ``device``: ``"triton"`` (diffgen's kernel, 5 kernels a layer
    with the routing weight and unpermute in its epilogue) wherever Triton runs, else ``"torch"``
    (transformers' ``grouped_mm`` experts, about 17 kernels a layer). On cards where torch's
    grouped_mm would take its host-sync fallback (:func:`~diffgen.kernels.capability.torch_grouped_mm_is_fast`) the Triton
    kernel is the only capturable path; on compute capability 9.x/10.x both run, and
    ``DIFFGEN_BF16_EXPERTS=torch`` (read at call time; ``triton`` forces the other way) is the A/B
    that ``bench/gpu_session.py`` measures."""
    device = torch.device(device)
    forced = os.environ.get("DIFFGEN_BF16_EXPERTS", "auto").strip().lower() or "auto"
    if forced not in ("auto", "triton", "torch"):
        raise ValueError(f"DIFFGEN_BF16_EXPERTS must be 'auto', 'triton' or 'torch', not {forced!r}")
    if forced == "torch" or not triton_runs(device.type) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return "torch"
    return "triton"


def grouped_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward for unquantised stacks (``module``: a ``@use_experts_implementation``
    experts module with ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``): diffgen's
    fused Triton experts (the "bf16" format) where :func:`bf16_experts_backend` says so, else
    transformers' own ``grouped_mm`` experts. Registered as :data:`EXPERTS_IMPLEMENTATION`."""
    gate_up, down = module.gate_up_proj, module.down_proj
    simple = (not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
              and not getattr(module, "is_transposed", False) and not getattr(module, "has_post_expert_norm", False)
              and getattr(module, "is_concatenated", True) and not getattr(module, "_is_expert_parallel", False))
    if (simple and gate_up.dtype == down.dtype == hidden_states.dtype and gate_up.is_contiguous()
            and down.is_contiguous() and bf16_experts_backend(gate_up.device, gate_up.dtype) == "triton"):
        experts, two_inter, hidden = gate_up.shape
        return experts_forward(hidden_states, top_k_index, top_k_weights,
                               Stack(gate_up, gate_up, None, "bf16", two_inter, hidden),
                               Stack(down, down, None, "bf16", hidden, two_inter // 2),
                               module.act_fn, backend="triton", boundaries=boundaries(experts, gate_up.device))
    from transformers.integrations.moe import grouped_mm_experts_forward

    return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> Optional[str]:
    """Register :func:`grouped_experts_forward` with transformers and return its name (``None``
    where this transformers has no experts interface: its default experts then)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return None
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, grouped_experts_forward)
    return EXPERTS_IMPLEMENTATION
