"""Generation settings: checkpoint defaults, fallbacks and validation."""

import pytest

from diffgen.errors import UsageError
from diffgen.settings import LIBRARY_DEFAULTS, GenerationSettings
from devtools.tiny import generation_config_dict


def test_released_generation_config_gives_the_documented_defaults():
    settings = GenerationSettings.from_generation_config(generation_config_dict())
    assert settings.max_new_tokens == 256
    assert settings.max_denoising_steps == 48
    assert settings.entropy_bound == 0.1
    assert (settings.t_min, settings.t_max) == (0.4, 0.8)
    assert (settings.stability_threshold, settings.confidence_threshold) == (1, 0.005)
    assert settings.eos_token_ids == (1, 106, 50)
    assert settings.pad_token_id == 0


def test_missing_fields_fall_back_to_library_defaults_and_model_config():
    model_config = {"text_config": {"eos_token_id": [7, 8], "pad_token_id": 3}}
    settings = GenerationSettings.from_generation_config({"max_denoising_steps": 12}, model_config)
    assert settings.max_denoising_steps == 12
    assert settings.max_new_tokens == LIBRARY_DEFAULTS["max_new_tokens"]
    assert settings.eos_token_ids == (7, 8)
    assert settings.pad_token_id == 3


def test_no_generation_config_at_all():
    settings = GenerationSettings.from_generation_config(None, None)
    assert settings == GenerationSettings()


def test_replace_ignores_none_so_unset_flags_keep_the_default():
    base = GenerationSettings()
    changed = base.replace(max_new_tokens=10, t_min=None, seed=4)
    assert (changed.max_new_tokens, changed.t_min, changed.seed) == (10, base.t_min, 4)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"max_new_tokens": 0}, "max-new-tokens"),
        ({"max_denoising_steps": -1}, "steps"),
        ({"entropy_bound": 0.0}, "entropy-bound"),
        ({"t_min": 0.9}, "t-max must be greater than t-min"),
        ({"stability_threshold": -2}, "stability"),
        ({"confidence_threshold": 0.0}, "confidence"),
    ],
)
def test_invalid_values_are_usage_errors_naming_the_flag(changes, words):
    with pytest.raises(UsageError) as info:
        GenerationSettings(**changes)
    assert words in str(info.value)


@pytest.mark.parametrize("changes, words", [
    ({"t_max": float("inf")}, "t-max must be a finite number"),
    ({"t_min": float("nan")}, "t-min must be a finite number"),
    ({"entropy_bound": float("inf")}, "entropy-bound must be a finite number"),
    ({"confidence_threshold": float("nan")}, "confidence must be a finite number"),
    ({"seed": 2**63}, "seed must be an integer from 0 to 2**63-1"),
    ({"seed": -1}, "seed must be an integer from 0 to 2**63-1"),
])
def test_library_callers_get_the_same_checks(changes, words):
    with pytest.raises(UsageError) as info:
        GenerationSettings(**changes)
    assert words in str(info.value)


def test_flags_are_checked_alone_before_the_checkpoint_defaults_are_known():
    from diffgen.settings import check_flags

    check_flags(t_min=0.9, seed=2**63 - 1)  # t-min alone may exceed the library's t-max: the checkpoint decides
    with pytest.raises(UsageError, match="t-max must be greater than t-min"):
        check_flags(t_min=0.9, t_max=0.5)
    with pytest.raises(UsageError, match="steps must be a positive integer"):
        check_flags(max_denoising_steps=0)


def test_one_flag_table_serves_the_cli_and_batch_records():
    import typer.main

    from diffgen.cli.app import app
    from diffgen.records.batch import RECORD_FIELDS
    from diffgen.settings import SAMPLER_FLAGS

    for command in ("run", "batch"):
        params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
        for flag in SAMPLER_FLAGS:
            assert flag.flag in params[flag.key].opts, (command, flag)
    for flag in SAMPLER_FLAGS:
        assert RECORD_FIELDS[flag.key] == (flag.types, flag.field)
        assert flag.field in {f.name for f in GenerationSettings.__dataclass_fields__.values()}
