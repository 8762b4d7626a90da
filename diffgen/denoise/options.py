"""The loop's option groups: how a generation runs, and what constrains its tokens.

:func:`~diffgen.denoise.loop.stream` takes two frozen groups besides its plain keywords
(``observe``, ``seeds``, ``vision``, ``cache``), each checked where it is defined:

* :class:`Execution`: the sampler (exact or fast), CUDA graphs, ``torch.compile``, and how often
  the loop asks whether every row stopped. :meth:`Execution.resolve` fills in the device's
  defaults once and rejects the combinations that cannot run.
* :class:`Constraints`: constrained generation's per-position inputs (clamped positions for
  :mod:`~diffgen.denoise.constrained.fill`, seeded ones for :mod:`~diffgen.denoise.constrained.edit`,
  allowed tokens for :mod:`~diffgen.denoise.constrained.schema`). :meth:`Constraints.check` holds
  them against the generation's rows and canvases; :meth:`Constraints.canvas` is one canvas's slice.

No torch at import (its types are annotations only): the command line builds these groups
before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from diffgen.errors import UsageError

if TYPE_CHECKING:
    import torch

    #: ``(tokens, mask)``: ``int64`` and ``bool`` tensors of one shape
    TokenMask = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Execution:
    """How a generation runs; ``None`` is the device's default (:meth:`resolve`).

    Attributes:
        exact: the reference-identical sampler (default on the CPU) or the fast one (default
            elsewhere). With the exact sampler and no per-row seeds the random draws come from
            torch's global generator (seeded by ``settings.seed``) exactly as in transformers'
            ``generate()``.
        graphs: replay the fast step (and the committed canvas's encoder pass) from CUDA graphs
            (default on CUDA; ``DIFFGEN_CUDA_GRAPHS=0`` turns it off).
        compile: run the fast step through ``torch.compile``
            (:func:`~diffgen.denoise.step.compiled_step`): minutes on the first call, cached on
            disk by inductor for later processes, about twice as fast per step on a CPU.
        check_every: steps between host syncs that ask whether every row stopped (default 1 for
            the exact sampler, like the reference; :data:`~diffgen.denoise.runner.FAST_CHECK_EVERY`
            for the fast one).
    """

    exact: bool | None = None
    graphs: bool | None = None
    compile: bool = False
    check_every: int | None = None

    def resolve(self, device: torch.device) -> Execution:
        """Every choice made for ``device`` (no ``None`` left), or :class:`UsageError` for a
        combination that cannot run."""
        from diffgen.denoise.runner import FAST_CHECK_EVERY, graphs_enabled, graphs_supported

        exact = device.type == "cpu" if self.exact is None else self.exact
        # CUDA graphs replay the fast step (the exact one draws from the global generator, eagerly).
        graphs = (not exact and device.type == "cuda" and graphs_enabled()) if self.graphs is None else self.graphs
        if graphs and (exact or not graphs_supported(device)):
            raise UsageError("CUDA graphs need the fast sampler on a CUDA device")
        if self.compile and exact:
            raise UsageError("compiling the step needs the fast sampler (compiled kernels reorder float sums, "
                             "so the exact sampler would no longer match generate())")
        return replace(self, exact=exact, graphs=graphs,
                       check_every=self.check_every or (1 if exact else FAST_CHECK_EVERY))


@dataclass(frozen=True)
class Constraints:
    """Per-position constraints over every planned canvas of a generation (``B`` rows,
    ``P`` = canvases x canvas length positions).

    Attributes:
        clamp: ``(tokens, mask)``, both ``(B, P)``: pins the masked positions to their tokens at
            every step (infilling; see :class:`~diffgen.denoise.step.StepContext`). A canvas whose
            positions are all clamped is committed as is without a decoder pass, and an EOS ends
            no row (the layout is fixed), so every planned canvas runs.
        init: ``(tokens, mask)``, both ``(B, P)``: each canvas starts from those tokens at the
            masked positions instead of uniform noise (editing). Unlike a clamp this pins
            nothing: the sampler renoises them as it would any rejected position.
        allowed: ``(1 or B, P, V)`` bool: restricts each position to its allowed tokens before
            temperature and sampling (JSON by construction).
    """

    clamp: TokenMask | None = None
    init: TokenMask | None = None
    allowed: torch.Tensor | None = None

    def check(self, rows: int, positions: int) -> None:
        """:class:`UsageError` unless every tensor covers ``rows`` rows and ``positions`` positions."""
        expected = (rows, positions)
        for name, pair in (("clamp", self.clamp), ("init", self.init)):
            if pair is not None and any(tuple(t.shape) != expected for t in pair):
                raise UsageError(f"{name} tensors must be {expected} (rows, whole canvases), got "
                                 f"{tuple(pair[0].shape)} and {tuple(pair[1].shape)}")
        allowed = self.allowed
        if allowed is not None and (allowed.dim() != 3 or allowed.shape[0] not in (1, rows)
                                    or allowed.shape[1] != positions):
            raise UsageError(f"the allowed-token mask must be (1 or rows, {positions}, vocab), got "
                             f"{tuple(allowed.shape)}")

    def canvas(self, index: int, length: int, device: torch.device) -> Constraints:
        """Canvas ``index``'s slice of every tensor (``length`` positions), on ``device``."""
        window = slice(index * length, (index + 1) * length)

        def part(pair: TokenMask | None) -> TokenMask | None:
            return None if pair is None else (pair[0][:, window].to(device), pair[1][:, window].to(device))

        allowed = None if self.allowed is None else self.allowed[:, window].to(device)
        return Constraints(clamp=part(self.clamp), init=part(self.init), allowed=allowed)
