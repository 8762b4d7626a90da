"""Frozen generation settings, with defaults from the checkpoint and validation.

Precedence follows transformers' ``generate()``: an explicit value beats the checkpoint's
``generation_config.json``, which beats the library defaults below (the values the
reference applies when a checkpoint leaves a field unset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diffgen.errors import UsageError

# transformers' DiffusionGemmaGenerationConfig._get_default_generation_params(), which are
# also the released checkpoint's values.
LIBRARY_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


@dataclass(frozen=True)
class GenerationSettings:
    """How one generation runs.

    Attributes:
        max_new_tokens: tokens to return at most. Whole canvases are generated (the count is
            rounded up to a multiple of the canvas length, as transformers does), but the result
            is cut to this many tokens.
        max_denoising_steps: N, the denoising steps per canvas when adaptive stopping does not
            fire first. Also the denominator of the temperature schedule.
        entropy_bound: the entropy-bound sampler's budget, in nats: a step accepts the k
            lowest-entropy tokens while ``sum(H_1..H_k) - max(H_1..H_k) <= entropy_bound``.
        t_min: temperature at the last step (step 1 of N).
        t_max: temperature the schedule starts from (reached at step N).
        stability_threshold: adaptive stop needs the argmax canvas unchanged for this many
            steps (0: no stability condition). ``None`` disables adaptive stopping.
        confidence_threshold: adaptive stop needs the mean token entropy (nats) of the
            temperature-scaled logits below this. ``None`` disables adaptive stopping.
        eos_token_ids: tokens that end a sequence.
        pad_token_id: token written after the first EOS and used for left padding.
        seed: ``torch.manual_seed`` applied before generating; ``None`` leaves the RNG alone.
    """

    max_new_tokens: int = LIBRARY_DEFAULTS["max_new_tokens"]
    max_denoising_steps: int = LIBRARY_DEFAULTS["max_denoising_steps"]
    entropy_bound: float = LIBRARY_DEFAULTS["entropy_bound"]
    t_min: float = LIBRARY_DEFAULTS["t_min"]
    t_max: float = LIBRARY_DEFAULTS["t_max"]
    stability_threshold: int | None = LIBRARY_DEFAULTS["stability_threshold"]
    confidence_threshold: float | None = LIBRARY_DEFAULTS["confidence_threshold"]
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            problems.append(f"max-new-tokens must be a positive integer (got {self.max_new_tokens})")
        if not _is_int(self.max_denoising_steps) or self.max_denoising_steps <= 0:
            problems.append(f"steps must be a positive integer (got {self.max_denoising_steps})")
        if not self.entropy_bound > 0:
            problems.append(f"entropy-bound must be > 0 (got {self.entropy_bound})")
        if self.t_min < 0:
            problems.append(f"t-min must be >= 0 (got {self.t_min})")
        if self.t_max <= self.t_min:
            problems.append(f"t-max must be greater than t-min (got t-max {self.t_max}, t-min {self.t_min})")
        if self.stability_threshold is not None and (
            not _is_int(self.stability_threshold) or self.stability_threshold < 0
        ):
            problems.append(f"stability must be an integer >= 0 (got {self.stability_threshold})")
        if self.confidence_threshold is not None and not self.confidence_threshold > 0:
            problems.append(f"confidence must be > 0 (got {self.confidence_threshold})")
        if not self.eos_token_ids:
            problems.append("at least one EOS token id is needed")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def adaptive_stopping(self) -> bool:
        """Whether the stable-and-confident stop can end a canvas before N steps."""
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with ``changes`` applied; ``None`` values mean "keep the current value"."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_generation_config(cls, generation_config: Any, model_config: Any = None) -> GenerationSettings:
        """Defaults taken from a checkpoint's generation config.

        Both arguments may be config objects or the parsed JSON dicts of
        ``generation_config.json`` and ``config.json``. Unset fields fall back to
        :data:`LIBRARY_DEFAULTS`; EOS and pad ids fall back to the model's text config.
        """

        def pick(name: str) -> Any:
            value = _field(generation_config, name)
            return LIBRARY_DEFAULTS[name] if value is None else value

        text_config = _field(model_config, "text_config") or model_config
        eos = _field(generation_config, "eos_token_id")
        eos = _field(text_config, "eos_token_id") if eos is None else eos
        pad = _field(generation_config, "pad_token_id")
        pad = _field(text_config, "pad_token_id") if pad is None else pad
        entropy_bound = _field(_field(generation_config, "sampler_config"), "entropy_bound")
        return cls(
            max_new_tokens=pick("max_new_tokens"),
            max_denoising_steps=pick("max_denoising_steps"),
            entropy_bound=float(LIBRARY_DEFAULTS["entropy_bound"] if entropy_bound is None else entropy_bound),
            t_min=float(pick("t_min")),
            t_max=float(pick("t_max")),
            stability_threshold=pick("stability_threshold"),
            confidence_threshold=float(pick("confidence_threshold")),
            eos_token_ids=_as_tuple(1 if eos is None else eos),
            pad_token_id=int(0 if pad is None else pad),
        )


def _field(source: Any, name: str) -> Any:
    """``source[name]`` for a mapping, ``source.name`` for an object, ``None`` if absent."""
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(name)
    return getattr(source, name, None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(ids: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)
