"""Own compute kernels (Triton where it runs, with torch fallbacks): grouped quantised expert products and more.

Sits between :mod:`diffgen.loading` (which builds the modules that call these) and
:mod:`diffgen.planning`. Nothing here imports triton at module import: the Triton kernels live in
modules that the torch-side entry points import on first use, so the package works without it.
"""
