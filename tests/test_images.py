"""Images in: transformers' processor, the loop's first encode, the CLI's checks before loading."""

from __future__ import annotations

import json

import pytest
import torch

from diffgen import images
from tests.conftest import cli, run_cli, write_image


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


# -- the CLI -------------------------------------------------------------------------------------


def test_run_image_gives_the_tokens_of_transformers_generate(vision, vision_checkpoint, tmp_path):
    picture = write_image(tmp_path / "x.png", 36, 24, seed=3)
    done = cli("run", "-m", str(vision_checkpoint), "--seed", "5", "--max-new-tokens", "32", "--json",
               "--image", str(picture), "What is this?")
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    processor = images.load_processor(vision.checkpoint.path, vision.tokenizer)
    inputs = _processor_inputs(processor, "What is this?", [images.read_image_file(picture)])
    expected = _reference(vision, inputs, vision.defaults.replace(max_new_tokens=32, seed=5))
    assert record["stats"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert record["tokens"] == expected[:len(record["tokens"])]
    assert len(record["tokens"]) == 32 or expected[len(record["tokens"])] in vision.defaults.eos_token_ids


def test_an_image_on_stdin_with_the_prompt_as_argument(vision_checkpoint, tmp_path):
    data = write_image(tmp_path / "x.png", 30, 30, seed=1).read_bytes()
    by_file = cli("run", "-m", str(vision_checkpoint), "--seed", "2", "--max-new-tokens", "16", "--json",
                  "--image", str(tmp_path / "x.png"), "What is this?", input=b"")
    by_stdin = cli("run", "-m", str(vision_checkpoint), "--seed", "2", "--max-new-tokens", "16", "--json",
                   "--image", "-", "What is this?", input=data)
    assert by_stdin.returncode == 0, by_stdin.stderr.decode()
    assert json.loads(by_stdin.stdout)["tokens"] == json.loads(by_file.stdout)["tokens"]
    no_prompt = cli("run", "-m", str(vision_checkpoint), "--image", "-", input=data)
    assert no_prompt.returncode == 2
    assert "prompt must be an argument" in no_prompt.stderr.decode()


def _bad(tmp_path, kind):
    from PIL import Image

    path = tmp_path / f"{kind}.img"
    if kind == "missing":
        return tmp_path / "nowhere.png"
    if kind == "text":
        path.write_text("not a picture\n")
    elif kind == "truncated":
        data = write_image(tmp_path / "whole.png", 64, 64).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "tiff":
        write_image(path, 8, 8, format="TIFF")
    elif kind == "huge":  # 48 megapixels, over diffgen's stated limit (1-bit: small to write)
        Image.new("1", (8000, 6000)).save(path, format="PNG")
    elif kind == "bomb":  # over pillow's own decompression-bomb limit (2 x 89.5 megapixels)
        Image.new("1", (15000, 12000)).save(path, format="PNG")
    return path


@pytest.mark.parametrize("kind, code, words", [
    ("missing", 2, "cannot read --image"),
    ("text", 1, "is not an image pillow can read — supported formats: PNG, JPEG, WEBP, GIF, BMP"),
    ("truncated", 1, "is truncated or damaged"),
    ("tiff", 1, "is a TIFF image, which diffgen does not take — supported formats: PNG, JPEG, WEBP, GIF, BMP"),
    ("huge", 1, "8000 x 6000 = 48.0 megapixels, over the limit of 40 per image"),
    ("bomb", 1, "is too large to decode safely"),
])
def test_a_bad_image_is_one_line_before_anything_is_loaded(vision_checkpoint, tmp_path, kind, code, words):
    done = cli("run", "-m", str(vision_checkpoint), "--image", str(_bad(tmp_path, kind)), "hi")
    err = done.stderr.decode()
    assert done.returncode == code, err
    assert words in err
    assert len(err.strip().splitlines()) == 1, err
    assert "plan:" not in err  # the weights were never planned, let alone loaded


def test_more_images_than_the_context_holds(vision_checkpoint, tmp_path):
    picture = str(write_image(tmp_path / "x.png", 60, 60))
    many = [arg for _ in range(60) for arg in ("--image", picture)]
    done = cli("run", "-m", str(vision_checkpoint), *many, "hi")
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "60 image(s) take 3840 of the prompt's" in err and "more than the model's context of 4096" in err
    assert len(err.strip().splitlines()) == 1 and "plan:" not in err


def test_without_pillow_image_input_names_the_extra(vision_checkpoint, tmp_path):
    import os

    blocker = tmp_path / "no-pil" / "PIL"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pillow is blocked in this test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    done = run_cli("run", "-m", str(vision_checkpoint), "--image", str(tmp_path / "x.png"), "hi", env=env)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.strip() == ("diffgen: error: image input needs pillow, which is not installed "
                           "— pip install 'diffgen[images]'")
    # Text prompts need no pillow.
    assert run_cli("run", "-m", str(vision_checkpoint), "--max-new-tokens", "8", "hi", env=env).returncode == 0


def test_a_text_only_checkpoint_refuses_images_before_loading(tiny_checkpoint, tmp_path):
    done = cli("run", "-m", str(tiny_checkpoint), "--image", str(write_image(tmp_path / "x.png")), "hi")
    err = done.stderr.decode()
    assert done.returncode == 1 and "has no image processor" in err and "plan:" not in err


# -- the plan and `diffgen info` ------------------------------------------------------------------


def _released_config_dir(tmp_path):
    from importlib import resources

    directory = tmp_path / "released"
    directory.mkdir()
    (directory / "config.json").write_bytes(
        resources.files("diffgen").joinpath("data/diffusiongemma-26b-a4b-config.json").read_bytes())
    return directory


def test_the_plan_counts_the_vision_tower_and_the_images_workspace(tmp_path):
    from diffgen.planning import sizes
    config = json.loads((_released_config_dir(tmp_path) / "config.json").read_text())
    counts = sizes.count_parameters(config)
    assert 0.5e9 < counts.vision < 0.6e9  # the released ~0.57B-parameter tower, inside the total
    text_only = sizes.runtime_bytes(config, "bfloat16")
    with_images = sizes.runtime_bytes(config, "bfloat16", images=2)
    assert "vision" not in text_only and with_images["vision"] > 2 * 16 * sizes.IMAGE_PATCHES ** 2
    assert sizes.image_context(3) == 3 * 282


def test_info_shows_the_vision_tower_and_plans_for_images(tmp_path):
    directory = _released_config_dir(tmp_path)
    common = ("info", "-m", str(directory), "--device", "cpu", "--max-memory", "200GB", "--json")
    plain = json.loads(cli(*common).stdout)
    done = cli(*common, "--images", "4")
    assert done.returncode == 0, done.stderr.decode()
    data = json.loads(done.stdout)
    assert 0.5e9 < data["vision_parameters"] < 0.6e9
    assert data["image_tokens"] == 4 * 282 and data["max_image_tokens"] == 280
    assert data["plans"][0]["runtime_gb"] > plain["plans"][0]["runtime_gb"]
    text = cli("info", "-m", str(directory), "--device", "cpu", "--max-memory", "200GB").stdout.decode()
    assert "vision: tower 0.557B parameters" in text
    too_many = cli(*common, "--context", "262000", "--images", "1")
    assert too_many.returncode == 2 and "more than the model's context of 262144" in too_many.stderr.decode()


# -- batch jobs --------------------------------------------------------------------------------------


def test_batch_records_take_images_relative_to_the_input_file(vision, vision_checkpoint, tmp_path):
    from diffgen.denoise.loop import generate

    folder = tmp_path / "job"
    (folder / "pics").mkdir(parents=True)
    write_image(folder / "pics" / "a.png", 30, 24, seed=1)
    write_image(folder / "pics" / "b.png", 24, 30, seed=2)
    records = [
        {"id": "one", "prompt": "What is this?", "image": "pics/a.png", "seed": 3},
        {"id": "two", "prompt": "Compare them.", "images": ["pics/a.png", "pics/b.png"], "seed": 4},
        {"id": "text", "prompt": "hi", "seed": 5},
        {"id": "lost", "prompt": "?", "image": "pics/missing.png"},
        {"id": "both", "prompt": "?", "image": "pics/a.png", "images": ["pics/b.png"]},
        {"id": "raw", "prompt": "?", "image": "pics/a.png", "raw": True},
    ]
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    import shlex
    import sys

    # Run from another directory: the paths are relative to the input file, not to the working directory.
    command = [sys.executable, "-m", "diffgen", "batch", str(source), "-m", str(vision_checkpoint),
               "--max-new-tokens", "16", "--batch-size", "4", "-q"]
    done = run_cli(shell=f"cd {shlex.quote(str(tmp_path))} && {shlex.join(command)}")
    out = {r["id"]: r for r in map(json.loads, done.stdout.decode().splitlines())}
    assert done.returncode == 1  # the bad records failed; the others were written
    assert "cannot read image" in out["lost"]["error"] and "missing.png" in out["lost"]["error"]
    assert "not both" in out["both"]["error"] and "drop 'raw'" in out["raw"]["error"]
    processor = images.load_processor(vision.checkpoint.path, vision.tokenizer)
    settings = vision.defaults.replace(max_new_tokens=16)
    for record, names in ((records[0], ["a"]), (records[1], ["a", "b"])):
        record_id, seed = record["id"], record["seed"]
        pictures = [images.read_image_file(folder / "pics" / f"{n}.png") for n in names]
        ids, inputs = images.encode(processor, record["prompt"], pictures)
        alone = generate(vision, [ids], settings, seeds=[seed], vision=[inputs])
        assert out[record_id]["tokens"] == list(alone.completions[0].token_ids), record_id
        assert out[record_id]["stats"]["prompt_tokens"] == len(ids)
    assert "error" not in out["text"]


def test_fill_with_an_image_is_the_librarys_fill_with_its_inputs(vision, vision_checkpoint, tmp_path):
    from diffgen.denoise.constrained import fill as fill_mod

    picture = write_image(tmp_path / "x.png", 30, 30, seed=6)
    template = "Colour: {{4}}. Shape: {{4}}."
    done = cli("fill", "-m", str(vision_checkpoint), "--seed", "9", "--json", "--image", str(picture),
               "-p", "Describe the picture", template)
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    processor = images.load_processor(vision.checkpoint.path, vision.tokenizer)
    prefix, inputs = images.encode(processor, "Describe the picture", [images.read_image_file(picture)])
    result = fill_mod.fill(vision, prefix, template, vision.defaults.replace(seed=9), vision=inputs)
    assert record["prompt_tokens"] == len(prefix) > inputs.image_tokens
    assert [h["tokens"] for h in record["holes"]] == [list(h.token_ids) for h in result.holes]
    assert record["text"] == result.text
    blind = fill_mod.fill(vision, prefix, template, vision.defaults.replace(seed=9))
    assert [h.token_ids for h in blind.holes] != [h.token_ids for h in result.holes]


def test_the_processor_by_hand_matches_transformers_processor(vision, tmp_path):
    """transformers 5.17 (the GPU image) cannot import Gemma4Processor without torchvision; the
    fallback must give exactly what transformers' processor gives."""
    real = images.load_processor(vision.checkpoint.path, vision.tokenizer, by_hand=False)
    by_hand = images.load_processor(vision.checkpoint.path, vision.tokenizer, by_hand=True)
    assert isinstance(by_hand, images.PlaceholderProcessor) and not isinstance(real, images.PlaceholderProcessor)
    pictures = [images.read_image_file(write_image(tmp_path / f"{i}.png", 20 + 10 * i, 44 - 8 * i, seed=i))
                for i in range(3)]
    for shown, system, think in ((pictures[:1], None, False), (pictures, "Be brief.", True), ([], None, False)):
        ids, inputs = images.encode(real, "What differs?", shown, system=system, think=think)
        ids_by_hand, inputs_by_hand = images.encode(by_hand, "What differs?", shown, system=system, think=think)
        assert ids_by_hand == ids
        if not shown:
            assert inputs is None and inputs_by_hand is None
            continue
        assert torch.equal(inputs_by_hand.pixel_values, inputs.pixel_values)
        assert torch.equal(inputs_by_hand.image_position_ids, inputs.image_position_ids)
        assert inputs_by_hand.token_types == inputs.token_types and inputs_by_hand.image_tokens == inputs.image_tokens


def test_image_flag_combinations_and_the_observed_run(vision_checkpoint, tmp_path):
    picture = str(write_image(tmp_path / "x.png"))
    raw = cli("run", "-m", str(vision_checkpoint), "--raw", "--image", picture, "hi")
    assert raw.returncode == 2 and "--image does not combine with --raw" in raw.stderr.decode()
    twice = cli("run", "-m", str(vision_checkpoint), "--image", "-", "--image", "-", "hi", input=b"")
    assert twice.returncode == 2 and "pass - at most once" in twice.stderr.decode()
    # --trace takes the observed path through the loop: the same tokens as the plain run.
    common = ("run", "-m", str(vision_checkpoint), "--seed", "1", "--max-new-tokens", "16", "--json", "--image",
              picture, "hi")
    traced = cli(*common, "--trace", str(tmp_path / "t.jsonl"))
    plain = cli(*common)
    assert traced.returncode == 0, traced.stderr.decode()
    assert json.loads(traced.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    assert (tmp_path / "t.jsonl").stat().st_size > 0
