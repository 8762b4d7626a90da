"""Frozen generation settings, with defaults from the checkpoint and validation.

Precedence follows transformers' ``generate()``: an explicit value beats the checkpoint's
``generation_config.json``, which beats the library defaults below (the values the
reference applies when a checkpoint leaves a field unset).
"""

from __future__ import annotations

import dataclasses
import math
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
RELEASED_MODEL = "google/diffusiongemma-26B-A4B-it"
SEED_LIMIT = 2**63  # torch.manual_seed takes a 64-bit integer; seeds are 0 <= seed < 2**63
#: Most denoising steps per canvas any front end takes (the checkpoint's default is 48; a server
#: caps lower, ``serve --max-steps``): a canvas costs one decoder pass per step, so a typo such as
#: ``--steps 1000000000`` would otherwise run for days.
MAX_STEPS = 1024


@dataclass(frozen=True)
class SamplerFlag:
    """One generation setting as every front end spells it (the one table: CLI, batch records).

    Attributes:
        flag: the command-line option, e.g. ``--steps``.
        field: the :class:`GenerationSettings` field it sets, e.g. ``max_denoising_steps``.
        key: its name in a batch JSONL record, in the config file and as the CLI parameter
            (``steps``).
        types: the JSON types a batch record may give it.
    """

    flag: str
    field: str
    key: str
    types: tuple[type, ...]

    @property
    def label(self) -> str:
        """The name error messages use: the flag without its dashes (``t-max``)."""
        return self.flag[2:]


SAMPLER_FLAGS: tuple[SamplerFlag, ...] = (
    SamplerFlag("--max-new-tokens", "max_new_tokens", "max_new_tokens", (int,)),
    SamplerFlag("--steps", "max_denoising_steps", "steps", (int,)),
    SamplerFlag("--entropy-bound", "entropy_bound", "entropy_bound", (int, float)),
    SamplerFlag("--t-min", "t_min", "t_min", (int, float)),
    SamplerFlag("--t-max", "t_max", "t_max", (int, float)),
    SamplerFlag("--stability", "stability_threshold", "stability", (int,)),
    SamplerFlag("--confidence", "confidence_threshold", "confidence", (int, float)),
)
_LABELS = {flag.field: flag.label for flag in SAMPLER_FLAGS} | {"seed": "seed"}
# The ranges :func:`field_problem` accepts, as JSON Schema (the server's OpenAPI document publishes them;
# tests/test_settings.py checks the two agree at every bound).
FIELD_SCHEMAS: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"type": "integer", "minimum": 1},
    "max_denoising_steps": {"type": "integer", "minimum": 1},
    "stability_threshold": {"type": "integer", "minimum": 0},
    "entropy_bound": {"type": "number", "exclusiveMinimum": 0},
    "t_min": {"type": "number", "minimum": 0},
    "t_max": {"type": "number", "exclusiveMinimum": 0},
    "confidence_threshold": {"type": "number", "exclusiveMinimum": 0},
    "seed": {"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1},
}


def field_problem(field: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the settings field ``field`` on its own (``None``: nothing).

    The same checks serve :class:`GenerationSettings`, the CLI (before anything is loaded) and
    batch records. ``None`` is always fine here: it means "the checkpoint's default".
    """
    if value is None:
        return None
    if field in ("max_new_tokens", "max_denoising_steps"):
        return None if _is_int(value) and value > 0 else f"must be a positive integer (got {value})"
    if field == "stability_threshold":
        return None if _is_int(value) and value >= 0 else f"must be an integer >= 0 (got {value})"
    if field == "seed":
        if _is_int(value) and 0 <= value < SEED_LIMIT:
            return None
        return f"must be an integer from 0 to 2**63-1 = {SEED_LIMIT - 1} (got {value})"
    if field in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a finite number (got {value})"
        if field == "t_min":
            return None if value >= 0 else f"must be >= 0 (got {value})"
        return None if value > 0 else f"must be > 0 (got {value})"
    return None


def input_problem(field: str, value: Any) -> str | None:
    """:func:`field_problem`, plus the limits of what a user may ask for from a front end (a flag,
    the config file, a batch record): at most :data:`MAX_STEPS` steps. The library's own
    :class:`GenerationSettings` takes any positive count."""
    problem = field_problem(field, value)
    if problem is None and field == "max_denoising_steps" and value is not None and value > MAX_STEPS:
        return f"must be an integer from 1 to {MAX_STEPS} (got {value})"
    return problem


def check_flags(**values: Any) -> None:
    """Check explicit settings values (by field name; ``None`` = unset) before any checkpoint is
    read: each value on its own, and t-min against t-max when both are given. The final
    check against the checkpoint's defaults is :class:`GenerationSettings`' own."""
    problems = [f"{_LABELS.get(name, name)} {problem}" for name, value in values.items()
                if (problem := field_problem(name, value))]
    t_min, t_max = values.get("t_min"), values.get("t_max")
    if not problems and t_min is not None and t_max is not None and t_max <= t_min:
        problems.append(f"t-max must be greater than t-min (got t-max {t_max}, t-min {t_min})")
    if problems:
        raise UsageError("; ".join(problems))


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
        fields = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                  "stability_threshold", "confidence_threshold", "seed")
        problems = [f"{_LABELS[name]} {problem}" for name in fields
                    if (problem := field_problem(name, getattr(self, name))) is not None]
        for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max"):
            if getattr(self, name) is None:
                problems.append(f"{_LABELS[name]} must be set")
        if not problems and self.t_max <= self.t_min:
            problems.append(f"t-max must be greater than t-min (got t-max {self.t_max}, t-min {self.t_min})")
        if not self.eos_token_ids:
            problems.append("at least one EOS token id is needed")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def adaptive_stopping(self) -> bool:
        """Whether the stable-and-confident stop can end a canvas before N steps."""
        return self.stability_threshold is not None and self.confidence_threshold is not None

    @property
    def stability_window(self) -> int | None:
        """The drafts the adaptive stop compares (``None``: stopping is off). A threshold of N
        steps or more can never be met within N steps, and neither can N itself, so it is capped
        at N: the same stops, without a history tensor sized by whatever number was typed."""
        if not self.adaptive_stopping:
            return None
        return min(int(self.stability_threshold), int(self.max_denoising_steps))

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(ids: int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)
