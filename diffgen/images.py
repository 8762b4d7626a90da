"""Images in: read and check image files, then turn them and a prompt into the model's inputs.

Reading (:func:`read_image`) needs only pillow and runs before any weights are loaded, so a bad
image costs nothing: a missing file, bytes that are no image, a truncated file, a format outside
:data:`SUPPORTED_FORMATS` or more than :data:`MAX_PIXELS` pixels each become one line.

Preprocessing is transformers' own: the checkpoint's image processor (``AutoImageProcessor`` with
the pillow backend, ``Gemma4ImageProcessorPil`` for DiffusionGemma) inside transformers'
``Gemma4Processor``, whose ``apply_chat_template`` renders the chat template, expands each
image's ``<|image|>`` placeholder to ``<|image>`` + one ``<|image|>`` per soft token +
``<image|>`` and returns ``pixel_values``, ``image_position_ids`` and ``mm_token_type_ids`` — the
very inputs transformers' ``generate()`` takes. Why :func:`load_processor` builds that processor
by hand instead of calling ``AutoProcessor.from_pretrained``: Gemma 4's processor also holds a
video processor, which transformers builds only with torchvision, and PyPI's torchvision cannot
be installed beside every torch build; diffgen sends no video, so it passes none (and a default
audio feature extractor, which it never calls either).

Older transformers (5.17, the GPU image) cannot even import ``Gemma4Processor`` (nor
``AutoImageProcessor``) without torchvision: its module imports the torchvision image processor
at load time. There :func:`load_processor` falls back to :class:`PlaceholderProcessor`, which does
the processor's three steps for images by hand around the same pillow image processor
(``Gemma4ImageProcessorPil``, importable there); ``tests/test_images.py`` checks that it gives the
very ids, pixel values and token types of transformers' processor.

The only extra package is pillow: ``pip install 'diffgen[images]'`` (:data:`EXTRA`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

from diffgen.errors import ImageError, MissingExtraError, PromptTooLongError, UsageError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PillowImage
    from transformers import BaseImageProcessor, PreTrainedTokenizerBase, ProcessorMixin

EXTRA = "pip install 'diffgen[images]'"
# Formats pillow decodes that diffgen accepts (pillow's names); an animated GIF or WebP gives its first frame.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Pixels per image (width x height) that diffgen decodes at most: 40 megapixels (e.g. 8000 x 5000).
# The model sees at most 280 soft tokens (~ 670 x 670 pixels at the released processor's settings)
# whatever the size, and decoding a larger image only costs memory; pillow's own bomb check
# (DecompressionBombError) fires later, at twice its own limit.
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Picture:
    """One image, read and decoded, checked before any weights are loaded.

    Attributes:
        name: where it came from, for messages (a path, ``stdin`` or ``image 1 of the request``).
        width: pixels.
        height: pixels.
        format: pillow's format name (one of :data:`SUPPORTED_FORMATS`).
        image: the decoded ``PIL.Image.Image`` (first frame of an animation).
    """

    name: str
    width: int
    height: int
    format: str
    image: PillowImage


@dataclass(frozen=True)
class VisionInputs:
    """The image inputs of one prompt, as transformers' processor returns them.

    Attributes:
        pixel_values: ``(images, patches, 3 * patch_size**2)`` float32 patches in [0, 1],
            padded to the processor's patch budget.
        image_position_ids: ``(images, patches, 2)`` int64 (x, y) patch positions; ``(-1, -1)``
            marks padding.
        token_types: one per prompt token: 0 text, 1 image (``mm_token_type_ids``); the
            encoder lets image tokens attend to each other both ways when the model asks for it.
        images: images in the prompt.
        image_tokens: prompt tokens that are image soft tokens (the ``<|image>``/``<image|>``
            brackets not counted).
    """

    pixel_values: torch.Tensor
    image_position_ids: torch.Tensor
    token_types: tuple[int, ...]
    images: int
    image_tokens: int


class IdsWithImages(list):
    """Token ids (a plain ``list[int]``) that carry their prompt's :class:`VisionInputs` as
    ``vision``, so code that hands ids on untouched (batch jobs) carries the images along."""

    def __init__(self, ids: Sequence[int], vision: VisionInputs | None):
        super().__init__(ids)
        self.vision = vision


def require_pillow() -> ModuleType:
    """``PIL.Image``, or a one-line error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingExtraError("image input needs pillow, which is not installed", EXTRA) from exc
    return Image


def read_image_file(path: str | Path, *, flag: str = "--image") -> Picture:
    """Read and check the image at ``path`` (see :func:`read_image`)."""
    require_pillow()
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise UsageError(f"{flag} {path} is a directory", "give an image file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from exc
    return read_image(data, str(path))


def read_image(data: bytes, name: str) -> Picture:
    """Decode ``data`` completely and check it; raise :class:`ImageError` with one line if it
    is not an image, is damaged or truncated, has an unsupported format or too many pixels."""
    Image = require_pillow()
    supported = ", ".join(SUPPORTED_FORMATS)
    if not data:
        raise ImageError(f"{name} is empty, not an image", f"supported formats: {supported}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name} is too large to decode safely ({exc})", _too_large_hint()) from exc
        except Exception as exc:  # noqa: BLE001 - pillow raises UnidentifiedImageError, OSError, SyntaxError...
            raise ImageError(f"{name} is not an image pillow can read", f"supported formats: {supported}") from exc
        if image.format not in SUPPORTED_FORMATS:
            raise ImageError(f"{name} is a {image.format} image, which diffgen does not take",
                             f"supported formats: {supported}; convert it first")
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"{name} has {width} x {height} = {width * height / 1e6:.1f} megapixels, over the "
                             f"limit of {MAX_PIXELS / 1e6:.0f} per image", _too_large_hint())
        try:
            image.seek(0)
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{name} is too large to decode safely ({exc})", _too_large_hint()) from exc
        except Exception as exc:  # noqa: BLE001 - "image file is truncated", broken chunks, bad CRCs
            raise ImageError(f"{name} is truncated or damaged: {exc}", "check the file or export it again") from exc
    return Picture(name=name, width=width, height=height, format=str(image.format), image=image)


def _too_large_hint() -> str:
    return "scale it down first: the model sees at most a few hundred soft tokens per image whatever its size"


def has_vision(config: dict[str, Any]) -> bool:
    """Whether a parsed config.json describes a model with a vision tower and image tokens."""
    return bool(config.get("vision_config")) and config.get("image_token_id") is not None


class PlaceholderProcessor:
    """Gemma 4's processor for images, by hand, for releases whose ``Gemma4Processor`` needs
    torchvision to import (see the module's docstring): render the chat template (one
    ``<|image|>`` per image part), run the pillow image processor, expand each ``<|image|>`` to
    ``<|image>`` + one ``<|image|>`` per soft token + ``<image|>`` (``Gemma4Processor.replace_image_token``),
    tokenise without adding special tokens (the template starts with ``<bos>``) and mark image
    tokens with type 1 (``mm_token_type_ids``).

    Attributes: ``image_processor``, ``tokenizer``, ``chat_template``, ``image_token_id``.
    """

    def __init__(self, image_processor: BaseImageProcessor, tokenizer: PreTrainedTokenizerBase,
                 chat_template: str | None):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token, self.boi_token, self.eoi_token = tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, turns: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, **_: Any) -> dict[str, Any]:
        import torch

        pictures = [part["image"] for turn in turns if not isinstance(turn["content"], str)
                    for part in turn["content"] if part["type"] == "image"]
        text = self.tokenizer.apply_chat_template(list(turns), chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking)
        out: dict[str, Any] = {}
        if pictures:
            features = self.image_processor(pictures, return_tensors="pt")
            pieces = text.split(self.image_token)
            if len(pieces) != len(pictures) + 1:
                raise ImageError(f"the chat template placed {len(pieces) - 1} images for {len(pictures)} given",
                                 "use a checkpoint whose template renders image parts")
            counts = [int(n) for n in features["num_soft_tokens_per_image"]]
            text = pieces[0] + "".join(self.boi_token + self.image_token * n + self.eoi_token + piece
                                       for n, piece in zip(counts, pieces[1:]))
            out["pixel_values"] = features["pixel_values"]
            out["image_position_ids"] = features["image_position_ids"]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out["input_ids"] = torch.tensor([ids])
        out["mm_token_type_ids"] = torch.tensor([[int(t == self.image_token_id) for t in ids]])
        return out


#: What :func:`load_processor` returns: transformers' ``Gemma4Processor`` (images only), or the
#: :class:`PlaceholderProcessor` where that cannot be imported.
Processor = Union["ProcessorMixin", PlaceholderProcessor]


def check_takes_images(path: str | Path, config: dict[str, Any] | None = None) -> None:
    """An :class:`~diffgen.errors.ImageError` unless the checkpoint at ``path`` (its parsed
    ``config``, when given) can take images: a vision tower, and the image processor's config
    beside it. Reads no image and builds nothing (a server answers a text-only model's image
    request with it before decoding any)."""
    path = Path(path)
    if config is not None and not has_vision(config):
        raise ImageError(f"{path.name} has no vision tower, so it takes no images", "drop --image")
    if not (path / "processor_config.json").is_file() and not (path / "preprocessor_config.json").is_file():
        raise ImageError(f"{path.name} has no image processor (processor_config.json or preprocessor_config.json)",
                         "use a checkpoint that ships its processor, as the released one does")


def load_processor(path: str | Path, tokenizer: PreTrainedTokenizerBase, config: dict[str, Any] | None = None, *,
                   by_hand: bool | None = None) -> Processor:
    """transformers' ``Gemma4Processor`` for the checkpoint at ``path``, without a video processor.

    ``tokenizer`` is copied (the processor registers its video token on the tokenizer it holds);
    the image processor comes from the checkpoint's ``processor_config.json`` or
    ``preprocessor_config.json`` through ``AutoImageProcessor`` with the pillow backend.
    ``by_hand``: use :class:`PlaceholderProcessor` (``None``: only where transformers' processor
    cannot be imported without torchvision).
    """
    require_pillow()
    path = Path(path)
    check_takes_images(path, config)
    try:
        if by_hand:
            raise ImportError("asked for the processor by hand")
        from transformers import AutoImageProcessor
        from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4Processor
    except (ImportError, ModuleNotFoundError):  # transformers 5.17 without torchvision (see the module's docstring)
        if by_hand is False:
            raise
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        return PlaceholderProcessor(Gemma4ImageProcessorPil.from_pretrained(path, local_files_only=True), tokenizer,
                                    getattr(tokenizer, "chat_template", None))

    class ImagesOnlyProcessor(Gemma4Processor):
        """Gemma 4's processor that accepts ``video_processor=None`` (see the module's docstring)."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
    settings: dict[str, Any] = {}
    processor_file = path / "processor_config.json"
    if processor_file.is_file():
        saved = json.loads(processor_file.read_text(encoding="utf-8"))
        settings = {key: saved[key] for key in ("image_seq_length", "audio_seq_length", "audio_ms_per_token")
                    if key in saved}
    return ImagesOnlyProcessor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
                               tokenizer=copy.deepcopy(tokenizer), video_processor=None,
                               chat_template=getattr(tokenizer, "chat_template", None), **settings)


def data_url(picture: Picture) -> str:
    """``picture`` as a ``data:image/png;base64,...`` URL for an OpenAI ``image_url`` part. PNG is
    lossless, so a server decodes exactly the pixels read here (a JPEG is not re-compressed)."""
    import base64
    import io

    buffer = io.BytesIO()
    image = picture.image
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # e.g. CMYK JPEG: PNG cannot hold it
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def user_content(text: str, pictures: Sequence[Picture]) -> list[dict[str, Any]]:
    """The user turn's content parts: each image, then the text (Gemma's order: the image
    comes before what is asked about it)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": picture.image} for picture in pictures]
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def encode_turns(processor: Processor, turns: Sequence[dict[str, Any]], *, think: bool = False
                 ) -> tuple[list[int], VisionInputs | None]:
    """Token ids and image inputs for a conversation whose contents may hold image parts
    (``{"type": "image", "image": PIL image}``), rendered by the chat template and expanded by
    transformers' processor; ends with the start of the model's turn."""
    if not getattr(processor, "chat_template", None):
        raise UsageError("this checkpoint's tokenizer has no chat template, which places the images",
                         "drop --raw or the images")
    with _quiet_transformers():  # e.g. "The channel dimension is ambiguous" for a 3-pixel-wide image
        out = processor.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt", enable_thinking=think)
    ids = out["input_ids"][0].tolist()
    if "pixel_values" not in out:
        return ids, None
    types = out["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in out else [0] * len(ids)
    image_token_id = processor.image_token_id
    return ids, VisionInputs(pixel_values=out["pixel_values"], image_position_ids=out["image_position_ids"],
                             token_types=tuple(int(t) for t in types), images=int(out["pixel_values"].shape[0]),
                             image_tokens=sum(1 for t in ids if t == image_token_id))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own warnings off for the body (diffgen checks the images itself and says what
    matters in its own words); ``DIFFGEN_DEBUG=1`` keeps them."""
    import os

    from transformers.utils import logging as hf_logging

    if os.environ.get("DIFFGEN_DEBUG"):
        yield
        return
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def encode(processor: Processor, text: str, pictures: Sequence[Picture], *, system: str | None = None,
           think: bool = False) -> tuple[list[int], VisionInputs | None]:
    """One user turn of ``text`` and ``pictures`` (with an optional system turn): see :func:`encode_turns`."""
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": user_content(text, pictures)})
    return encode_turns(processor, turns, think=think)


def check_positions(vision: VisionInputs | None, config: dict[str, Any], pictures: Sequence[Picture]) -> None:
    """Refuse an image whose patch grid the vision tower cannot place (a very wide or tall one:
    its patches' x or y index runs past the tower's position table) with one line naming it."""
    size = (config.get("vision_config") or {}).get("position_embedding_size")
    if vision is None or not size:
        return
    positions = vision.image_position_ids
    for index, picture in enumerate(pictures[: int(positions.shape[0])]):
        across, down = (int(v) + 1 for v in positions[index].reshape(-1, 2).max(dim=0).values.tolist())
        if max(across, down) > int(size):
            shape = "wide" if picture.width >= picture.height else "tall"
            raise ImageError(f"{picture.name} ({picture.width} x {picture.height}) is too {shape} for this model's "
                             f"vision tower ({max(across, down)} patches in a row, at most {size})",
                             "crop it, or pad it toward a square")


def check_image_context(vision: VisionInputs | None, prompt_tokens: int, limit: int | None, canvas_tokens: int
                        ) -> None:
    """A clearer error than the generic one when the images are what overflows the context."""
    if vision is None or limit is None or prompt_tokens + canvas_tokens <= limit:
        return
    raise PromptTooLongError(
        f"{vision.images} image(s) take {vision.image_tokens} of the prompt's {prompt_tokens} tokens; with "
        f"{canvas_tokens} generated positions that needs {prompt_tokens + canvas_tokens}, more than the model's "
        f"context of {limit}", "send fewer images, shorten the prompt or lower --max-new-tokens")
