"""Device kernels (Triton) with torch fallbacks for the denoising step's hot spots.

* :mod:`diffgen.kernels.noise` — counter-based random numbers (Philox4x32-10): a pure function of
  ``(key, index)``, so a graph-captured step can be replayed and a row's draws depend only on its
  own seed, canvas and step.
* :mod:`diffgen.kernels.sampler` — the fused sampler tail: soft-cap, temperature, entropy, argmax,
  Gumbel-max sampling and the self-conditioning write in one read of the logits.
* :mod:`diffgen.kernels.moe` — grouped quantised expert products (int8 / fp8 / nf4 weight-only in
  Triton, fp8 x fp8 through ``torch._scaled_grouped_mm``, torch fallbacks), no host sync.

Sits between :mod:`diffgen.loading` (which builds the modules that call these) and
:mod:`diffgen.planning`. Nothing here imports triton at package import time: the Triton kernels
live in modules that the torch-side entry points import on first use, so the package works
without it.
"""
