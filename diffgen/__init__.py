"""diffgen: local text generation with DiffusionGemma block-diffusion models.

The package keeps its heavy imports (torch, transformers) out of this module so that
``diffgen --help`` stays instant; import :mod:`diffgen.denoise.loop` or :mod:`diffgen.loading.loader`
for the library API.
"""

__version__ = "0.1.0"
