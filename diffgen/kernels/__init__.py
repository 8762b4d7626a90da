"""Device kernels (Triton) with torch fallbacks for the denoising step's hot spots.

* :mod:`diffgen.kernels.noise` — counter-based random numbers (Philox4x32-10): a pure function of
  ``(key, index)``, so a graph-captured step can be replayed and a row's draws depend only on its
  own seed, canvas and step.
* :mod:`diffgen.kernels.sampler` — the fused sampler tail: soft-cap, temperature, entropy, argmax,
  Gumbel-max sampling and the self-conditioning write in one read of the logits.

Nothing here imports torch or triton at package import time; each module imports torch itself
and triton only inside the functions that launch a kernel.
"""
