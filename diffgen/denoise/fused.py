"""The fast passes: DiffusionGemma's decoder and encoder layers as a few fused kernels each.

transformers' layer forward is written for clarity: eleven RMSNorms a layer of seven to nine
ops each (the weight cast to float32 at every call), separate q/k/v projections, rotary glue,
and the decoder concatenating cache and canvas keys at every step — about 5,100 kernels for one
denoising step of the released model. Here the same arithmetic runs over the model's own weights
(nothing is copied: q|k|v and gate|up are concatenated once, the modules' weights becoming views
of the result, shared by encoder and decoder as before) through :mod:`diffgen.kernels.fused`:

* one RMSNorm kernel in, one projection for q|k|v, one kernel for the q/k/v norms and RoPE that
  writes keys and values straight into the canvas columns of the static cache
  (:class:`~diffgen.denoise.kv.StaticKV`), one attention call over the whole cache buffer;
* one kernel for residual + post-attention norm + the three norms that read its result (dense
  MLP input, experts input, router input with the router's scale folded into its weight);
* one projection for gate|up, one GELU x up kernel, the down projection;
* the router's softmax, top-k, renormalisation and per-expert scale in one kernel; the experts;
* one kernel for both post-FFN norms, their sum, the outer norm, the residual and the layer scalar.

The arithmetic is transformers' (float32 inside each norm; see ``docs/architecture.md``), with
rounding at fewer places, so the fast path is close to but not bit-identical with transformers'
forward; ``--exact`` never takes it. ``DIFFGEN_FUSED=0`` (read per generation) runs transformers'
modules instead, for comparison.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from diffgen.kernels import fused as ops

if TYPE_CHECKING:
    from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    from diffgen.denoise.kv import StaticKV


def fused_enabled() -> bool:
    """Whether the fast path runs diffgen's fused layers (``DIFFGEN_FUSED``, default on)."""
    return os.environ.get("DIFFGEN_FUSED", "1").strip().lower() not in {"0", "false", "no", "off"}


def fusable(model: DiffusionGemmaForBlockDiffusion) -> bool:
    """Whether the fused passes can run ``model``: every weight on one device, none offloaded
    (accelerate's hooks move offloaded weights in a module's own forward, which the fused passes
    do not call). Otherwise the fast path runs transformers' modules."""
    cached = model.__dict__.get("_diffgen_fusable")
    if cached is None:
        devices = {p.device for p in model.model.decoder.parameters()}
        cached = len(devices) == 1 and next(iter(devices)).type != "meta" and not any(
            hasattr(module, "_hf_hook") for module in model.modules())
        model.__dict__["_diffgen_fusable"] = cached
    return cached


def _f32(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.detach().float().contiguous()


def _plain(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.bias is None and not hasattr(module, "_hf_hook")
            and module.weight.device.type != "meta")


def _fuse_linears(pairs: list[tuple[nn.Module, nn.Module | None]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection computing the given linears side by side. ``pairs`` are (decoder module,
    encoder twin or None); plain bf16 linears get one concatenated weight, their own weights
    becoming views of it (in both twins: nothing is held twice); anything else (quantised,
    offloaded) is called one by one and concatenated."""
    modules = [module for module, _ in pairs]
    if not all(_plain(module) for module in modules):
        return lambda x: torch.cat([module(x) for module in modules], dim=-1)
    weight = torch.cat([module.weight.detach() for module in modules])
    offset = 0
    for module, twin in pairs:
        rows = module.weight.shape[0]
        view = nn.Parameter(weight[offset:offset + rows], requires_grad=False)
        offset += rows
        for owner in (module, twin):
            if owner is not None and "weight" in owner._parameters:
                owner._parameters["weight"] = view
    return lambda x: torch.nn.functional.linear(x, weight)


@dataclass(frozen=True)
class FusedLayer:
    """One text layer's weights, prepared once (norm weights in float32, projections fused)."""

    kind: str
    heads: int
    kv_heads: int
    head_dim: int
    has_v: bool
    eps: float
    input_norm: torch.Tensor
    qkv: Callable[[torch.Tensor], torch.Tensor]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: nn.Module
    post_attention: torch.Tensor
    ffn_norms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: nn.Module
    router: nn.Module
    per_expert_scale: torch.Tensor
    top_k: int
    experts: nn.Module
    post_mlp: torch.Tensor
    post_experts: torch.Tensor
    post_ffn: torch.Tensor
    layer_scalar: torch.Tensor


@dataclass(frozen=True)
class FusedModel:
    """The whole text stack prepared for the fused passes (one per loaded model and process)."""

    layers: tuple[FusedLayer, ...]
    embed: nn.Module
    rotary: nn.Module
    final_norm: torch.Tensor
    lm_head: nn.Module
    sc_pre_norm: torch.Tensor
    sc_gate_up: Callable[[torch.Tensor], torch.Tensor]
    sc_down: nn.Module
    eps: float
    text_config: DiffusionGemmaTextConfig
    dtype: torch.dtype
    embed_scale: torch.Tensor


def prepare(model: DiffusionGemmaForBlockDiffusion) -> FusedModel:
    """The fused view of ``model`` (built on first use, then kept on the model)."""
    cached = getattr(model, "_diffgen_fused", None)
    if cached is not None:
        return cached
    config = model.config.get_text_config()
    decoder = model.model.decoder
    encoder = model.model.encoder.language_model
    eps = float(config.rms_norm_eps)
    root = config.hidden_size ** -0.5
    layers = []
    for index, (layer, twin) in enumerate(zip(decoder.layers, encoder.layers, strict=True)):
        attn, twin_attn = layer.self_attn, twin.self_attn
        names = ["q_proj", "k_proj"] + (["v_proj"] if attn.v_proj is not None else [])
        mlp, twin_mlp = layer.mlp, twin.mlp
        layers.append(FusedLayer(
            kind=config.layer_types[index], heads=config.num_attention_heads,
            kv_heads=config.per_layer_config[index].num_key_value_heads, head_dim=attn.head_dim,
            has_v=attn.v_proj is not None, eps=eps, input_norm=_f32(layer.input_layernorm.weight),
            qkv=_fuse_linears([(getattr(attn, n), getattr(twin_attn, n)) for n in names]),
            q_norm=_f32(attn.q_norm.weight), k_norm=_f32(attn.k_norm.weight), o_proj=attn.o_proj,
            post_attention=_f32(layer.post_attention_layernorm.weight),
            ffn_norms=(_f32(layer.pre_feedforward_layernorm.weight), _f32(layer.pre_feedforward_layernorm_2.weight),
                       (layer.router.scale.detach().float() * root).contiguous()),
            gate_up=_fuse_linears([(mlp.gate_proj, twin_mlp.gate_proj), (mlp.up_proj, twin_mlp.up_proj)]),
            down=mlp.down_proj, router=layer.router.proj,
            per_expert_scale=layer.router.per_expert_scale.detach(), top_k=int(config.top_k_experts),
            experts=layer.experts, post_mlp=_f32(layer.post_feedforward_layernorm_1.weight),
            post_experts=_f32(layer.post_feedforward_layernorm_2.weight),
            post_ffn=_f32(layer.post_feedforward_layernorm.weight), layer_scalar=layer.layer_scalar,
        ))
    sc = decoder.self_conditioning
    fused = FusedModel(
        layers=tuple(layers), embed=decoder.embed_tokens, rotary=decoder.rotary_emb, final_norm=_f32(decoder.norm.weight),
        lm_head=model.lm_head, sc_pre_norm=_f32(sc.pre_norm.weight),
        sc_gate_up=_fuse_linears([(sc.gate_proj, None), (sc.up_proj, None)]), sc_down=sc.down_proj, eps=eps,
        text_config=config, dtype=decoder.embed_tokens.weight.dtype,
        embed_scale=decoder.embed_tokens.embed_scale.to(decoder.embed_tokens.weight.dtype),
    )
    model._diffgen_fused = fused
    return fused


# -- the passes ------------------------------------------------------------------------------------


def _embed(fused: FusedModel, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, fused.embed.weight) * fused.embed_scale


def _rotary(fused: FusedModel, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple]:
    return {kind: fused.rotary(hidden, positions, kind) for kind in set(fused.text_config.layer_types)}


def _layer(index: int, layer: FusedLayer, hidden: torch.Tensor, kv: StaticKV,
           masks: dict[str, torch.Tensor], rotary: dict[str, tuple], *, encoder: bool, last: bool) -> torch.Tensor:
    batch, length, width = hidden.shape
    eps = layer.eps
    normed = ops.rms_norm(hidden, layer.input_norm, eps)
    cos, sin = rotary[layer.kind]
    k_out, v_out = kv.canvas_slice(index)
    q = torch.empty((batch, layer.heads, length, layer.head_dim), dtype=hidden.dtype, device=hidden.device)
    ops.qkv_norm_rope(layer.qkv(normed), layer.q_norm, layer.k_norm, cos, sin, heads=layer.heads,
                      kv_heads=layer.kv_heads, head_dim=layer.head_dim, eps=eps, has_v=layer.has_v,
                      q_out=q, k_out=k_out, v_out=v_out)
    keys, values = kv.keys[index], kv.values[index]
    attended = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=masks[layer.kind], scale=1.0, enable_gqa=layer.heads != layer.kv_heads)
    if encoder:
        kv.commit_layer(index)
        if last:  # the encoder's last hidden state is never read: only its keys and values count
            return hidden
    attended = layer.o_proj(attended.transpose(1, 2).reshape(batch, length, -1))
    hidden, (mlp_in, experts_in, router_in) = ops.residual_norms(hidden, attended, layer.post_attention,
                                                                 layer.ffn_norms, eps)
    mlp = layer.down(ops.gelu_mul(layer.gate_up(mlp_in)))
    weights, chosen = ops.router_topk(layer.router(router_in).view(batch * length, -1), layer.per_expert_scale,
                                      layer.top_k)
    experts = layer.experts(experts_in.view(batch * length, width), chosen, weights).view(batch, length, width)
    return ops.ffn_combine(hidden, mlp, experts, layer.post_mlp, layer.post_experts, layer.post_ffn,
                           layer.layer_scalar, eps)


def decode(fused: FusedModel, kv: StaticKV, canvas: torch.Tensor, self_conditioning: torch.Tensor | None,
           self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder pass over ``canvas`` ``(slots, C)``: raw lm_head logits ``(slots, C, V)``.

    ``self_conditioning``: the previous step's temperature-scaled logits (``None``: zeros, the
    first step); ``self_conditioning_mask`` ``(slots,)`` bool zeroes it per row.
    """
    hidden = _embed(fused, canvas)
    if self_conditioning is not None:
        embed = fused.embed
        soft = self_conditioning.softmax(dim=-1, dtype=torch.float32).to(fused.dtype)
        soft = torch.matmul(soft, embed.weight) * fused.embed_scale
        if self_conditioning_mask is not None:
            soft = soft * self_conditioning_mask.to(soft.dtype)[:, None, None]
        signal = fused.sc_down(ops.gelu_mul(fused.sc_gate_up(ops.rms_norm(soft, fused.sc_pre_norm, fused.eps))))
        hidden = hidden + signal
    # (first step: the reference's zero soft embeddings give a zero signal: only the norm remains)
    hidden = ops.rms_norm(hidden, None, fused.eps)
    positions = kv.begin_pass()
    masks = kv.decoder_masks(hidden.dtype)
    rotary = _rotary(fused, hidden, positions)
    for index, layer in enumerate(fused.layers):
        hidden = _layer(index, layer, hidden, kv, masks, rotary, encoder=False, last=False)
    return fused.lm_head(ops.rms_norm(hidden, fused.final_norm, fused.eps))


def run_encoder(fused: FusedModel, kv: StaticKV, tokens: torch.Tensor) -> None:
    """The encoder pass of a committed canvas ``(slots, C)``: its keys and values join the cache."""
    hidden = _embed(fused, tokens)
    positions = kv.begin_pass()
    masks = kv.encoder_masks(hidden.dtype, positions)
    rotary = _rotary(fused, hidden, positions)
    last = len(fused.layers) - 1
    for index, layer in enumerate(fused.layers):
        hidden = _layer(index, layer, hidden, kv, masks, rotary, encoder=True, last=index == last)
    kv.end_encode()
