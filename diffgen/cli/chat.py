"""``diffgen chat``: a multi-turn conversation, in-process or against a server.

In-process the model is loaded once, under the same plan and flags as ``diffgen run``, and the
conversation's encoder KV cache is kept between turns (:class:`~diffgen.denoise.prompt_cache.PromptCache`):
each turn encodes only what its prompt does not share with what the cache holds. With
``--server`` the turns go to an OpenAI-compatible server (:mod:`diffgen.cli.support.chat_client`). The
loop itself, its commands and streams are :mod:`diffgen.cli.support.chat_repl`.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from diffgen.cli.support.common import check_new_tokens, exclusive, parameter_source
from diffgen.cli.support.funnel import doing
from diffgen.cli.support.job import LocalJob
from diffgen.cli.support.option_groups import Runtime, Sampler, grouped
from diffgen.cli.support.options import (
    DEFAULT_MODEL,
    MaxNewTokensOption,
    ModelOption,
    NoColorOption,
    QuietOption,
    SystemOption,
)
from diffgen.denoise.options import Execution

if TYPE_CHECKING:
    from diffgen.loading.loader import LoadedModel
    from diffgen.settings import GenerationSettings

EPILOG = (
    "Examples:\n\n"
    "  diffgen chat                                     (loads the model once, then talk; /help lists the commands)\n\n"
    '  diffgen chat --think -s "Answer briefly."        (thinking mode and a system prompt from the start)\n\n'
    "  diffgen chat --server http://127.0.0.1:8000      (against `diffgen serve`, or set DIFFGEN_SERVER)\n\n"
    "  printf 'Hi\\n/think\\nWhy?\\n/save chat.json\\n' | diffgen chat --seed 1   (scripted: reproducible with "
    "--seed)\n\n"
    "Commands: /think (toggle thinking mode), /system TEXT, /reset, /save PATH (the conversation as JSON "
    "messages), /help, /exit (or Ctrl-D). Ctrl-C stops an answer and returns to the prompt. Answers go to "
    "stdout as each canvas is committed; thoughts (dimmed), prompts and notices to stderr. On a terminal the "
    "line editor keeps a history in $XDG_STATE_HOME/diffgen/chat_history. With --seed S the i-th turn (from 0) "
    "uses the seed S+i. In-process, each turn encodes only the part of the conversation its KV cache does not "
    "already hold; a server keeps no per-conversation cache, so with --server the whole conversation is sent "
    "and encoded every turn."
)

def _check_seed(ctx: typer.Context, value: Any) -> Any:
    from diffgen.settings import field_problem

    problem = None if ctx.resilient_parsing else field_problem("seed", value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


LOCAL_ONLY = ("device", "exact", "fast", "compile", "quant", "max_memory", "offload", "offline", "no_reuse")


@grouped
def chat(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL,
    server: Annotated[
        Optional[str],
        typer.Option("--server", envvar="DIFFGEN_SERVER", show_envvar=True, show_default="none: in-process",
                     metavar="<url>",
                     help="Talk to an OpenAI-compatible server (e.g. `diffgen serve`) instead of loading the model. "
                          "The server keeps no per-conversation cache: every turn sends and encodes the whole "
                          "conversation."),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="DIFFGEN_API_KEY", show_envvar=True, show_default="none",
                     help="With --server: send 'Authorization: Bearer KEY' (prefer the environment variable)."),
    ] = None,
    system: SystemOption = None,
    think: Annotated[
        bool, typer.Option("--think", help="Start in thinking mode (/think toggles it); thoughts go dimmed to stderr.")
    ] = False,
    max_new_tokens: MaxNewTokensOption = None,
    sampler: Sampler = Sampler(),
    seed: Annotated[
        Optional[int],
        typer.Option("--seed", callback=_check_seed, show_default="random per turn",
                     help="Seed of the first turn; turn i (from 0) uses SEED+i, so a scripted chat is reproducible."),
    ] = None,
    runtime: Runtime = Runtime(),
    no_reuse: Annotated[
        bool,
        typer.Option("--no-reuse", help="Encode the whole conversation every turn instead of reusing the KV cache "
                                        "(for comparison: the same arithmetic, but encoding in pieces rounds floats "
                                        "differently, so a rare token may differ)."),
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="After each answer, one line of timings on stderr.")] = False,
    quiet: QuietOption = False,
    no_color: NoColorOption = False,
) -> None:
    """Talk with the model, turn after turn (in-process, or with --server against a server)."""
    from diffgen.cli.support import chat_repl
    from diffgen.errors import UsageError

    flags = sampler.flags(max_new_tokens=max_new_tokens)
    if server:
        exclusive(ctx, "give one of them, or neither for the device's default", exact=runtime.exact, fast=runtime.fast)
        given = [name for name in LOCAL_ONLY
                 if parameter_source(ctx, name) in ("COMMANDLINE", "ENVIRONMENT") and ctx.params.get(name)
                 not in (None, False, "auto")]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} applies to an in-process model, not to --server",
                             "the server's own flags (`diffgen serve`) choose how it loads and samples")
        backend = _remote(ctx, server, api_key, model, flags)
        name = backend.describe()
    else:
        if api_key and parameter_source(ctx, "api_key") == "COMMANDLINE":
            raise UsageError("--api-key is sent to a server: it needs --server", "add --server URL or drop --api-key")
        backend, name = _local(LocalJob(ctx, model, runtime, quiet=quiet), flags, seed=seed, reuse=not no_reuse)
    streams = chat_repl.default_streams(no_color)
    if not quiet:
        streams.notice(f"diffgen chat: {name} — /help lists the commands, Ctrl-D leaves")
    state = chat_repl.Chat(system=system or None, think=think, seed=seed)
    with doing("chatting"):
        code = chat_repl.Repl(backend, state, streams, chat_repl.line_reader(sys.stdin, sys.stderr),
                              stats=stats).run()
    raise typer.Exit(code)


def _remote(ctx: typer.Context, server: str, api_key: Optional[str], model: str, flags: dict[str, Any]) -> Any:
    from diffgen.cli.support.chat_client import RemoteChat
    from diffgen.remote.requests import sampler_fields

    fields = sampler_fields(flags)
    if parameter_source(ctx, "model") in ("COMMANDLINE", "ENVIRONMENT"):
        fields["model"] = model
    return RemoteChat(server, api_key=api_key, fields=fields)


def _local(job: LocalJob, flags: dict[str, Any], *, seed: Optional[int], reuse: bool) -> tuple[LocalChat, str]:
    from diffgen.errors import UsageError

    prepared = job.prepare(seed=seed, flags=flags)
    check_new_tokens(prepared)
    with job.tokenizing() as tokenizer:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("this checkpoint's tokenizer has no chat template, and chat needs one",
                             "use `diffgen run --raw` to send text as is")
    return LocalChat(job.load(), prepared.settings, execution=job.execution, reuse=reuse), prepared.checkpoint.name


class LocalChat:
    """A chat backend on an in-process model (see :mod:`diffgen.cli.support.chat_repl` for the protocol).

    ``reuse``: keep the conversation's KV cache between turns (a
    :class:`~diffgen.denoise.prompt_cache.PromptCache`); off, every turn encodes everything.
    """

    def __init__(self, loaded: LoadedModel, settings: GenerationSettings, *, execution: Execution = Execution(),
                 reuse: bool = True):
        from diffgen.denoise.prompt_cache import PromptCache

        self.loaded, self.settings, self.execution = loaded, settings, execution
        self.cache = PromptCache() if reuse else None

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    def reply(self, messages: list[dict[str, str]], *, think: bool, seed: Optional[int]) -> Iterator[tuple[str, Any]]:
        from diffgen import prompt as prompt_mod
        from diffgen.cli.support.chat_repl import Reply
        from diffgen.denoise.channels import split_response
        from diffgen.denoise.loop import CanvasEvent, check_context, stream
        from diffgen.errors import PromptTooLongError
        from diffgen.server.answers import Deltas

        tokenizer = self.loaded.tokenizer
        settings = self.settings.replace(seed=secrets.randbelow(2**31) if seed is None else seed)
        ids = prompt_mod.encode_messages(tokenizer, messages, think=think)
        try:
            check_context(self.loaded.model, len(ids), settings)
        except PromptTooLongError as exc:
            raise PromptTooLongError(exc.message, "/reset starts a new conversation; or lower --max-new-tokens") \
                from exc
        start = time.perf_counter()
        generation = stream(self.loaded, [ids], settings, observe=False, execution=self.execution, cache=self.cache)
        eos, limit = set(settings.eos_token_ids), settings.max_new_tokens
        answer, thoughts = Deltas(()), Deltas(())
        tokens: list[int] = []
        first = None
        for event in generation:
            if not isinstance(event, CanvasEvent):
                continue
            first = time.perf_counter() - start if first is None else first
            tokens.extend(event.tokens[0].tolist())
            end = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
            response = split_response(tokenizer, tokens[: min(end, limit)])
            yield "thought", thoughts.update(response.thoughts or "")
            yield "answer", answer.update(response.text)
        completion = generation.result.completions[0]
        yield "thought", thoughts.update(completion.thoughts or "", final=True)
        yield "answer", answer.update(completion.text, final=True)
        reuse = self.cache.last if self.cache is not None else None
        reused = f", {reuse.reused_tokens} reused from the cache" if reuse is not None else ""
        stats = (f"{completion.stats.new_tokens} tokens in {completion.stats.seconds:.2f} s, first canvas after "
                 f"{first or 0:.2f} s; prompt {len(ids)} tokens{reused}")
        yield "done", Reply(text=completion.text, thoughts=completion.thoughts,
                            finish_reason="stop" if completion.finish_reason == "eos" else "length", stats=stats)
