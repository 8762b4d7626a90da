"""Tiny, randomly initialised DiffusionGemma checkpoints built locally.

No weights can be downloaded in tests or CI, so everything that loads a checkpoint is tested
on these: a real ``DiffusionGemmaForBlockDiffusion`` with the real architecture (sliding and
full attention layers, MoE experts, self-conditioning, a deliberately tiny vision tower),
saved as safetensors with a byte-level BPE tokenizer trained here and a Gemma-style chat
template with a thinking switch. The special-token ids follow Gemma 4 where the generator
cares about them: pad 0, ``<eos>`` 1, ``<bos>`` 2, ``<|tool_response>`` 50, ``<turn|>`` 106.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Special tokens by id. Unlisted ids below SPECIAL_COUNT are filled with <unusedN>.
SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    4: "<mask>",
    50: "<|tool_response>",
    98: "<|think|>",
    99: "<|video|>",
    100: "<|channel>",
    101: "<channel|>",
    102: "<|audio>",
    103: "<audio|>",
    104: "<|audio|>",
    105: "<|turn>",
    106: "<turn|>",
    107: "<|image>",
    108: "<image|>",
    109: "<|image|>",
}
SPECIAL_COUNT = 110
EOS_TOKEN_IDS = [1, 106, 50]
# The named media tokens Gemma 4's processor reads from its tokenizer (``tokenizer.image_token`` ...).
MEDIA_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
}
# The tiny image processor (``images=True``): patches of 2 pixels pooled 3 x 3, at most 70 soft
# tokens (the smallest budget Gemma 4's image processor supports) per image.
IMAGE_PROCESSOR = {
    "image_processor_type": "Gemma4ImageProcessor",
    "do_convert_rgb": True,
    "do_normalize": False,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.0, 0.0, 0.0],
    "image_std": [1.0, 1.0, 1.0],
    "max_soft_tokens": 70,
    "patch_size": 2,
    "pooling_kernel_size": 3,
    "resample": 3,
    "rescale_factor": 1 / 255,
}

# Gemma-4-style template: a system turn (carrying <|think|> when thinking is on), user and
# model turns, and with thinking off an empty thought channel opened and closed for the model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- if system is not none or enable_thinking -%}"
    "{{ '<|turn>system\\n' }}{%- if enable_thinking -%}{{ '<|think|>' }}{%- endif -%}"
    "{%- if system is not none -%}{{ system | trim }}{%- endif -%}{{ '<turn|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] != 'system' -%}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- elif item['type'] == 'image' -%}{{ '<|image|>' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<turn|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}"
    "{%- if not enable_thinking -%}{{ '<|channel>thought\\n<channel|>' }}{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = [
    "The sky is blue because air scatters short wavelengths of sunlight more than long ones.",
    "Diffusion models denoise a canvas of random tokens over a handful of parallel steps.",
    "Summarise the notes below in three short sentences, please.",
    "def main():\n    print('hello, world')\n",
    "A thought channel holds the model's reasoning; the answer follows it.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { }",
]


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (every string encodes, every id decodes) of ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS.get(i, f"<unused{i}>") for i in range(SPECIAL_COUNT)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Pad the vocabulary with plain filler words so that every id the model can emit decodes
    # to visible text (as most of a real vocabulary does).
    extra = [f" w{i}" for i in range(tok.get_vocab_size(), vocab_size)]
    if extra:
        tok.add_tokens(extra)
    # Like Gemma's tokenizer: plain encoding starts with <bos>.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_specific_special_tokens=dict(MEDIA_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int = 512, canvas_length: int = 16, *, images: bool = False,
                **text_overrides: Any) -> Any:
    """A ~0.2M-parameter DiffusionGemma config with both attention layer kinds and MoE experts.

    ``num_experts`` is set (the model has no MoE switch) and the vision tower is given tiny
    dimensions (``vision_config=None`` would build a 167M-parameter one). ``images``: a vision
    tower that takes the tiny image processor's patch grids (positions up to 64 per side) and
    the released model's bidirectional attention over image tokens
    (``use_bidirectional_attention="vision"``).
    """
    from transformers import DiffusionGemmaConfig

    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 16,
        "num_global_key_value_heads": 1,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 64,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": list(EOS_TOKEN_IDS),
    }
    if images:
        text["use_bidirectional_attention"] = "vision"
    text.update(text_overrides)
    vision = {
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "patch_size": 2,
        "position_embedding_size": 64 if images else 16,
    }
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=canvas_length,
        boi_token_id=107,
        eoi_token_id=108,
        image_token_id=109,
    )


def generation_config_dict(**overrides: Any) -> dict[str, Any]:
    """The released checkpoint's ``generation_config.json`` values (DESIGN.md §1)."""
    data = {
        "max_new_tokens": 256,
        "max_denoising_steps": 48,
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "eos_token_id": list(EOS_TOKEN_IDS),
        "pad_token_id": 0,
    }
    data.update(overrides)
    return data


def save_tiny_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    canvas_length: int = 16,
    vocab_size: int = 512,
    logit_scale: float = 1.0,
    generation: dict[str, Any] | None = None,
    images: bool = False,
    **text_overrides: Any,
) -> Path:
    """Build a random tiny model and save it as a complete checkpoint in ``directory``.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer
    files (with the chat template). Returns the directory.

    A random model's logits are nearly flat (token entropy close to ``ln(vocab_size)``), so
    adaptive stopping never fires. ``logit_scale`` multiplies the tied embedding / LM-head
    matrix, which sharpens the distributions in proportion and lets the stable-and-confident
    stop fire within a canvas.

    ``images``: also an image processor (``processor_config.json``, the layout transformers 5
    saves a processor in: the image processor's settings under ``image_processor``), written
    as JSON so that building a checkpoint needs no pillow; the vision tower as in
    :func:`tiny_config`.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config(vocab_size=vocab_size, canvas_length=canvas_length, images=images, **text_overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(logit_scale)
    model.save_pretrained(directory)
    build_tokenizer(vocab_size).save_pretrained(directory)
    (directory / "generation_config.json").write_text(
        json.dumps(generation_config_dict(**(generation or {})), indent=2) + "\n"
    )
    if images:
        processor = {"processor_class": "Gemma4Processor", "image_seq_length": IMAGE_PROCESSOR["max_soft_tokens"],
                     "image_processor": dict(IMAGE_PROCESSOR)}
        (directory / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return directory
