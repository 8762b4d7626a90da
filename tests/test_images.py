"""Images in: transformers' processor, the loop's first encode, the CLI's checks before loading."""

from __future__ import annotations

import json

import pytest
import torch

from diffgen import images
from tests.conftest import run_cli, write_image


def _reference(loaded, inputs, settings):
    """transformers' generate() on the processor's own inputs (pixel_values and all)."""
    from transformers import EntropyBoundSamplerConfig

    torch.manual_seed(settings.seed)
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=settings.max_new_tokens,
        max_denoising_steps=settings.max_denoising_steps,
        t_min=settings.t_min,
        t_max=settings.t_max,
        stability_threshold=settings.stability_threshold,
        confidence_threshold=settings.confidence_threshold,
        eos_token_id=list(settings.eos_token_ids),
        pad_token_id=settings.pad_token_id,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound),
    )
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist()


def _processor_inputs(processor, text, pictures):
    turns = [{"role": "user", "content": images.user_content(text, pictures)}]
    return processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def test_the_processor_expands_each_image_to_its_soft_tokens(vision, tmp_path):
    processor = images.load_processor(vision.checkpoint.path, vision.tokenizer)
    pictures = [images.read_image_file(write_image(tmp_path / f"{i}.png", 30 + 12 * i, 20, seed=i)) for i in range(2)]
    ids, inputs = images.encode(processor, "What differs?", pictures)
    tokenizer = vision.tokenizer
    boi, image, eoi = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image>", "<|image|>", "<image|>"))
    assert ids.count(boi) == ids.count(eoi) == 2
    assert inputs.images == 2 and inputs.pixel_values.shape[0] == 2
    assert inputs.image_tokens == ids.count(image) > 0
    assert [i for i, t in enumerate(inputs.token_types) if t] == [i for i, t in enumerate(ids) if t == image]
    # Each image sits before the text, as the chat template places it; the text path is unchanged.
    assert ids.index(boi) < len(ids) - len(tokenizer("What differs?", add_special_tokens=False)["input_ids"])
    from diffgen.prompt import encode

    assert images.encode(processor, "hello", [])[0] == encode(tokenizer, "hello")


@pytest.mark.parametrize("count", [1, 2])
def test_same_tokens_as_transformers_generate_with_the_processors_pixel_values(vision, tmp_path, count):
    from diffgen.denoise.loop import generate

    processor = images.load_processor(vision.checkpoint.path, vision.tokenizer)
    pictures = [images.read_image_file(write_image(tmp_path / f"{i}.png", 24 + 6 * i, 36, seed=i))
                for i in range(count)]
    inputs = _processor_inputs(processor, "Describe the picture.", pictures)
    assert "pixel_values" in inputs and "mm_token_type_ids" in inputs
    settings = vision.defaults.replace(max_new_tokens=32, seed=7)
    expected = _reference(vision, inputs, settings)
    ids, vision_inputs = images.encode(processor, "Describe the picture.", pictures)
    assert ids == inputs["input_ids"][0].tolist()
    result = generate(vision, [ids], settings, vision=[vision_inputs])
    completion = result.completions[0]
    eos = set(settings.eos_token_ids)
    end = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert list(completion.token_ids) == expected[:min(end, settings.max_new_tokens)]
    # The images matter: without them (image tokens left as plain embeddings) the answer differs.
    blind = generate(vision, [ids], settings)
    assert blind.completions[0].token_ids != completion.token_ids
