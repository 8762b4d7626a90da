"""Device kernels (Triton) with torch fallbacks for the denoising step's hot spots.

* :mod:`diffgen.kernels.noise` — counter-based random numbers (Philox4x32-10): a pure function of
  ``(key, index)``, so a graph-captured step can be replayed and a row's draws depend only on its
  own seed, canvas and step.
* :mod:`diffgen.kernels.sampler` — the fused sampler tail: soft-cap, temperature, entropy, argmax,
  Gumbel-max sampling and the self-conditioning write in one read of the logits (kernels in
  :mod:`~diffgen.kernels.sampler_triton`).
* :mod:`diffgen.kernels.moe` — grouped expert products (bf16, and int8 / fp8 / nf4 weight-only, in
  one Triton kernel tiled for ~16 rows per expert, GELU x up and the routing weight in its
  epilogues; fp8 x fp8 through ``torch._scaled_grouped_mm`` behind ``DIFFGEN_FP8_SCALED=1``; torch
  fallbacks), no host sync. Beside it: the stack formats and their dequantisation
  (:mod:`~diffgen.kernels.expert_formats`), what the device can run (:mod:`~diffgen.kernels.capability`),
  the torch products (:mod:`~diffgen.kernels.grouped_torch`), the kernels' switches and tiles
  (:mod:`~diffgen.kernels.moe_config`), their launchers (:mod:`~diffgen.kernels.moe_launch`, kernels
  in :mod:`~diffgen.kernels.moe_triton`) and transformers' unquantised experts
  (:mod:`~diffgen.kernels.bf16_experts`).
* :mod:`diffgen.kernels.fused` — the fused row-wise ops of diffgen's own layer forward (RMSNorm,
  q/k/v norms + RoPE into the KV cache, residual + norms, GELU x up, router top-k, the FFN
  combine).
* :mod:`diffgen.kernels.launches` — the counter every Triton launch reports to
  (``bench/kernel_count.py`` counts a step's kernels on the CPU with it).

Sits between :mod:`diffgen.loading` (which builds the modules that call these) and
:mod:`diffgen.planning`. Nothing here imports triton at package import time: the Triton kernels
live in modules that the torch-side entry points import on first use, so the package works
without it.
"""
