"""Constrained generation on top of the engine: infilling (:mod:`.fill`), editing in place
(:mod:`.edit`) and JSON by construction (:mod:`.schema`).

Each lays its constraints out as per-position tensors (tokens clamped, tokens seeded, tokens
allowed) and runs them through :func:`diffgen.denoise.loop.stream`; the engine (loop, runner,
step) knows nothing of templates, documents or schemas.
"""
