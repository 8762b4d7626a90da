"""diffgen: local text generation with DiffusionGemma block-diffusion models.

The package keeps its heavy imports (torch, transformers) out of this module so that
``diffgen --help`` stays instant. The library API: :func:`diffgen.loading.loader.load` gives a
``LoadedModel``; :mod:`diffgen.denoise.loop` has ``stream`` (step and canvas events, then the result)
and ``generate`` (the result), with their option groups ``Execution`` and ``Constraints``
(:mod:`diffgen.denoise.options`); :mod:`diffgen.denoise.constrained` fills templates, edits spans
and generates JSON for a schema. The module docstring of :mod:`diffgen.denoise.loop` has an example.
"""

__version__ = "0.1.0"
