"""Whether a checkpoint fills the model whole, from the safetensors headers alone (no data read).

The rule: every parameter and persistent buffer of the model comes from the checkpoint or from a
documented tie; otherwise the load is refused before anything is loaded, in one line naming the
first missing tensor and how many are missing (exit 1). Tensors the model has no place for are
named in a warning and skipped. Without this, transformers' ``from_pretrained`` initialises
whatever the checkpoint lacks at random and the model generates nonsense with exit code 0 — what
a directory in the per-expert (ModelOpt) layout did before diffgen read that layout.

The ties (``DiffusionGemmaForBlockDiffusion.tie_weights()``, found by identity on the model built
on the meta device, so exactly transformers' ties count and no others):

* the encoder's text layers share every parameter with the decoder's
  (``model.encoder.language_model.X`` is ``model.decoder.X``), stored once, under
  ``model.decoder.*``; the encoder's ``layer_scalar`` buffers are not tied and are stored apart;
* ``lm_head.weight`` is ``model.decoder.embed_tokens.weight``.

A pre-quantised checkpoint (:mod:`diffgen.loading.prequant`) stores the experts one matrix per
expert and quantised linears with their scales; :func:`check` then asks for exactly the tensors of
its format in place of the fused expert tensors and the quantised linears' weights.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffgen.errors import NotACheckpointError

if TYPE_CHECKING:
    from transformers import DiffusionGemmaConfig

    from diffgen.loading.prequant import Format

EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
# At most this many names in the warning about tensors the model has no place for.
SHOWN = 5


@dataclass(frozen=True)
class Needs:
    """What the model needs from a checkpoint.

    Attributes:
        groups: one entry per distinct tensor: its names (a tied tensor has several; any one of
            them in the checkpoint fills it), the decoder's name first.
        experts: the fused expert tensors by name (``model.decoder.layers.N.experts.gate_up_proj``)
            with their shapes ``(E, out, in)``.
        linears: the weights of the model's ``nn.Linear`` modules by module name, as ``(out, in)``.
    """

    groups: tuple[tuple[str, ...], ...]
    experts: dict[str, tuple[int, int, int]]
    linears: dict[str, tuple[int, int]]


def model_needs(config: DiffusionGemmaConfig | dict[str, Any]) -> Needs:
    """The tensors a DiffusionGemma model of ``config`` (a config object or a parsed config.json)
    needs, from the model built on the meta device and tied as transformers ties it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    if isinstance(config, dict):
        config = DiffusionGemmaConfig.from_dict(dict(config))
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.tie_weights()
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    groups = tuple(tuple(sorted(group, key=lambda n: (0 if ".decoder." in n else 1 if n.startswith("lm_head") else 2, n)))
                   for group in names.values())
    groups = tuple(sorted(groups, key=lambda g: g[0]))
    experts = {}
    linears = {}
    for group in groups:
        match = EXPERTS.match(group[0])
        if match:
            experts[group[0]] = tuple(model.get_parameter(group[0]).shape)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            linears[name] = (module.out_features, module.in_features)
    return Needs(groups, experts, linears)


def read_headers(files: list[Path]) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the weight ``files`` as ``name -> (dtype, shape)`` (headers only)."""
    from diffgen.loading.shards import read_header

    found: dict[str, tuple[str, list[int]]] = {}
    for file in files:
        found.update(read_header(file))
    return found


def required(needs: Needs, keys: dict[str, Any], fmt: Format | None) -> tuple[list[tuple[str, ...]], set[str]]:
    """``(groups, optional)``: the name groups the checkpoint must fill in its layout (``fmt``: a
    pre-quantised format, or ``None`` for the fused layout transformers saves) and the names it
    may hold besides (activation scales of a pre-quantised checkpoint, which diffgen does not use:
    it runs the quantised matrices on unquantised activations)."""
    out: list[tuple[str, ...]] = []
    optional: set[str] = set()
    for group in needs.groups:
        head = group[0]
        if fmt is not None and head in needs.experts:
            prefix, kind = EXPERTS.match(head).group("prefix", "kind")
            projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            for expert in range(needs.experts[head][0]):
                for projection in projections:
                    stem = f"{prefix}.{expert}.{projection}"
                    out += [(f"{stem}.{leaf}",) for leaf in fmt.leaves]
                    optional.update(f"{stem}.{leaf}" for leaf in fmt.optional)
            continue
        module, _, leaf = head.rpartition(".")
        if fmt is not None and leaf == "weight" and module in needs.linears and f"{module}.weight_scale" in keys:
            out += [(f"{module}.{name}",) for name in fmt.leaves]
            optional.update(f"{module}.{name}" for name in fmt.optional)
            continue
        out.append(group)
    return out, optional


def check(keys: dict[str, Any], needs: Needs, *, label: str, fmt: Format | None = None) -> list[str]:
    """Refuse a checkpoint (its tensors ``keys``) that lacks a tensor the model needs; warn about
    (and return) the tensors it holds that the model has no place for."""
    groups, optional = required(needs, keys, fmt)
    missing = [group[0] for group in groups if not any(name in keys for name in group)]
    if missing:
        layout = f"the {fmt.label} layout" if fmt is not None else "the layout transformers saves"
        raise NotACheckpointError(
            f"{label} lacks {len(missing)} of the {len(groups)} tensors the model needs in {layout} "
            f"(first: {missing[0]})",
            "the checkpoint is incomplete or in a layout diffgen does not read; download it again or convert it")
    known = {name for group in groups for name in group} | optional
    extra = sorted(name for name in keys if name not in known)
    if extra:
        shown = ", ".join(extra[:SHOWN]) + (f" and {len(extra) - SHOWN} more" if len(extra) > SHOWN else "")
        print(f"diffgen: warning: {label} holds {len(extra)} tensor(s) this model has no place for, ignored: {shown}",
              file=sys.stderr, flush=True)
    return extra
