"""Renderers: what a finished generation looks like on stdout and stderr.

stdout carries only the answer (plus a final newline) or one JSON object; thoughts, stats and
warnings go to stderr. One serialiser (:func:`completion_record`) gives every JSON output the
same shape.
"""

from __future__ import annotations

import dataclasses
import json
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from diffgen.denoise.loop import Completion, GenerationResult


def completion_record(completion: Completion, result: GenerationResult, *, model: str,
                      seed: int | None = None) -> dict[str, Any]:
    """The JSON object for one completion (``seed`` overrides the settings' seed, for rows that
    drew from their own generator)."""
    seed = result.settings.seed if seed is None else seed
    return {
        "text": completion.text,
        "thoughts": completion.thoughts,
        "tokens": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "model": model,
        "seed": seed,
        "settings": {**result.settings.to_dict(), "seed": seed},
        "stats": dataclasses.asdict(completion.stats),
    }


def write_json(record: dict[str, Any], out: IO[str]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def write_answer(completion: Completion, out: IO[str]) -> None:
    out.write(completion.text + "\n")
    out.flush()


def stats_line(completion: Completion) -> str:
    """One line of numbers, e.g. ``42 tokens in 1.20 s (35.0 tok/s), 2 canvases, steps 14+12, ...``."""
    return stats_line_of(dataclasses.asdict(completion.stats), completion.finish_reason)


def stats_line_of(stats: dict[str, Any], finish_reason: str) -> str:
    """:func:`stats_line` from the stats' fields (as a server's ``diffgen_stats`` sends them)."""
    s = stats
    steps = "+".join(str(n) for n in s["steps_per_canvas"])
    parts = [
        f"{s['new_tokens']} tokens in {s['seconds']:.2f} s ({s['tokens_per_second']:.1f} tok/s)",
        f"prompt {s['prompt_tokens']} tokens",
        f"{s['canvases']} canvas{'es' if s['canvases'] != 1 else ''}, steps {steps}",
        f"{s['tokens_per_forward']:.2f} tokens/forward",
        f"finish {finish_reason}",
    ]
    if s.get("peak_memory_bytes") is not None:
        parts.append(f"peak {s['peak_memory_bytes'] / 2**30:.2f} GiB")
    return ", ".join(parts)


def usage_line(new_tokens: int | None, prompt_tokens: int | None, seconds: float, finish_reason: str) -> str:
    """What :func:`stats_line` can say of an answer from a server that sends no diffgen stats: the
    token counts of its usage and the request's wall time (measured by the client)."""
    parts = [f"{new_tokens if new_tokens is not None else '?'} tokens in {seconds:.2f} s"
             + (f" ({new_tokens / seconds:.1f} tok/s)" if new_tokens is not None and seconds > 0 else ""),
             f"prompt {prompt_tokens if prompt_tokens is not None else '?'} tokens", f"finish {finish_reason}",
             "no denoising stats (not a diffgen server)"]
    return ", ".join(parts)


def error_console(no_color: bool = False) -> Console:
    """A Rich console on stderr (NO_COLOR is honoured by Rich itself)."""
    from rich.console import Console

    return Console(stderr=True, no_color=no_color or None, highlight=False)


def show_thoughts(thoughts: str, console: Console) -> None:
    """The thought channel, dimmed, on the stderr console."""
    from rich.text import Text

    console.print(Text("thinking:", style="dim bold"))
    console.print(Text(thoughts, style="dim italic"))
