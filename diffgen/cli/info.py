"""``diffgen info``: this machine, its memory budget, and — with a model — the plan table."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from diffgen.cli.support.funnel import doing
from diffgen.cli.support.options import (
    DeviceOption,
    MaxMemoryOption,
    NoColorOption,
    OfflineOption,
    complete_model,
    not_blank,
)

EPILOG = (
    "Examples:\n\n"
    "  diffgen info                                         (the hardware profile and memory budget)\n\n"
    "  diffgen info -m google/diffusiongemma-26B-A4B-it     (plus the plan table: which --quant fits)\n\n"
    "  diffgen info -m ./config-only-dir --max-memory 24GB --json\n\n"
    "  diffgen info -m google/diffusiongemma-26B-A4B-it --images 4   (4 images per prompt: tokens and vision memory)\n\n"
    "No weights are read and no GPU is needed: the plan comes from config.json alone. A pre-quantised "
    "checkpoint (ModelOpt NVFP4, compressed-tensors NVFP4 or FP8) is planned in its own format. Without one, "
    "the line 'pick' names the published checkpoint that fits this machine best."
)


def info(
    model: Annotated[
        Optional[str],
        typer.Option("--model", "-m", envvar="DIFFGEN_MODEL", show_default=False, autocompletion=complete_model,
                     callback=not_blank,
                     help="A Hub id (in the cache, or its config.json fetched) or a directory with config.json."),
    ] = None,
    device: DeviceOption = "auto",
    max_memory: MaxMemoryOption = None,
    context: Annotated[
        Optional[int],
        typer.Option("--context", min=1, max=1 << 24, show_default="8192, or the model's context if smaller",
                     help="Context length to plan the KV cache for (at most the model's)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch rows to plan the sampler workspace for.")] = 1,
    images: Annotated[
        int,
        typer.Option("--images", min=0, help="Images per prompt to plan for: their soft tokens join the context and "
                                             "the vision tower's workspace the runtime."),
    ] = 0,
    offline: OfflineOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    no_color: NoColorOption = False,
) -> None:
    """Show the hardware profile, the usable memory and how it was measured, and the plan per --quant."""
    from diffgen.cli.support import config
    from diffgen.errors import UsageError
    from diffgen.planning import hardware
    from diffgen.planning import plan, sizes
    with doing("measuring this machine"):
        profile = hardware.detect()
    settings_file = config.config_path()
    values, problem = config.read_or_warn(settings_file)
    device_name, dtype = plan.device_dtype(device)
    budget = plan.parse_size(max_memory) if max_memory else next(
        (d.usable for d in profile.devices if d.device == device_name), profile.usable)
    data: dict[str, Any] = {"hardware": profile.to_dict(), "device": device_name, "dtype": dtype,
                            "budget_gb": round(budget / sizes.GB, 3),
                            "budget_source": "--max-memory" if max_memory else "measured",
                            "plans": [], "chosen": None, "can_offload": device_name.startswith("cuda"),
                            "config": {"path": str(settings_file), "exists": settings_file.is_file(),
                                       "values": values, "error": problem, "precedence": config.PRECEDENCE}}
    if model is not None:
        from diffgen.loading import hub

        from diffgen.loading.prepare import checkpoint_format

        where, checkpoint_config = hub.resolve_config(model, offline=offline)
        fmt = checkpoint_format(where, checkpoint_config, model)
        with doing("planning from config.json"):
            counts = sizes.count_parameters(checkpoint_config)
            text_config = checkpoint_config.get("text_config", checkpoint_config)
            limit = text_config.get("max_position_embeddings")
            image_tokens = sizes.image_context(images, _soft_tokens(where))
            context = _context(context, limit, images, image_tokens)
            full = plan.estimates(checkpoint_config, counts, device=device_name, dtype=dtype, budget=budget,
                                  hardware=profile, context=context + image_tokens, batch=batch, images=images)
            table = full if fmt is None else plan.estimates(
                checkpoint_config, counts, device=device_name, dtype=dtype, budget=budget, hardware=profile,
                context=context + image_tokens, batch=batch, images=images, only=fmt.scheme,
                linears=fmt.scheme if fmt.linears else None)
        try:
            chosen = plan.choose(table, "auto" if fmt is None else fmt.scheme, budget).scheme
        except UsageError:  # nothing fits: the table says so
            chosen = None
        # Which published checkpoint to pick: for the released model (a tiny test model has none).
        pick = plan.published_choice(full) if counts.total >= plan.RELEASED_PARAMETERS else None
        has_vision = bool(checkpoint_config.get("vision_config"))
        data.update(model=model, source=where, parameters=counts.total, context=context, batch=batch,
                    plans=[e.to_dict() for e in table], chosen=chosen, vision_parameters=counts.vision,
                    context_limit=limit, images=images, image_tokens=image_tokens,
                    max_image_tokens=(_soft_tokens(where) or sizes.IMAGE_TOKENS) if has_vision else None,
                    format=None if fmt is None else {"label": fmt.label, "quant": fmt.scheme, "method": fmt.method},
                    pick=None if pick is None else {"quant": pick[0], "model": pick[1]})
    if json_output:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    _print(data)


DEFAULT_CONTEXT = 8192


def _context(context: Optional[int], limit: Optional[int], images: int, image_tokens: int) -> int:
    """The context to plan for: ``--context`` checked against the model's (with the images'
    tokens), or the default within it."""
    from diffgen.errors import UsageError

    if context is not None and limit is not None and context + image_tokens > limit:
        also = f" plus {images} image(s) ({image_tokens} tokens)" if images else ""
        raise UsageError(f"--context {context}{also} is more than the model's context of {limit}",
                         "lower --context" + (" or --images" if images else ""))
    if context is None:  # the default, within the model's context with the images
        context = DEFAULT_CONTEXT if limit is None else max(min(DEFAULT_CONTEXT, limit - image_tokens), 1)
        if limit is not None and image_tokens >= limit:
            raise UsageError(f"{images} image(s) ({image_tokens} tokens) fill the model's context of {limit}",
                             "lower --images")
    return context


def _soft_tokens(where: Any) -> Optional[int]:
    """Soft tokens per image of a checkpoint directory's processor (``processor_config.json``'s
    ``max_soft_tokens`` or ``image_seq_length``), ``None`` when it does not say."""
    from pathlib import Path

    try:
        data = json.loads((Path(where) / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    found = (data.get("image_processor") or {}).get("max_soft_tokens") or data.get("image_seq_length")
    return int(found) if isinstance(found, int) and found > 0 else None


def _print(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from diffgen.planning.sizes import GiB

    console = Console(highlight=False)
    hw = data["hardware"]
    console.print(f"[bold]machine[/bold]: {hw['kind_label']}; host RAM {hw['host_total'] / GiB:.1f} GiB "
                  f"({hw['host_available'] / GiB:.1f} GiB available)")
    devices = Table("device", "name", "cc", "total GiB", "free GiB", "usable GiB", "bf16", "fp8", box=None)
    for d in hw["devices"]:
        cc = ".".join(map(str, d["capability"])) if d["capability"] else "-"
        devices.add_row(d["device"], d["name"], cc, f"{d['total'] / GiB:.1f}", f"{d['free'] / GiB:.1f}",
                        f"{d['usable'] / GiB:.1f}", "yes" if d["bf16"] else "no", "yes" if d["fp8"] else "no")
    console.print(devices)
    for d in hw["devices"]:
        console.print(f"[dim]{d['device']} usable: {d['measured']}[/dim]")
    for note in hw.get("notes", []):
        console.print(f"[yellow]note[/yellow]: {note}")
    cfg = data["config"]
    state = "" if cfg["exists"] else " (none)"
    if cfg["error"]:
        state = " (ignored: it cannot be read)"
    console.print(f"[bold]config[/bold]: {cfg['path']}{state}; precedence: {cfg['precedence']}", markup=True)
    for key, value in cfg["values"].items():
        console.print(f"  {key} = {value!r}", markup=False)
    console.print(f"[bold]budget[/bold]: {data['budget_gb']:.1f} GB ({data['budget_source']}) on "
                  f"{data['device']} ({data['dtype']})")
    if not data["plans"]:
        console.print("[dim]pass --model to see which --quant fits[/dim]")
        return
    console.print(f"[bold]model[/bold]: {data['model']} — {data['parameters'] / 1e9:.2f}B parameters; "
                  f"context {data['context']}, batch {data['batch']}")
    if data["max_image_tokens"] is not None:
        planned = (f"; planned: {data['images']} image(s), {data['image_tokens']} tokens on top of the context"
                   if data["images"] else "; plan for them with --images N")
        console.print(f"[bold]vision[/bold]: tower {data['vision_parameters'] / 1e9:.3f}B parameters (kept "
                      f"unquantised); up to {data['max_image_tokens']} + 2 tokens per image, counted against the "
                      f"model's context of {data['context_limit']}{planned}")
    if data["format"] is not None:
        console.print(f"[bold]format[/bold]: {data['format']['label']} checkpoint, pre-quantised: loads as --quant "
                      f"{data['format']['quant']} only, as stored")
    pick = data["pick"]
    if pick is not None:
        console.print(f"[bold]pick[/bold]: {pick['model']} ({pick['quant']}) is the best published checkpoint that "
                      "fits here")
    table = Table("quant", "weights GB", "runtime GB", "total GB", "fits", "", box=None)
    for row in data["plans"]:
        mark = "← auto" if row["quant"] == data["chosen"] else (row["why"] or "")
        fits = "yes" if row["fits"] and row["available"] else ("n/a" if not row["available"] else "no")
        table.add_row(row["quant"], f"{row['weights_gb']:.2f}", f"{row['runtime_gb']:.2f}", f"{row['total_gb']:.2f}",
                      fits, mark, style="bold" if row["quant"] == data["chosen"] else None)
    console.print(table)
    if data["chosen"] is None:
        offload = ", or use --offload (slow)" if data["can_offload"] else ""
        console.print(f"[red]nothing fits[/red]: free memory or raise --max-memory{offload}")
