"""Published pre-quantised checkpoints: which format a checkpoint is in, and whether its tensors are right.

diffgen loads three published layouts directly into its own quantised modules — no bf16 detour,
no transformers quantiser (which wraps ``nn.Linear`` only, so it cannot hold the experts):

============================  ===================================================================
format                        what identifies it, and the tensors of one quantised matrix ``X``
============================  ===================================================================
ModelOpt NVFP4                ``config.json`` ``quantization_config.quant_method: modelopt`` and/or
                              ``hf_quant_config.json`` ``{"quantization": {"quant_algo": "NVFP4",
                              "group_size": 16, "kv_cache_quant_algo", "exclude_modules"}}``;
                              ``X.weight`` uint8 ``[out, in/2]``, ``X.weight_scale`` float8_e4m3fn
                              ``[out, in/16]``, ``X.weight_scale_2`` fp32 scalar, **multiplied**
                              (``amax / (6 * 448)``); ``X.input_scale`` (activations; unused here)
compressed-tensors NVFP4      ``quantization_config.quant_method: compressed-tensors``, format
                              ``nvfp4-pack-quantized``; ``X.weight_packed`` uint8 ``[out, in/2]``,
                              ``X.weight_scale`` e4m3 ``[out, in/16]``, ``X.weight_global_scale`` fp32
                              ``[1]``, **divided by** (``448 * 6 / amax``); ``X.input_global_scale``
compressed-tensors FP8        format ``float-quantized`` (FP8-dynamic): ``X.weight`` float8_e4m3fn
                              ``[out, in]``, ``X.weight_scale`` ``[out, 1]`` (per channel); activations
                              quantised per token at run time by its recipe, so no activation scale
============================  ===================================================================

Sources read for this (2026-12): NVIDIA Model-Optimizer ``modelopt/torch/quantization/qtensor/
nvfp4_tensor.py`` (``quantize``: ``weights_scaling_factor_2 = amax / (6 * 448)``, per-block scale
``block_amax / (6 * scale_2)`` cast to e4m3, codes packed ``(q[..., 1::2] << 4) | q[..., 0::2]``;
``dequantize``: ``scale * double_scale``); neuralmagic compressed-tensors
``compressors/quantized_compressors/nvfp4_quantized.py`` (names ``weight_packed``, ``weight_scale``,
``weight_global_scale``; ``pack_fp4_to_uint8``: low nibble first), ``quantization/utils/helpers.py``
``generate_gparam`` (``global_scale = 448 * 6 / amax``), ``quantization/lifecycle/forward.py``
(``_quantize_dequantize``: ``scale = scale / global_scale``) and ``naive_quantized.py`` (``float-quantized``: ``weight`` and
``weight_scale``); vLLM ``model_executor/models/gemma4.py`` ``load_weights`` (the per-expert names
``experts.{id}.{gate_proj,up_proj,down_proj}.*`` with any suffix, gate into the first half of the
fused ``w13``, up into the second). The layer layout (tied text weights stored once under
``model.decoder.*``, the encoder's ``layer_scalar`` apart) is :mod:`diffgen.loading.layout`'s.

Experts are stored one matrix per expert (``model.decoder.layers.N.experts.E.{gate_proj,up_proj,
down_proj}.*``); diffgen copies them byte for byte into its fused stacks (gate rows first, then
up) and keeps the per-tensor scale as a per-row multiplier (the reciprocal of compressed-tensors'
divisor). A linear that the checkpoint stores with a ``weight_scale`` (FP8-dynamic quantises the
attention and dense MLP) becomes a weight-only quantised linear; every other tensor loads as today.

Everything here reads JSON and safetensors headers only: a checkpoint diffgen cannot read is
refused in one line before the model is built.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffgen.errors import NotACheckpointError

if TYPE_CHECKING:
    from diffgen.loading.layout import Needs

HF_QUANT_CONFIG = "hf_quant_config.json"
MODELOPT_NVFP4 = ("NVFP4", "W4A16_NVFP4")
CT_NVFP4 = "nvfp4-pack-quantized"
CT_FP8 = "float-quantized"
GROUP = 16
# A name that a quantised text-layer linear has, to read from a compressed-tensors ignore list
# whether the checkpoint quantises the linears (for the plan, before any header is read).
SAMPLE_LINEAR = "model.decoder.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Format:
    """A pre-quantised layout.

    Attributes:
        scheme: the diffgen storage it loads into (``nvfp4`` or ``fp8``; :mod:`diffgen.loading.quant`).
        method: ``modelopt`` or ``compressed-tensors``.
        label: for messages (``ModelOpt NVFP4``...).
        leaves: the tensor names of one quantised matrix, in the roles ``q``, ``scale`` and (nvfp4)
            ``scale2``.
        optional: names it may also hold that diffgen does not use (activation scales).
        divides: whether the per-tensor scale is a divisor (compressed-tensors) not a multiplier.
        linears: whether the config says the text layers' linears are quantised too (for the plan;
            the loader goes by the tensors themselves).
    """

    scheme: str
    method: str
    label: str
    leaves: tuple[str, ...]
    optional: tuple[str, ...]
    divides: bool = False
    linears: bool = False

    def role(self, leaf: str) -> str | None:
        """``q``, ``scale``, ``scale2`` for a leaf name of this format, ``None`` for any other."""
        roles = dict(zip(self.leaves, ("q", "scale", "scale2")))
        return roles.get(leaf)


def _error(label: str, problem: str, hint: str) -> NotACheckpointError:
    return NotACheckpointError(f"{label}: {problem}", hint)


def detect(config: dict[str, Any], path: Path | None = None, label: str = "the checkpoint") -> Format | None:
    """The checkpoint's pre-quantised format from ``config.json`` (``config``) and, when ``path``
    is given, its ``hf_quant_config.json``; ``None`` for an unquantised checkpoint. Refuses an
    unknown method, algorithm or format, and mixed ones, in one line."""
    quant = config.get("quantization_config") or None
    hf_quant = None
    if path is not None and (path / HF_QUANT_CONFIG).is_file():
        try:
            hf_quant = json.loads((path / HF_QUANT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _error(label, f"{HF_QUANT_CONFIG} is not valid JSON ({exc})", "download the checkpoint again") from exc
    if quant is None and hf_quant is None:
        return None
    if quant is not None and not isinstance(quant, dict):
        raise _error(label, "config.json's quantization_config is not a JSON object", "download the checkpoint again")
    method = (quant or {}).get("quant_method") or ("modelopt" if hf_quant is not None else None)
    if method == "modelopt":
        return _modelopt(quant or {}, hf_quant, label)
    if method == "compressed-tensors":
        if hf_quant is not None:
            raise _error(label, f"mixed formats: config.json says compressed-tensors but {HF_QUANT_CONFIG} is "
                                "ModelOpt's", "keep the files of one checkpoint only")
        return _compressed_tensors(quant, label)
    raise _error(label, f"its weights are quantised with {method!r}, which diffgen does not read",
                 "diffgen reads ModelOpt NVFP4 and compressed-tensors NVFP4 / FP8 checkpoints, or a bf16 one "
                 "that it quantises itself (--quant)")


def _modelopt(quant: dict[str, Any], hf_quant: dict[str, Any] | None, label: str) -> Format:
    section = (hf_quant or {}).get("quantization") or quant.get("quantization") or quant
    algorithms = {a for a in (section.get("quant_algo"), quant.get("quant_algo")) if a}
    if len(algorithms) > 1:
        raise _error(label, f"mixed formats: quant_algo {' and '.join(sorted(algorithms))}",
                     f"config.json and {HF_QUANT_CONFIG} must describe one quantisation")
    algorithm = next(iter(algorithms), None)
    if algorithm not in MODELOPT_NVFP4:
        raise _error(label, f"ModelOpt quant_algo {algorithm!r} is not one diffgen reads",
                     "diffgen reads ModelOpt NVFP4 checkpoints (quant_algo NVFP4)")
    group = section.get("group_size", GROUP)
    if group != GROUP:
        raise _error(label, f"NVFP4 group_size {group}, but the format has one scale per {GROUP} weights",
                     "download the checkpoint again")
    return Format("nvfp4", "modelopt", "ModelOpt NVFP4", ("weight", "weight_scale", "weight_scale_2"),
                  ("input_scale", "k_scale", "v_scale"))


def _compressed_tensors(quant: dict[str, Any], label: str) -> Format:
    groups = quant.get("config_groups") or {}
    formats = {quant.get("format")} | {g.get("format") for g in groups.values() if isinstance(g, dict)}
    formats.discard(None)
    formats.discard("mixed-precision")
    if len(formats) > 1:
        raise _error(label, f"mixed formats: {', '.join(sorted(formats))}",
                     "diffgen reads compressed-tensors checkpoints in one format (NVFP4 or FP8)")
    fmt = next(iter(formats), None)
    ignore = quant.get("ignore") or []
    linears = any("Linear" in (g.get("targets") or []) for g in groups.values() if isinstance(g, dict)) and not any(
        SAMPLE_LINEAR.endswith(item) or (item.startswith("re:") and re.match(item[3:], SAMPLE_LINEAR))
        for item in ignore)
    if fmt == CT_NVFP4:
        return Format("nvfp4", "compressed-tensors", "compressed-tensors NVFP4",
                      ("weight_packed", "weight_scale", "weight_global_scale"), ("input_global_scale",),
                      divides=True, linears=linears)
    if fmt == CT_FP8:
        for group in groups.values():
            weights = (group or {}).get("weights") or {}
            if weights and (weights.get("num_bits"), weights.get("type")) != (8, "float"):
                raise _error(label, f"float-quantized weights of {weights.get('num_bits')} bits "
                                    f"({weights.get('type')}), not fp8", "diffgen reads FP8 (e4m3) float-quantized checkpoints")
        return Format("fp8", "compressed-tensors", "compressed-tensors FP8", ("weight", "weight_scale"),
                      ("input_scale",), linears=linears)
    raise _error(label, f"compressed-tensors format {fmt!r} is not one diffgen reads",
                 f"diffgen reads {CT_NVFP4} (NVFP4) and {CT_FP8} (FP8) checkpoints")


# -- the tensors -------------------------------------------------------------------------------------

SAFETENSORS_FP8 = "F8_E4M3"
SCALE_DTYPES = ("F32", "BF16", "F16")


def matrices(needs: Needs, keys: dict[str, tuple[str, list[int]]]) -> list[tuple[str, int, int]]:
    """``(stem, out, in)`` of every quantised matrix the checkpoint must hold: each expert's
    projections (``...experts.E.gate_proj``) and each linear stored with a ``weight_scale``."""
    from diffgen.loading.layout import EXPERTS

    out = []
    for name, (experts, rows, columns) in needs.experts.items():
        prefix, kind = EXPERTS.match(name).group("prefix", "kind")
        for expert in range(experts):
            if kind == "gate_up_proj":
                out += [(f"{prefix}.{expert}.gate_proj", rows // 2, columns),
                        (f"{prefix}.{expert}.up_proj", rows // 2, columns)]
            else:
                out.append((f"{prefix}.{expert}.down_proj", rows, columns))
    for module, (rows, columns) in needs.linears.items():
        if f"{module}.weight_scale" in keys:
            out.append((module, rows, columns))
    return out


def validate(fmt: Format, needs: Needs, keys: dict[str, tuple[str, list[int]]], label: str) -> None:
    """Refuse, from the headers, a quantised tensor of the wrong dtype or shape (every tensor is
    present: :func:`diffgen.loading.layout.check` ran first)."""
    for stem, rows, columns in matrices(needs, keys):
        if fmt.scheme == "nvfp4" and columns % GROUP:
            raise _error(label, f"{stem} has rows of {columns} weights, not a multiple of {GROUP}, so it cannot be "
                                f"{fmt.label} (one e4m3 scale per {GROUP} weights, two per byte)",
                         "this checkpoint's config does not match its format")
        if fmt.scheme == "nvfp4":
            expected = {fmt.leaves[0]: ("U8", [rows, columns // 2]),
                        fmt.leaves[1]: (SAFETENSORS_FP8, [rows, columns // GROUP])}
        else:
            expected = {fmt.leaves[0]: (SAFETENSORS_FP8, [rows, columns])}
        for leaf, (dtype, shape) in expected.items():
            found = keys.get(f"{stem}.{leaf}")
            if found is None:
                continue
            if tuple(found) != (dtype, shape):
                raise _error(label, f"{stem}.{leaf} is {found[0]} {found[1]}, but {fmt.label} stores it as "
                                    f"{dtype} {shape} for a {rows}x{columns} matrix",
                             "the checkpoint is damaged or not in the format its config names")
        scales = fmt.leaves[2:] if fmt.scheme == "nvfp4" else fmt.leaves[1:]
        for leaf in scales:
            found = keys.get(f"{stem}.{leaf}")
            if found is None:
                continue
            allowed = ([], [1]) if fmt.scheme == "nvfp4" else ([], [1], [rows, 1], [rows])
            if found[0] not in SCALE_DTYPES or found[1] not in allowed:
                raise _error(label, f"{stem}.{leaf} is {found[0]} {found[1]}; {fmt.label} keeps "
                                    f"{'one per-tensor scale' if fmt.scheme == 'nvfp4' else 'one scale per output row'}",
                             "the checkpoint is damaged or not in the format its config names")
