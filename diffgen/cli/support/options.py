"""The options the commands share, declared once (``Annotated`` aliases, as huggingface_hub's CLI does).

Values are checked while the command line is parsed, before anything is loaded: options with
fixed choices are ``Literal`` types (click lists the choices and refuses others), and the
generation values go through :func:`diffgen.settings.input_problem`: the check the library
applies, plus the limits of what a user may ask for (at most 1024 steps). Checkpoint defaults are shown as what they are: the checkpoint's
``generation_config.json`` value, with the released model's.

Only light modules are imported here, so ``--help`` and completion stay fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from diffgen import settings as settings_mod
from diffgen.planning.plan import QUANT_CHOICES
from diffgen.settings import LIBRARY_DEFAULTS, RELEASED_MODEL

DEFAULT_MODEL = RELEASED_MODEL
QuantChoice = Literal[QUANT_CHOICES]  # type: ignore[valid-type]
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub itself resolves it (``HF_HUB_CACHE``, ``HF_HOME``,
    XDG). Its constants module reads the environment when first imported: a few milliseconds, no torch
    (completion runs in a fresh process each time)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def complete_model(incomplete: str) -> list[str]:
    """``--model`` completion: the models in the local Hugging Face cache (no torch, no network)."""
    try:
        names = [entry.name[len("models--"):].replace("--", "/") for entry in hub_cache_dir().iterdir()
                 if entry.name.startswith("models--")]
    except OSError:
        return []
    return sorted(name for name in names if name.startswith(incomplete))


def complete_device(incomplete: str) -> list[str]:
    return [kind for kind in DEVICE_KINDS if kind.startswith(incomplete)]


def _check_device(ctx: typer.Context, value: Any) -> Any:
    if ctx.resilient_parsing or value is None or _DEVICE.match(str(value).strip().lower()):
        return value
    raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def _checked(field: str) -> Any:
    """A click callback that refuses a value :func:`diffgen.settings.input_problem` refuses."""

    def check(ctx: typer.Context, value: Any) -> Any:
        if ctx.resilient_parsing:
            return value
        problem = settings_mod.input_problem(field, value)
        if problem is not None:
            raise typer.BadParameter(problem)
        return value

    return check


def _from_checkpoint(field: str) -> str:
    return f"from the checkpoint; {LIBRARY_DEFAULTS[field]} for {RELEASED_MODEL}"


def _no_color(ctx: typer.Context, value: bool) -> bool:
    if value:
        os.environ["NO_COLOR"] = "1"
    return value


def not_blank(ctx: typer.Context, value: Any) -> Any:
    """A click callback that refuses an empty or blank name (``-m ""``, ``pull ""``)."""
    if not ctx.resilient_parsing and isinstance(value, str) and not value.strip():
        raise typer.BadParameter("must name a checkpoint: a Hub id (org/name) or a directory")
    return value


ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", envvar="DIFFGEN_MODEL", show_envvar=True, autocompletion=complete_model,
                 callback=not_blank,
                 help="Hub id (resolved through the Hugging Face cache) or local checkpoint directory."),
]
ExactOption = Annotated[
    bool,
    typer.Option("--exact", show_default="on for the CPU",
                 help="Sampler: reproduce transformers' generate() token for token (same seed, CPU)."),
]
FastOption = Annotated[
    bool,
    typer.Option("--fast", show_default="on for GPUs",
                 help="Sampler: fewer passes and host syncs (Gumbel-max sampling); not token-identical to "
                      "generate()."),
]
CompileOption = Annotated[
    bool,
    typer.Option("--compile", help="Compile the fast step with torch.compile (implies --fast). About twice as fast "
                                   "per step on a CPU; the first call compiles for a minute or more, later calls "
                                   "reuse inductor's on-disk cache. GPUs replay the step from CUDA graphs without it."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only the answer and errors: no plan, spinner or warnings.")]
DeviceOption = Annotated[
    str,
    typer.Option("--device", callback=_check_device, autocompletion=complete_device,
                 help="auto, cpu, cuda, cuda:N or mps. auto: CUDA in bf16, else MPS, else CPU in fp32."),
]
OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Never contact the Hub; use the local cache only (like HF_HUB_OFFLINE=1).")
]
SystemOption = Annotated[Optional[str], typer.Option("--system", "-s", show_default="none", help="System prompt.")]
RawOption = Annotated[bool, typer.Option("--raw", help="No chat template: tokenise the text as is.")]
ThinkOption = Annotated[
    bool, typer.Option("--think", help="Thinking mode; thoughts are shown dimmed on stderr, never on stdout.")
]
NoColorOption = Annotated[
    bool, typer.Option("--no-color", callback=_no_color, is_eager=True, help="No colours on stderr (like NO_COLOR=1).")
]
MaxNewTokensOption = Annotated[
    Optional[int],
    typer.Option("--max-new-tokens", "-n", callback=_checked("max_new_tokens"),
                 show_default=_from_checkpoint("max_new_tokens"),
                 help="Most tokens to return (> 0). Whole canvases are generated; the answer is cut to this."),
]
StepsOption = Annotated[
    Optional[int],
    typer.Option("--steps", callback=_checked("max_denoising_steps"),
                 show_default=_from_checkpoint("max_denoising_steps"),
                 help="Most denoising steps per canvas (> 0)."),
]
EntropyBoundOption = Annotated[
    Optional[float],
    typer.Option("--entropy-bound", callback=_checked("entropy_bound"), show_default=_from_checkpoint("entropy_bound"),
                 help="Entropy budget (nats, > 0) for accepting tokens per step; higher accepts more."),
]
TMinOption = Annotated[
    Optional[float],
    typer.Option("--t-min", callback=_checked("t_min"), show_default=_from_checkpoint("t_min"),
                 help="Temperature at the last step (>= 0, below --t-max)."),
]
TMaxOption = Annotated[
    Optional[float],
    typer.Option("--t-max", callback=_checked("t_max"), show_default=_from_checkpoint("t_max"),
                 help="Temperature at the first step (finite, above --t-min)."),
]
StabilityOption = Annotated[
    Optional[int],
    typer.Option("--stability", callback=_checked("stability_threshold"),
                 show_default=_from_checkpoint("stability_threshold"),
                 help="Adaptive stop: steps the draft must stay unchanged (>= 0)."),
]
ConfidenceOption = Annotated[
    Optional[float],
    typer.Option("--confidence", callback=_checked("confidence_threshold"),
                 show_default=_from_checkpoint("confidence_threshold"),
                 help="Adaptive stop: mean token entropy (nats, > 0) must fall below this."),
]
SeedOption = Annotated[
    Optional[int],
    typer.Option("--seed", callback=_checked("seed"), show_default="random, reported by --json",
                 help="Random seed, 0 to 2**63-1 (torch.manual_seed); same seed, same answer on the same machine."),
]
QuantOption = Annotated[
    QuantChoice,
    typer.Option("--quant", metavar="<scheme>",
                 help=f"Weights: {', '.join(QUANT_CHOICES[:-1])} or {QUANT_CHOICES[-1]} (experts and linears). "
                      "auto: the best quality that fits this machine's memory."),
]
MaxMemoryOption = Annotated[
    Optional[str],
    typer.Option("--max-memory", show_default="measured",
                 help="Memory budget to plan for instead of the measured one, e.g. 20GB or 18GiB."),
]
OffloadOption = Annotated[
    bool,
    typer.Option("--offload", help="Last resort on a GPU when nothing fits: put some layers in CPU memory. Slow: "
                                   "every denoising step streams them over PCIe."),
]
ImageOption = Annotated[
    Optional[list[str]],
    typer.Option("--image", "-i", show_default=False, metavar="<file>",
                 help="Show the model an image (PNG, JPEG, WebP, GIF, BMP; repeatable, placed before the prompt in "
                      "order). - reads one from stdin when the prompt is an argument. Needs pillow: "
                      "pip install 'diffgen\\[images]'."),
]
NoStdinOption = Annotated[
    bool,
    typer.Option("--no-stdin", help="Do not read stdin even when it is not a terminal. Shell loops need it (or "
                                    "< /dev/null): `while read p; do diffgen run --no-stdin \"$p\"; done < prompts.txt`."),
]

ServerOption = Annotated[
    Optional[str],
    typer.Option("--server", envvar="DIFFGEN_SERVER", show_envvar=True, show_default="none: run here",
                 metavar="<url>",
                 help="Send the work to an OpenAI-compatible server (diffgen serve, vLLM, ...) instead of loading the "
                      "model here, e.g. http://127.0.0.1:8000. DIFFGEN_API_KEY is sent as its key."),
]


def sampler_choice(exact: bool, fast: bool, compile: bool = False) -> Optional[bool]:
    """``--exact`` / ``--fast`` (/ ``--compile``) -> the loop's ``exact`` argument (``None``: the
    device's default)."""
    from diffgen.errors import UsageError

    if compile and exact:
        raise UsageError("--compile needs the fast sampler (compiled kernels reorder float sums, so the exact "
                         "sampler would no longer match generate())", "drop --exact or --compile")
    if compile:
        return False
    if exact and fast:
        raise UsageError("--exact and --fast exclude each other", "give one of them, or neither for the "
                                                                  "device's default")
    return True if exact else False if fast else None


def sampler_flags(*values: Any, **by_key: Any) -> dict[str, Any]:
    """The generation flags shared by run, batch and bench, by their settings names.

    Positional values follow :data:`diffgen.settings.SAMPLER_FLAGS`' order; keywords use their
    keys (``steps=...``).
    """
    table = settings_mod.SAMPLER_FLAGS
    out = {flag.field: value for flag, value in zip(table, values)}
    out.update({flag.field: by_key[flag.key] for flag in table if flag.key in by_key})
    return out
ClampedShowStepsOption = Annotated[
    bool,
    typer.Option("--show-steps", help="Watch the denoising live on stderr, clamped (given) text drawn dim (one plain "
                                      "line per step when stderr is not a terminal). stdout is unchanged."),
]
ClampedTraceOption = Annotated[
    Optional[Path],
    typer.Option("--trace", dir_okay=False, show_default=False,
                 help="Write a JSONL trace of every step, clamped positions marked fixed, for `diffgen replay`."),
]
OverwriteOption = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing --trace file even if it is not a diffgen trace (an input "
                                     "of the command is never replaced)."),
]
