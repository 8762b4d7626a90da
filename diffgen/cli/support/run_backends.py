"""Where ``diffgen run`` generates, and the one way its answer is written.

:class:`LocalRun` (a model loaded here) and :class:`RemoteRun` (``--server``) take the same
:class:`Ask` and :class:`Watch` and return the same :class:`RunAnswer`, with the trace's write
error (raised once the answer is out); :func:`write_answer` prints it, whichever made it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from diffgen.cli.support.common import encode_with_images, observing, status
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.job import LocalJob

if TYPE_CHECKING:
    from rich.console import Console

    from diffgen.denoise.events import GenerationResult
    from diffgen.images import Picture, VisionInputs
    from diffgen.remote.client import Answer, Client, ServerModel


@dataclasses.dataclass(frozen=True)
class Ask:
    """One prompt as ``run`` sends it: the composed text, how it is templated, its images."""

    text: str
    system: Optional[str]
    raw: bool
    think: bool
    pictures: list[Picture]
    flags: dict[str, Any]  # the sampler flags given, by settings field name
    seed: Optional[int]


@dataclasses.dataclass(frozen=True)
class Watch:
    """What is watched while it denoises: the live view, a trace file, the spinner."""

    console: Console
    show_steps: bool
    trace_file: Optional[Path]
    model: str  # the model's name in the trace header
    quiet: bool

    @property
    def observed(self) -> bool:
        return self.show_steps or self.trace_file is not None


@dataclasses.dataclass(frozen=True)
class RunAnswer:
    """One answer, from a model here or a server.

    ``record`` is the ``--json`` object; ``stats`` diffgen's stats fields (``None`` from a server
    that does not send them, which then says only its ``usage`` and the request's ``seconds``)."""

    text: str
    thoughts: Optional[str]
    finish_reason: str
    record: dict[str, Any]
    stats: Optional[dict[str, Any]]
    usage: Optional[dict[str, Any]] = None
    seconds: float = 0.0

    def trace_result(self) -> dict[str, Any]:
        """The trace's closing ``result`` line."""
        return {"text": self.text, "thoughts": self.thoughts, "finish_reason": self.finish_reason,
                "stats": self.stats}

    def stats_line(self) -> str:
        from diffgen.ui import render

        if self.stats is not None:
            return render.stats_line_of(self.stats, self.finish_reason)
        usage = self.usage or {}
        return render.usage_line(usage.get("completion_tokens"), usage.get("prompt_tokens"), self.seconds,
                                 self.finish_reason)


def write_answer(answer: RunAnswer, console: Console, *, json_output: bool, thoughts: bool, stats: bool) -> None:
    """The answer on stdout (or its ``--json`` object); its thoughts (when ``thoughts``) and the
    ``--stats`` line on stderr."""
    from diffgen.ui import render

    if json_output:
        render.write_json(answer.record, sys.stdout)
    else:
        if thoughts and answer.thoughts:
            render.show_thoughts(answer.thoughts, console)
        render.write_answer(answer, sys.stdout)
    if stats:
        typer.echo(answer.stats_line(), err=True)


class LocalRun:
    """``run`` on a model loaded here: plan, tokenise, check the context, load, denoise."""

    def __init__(self, job: LocalJob, ask: Ask):
        self.job, self.ask = job, ask

    def encode(self) -> tuple[list[int], Optional[VisionInputs]]:
        """Plan the load and encode the prompt (its images too), the context checked before the
        weights; the token ids and the image inputs (``None``: none)."""
        from diffgen import prompt as prompt_mod

        job, ask = self.job, self.ask
        prepared = job.prepare(seed=ask.seed, flags=ask.flags, images=len(ask.pictures))
        with job.tokenizing() as tokenizer:
            # Refused by its size before it is tokenised (50 MB of text would take a minute and GBs).
            prompt_mod.check_fits(ask.text, prepared.config.get("text_config", prepared.config)
                                  .get("max_position_embeddings"), tokenizer)
            ids = prompt_mod.encode(tokenizer, ask.text, system=ask.system, think=ask.think, raw=ask.raw)
        vision = None
        if ask.pictures:
            ids, vision = encode_with_images(prepared, tokenizer, ask.text, ask.pictures, system=ask.system,
                                             think=ask.think)
        return ids, vision

    def answer(self, watch: Watch) -> tuple[RunAnswer, Optional[BaseException]]:
        ids, vision = self.encode()
        return self.generate(ids, vision, watch)

    def generate(self, ids: list[int], vision: Optional[VisionInputs], watch: Watch
                 ) -> tuple[RunAnswer, Optional[BaseException]]:
        from diffgen.denoise import loop

        job = self.job
        settings = job.prepared.settings
        job.check_context(len(ids), settings)
        loaded = job.load()
        options = {"execution": job.execution, "vision": [vision]}
        with doing("generating"):
            if not watch.observed:
                with status(watch.console, "Denoising", quiet=watch.quiet):
                    return self.answer_of(loop.generate(loaded, [ids], settings, **options)), None
            generation = loop.stream(loaded, [ids], settings, observe=True, **options)
            with observing(watch.console, loaded.tokenizer, show_steps=watch.show_steps, trace_file=watch.trace_file,
                           model=watch.model, prompt=self.ask.text, settings=settings,
                           canvas_length=generation.canvas_length) as observer:
                for event in generation:
                    observer.on_event(event)
                answer = self.answer_of(generation.result)
                if observer.writer is not None:
                    observer.writer.result(answer.trace_result())
            return answer, observer.failure

    def answer_of(self, result: GenerationResult) -> RunAnswer:
        from diffgen.ui import render

        completion = result.completions[0]
        return RunAnswer(text=completion.text, thoughts=completion.thoughts, finish_reason=completion.finish_reason,
                         record=render.completion_record(completion, result, model=self.job.model),
                         stats=dataclasses.asdict(completion.stats))


class RemoteRun:
    """``run --server``: the same prompt, flags and answer as a local run, generated by a server
    (``model``: the one asked for, ``None`` for the server's own)."""

    def __init__(self, server: str, model: Optional[str], ask: Ask):
        self.server, self.model, self.ask = server, model, ask

    def answer(self, watch: Watch) -> tuple[RunAnswer, Optional[BaseException]]:
        import secrets

        from diffgen.remote import requests as remote
        from diffgen.remote.client import Client

        ask = self.ask
        seed = ask.seed if ask.seed is not None else secrets.randbelow(2**31)
        with Client(self.server) as client:
            with doing("asking the server for its model"):
                served = client.model(self.model)
            self.check_observable(client, served, watch)
            body, chat = remote.body(served.id, ask.text, system=ask.system, think=ask.think, raw=ask.raw,
                                     flags=ask.flags, seed=seed, image_urls=self.image_urls())
            settings = remote.settings(served, ask.flags, seed)
            with doing("generating on the server"):
                if not watch.observed:
                    with status(watch.console, "Denoising on the server", quiet=watch.quiet):
                        reply = client.complete(body, chat=chat)
                    return self.answer_of(reply, served, seed, settings), None
                with observing(watch.console, None, show_steps=watch.show_steps, trace_file=watch.trace_file,
                               model=served.id, prompt=ask.text, settings=settings,
                               canvas_length=int(served.canvas_length), channel_ids=served.channel_ids) as observer:
                    reply = remote.stream_answer(client, body, chat=chat, on_record=observer.on_record)
                    answer = self.answer_of(reply, served, seed, settings)
                    if observer.writer is not None:
                        observer.writer.result(answer.trace_result())
                return answer, observer.failure

    @staticmethod
    def check_observable(client: Client, served: ServerModel, watch: Watch) -> None:
        from diffgen.errors import UsageError

        if watch.observed and (served.settings is None or served.canvas_length is None):
            raise UsageError(f"the server at {client.url} does not stream denoising steps, so --show-steps and "
                             "--trace cannot draw them (diffgen serve does; other OpenAI-compatible servers do not)",
                             "drop --show-steps / --trace")

    def image_urls(self) -> tuple[str, ...]:
        """The images as data URLs, placed before the text as a local run places them."""
        if not self.ask.pictures:
            return ()
        from diffgen.images import data_url

        return tuple(data_url(picture) for picture in self.ask.pictures)

    @staticmethod
    def answer_of(reply: Answer, served: ServerModel, seed: int, settings: dict[str, Any]) -> RunAnswer:
        from diffgen.remote import requests as remote

        return RunAnswer(text=reply.text, thoughts=reply.thoughts, finish_reason=reply.finish_reason,
                         record=remote.record(reply, model=served.id, seed=seed, settings=settings),
                         stats=reply.stats, usage=reply.usage, seconds=reply.seconds)
