"""Checkpoint resolution and the checks that turn wrong inputs into clear errors."""

import json
import shutil

import pytest

from diffgen.loading import loader
from diffgen.errors import (
    HubUnreachableError,
    ModelNotFoundError,
    NotACheckpointError,
    TokenizerMissingError,
    UnsafeCheckpointError,
)
from diffgen.planning.plan import LoadPlan, simple_plan


def hub_cache(root, repo_id, checkpoint, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay a checkpoint out as huggingface_hub's cache does: models--org--name/{snapshots,refs}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def copy_checkpoint(src, dst, *, drop=(), add=None):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    for name, data in (add or {}).items():
        (dst / name).write_bytes(data)
    return dst


def test_local_directory_loads_model_tokenizer_and_defaults(tiny_checkpoint):
    loaded = loader.load(str(tiny_checkpoint), LoadPlan("cpu", "float32"), progress=False)
    assert type(loaded.model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert not loaded.model.training
    assert loaded.defaults.max_denoising_steps == 48 and loaded.defaults.eos_token_ids == (1, 106, 50)
    assert loaded.checkpoint.from_hub is False and loaded.checkpoint.path == tiny_checkpoint.resolve()
    assert loaded.tokenizer.chat_template


def test_hub_id_resolves_from_the_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = hub_cache(tmp_path, "acme/tiny-diffusion", tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    checkpoint = loader.resolve("acme/tiny-diffusion", offline=True)
    assert checkpoint.from_hub and checkpoint.path == snapshot


def test_hub_id_missing_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubUnreachableError) as info:
        loader.resolve("acme/not-downloaded", offline=True)
    assert "offline" in str(info.value)


def test_env_offline_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loader.env_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not loader.env_offline()


@pytest.mark.parametrize("name", ["./nope", "/definitely/not/here", "a/b/c", "bad id!"])
def test_missing_paths_and_malformed_ids(name):
    with pytest.raises(ModelNotFoundError):
        loader.resolve(name)


def test_a_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(NotACheckpointError):
        loader.resolve(str(path))


def test_directory_without_config(tmp_path):
    with pytest.raises(NotACheckpointError) as info:
        loader.inspect_checkpoint(tmp_path)
    assert "config.json" in str(info.value)


def test_other_model_type_is_refused(tiny_checkpoint, tmp_path):
    other = copy_checkpoint(tiny_checkpoint, tmp_path / "llama")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotACheckpointError) as info:
        loader.inspect_checkpoint(other)
    assert "llama" in str(info.value)


def test_pickled_weights_only_are_refused(tiny_checkpoint, tmp_path):
    pickled = copy_checkpoint(tiny_checkpoint, tmp_path / "pickled", drop=["model.safetensors"],
                              add={"pytorch_model.bin": b"not loaded"})
    with pytest.raises(UnsafeCheckpointError) as info:
        loader.inspect_checkpoint(pickled)
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)


def test_no_weights_at_all(tiny_checkpoint, tmp_path):
    empty = copy_checkpoint(tiny_checkpoint, tmp_path / "empty", drop=["model.safetensors"])
    with pytest.raises(NotACheckpointError):
        loader.inspect_checkpoint(empty)


def test_missing_tokenizer(tiny_checkpoint, tmp_path):
    bare = copy_checkpoint(tiny_checkpoint, tmp_path / "bare", drop=["tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(TokenizerMissingError):
        loader.inspect_checkpoint(bare)


def test_hub_downloads_never_include_pickles():
    patterns = loader.HUB_ALLOW_PATTERNS
    import fnmatch

    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt"):
        assert not any(fnmatch.fnmatch(name, p) for p in patterns)
    for name in ("model-00001-of-00002.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns)


def test_cpu_plan_and_unavailable_devices():
    from diffgen.errors import DeviceError

    assert simple_plan("cpu") == LoadPlan("cpu", "float32")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            simple_plan("cuda")
        assert simple_plan("auto").device in {"cpu", "mps"}
    with pytest.raises(DeviceError):
        simple_plan("tpu")
