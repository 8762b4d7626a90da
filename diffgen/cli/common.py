"""What the commands share: option declarations, the error funnel, settings and loading.

Only light modules are imported here, so building the CLI (``--help``, completion) stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffgen.errors import EXIT_INTERRUPTED, DiffgenError
from diffgen.loading.loader import DEFAULT_MODEL  # the loader module imports nothing heavy at import time

__all__ = ["DEFAULT_MODEL"]


def debug() -> bool:
    return os.environ.get("DIFFGEN_DEBUG", "").strip() not in {"", "0"}


@contextlib.contextmanager
def error_funnel(interrupted: str = "interrupted") -> Iterator[None]:
    """Known errors -> one line on stderr and their exit code; Ctrl-C -> exit 130."""
    try:
        yield
    except DiffgenError as exc:
        if debug():
            raise
        message = f"diffgen: error: {exc.message}"
        if exc.hint:
            message += f" — {exc.hint}"
        typer.echo(message, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if debug():
            raise
        typer.echo(f"diffgen: {interrupted}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # stdout was closed early (e.g. `diffgen run ... | head -1`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None


# -- options shared by the commands that load a model and generate ------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def complete_model(incomplete: str) -> list[str]:
    """``--model`` completion: the models in the local Hugging Face cache (no imports, no network)."""
    try:
        names = [entry.name[len("models--"):].replace("--", "/") for entry in hub_cache_dir().iterdir()
                 if entry.name.startswith("models--")]
    except OSError:
        return []
    return sorted(name for name in names if name.startswith(incomplete))


ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", envvar="DIFFGEN_MODEL", show_envvar=True, autocompletion=complete_model,
                 help="Hub id (resolved through the Hugging Face cache) or local checkpoint directory."),
]
ExactOption = Annotated[
    Optional[bool],
    typer.Option("--exact/--fast", show_default=False,
                 help="Sampler: --exact reproduces transformers' generate() token for token (same seed, CPU); "
                      "--fast samples with fewer passes and host syncs. [default: exact on the CPU, fast on GPUs]"),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only the answer and errors: no plan, spinner or warnings.")]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps. auto: CUDA in bf16, else MPS, else CPU in fp32.")
]
OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Never contact the Hub; use the local cache only (like HF_HUB_OFFLINE=1).")
]
SystemOption = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
RawOption = Annotated[bool, typer.Option("--raw", help="No chat template: tokenise the text as is.")]
ThinkOption = Annotated[
    bool, typer.Option("--think", help="Thinking mode; thoughts are shown dimmed on stderr, never on stdout.")
]
MaxNewTokensOption = Annotated[
    Optional[int],
    typer.Option("--max-new-tokens", "-n", min=1, show_default=False,
                 help="Most tokens to return. Whole canvases are generated; the answer is cut to this. "
                      "[default: from the checkpoint, 256]"),
]
StepsOption = Annotated[
    Optional[int],
    typer.Option("--steps", min=1, show_default=False,
                 help="Most denoising steps per canvas. [default: from the checkpoint, 48]"),
]
EntropyBoundOption = Annotated[
    Optional[float],
    typer.Option("--entropy-bound", show_default=False,
                 help="Entropy budget (nats) for accepting tokens per step; higher accepts more. [default: 0.1]"),
]
TMinOption = Annotated[
    Optional[float], typer.Option("--t-min", min=0, show_default=False, help="Temperature at the last step. [default: 0.4]")
]
TMaxOption = Annotated[
    Optional[float], typer.Option("--t-max", min=0, show_default=False, help="Temperature at the first step. [default: 0.8]")
]
StabilityOption = Annotated[
    Optional[int],
    typer.Option("--stability", min=0, show_default=False,
                 help="Adaptive stop: steps the draft must stay unchanged. [default: 1]"),
]
ConfidenceOption = Annotated[
    Optional[float],
    typer.Option("--confidence", show_default=False,
                 help="Adaptive stop: mean token entropy (nats) must fall below this. [default: 0.005]"),
]


QuantOption = Annotated[
    str,
    typer.Option("--quant", help="Weights: auto, fp32, bf16, fp16, fp8, int8, nf4 or nf4-all (experts and linears). "
                                 "auto: the best quality that fits this machine's memory."),
]
MaxMemoryOption = Annotated[
    Optional[str],
    typer.Option("--max-memory", help="Memory budget to plan for instead of the measured one, e.g. 20GB or 18GiB.",
                 show_default=False),
]
OffloadOption = Annotated[
    bool,
    typer.Option("--offload", help="Last resort when nothing fits: put some layers on the CPU. Slow: every "
                                   "denoising step streams them over PCIe."),
]


def sampler_flags(max_new_tokens: Optional[int], steps: Optional[int], entropy_bound: Optional[float],
                  t_min: Optional[float], t_max: Optional[float], stability: Optional[int],
                  confidence: Optional[float]) -> dict[str, Any]:
    """The generation flags shared by run, batch and bench, by their settings names."""
    return {"max_new_tokens": max_new_tokens, "max_denoising_steps": steps, "entropy_bound": entropy_bound,
            "t_min": t_min, "t_max": t_max, "stability_threshold": stability, "confidence_threshold": confidence}


def load_model(prepared: Any, console: Any, *, quiet: bool = False, tokenizer: Any = None) -> Any:
    """Say the plan in one line on stderr, then load (progress bar on a terminal)."""
    from diffgen.loading.prepare import load_prepared
    from diffgen.planning.plan import human

    load_plan, chosen = prepared.plan, prepared.chosen
    if not quiet:
        typer.echo(f"diffgen: plan: {prepared.checkpoint.name} as {load_plan.describe()} — {human(chosen.weights)} "
                   f"weights + {human(chosen.runtime)} runtime, {human(prepared.budget)} usable", err=True)
    if load_plan.offload_bytes:
        typer.echo(f"diffgen: warning: {human(load_plan.offload_bytes)} of layers offloaded to the CPU; every "
                   "denoising step streams them over PCIe, so expect generation to be many times slower", err=True)
    return load_prepared(prepared, progress=console.is_terminal and not quiet, tokenizer=tokenizer)


@contextlib.contextmanager
def status(console: Any, message: str, *, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while ``message`` runs, only when stderr is a terminal."""
    if console.is_terminal and not quiet:
        with console.status(message):
            yield
    else:
        yield


def read_input(path: str) -> tuple[bytes, str]:
    """The bytes of a file, or of stdin for ``-``; and a name for messages."""
    if path == "-":
        return sys.stdin.buffer.read(), "stdin"
    try:
        return Path(path).read_bytes(), path
    except OSError as exc:
        from diffgen.errors import UsageError

        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
