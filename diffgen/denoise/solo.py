"""Requests the batch step cannot share, as the work the batcher runs alone
(:data:`~diffgen.denoise.tickets.SoloWork`, :meth:`~diffgen.denoise.batcher.Batcher.submit_solo`).

Each generates one choice through the code the CLI runs — :func:`~diffgen.denoise.loop.stream`
(the exact sampler, or a prompt with images) or
:func:`~diffgen.denoise.constrained.schema.generate_json` (a JSON Schema) — and yields the
choice's typed items (:mod:`diffgen.denoise.items`) with a
:class:`~diffgen.denoise.tickets.Committed` after each canvas, where the scheduler counts the
canvas's decoder passes and stops a cancelled request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional, Union

from diffgen.denoise.channels import split_response
from diffgen.denoise.events import CanvasEvent, Completion, StepEvent, cut_completion
from diffgen.denoise.items import Canvas, Done, Item, Step
from diffgen.denoise.tickets import Committed

if TYPE_CHECKING:
    from diffgen.denoise.constrained.schema import Vocabulary
    from diffgen.denoise.options import Execution
    from diffgen.images import VisionInputs
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

Part = Union[Item, Committed]


def loop_items(loaded: LoadedModel, prompt: Sequence[int], settings: GenerationSettings, index: int, *,
               observe: bool, execution: Execution, vision: Optional[VisionInputs] = None,
               canvases: bool = True) -> Iterator[Part]:
    """Choice ``index`` through the loop: a ``Step`` per step when ``observe``, after each canvas
    (with ``canvases``) a ``Canvas`` with the text so far then a ``Committed``, and last ``Done``.
    ``execution``: the loop's sampler choice (:class:`~diffgen.denoise.options.Execution`); ``vision``: the prompt's image inputs."""
    from diffgen.denoise.loop import stream

    generation = stream(loaded, [list(prompt)], settings, observe=observe, execution=execution,
                        vision=[vision] if vision is not None else None)
    tokens: list[int] = []
    for event in generation:
        if isinstance(event, StepEvent):
            yield Step(index, event)
        elif isinstance(event, CanvasEvent):
            if canvases:
                tokens.extend(event.tokens[0].tolist())
                response = split_response(loaded.tokenizer, cut_completion(tokens, settings)[0])
                yield Canvas(index, response.text, response.thoughts)
            yield Committed(event.steps)
    yield Done(index, generation.result.completions[0])


def schema_items(loaded: LoadedModel, prompt: Sequence[int], schema: dict, settings: GenerationSettings,
                 index: int, *, execution: Execution, vocab: Optional[Vocabulary]) -> Iterator[Part]:
    """Choice ``index`` as JSON for ``schema``, generated as ``run --schema`` generates it: one
    ``Committed`` with every decoder pass, then ``Done``, whose completion is the JSON text, its
    laid-out positions (pad dropped) as ``token_ids``, finish reason ``"eos"`` (the JSON is whole)
    and no stats."""
    from diffgen.denoise.constrained.schema import generate_json

    result = generate_json(loaded, prompt, schema, settings, execution=execution, vocab=vocab)
    yield Committed(result.forwards)
    pad = settings.pad_token_id
    tokens = tuple(token for token in result.token_ids[: result.layout.length] if token != pad)
    yield Done(index, Completion(result.text, None, tokens, "eos", None))
