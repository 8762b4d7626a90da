"""Loading a checkpoint tensor by tensor, quantising experts (and linears) on the way in.

The model is built with empty (meta) weights; each tensor is then read from its safetensors
shard, cast, moved to the device and — for expert tensors — quantised expert by expert, so
the bf16 experts never sit in memory all at once, on the host or on the GPU. Encoder layer i
and decoder layer i share one quantised module, and the other tied weights are re-tied to
the decoder's after loading, as transformers ties them. What quantisation produced is kept in
the quantised-weights cache (:mod:`diffgen.loading.qcache`), so later loads skip it.

A published pre-quantised checkpoint (:mod:`diffgen.loading.prequant`) goes through the same
stream, but its quantised tensors are copied byte for byte into the quantised modules' buffers
(experts one matrix per expert, into their rows of the fused stacks) instead of being quantised,
and the cache is neither read nor written: the checkpoint already is what it would hold. Host
memory then peaks at the quantised model plus the shard being read (a memory map whose pages
are let go with the shard).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from accelerate.utils import set_module_tensor_to_device

from diffgen.errors import NotACheckpointError
from diffgen.planning.plan import LoadPlan
from diffgen.planning.sizes import keeps_dtype
from diffgen.loading import qcache
from diffgen.loading.quant import QuantizedExperts, QuantizedLinear
from diffgen.loading.shards import shard_files

if TYPE_CHECKING:
    from tqdm.auto import tqdm
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion as Model

    from diffgen.loading.prequant import Format

Quantised = Union[QuantizedExperts, QuantizedLinear]
Headers = dict[str, tuple[str, list[int]]]  # tensor name -> (dtype, shape), as the shards' headers say

# The checkpoint tensors (by their last name part) each kind of quantised module is filled from.
QUANTISED_LEAVES = {QuantizedExperts: frozenset({"gate_up_proj", "down_proj"}), QuantizedLinear: frozenset({"weight"})}
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# One expert matrix of a pre-quantised checkpoint: ``<experts module>.<expert>.<projection>.<leaf>``.
PER_EXPERT = re.compile(r"^(?P<module>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                        r"(?P<leaf>\w+)$")
ENCODER_TWIN = ("model.decoder.", "model.encoder.language_model.")


def _swap_prequantised_linears(model: Model, fmt: Format, keys: Headers, dtype: torch.dtype,
                               device: torch.device) -> None:
    """Every ``nn.Linear`` the checkpoint stores quantised (with a ``weight_scale``) becomes a
    weight-only :class:`QuantizedLinear` of the checkpoint's scheme, shared with its encoder twin."""
    for key in keys:
        name, _, leaf = key.rpartition(".")
        if leaf != "weight_scale" or PER_EXPERT.match(key) or name == "lm_head":
            continue  # (the LM head is the embedding, tied: it stays as the embedding is stored)
        try:
            original = model.get_submodule(name)
        except AttributeError:
            continue  # a tensor with no place: the header check has warned about it
        if not isinstance(original, torch.nn.Linear):
            continue
        linear = QuantizedLinear(original, dtype, device, fmt.scheme)
        names = [name]
        if name.startswith(ENCODER_TWIN[0]):
            names.append(ENCODER_TWIN[1] + name.removeprefix(ENCODER_TWIN[0]))
        for target in names:
            parent_name, _, child = target.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
            except AttributeError:
                continue
            if isinstance(getattr(parent, child, None), torch.nn.Linear):
                setattr(parent, child, linear)


def _swap_modules(model: Model, plan: LoadPlan, device: torch.device) -> None:
    """Replace experts (and for nf4-all the text linears) by quantised modules shared by the
    encoder and decoder layer of the same index."""
    dtype = plan.torch_dtype
    expert_scheme = "nf4" if plan.quant == "nf4-all" else plan.quant
    pairs = zip(model.model.encoder.language_model.layers, model.model.decoder.layers)
    for encoder_layer, decoder_layer in pairs:
        shared = QuantizedExperts(decoder_layer.experts, expert_scheme, dtype, device)
        encoder_layer.experts = decoder_layer.experts = shared
        if plan.quant != "nf4-all":
            continue
        for name in LINEAR_NAMES:
            parent_name, _, leaf = name.rpartition(".")
            decoder_parent = decoder_layer.get_submodule(parent_name)
            original = getattr(decoder_parent, leaf, None)
            if original is None:
                continue  # e.g. full-attention layers have no v_proj
            linear = QuantizedLinear(original, dtype, device)
            setattr(decoder_parent, leaf, linear)
            setattr(encoder_layer.get_submodule(parent_name), leaf, linear)


def _retie(model: Model) -> None:
    """Point the encoder's text weights and the LM head at the decoder's (transformers' ties)."""
    decoder = model.model.decoder
    encoder = model.model.encoder.language_model
    for name, module in decoder.named_modules():
        try:
            twin = encoder.get_submodule(name) if name else encoder
        except AttributeError:
            continue
        if twin is module:
            continue
        for pname, param in module._parameters.items():
            if param is not None and pname in twin._parameters:
                twin._parameters[pname] = param
    model.lm_head.weight = decoder.embed_tokens.weight


def load_quantized(path: Path, plan: LoadPlan, *, progress: bool = False, fmt: Format | None = None,
                   keys: Headers | None = None) -> Model:
    """Build the model empty, then fill it under ``plan`` from the checkpoint's shards.

    ``fmt`` (a :class:`~diffgen.loading.prequant.Format`) with ``keys`` (the shards' tensors, from
    their headers): a pre-quantised checkpoint, copied into the quantised modules as stored.

    The quantised modules come from the quantised-weights cache when it holds this checkpoint
    and scheme (:mod:`diffgen.loading.qcache`; then the shards' expert tensors are not read);
    otherwise they are quantised tensor by tensor, and the cache is written layer by layer on
    the way. Every other tensor is read from the shards either way.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    files = shard_files(path)
    if fmt is not None:
        model = empty_quantized(config, plan, fmt=fmt, keys=keys)
        bar = _progress(progress, len(files), f"Loading {fmt.label} shards")
        try:
            _fill(model, _shard_tensors(files, on_shard=lambda: _tick(bar)), plan, fmt=fmt)
        finally:
            _close(bar)
        return finish_quantized(model, source=str(path))
    model = empty_quantized(config, plan)
    modules = quantised_modules(model)
    cache = None
    if modules and qcache.enabled():
        cache = qcache.QuantCache(qcache.checkpoint_key(path, files, plan.quant, plan.dtype))
        if _fill_from_cache(model, modules, cache, files, plan, progress=progress):
            return finish_quantized(model, source=str(path))
    return _fill_quantising(model, modules, cache, files, plan, progress=progress, source=str(path))


def _fill_from_cache(model: Model, modules: dict[str, Quantised], cache: qcache.QuantCache, files: list[Path],
                     plan: LoadPlan, *, progress: bool) -> bool:
    """Fill the quantised modules from the cache and everything else from the shards (skipping
    the tensors the quantised modules would take); ``False`` (nothing from the shards read yet)
    when the cache has no usable entry."""
    manifest = cache.lookup(modules)
    if manifest is None:
        return False
    bar = _progress(progress, len(manifest["files"]) + len(files), f"Loading cached {plan.quant} weights and shards",
                    unit="file")
    try:
        if not cache.read(manifest, modules, on_file=lambda: _tick(bar)):
            return False
        skip = lambda key: _quantised_target(model, key) is not None  # noqa: E731
        _fill(model, _shard_tensors(files, on_shard=lambda: _tick(bar), skip=skip), plan)
    finally:
        _close(bar)
    return True


def _fill_quantising(model: Model, modules: dict[str, Quantised], cache: qcache.QuantCache | None, files: list[Path],
                     plan: LoadPlan, *, progress: bool, source: str) -> Model:
    """Fill the model from the shards, quantising on the way and writing the cache entry (when
    ``cache`` is given) one layer at a time as each shard completes layers."""
    writer = cache.writer(modules, announce=progress) if cache is not None else None  # says so before the bar
    bar = _progress(progress, len(files), "Loading and quantising shards")
    received: dict[int, set[str]] = {}

    def after_shard() -> None:
        if writer is not None:
            writer.write_ready(_complete(modules, received))
        _tick(bar)

    try:
        _fill(model, _shard_tensors(files, on_shard=after_shard), plan, received)
        model = finish_quantized(model, source=source, received=received)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.close()
        _close(bar)
    return model


def _shard_tensors(files: list[Path], *, on_shard: Callable[[], None], skip: Callable[[str], bool] | None = None,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every shard in turn (but the ``skip``ped names, which are not read);
    ``on_shard`` runs after each shard's last tensor was consumed."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for key in shard.keys():
                if skip is None or not skip(key):
                    yield key, shard.get_tensor(key)
        on_shard()


def build_quantized(config: DiffusionGemmaConfig, tensors: Iterable[tuple[str, torch.Tensor]], plan: LoadPlan, *,
                    source: str = "the checkpoint") -> Model:
    """An empty model filled from ``(name, tensor)`` pairs (checkpoint names) under ``plan``."""
    model = empty_quantized(config, plan)
    received: dict[int, set[str]] = {}
    _fill(model, tensors, plan, received)
    return finish_quantized(model, source=source, received=received)


def empty_quantized(config: DiffusionGemmaConfig, plan: LoadPlan, *, fmt: Format | None = None,
                    keys: Headers | None = None) -> Model:
    """The model with empty (meta) weights, its buffers on the device and — for a quantised plan —
    its quantised modules in place (their buffers allocated on the device, not yet filled); with a
    pre-quantised ``fmt``, also the linears that ``keys`` show stored quantised."""
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaForBlockDiffusion

    device = torch.device(plan.device)
    dtype = plan.torch_dtype
    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.tie_weights()
    # Buffers (rotary tables, scalars) were built for real on the CPU: move them to the device,
    # scalars in the weights' dtype as transformers would. (Before the swap: the quantised
    # modules' own buffers are created on the device in their storage dtypes and stay so.)
    for name, buffer in list(model.named_buffers()):
        value = buffer if keeps_dtype(name, buffer) else buffer.to(dtype)
        set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
    if plan.quant != "none":
        _swap_modules(model, plan, device)
    if fmt is not None:
        _swap_prequantised_linears(model, fmt, keys or {}, dtype, device)
    return model


def quantised_modules(model: Model) -> dict[str, Quantised]:
    """Each quantised module once (encoder and decoder share them), under the name its checkpoint
    tensors carry: the decoder's, as checkpoints store the tied text weights under the decoder."""
    names: dict[int, list[str]] = {}
    found: dict[int, Quantised] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (QuantizedExperts, QuantizedLinear)):
            names.setdefault(id(module), []).append(name)
            found[id(module)] = module
    return {min(names[key], key=lambda n: (".decoder." not in n, n)): module for key, module in found.items()}


def finish_quantized(model: Model, *, source: str, received: dict[int, set[str]] | None = None) -> Model:
    """Re-tie, then check that nothing stayed empty: no parameter on the meta device and — when
    ``received`` (the checkpoint tensors each quantised module got) is given — no quantised module
    short of a tensor (its buffers would hold garbage)."""
    _retie(model)
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if received is not None:
        modules = quantised_modules(model)
        complete = _complete(modules, received)
        missing += [name for name in modules if name not in complete]
    if missing:
        raise NotACheckpointError(f"{source} lacks {len(missing)} weights the model needs (first: {missing[0]})",
                                  "the checkpoint is incomplete; download it again")
    return model


def _fill(model: Model, tensors: Iterable[tuple[str, torch.Tensor]], plan: LoadPlan,
          received: dict[int, set[str]] | None = None, *, fmt: Format | None = None) -> None:
    """Place every ``(name, tensor)``; note in ``received`` which tensors each quantised module got.
    ``fmt``: a pre-quantised format, whose quantised tensors are copied as stored."""
    device, dtype = torch.device(plan.device), plan.torch_dtype
    for key, tensor in tensors:
        if fmt is not None and _place_prequantised(model, key, tensor, fmt):
            del tensor
            continue
        target = _place(model, key, tensor, device, dtype)
        # Let go of the tensor before asking for the next: it may be a view of its shard's memory
        # map, which then closes with the shard, before the cache writes the layers it completed.
        del tensor
        if target is not None and received is not None:
            received.setdefault(id(target), set()).add(key.rpartition(".")[2])


def _complete(modules: dict[str, Quantised], received: dict[int, set[str]]) -> set[str]:
    """The names of the quantised ``modules`` that received every checkpoint tensor they need."""
    return {name for name, module in modules.items()
            if QUANTISED_LEAVES[type(module)] <= received.get(id(module), set())}


def _quantised_target(model: Model, key: str) -> Quantised | None:
    """The quantised module that checkpoint tensor ``key`` fills, or ``None``."""
    module_name, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if isinstance(module, QuantizedExperts) or (isinstance(module, QuantizedLinear) and leaf == "weight"):
        return module
    return None


def _place_prequantised(model: Model, key: str, tensor: torch.Tensor, fmt: Format) -> bool:
    """Copy a pre-quantised checkpoint's tensor into its quantised module as stored; ``True`` when
    ``key`` belongs to a quantised module (activation scales, unused, included), ``False`` for a
    tensor that loads as usual."""
    match = PER_EXPERT.match(key)
    if match:
        try:
            experts = model.get_submodule(match.group("module"))
        except AttributeError:
            return False
        if not isinstance(experts, QuantizedExperts):
            return False
        expert, proj, leaf = int(match.group("expert")), match.group("proj"), match.group("leaf")
        stack = experts.down_proj if proj == "down_proj" else experts.gate_up_proj
        half = stack.shape[0] // 2
        rows = {"gate_proj": slice(0, half), "up_proj": slice(half, None), "down_proj": slice(None)}[proj]
        index = expert
    else:
        module_name, _, leaf = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        if not isinstance(module, QuantizedLinear):
            return False
        stack, index, rows = module.stack, 0, slice(None)
    role = fmt.role(leaf)
    if role is None:
        return True  # an activation scale: diffgen runs the matrices on unquantised activations
    if role == "scale2" and fmt.divides:
        tensor = 1.0 / tensor.to(torch.float32)
    stack.copy_rows(index, rows, role, tensor)
    return True


def _place(model: Model, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Quantised | None:
    """Put checkpoint tensor ``key`` in its place; return the quantised module it filled, if any."""
    module_name, _, leaf = key.rpartition(".")
    target = _quantised_target(model, key)
    if isinstance(target, QuantizedLinear):
        target.store(tensor)
        return target
    if isinstance(target, QuantizedExperts):
        target.store(leaf, tensor)
        return target
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or (leaf not in module._parameters and leaf not in module._buffers):
        return None  # a tensor the model has no place for: the header check has warned about it
    value = tensor if keeps_dtype(key, tensor) else tensor.to(dtype)
    if value is tensor and device.type == "cpu":
        # A safetensors tensor can be a view of the shard's memory map; a copy lets the map go.
        value = tensor.clone()
    # accelerate would cast to the empty parameter's dtype (the default, fp32); keep ours.
    set_module_tensor_to_device(model, key, device, value=value, dtype=value.dtype)
    return None


def _progress(show: bool, total: int, desc: str, unit: str = "shard") -> tqdm | None:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _tick(bar: tqdm | None) -> None:
    if bar is not None:
        bar.update(1)


def _close(bar: tqdm | None) -> None:
    if bar is not None:
        bar.close()
