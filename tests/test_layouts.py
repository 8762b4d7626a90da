"""A checkpoint fills the model whole or is refused; what it holds beyond that is named in a warning.

The checkpoints here are the tiny random one rewritten: tensors renamed into the per-expert
layout without saying so, dropped, or added. Each case runs the real CLI and asserts what a
user sees: the exit code and the one line on stderr.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import cli


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint ``src`` in ``dst`` whose tensors are ``change(tensors)``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file(change(dict(tensors)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused expert tensors split one matrix per expert (``experts.E.gate_proj.weight``...)."""
    out = {}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "gate_up_proj":
            inter = value.shape[1] // 2
            for expert in range(value.shape[0]):
                out[f"{prefix}.{expert}.gate_proj.weight"] = value[expert, :inter].contiguous()
                out[f"{prefix}.{expert}.up_proj.weight"] = value[expert, inter:].contiguous()
        elif leaf == "down_proj" and prefix.endswith(".experts"):
            for expert in range(value.shape[0]):
                out[f"{prefix}.{expert}.down_proj.weight"] = value[expert].contiguous()
        else:
            out[key] = value
    return out


def error_line(result) -> str:
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("diffgen: error:")]
    assert len(lines) == 1, result.stderr.decode()
    return lines[0]


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_experts_in_another_layout_are_refused_not_left_random(tiny_checkpoint, tmp_path, quant):
    path = rewrite(tiny_checkpoint, tmp_path / "ckpt", per_expert)
    result = cli("run", "-m", str(path), "--quant", quant, "hi")
    assert result.returncode == 1 and result.stdout == b""
    line = error_line(result)
    assert "lacks 4 of the" in line and "(first: model.decoder.layers.0.experts.down_proj)" in line


def test_a_missing_buffer_is_refused(tiny_checkpoint, tmp_path):
    def drop(tensors):
        del tensors["model.encoder.language_model.layers.1.layer_scalar"]
        return tensors

    result = cli("run", "-m", str(rewrite(tiny_checkpoint, tmp_path / "ckpt", drop)), "hi")
    assert result.returncode == 1
    assert "lacks 1 of the" in error_line(result)
    assert "model.encoder.language_model.layers.1.layer_scalar" in error_line(result)


def test_tied_weights_stored_once_are_enough(tiny_checkpoint):
    from diffgen.loading import layout

    needs = layout.model_needs(__import__("json").loads((tiny_checkpoint / "config.json").read_text()))
    tied = [group for group in needs.groups if len(group) > 1]
    # Every tie is an encoder text weight borrowed from the decoder, or the LM head borrowing the embedding.
    for group in tied:
        head, *others = group
        assert head.startswith("model.decoder."), group
        for other in others:
            assert other == "lm_head.weight" or other == head.replace("model.decoder.", "model.encoder.language_model.")
    assert ("model.decoder.embed_tokens.weight", "lm_head.weight",
            "model.encoder.language_model.embed_tokens.weight") in tied
    keys = layout.read_headers([tiny_checkpoint / "model.safetensors"])
    assert layout.check(keys, needs, label="tiny") == []


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_unknown_extra_tensors_are_named_in_a_warning(tiny_checkpoint, tmp_path, quant):
    def add(tensors):
        tensors["model.decoder.layers.0.mystery.weight"] = torch.zeros(3)
        tensors["model.decoder.extra_head.bias"] = torch.zeros(2)
        return tensors

    path = rewrite(tiny_checkpoint, tmp_path / "ckpt", add)
    result = cli("run", "-m", str(path), "--quant", quant, "--max-new-tokens", "16", "--steps", "2", "hi")
    assert result.returncode == 0, result.stderr.decode()
    warnings = [line for line in result.stderr.decode().splitlines() if "no place for" in line]
    assert len(warnings) == 1
    assert "2 tensor(s)" in warnings[0]
    assert "model.decoder.extra_head.bias" in warnings[0] and "model.decoder.layers.0.mystery.weight" in warnings[0]


def test_pull_fetches_the_files_then_only_the_weights_the_index_names(tmp_path, monkeypatch):
    """A published repository may hold weights the checkpoint does not use (a consolidated copy,
    an ``original/`` folder): pull asks for the files first, then exactly the shards the index names."""
    import json

    import huggingface_hub

    from diffgen.loading import hub

    calls = []
    snapshot = tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        calls.append(list(allow_patterns))
        snapshot.mkdir(exist_ok=True)
        index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors",
                                                "c": "model-00002-of-00002.safetensors"}}
        (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE")  # nothing reaches the network: the download is the fake below
    monkeypatch.setattr(hub, "probe", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.pull("nvidia/diffusiongemma-26B-A4B-it-NVFP4") == snapshot
    files, weights = calls
    assert "*.safetensors" not in files and "*.json" in files  # hf_quant_config.json and the index come first
    assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (snapshot / "model.safetensors.index.json").unlink()
    assert hub.needed_weights(snapshot) == ["*.safetensors"]
