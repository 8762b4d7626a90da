"""Where ``diffgen batch`` generates: a model loaded here (:class:`LocalBatch`) or a server
(:class:`RemoteBatch`). Both take the parsed records and the output, and return the run's
:class:`~diffgen.cli.support.batch_runner.Summary`; the command around them (flags, input, settings file,
progress, failures) is one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from diffgen.cli.support import batch_runner
from diffgen.cli.support.common import load_model
from diffgen.records.batch import Job, Output, seed_for

if TYPE_CHECKING:
    from rich.console import Console

    from diffgen.cli.support.batch_runner import Summary
    from diffgen.denoise.constrained.schema import SchemaLayout, Vocabulary
    from diffgen.images import Processor
    from diffgen.loading.loader import LoadedModel
    from diffgen.loading.prepare import Prepared
    from diffgen.remote.client import Answer, Client, ServerModel
    from diffgen.settings import GenerationSettings

# Seconds at most that one record waits, in all, for a busy server (429/503 with Retry-After).
BUSY_PATIENCE = 600.0

Progress = Callable[["Summary", int], None]


@dataclass(frozen=True)
class PromptFlags:
    """How the command line lays out every prompt (a record's own fields add to them)."""

    system: Optional[str]
    raw: bool
    think: bool

    def of(self, job: Job) -> tuple[Optional[str], bool, bool]:
        """A record's system prompt, raw and think: its own, or the command line's."""
        return job.system or self.system, job.raw or self.raw, job.think or self.think


class LocalBatch:
    """Records with equal settings generated together on a model loaded here, ``size`` rows at a
    time (``None``: as many as the memory plan fits, decided at :meth:`start`)."""

    def __init__(self, prepared: Prepared, size: Optional[int], console: Console, *, model: str, base_seed: int,
                 prompts: PromptFlags, schema: Optional[dict], retries: int, images_dir: Path):
        self.prepared, self.size, self.console, self.model = prepared, size, console, model
        self.base_seed, self.prompts, self.schema, self.retries = base_seed, prompts, schema, retries
        self.images_dir = images_dir
        self.loaded: Optional[LoadedModel] = None
        self.processor: Optional[Processor] = None  # built at the first record with images
        self.vocab: Optional[Vocabulary] = None
        self.plan: Optional[SchemaLayout] = None

    def kept(self) -> dict[str, Any]:
        """The settings that change a record's answer, as kept in OUTPUT.settings.json."""
        prepared, prompts = self.prepared, self.prompts
        generation = {k: v for k, v in prepared.settings.to_dict().items() if k != "seed"}
        return {"model": self.model, "checkpoint": str(prepared.checkpoint.path), "weights": prepared.plan.scheme,
                "device": prepared.plan.device, "seed": self.base_seed, "system": prompts.system, "raw": prompts.raw,
                "think": prompts.think, **generation, "schema": self.schema}

    def start(self, quiet: bool) -> None:
        """Decide an automatic batch size, then load the model (and lay out the schema)."""
        from diffgen.loading.prepare import auto_batch_rows

        if self.size is None:
            self.size = auto_batch_rows(self.prepared)
            if not quiet:
                typer.echo(f"diffgen: batch size {self.size} (auto, from the memory plan)", err=True)
        self.loaded = load_model(self.prepared, self.console, quiet=quiet)
        if self.schema is not None:
            from diffgen.denoise.constrained import schema as schema_mod

            loaded = self.loaded
            self.vocab = schema_mod.vocabulary(loaded.tokenizer, int(loaded.model.config.text_config.vocab_size),
                                               self.prepared.settings.pad_token_id)
            self.plan = schema_mod.layout(self.schema, loaded.tokenizer, self.vocab,
                                          int(loaded.model.config.canvas_length))

    def run(self, items: list, out: Output, progress: Progress) -> Summary:
        return batch_runner.run(items, encode=self.encode, generate_batch=self.generate_batch,
                                defaults=self.prepared.settings, base_seed=self.base_seed, batch_size=self.size,
                                output=out, progress=progress)

    def encode(self, job: Job, settings: GenerationSettings) -> list[int]:
        from diffgen import prompt as prompt_mod
        from diffgen.denoise import loop

        if job.images:
            return self.encode_images(job, settings)
        system, raw, think = self.prompts.of(job)
        ids = prompt_mod.encode(self.loaded.tokenizer, job.prompt, system=system, think=think, raw=raw)
        if self.schema is not None:
            settings = settings.replace(max_new_tokens=len(self.plan.tokens))
        loop.check_context(self.loaded.model, len(ids), settings)
        return ids

    def encode_images(self, job: Job, settings: GenerationSettings) -> list[int]:
        """A record's ids and images (paths relative to the input file), as ``run --image`` does."""
        from diffgen import images
        from diffgen.denoise import loop
        from diffgen.errors import UsageError

        loaded = self.loaded
        if self.schema is not None or self.prompts.raw:
            raise UsageError(f"images do not combine with {'--schema' if self.schema is not None else '--raw'} yet")
        pictures = [images.read_image_file(self.images_dir / path, flag="image") for path in job.images]
        if self.processor is None:
            self.processor = images.load_processor(loaded.checkpoint.path, loaded.tokenizer,
                                                   loaded.model.config.to_dict())
        system, _, think = self.prompts.of(job)
        ids, vision = images.encode(self.processor, job.prompt, pictures, system=system, think=think)
        images.check_positions(vision, loaded.model.config.to_dict(), pictures)
        canvas = int(loaded.model.config.canvas_length)
        images.check_image_context(vision, len(ids), loaded.model.config.get_text_config().max_position_embeddings,
                                   -(-settings.max_new_tokens // canvas) * canvas)
        loop.check_context(loaded.model, len(ids), settings)
        return images.IdsWithImages(ids, vision)

    def generate_batch(self, prompts: list[list[int]], settings: GenerationSettings, seeds: list[int]) -> list[dict]:
        from diffgen.denoise import loop
        from diffgen.ui import render

        if self.schema is not None:
            from diffgen.cli.run import schema_record
            from diffgen.denoise.constrained import schema as schema_mod

            results = schema_mod.generate_json_rows(self.loaded, prompts, self.schema, settings, seeds=seeds,
                                                    retries=self.retries, vocab=self.vocab)
            return [{**schema_record(r, model=self.model), "tokens": list(r.token_ids[:r.layout.length])}
                    for r in results]
        vision = [getattr(ids, "vision", None) for ids in prompts]
        result = loop.generate(self.loaded, prompts, settings, seeds=seeds,
                                   vision=vision if any(v is not None for v in vision) else None)
        return [render.completion_record(c, result, model=self.model, seed=s)
                for c, s in zip(result.completions, seeds)]


class RemoteBatch:
    """Every record one request to an OpenAI-compatible server, ``concurrency`` of them in flight.
    A record's images (paths relative to the input file) go as PNG data URLs."""

    def __init__(self, client: Client, served: ServerModel, *, flags: dict[str, Any], base_seed: int,
                 prompts: PromptFlags, concurrency: int, images_dir: Path, output: Optional[Path]):
        self.client, self.served, self.flags, self.base_seed = client, served, flags, base_seed
        self.prompts, self.concurrency, self.images_dir, self.output = prompts, concurrency, images_dir, output

    def kept(self) -> dict[str, Any]:
        """The settings kept in OUTPUT.settings.json: the server's, as a local batch keeps its own."""
        from diffgen.remote import requests as remote

        generation = {k: v for k, v in remote.settings(self.served, self.flags, self.base_seed).items() if k != "seed"}
        prompts = self.prompts
        return {"model": self.served.id, "seed": self.base_seed, "system": prompts.system, "raw": prompts.raw,
                "think": prompts.think, **generation, "schema": None}

    def start(self, quiet: bool) -> None:
        if not quiet:
            typer.echo(f"diffgen: sending to {self.client.url} ({self.served.id}), {self.concurrency} request(s) at "
                       "a time", err=True)

    def run(self, items: list, out: Output, progress: Progress) -> Summary:
        from diffgen.remote.client import RemoteError

        try:
            return batch_runner.run_concurrent(items, send=self.send, output=out, concurrency=self.concurrency,
                                               fatal=unreachable, progress=progress)
        except RemoteError as exc:
            where = f"{self.output}" if self.output is not None else "the output"
            raise RemoteError(exc.message, f"{exc.hint + '; ' if exc.hint else ''}the records finished are in "
                                           f"{where}: rerun with --resume to do the rest") from exc

    def send(self, job: Job) -> dict[str, Any]:
        from diffgen.remote import requests as remote

        served = self.served
        record_seed = seed_for(job, self.base_seed)
        record_flags = {**self.flags, **dict(job.overrides)}
        image_urls: tuple[str, ...] = ()
        if job.images:
            from diffgen import images

            image_urls = tuple(images.data_url(images.read_image_file(self.images_dir / path, flag="image"))
                               for path in job.images)
        system, raw, think = self.prompts.of(job)
        body, chat = remote.body(served.id, job.prompt, system=system, think=think, raw=raw, flags=record_flags,
                                 seed=record_seed, image_urls=image_urls)
        answer = self.complete(body, chat)
        return remote.record(answer, model=served.id, seed=record_seed,
                             settings=remote.settings(served, record_flags, record_seed))

    def complete(self, body: dict[str, Any], chat: bool) -> Answer:
        """One answer, waiting as a busy server asks (429/503 with Retry-After), up to
        :data:`BUSY_PATIENCE` seconds in all."""
        from diffgen.remote.client import Retry

        waited = 0.0
        while True:
            try:
                return self.client.complete(body, chat=chat)
            except Retry as busy:
                if waited >= BUSY_PATIENCE:
                    raise
                time.sleep(busy.after)  # the server said when to come back
                waited += busy.after


def unreachable(exc: BaseException) -> bool:
    """Whether no record can succeed now: the server is gone, or refuses the key or the model."""
    from diffgen.remote.client import RemoteError

    return isinstance(exc, RemoteError) and ((exc.status is None and exc.retryable) or exc.status in (401, 403, 404))
