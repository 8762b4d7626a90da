"""The recipe a local generation follows (``run``, ``fill``, ``edit``), written once.

Flags checked, then: plan the load (:meth:`LocalJob.prepare`), load the tokenizer and encode
(:meth:`LocalJob.tokenizing`), check the context before the weights (:meth:`LocalJob.check_context`),
load them (:meth:`LocalJob.load`), denoise, and write the answer before any trace error is raised
(:func:`answer_out`). The commands keep their own parsing, layout and printing.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Optional

from diffgen.cli.support.common import exclusive, load_model, prepare_generation
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.option_groups import Runtime
from diffgen.cli.support.options import sampler_choice
from diffgen.denoise.options import Execution

if TYPE_CHECKING:
    import typer
    from rich.console import Console
    from transformers import PreTrainedTokenizerBase

    from diffgen.loading.loader import LoadedModel
    from diffgen.loading.prepare import Prepared
    from diffgen.settings import GenerationSettings


class LocalJob:
    """One generation on a model loaded here, for ``model`` with the ``runtime`` options."""

    def __init__(self, ctx: typer.Context, model: str, runtime: Runtime, *, quiet: bool):
        exact, fast = exclusive(ctx, "give one of them, or neither for the device's default", exact=runtime.exact,
                                fast=runtime.fast)
        #: the options, ``--exact`` / ``--fast`` resolved against the config file's defaults
        self.runtime = dataclasses.replace(runtime, exact=exact, fast=fast)
        #: how the loop runs (``exact`` ``None``: the device's default)
        self.execution = Execution(exact=sampler_choice(exact, fast, runtime.compile), compile=runtime.compile)
        self.model, self.quiet = model, quiet
        self.prepared: Optional[Prepared] = None
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self._console: Optional[Console] = None

    @property
    def console(self) -> Console:
        """The stderr console (plan line, spinner, live view)."""
        if self._console is None:
            from diffgen.ui import render

            self._console = render.error_console()
        return self._console

    def prepare(self, *, seed: Optional[int], flags: dict[str, Any], images: int = 0) -> Prepared:
        """Plan the load: the checkpoint's config, the memory plan and the settings."""
        self.prepared = prepare_generation(self.model, seed=seed, flags=flags, quiet=self.quiet,
                                           **self.runtime.load(), images=images)
        return self.prepared

    @property
    def canvas_length(self) -> int:
        return int(self.prepared.config.get("canvas_length", 256))

    @contextlib.contextmanager
    def tokenizing(self) -> Iterator[PreTrainedTokenizerBase]:
        """The tokenizer, loaded; what the block does with it (encode, lay out) is the same phase."""
        from diffgen.loading import loader

        with doing("loading the tokenizer"):
            self.tokenizer = loader.load_tokenizer(self.prepared.checkpoint.path)
            yield self.tokenizer

    def check_context(self, prompt_tokens: int, settings: GenerationSettings, *, refusal: Optional[Callable[[], tuple[str, str]]] = None
                      ) -> None:
        """Refuse, before the weights load, a prompt and answer that do not fit the model's context;
        ``refusal()`` gives the message and hint that say why in the command's own terms."""
        from diffgen.denoise import loop
        from diffgen.errors import PromptTooLongError

        try:
            loop.check_context_config(self.prepared.config, prompt_tokens, settings)
        except PromptTooLongError as exc:
            if refusal is None:
                raise
            raise PromptTooLongError(*refusal()) from exc

    def load(self) -> LoadedModel:
        """The weights, loaded after the plan line."""
        return load_model(self.prepared, self.console, quiet=self.quiet, tokenizer=self.tokenizer)


def answer_out(write: Callable[[], None], trace_failure: Optional[BaseException]) -> None:
    """Write the answer on stdout, then raise the trace's write error, if any: the answer is out
    before the trace's failure is reported."""
    with doing("writing the answer to stdout"):
        write()
    if trace_failure is not None:
        raise trace_failure  # the answer is out; the trace could not be written
