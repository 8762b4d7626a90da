"""The quantised-weights cache: later loads read what the first load quantised, and never trust
an entry that does not fit (changed weights, a damaged or half-written entry)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

from diffgen.denoise.loop import generate
from diffgen.errors import NotACheckpointError
from diffgen.loading import qcache, quant
from diffgen.loading.loader import load
from diffgen.loading.quant import QuantizedStack
from diffgen.loading.streaming import build_quantized, quantised_modules
from diffgen.planning.plan import LoadPlan
from diffgen.prompt import encode

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint re-saved in many shards, as released checkpoints are (one layer's
    tensors spread over several shards)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    directory = tmp_path_factory.mktemp("sharded") / "ckpt"
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_checkpoint)
    model.save_pretrained(directory, max_shard_size="20KB")
    for file in tiny_checkpoint.iterdir():
        if not file.name.startswith("model"):
            shutil.copy(file, directory / file.name)
    assert len(list(directory.glob("*.safetensors"))) > 4
    return directory


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory per test (and the warn-once memory reset)."""
    monkeypatch.setenv("DIFFGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(qcache.SWITCH_VARIABLE, raising=False)
    monkeypatch.setattr(qcache, "_warned", set())
    return tmp_path / "cache" / "quantized"


@pytest.fixture
def reads(monkeypatch):
    """Every ``(file name, tensor name)`` read through safetensors during the test."""
    seen = []
    real_safe_open = safetensors.safe_open

    class Recording:
        def __init__(self, path, *args, **kwargs):
            self.path, self.inner = os.path.basename(str(path)), real_safe_open(path, *args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            seen.append((self.path, key))
            return self.handle.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return seen


def no_quantising(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("quantised although the cache holds these weights")

    monkeypatch.setattr(QuantizedStack, "store", refuse)


def counting_quantiser(monkeypatch):
    calls = []
    real = QuantizedStack.store

    def store(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QuantizedStack, "store", store)
    return calls


def plan(scheme):
    return LoadPlan("cpu", "float32", scheme)


def state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def tokens(loaded):
    settings = loaded.defaults.replace(max_new_tokens=16, max_denoising_steps=4, seed=0)
    ids = encode(loaded.tokenizer, "Why is the sky blue?")
    return generate(loaded, [ids], settings).completions[0].token_ids


def entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("scheme", ["int8", "fp8", "nvfp4", "nf4", "nf4-all"])
def test_a_second_load_reads_the_cache_and_gives_the_same_model(sharded, cache, reads, monkeypatch, scheme):
    first = load(str(sharded), plan(scheme), progress=False)
    (entry,) = entries(cache)
    assert entry.startswith(f"ckpt-{scheme}-")
    first_state, first_tokens = state(first.model), tokens(first)

    reads.clear()
    no_quantising(monkeypatch)
    second = load(str(sharded), plan(scheme), progress=False)
    second_state = state(second.model)
    assert second_state.keys() == first_state.keys()
    assert all(torch.equal(second_state[k], first_state[k]) for k in first_state)  # bit-identical
    assert tokens(second) == first_tokens
    # The shards' quantised tensors were not read the second time; the rest were, once each.
    from_shards = {key for file, key in reads if file.startswith("model-")}
    quantised = {key for key in from_shards if key.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert not quantised and "model.decoder.embed_tokens.weight" in from_shards
    if scheme == "nf4-all":
        assert not any(key.endswith("self_attn.q_proj.weight") for key in from_shards)
    # The entry costs the quantised buffers' size, not a second copy of the model.
    manifest = json.loads((cache / entry / qcache.MANIFEST).read_text())
    buffers = sum(t.numel() * t.element_size()
                  for m in quantised_modules(second.model).values() for t in m.state_dict().values())
    assert buffers <= manifest["bytes"] < buffers + 16 * 1024


def test_the_entry_is_written_layer_by_layer_as_the_shards_complete_them(sharded, cache, reads, monkeypatch):
    from safetensors import torch as st

    written, shards_read = [], []
    real_save = st.save_file

    def save_file(tensors, path, *args, **kwargs):
        written.append({name.split(".experts")[0].split(".self_attn")[0].split(".mlp")[0] for name in tensors})
        shards_read.append(len({file for file, _ in reads if file.startswith("model-")}))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", save_file)
    load(str(sharded), plan("nf4-all"), progress=False)
    assert written == [{"model.decoder.layers.0"}, {"model.decoder.layers.1"}]  # one layer per file
    shards = len(list(sharded.glob("model-*.safetensors")))
    assert shards_read[0] < shards_read[1] < shards  # each written once its layer was read, before the end


def test_the_progress_bar_says_where_the_weights_come_from(tiny_checkpoint, cache, capfd):
    load(str(tiny_checkpoint), plan("int8"), progress=True)
    first = capfd.readouterr().err
    assert "Loading and quantising shards" in first and "caching the int8 weights" in first
    load(str(tiny_checkpoint), plan("int8"), progress=True)
    second = capfd.readouterr().err
    assert "Loading cached int8 weights and shards" in second and "caching" not in second


def test_changed_weights_are_quantised_anew(tiny_checkpoint, tmp_path, cache, monkeypatch):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    load(str(checkpoint), plan("int8"), progress=False)
    # Replace the weights by another seed's (as a re-download or a fine-tune would).
    from devtools.tiny import save_tiny_checkpoint

    other = save_tiny_checkpoint(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", checkpoint / "model.safetensors")
    calls = counting_quantiser(monkeypatch)
    changed = state(load(str(checkpoint), plan("int8"), progress=False).model)
    assert calls and len(entries(cache)) == 2
    monkeypatch.setenv(qcache.SWITCH_VARIABLE, "0")
    fresh = state(load(str(checkpoint), plan("int8"), progress=False).model)
    assert all(torch.equal(changed[k], fresh[k]) for k in fresh)


def test_touching_a_weight_file_invalidates_a_local_entry(tiny_checkpoint, tmp_path, cache, monkeypatch):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    load(str(checkpoint), plan("nf4"), progress=False)
    weights = checkpoint / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    calls = counting_quantiser(monkeypatch)
    load(str(checkpoint), plan("nf4"), progress=False)
    assert calls and len(entries(cache)) == 2


def test_scheme_dtype_and_layout_version_are_part_of_the_key(tiny_checkpoint, cache, monkeypatch):
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    load(str(tiny_checkpoint), LoadPlan("cpu", "bfloat16", "int8"), progress=False)
    load(str(tiny_checkpoint), plan("nf4"), progress=False)
    assert len(entries(cache)) == 3
    monkeypatch.setattr(quant, "QUANT_LAYOUT_VERSION", quant.QUANT_LAYOUT_VERSION + 1)
    calls = counting_quantiser(monkeypatch)
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    assert calls and len(entries(cache)) == 4


def test_a_hub_snapshot_is_keyed_on_its_revision(tiny_checkpoint, tmp_path, cache, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--acme--tiny-diffusion"
    snapshot = shutil.copytree(tiny_checkpoint, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    first = state(load("acme/tiny-diffusion", plan("int8"), progress=False).model)
    (entry,) = entries(cache)
    manifest = json.loads((cache / entry / qcache.MANIFEST).read_text())
    assert entry.startswith("acme--tiny-diffusion-int8-")
    assert manifest["key"]["checkpoint"] == f"hub:models--acme--tiny-diffusion@{REVISION}"
    # A revision fixes its files: their times do not matter (a copied cache keeps its entries).
    weights = snapshot / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with monkeypatch.context() as patched:
        no_quantising(patched)
        second = state(load("acme/tiny-diffusion", plan("int8"), progress=False).model)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # A new revision is a new entry.
    newer = "f" * 40
    shutil.copytree(snapshot, repo / "snapshots" / newer)
    (repo / "refs" / "main").write_text(newer)
    load("acme/tiny-diffusion", plan("int8"), progress=False)
    assert len(entries(cache)) == 2


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_write_leaves_no_trusted_entry(sharded, cache, monkeypatch, capfd, interruption):
    from safetensors import torch as st

    real_save = st.save_file
    calls = []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # after the first layer's file, in the middle of the entry
            with open(path, "wb") as half:
                half.write(b"\0" * 100)
            raise interruption("interrupted while writing")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", save_file)
    if interruption is KeyboardInterrupt:  # Ctrl-C stops the load, and takes the half entry with it
        with pytest.raises(KeyboardInterrupt):
            load(str(sharded), plan("int8"), progress=False)
    else:  # any other failure of the cache is a warning; the load goes on
        assert load(str(sharded), plan("int8"), progress=False).model is not None
        assert "could not write the quantised-weights cache" in capfd.readouterr().err
    assert entries(cache) == []  # neither an entry nor a temporary directory is left
    monkeypatch.setattr(st, "save_file", real_save)
    calls_after = counting_quantiser(monkeypatch)
    load(str(sharded), plan("int8"), progress=False)
    assert calls_after and len(entries(cache)) == 1


def test_a_dead_runs_temporary_directory_is_never_read_and_is_cleaned_up(tiny_checkpoint, cache, monkeypatch):
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    (entry,) = entries(cache)
    # As if a run had been killed (SIGKILL, power loss) just before renaming its entry into place.
    dead = cache / f"{qcache._TEMP_PREFIX}{entry}-dead"
    os.rename(cache / entry, dead)
    old = dead.stat().st_mtime - qcache.STALE_AFTER_S - 60
    os.utime(dead, (old, old))
    calls = counting_quantiser(monkeypatch)
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    assert calls and entries(cache) == [entry]


def test_a_cache_that_cannot_be_written_warns_once_and_the_load_goes_on(tiny_checkpoint, cache, monkeypatch, capfd):
    cache.parent.mkdir(parents=True)
    os.chmod(cache.parent, 0o555)  # read-only (root ignores modes: the refusal is also simulated)

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(qcache.tempfile, "mkdtemp", refuse)
    try:
        loaded = load(str(tiny_checkpoint), plan("int8"), progress=False)
        load(str(tiny_checkpoint), plan("nf4"), progress=False)
    finally:
        os.chmod(cache.parent, 0o755)
    err = capfd.readouterr().err
    assert err.count("diffgen: warning:") == 1 and "Read-only file system" in err and "loading without it" in err
    assert tokens(loaded) and entries(cache) == []


def test_a_read_only_cache_with_the_entry_is_still_read(tiny_checkpoint, cache, monkeypatch, capfd):
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    monkeypatch.setattr(qcache.tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "ro")))
    no_quantising(monkeypatch)
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    assert "warning" not in capfd.readouterr().err


def test_a_full_disk_warns_and_the_load_goes_on(tiny_checkpoint, cache, monkeypatch, capfd):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(qcache.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    err = capfd.readouterr().err
    assert "not writing the quantised-weights cache" in err and "free" in err
    assert not any(cache.iterdir())


def test_the_switch_turns_the_cache_off(tiny_checkpoint, cache, monkeypatch):
    load(str(tiny_checkpoint), plan("int8"), progress=False)
    monkeypatch.setenv(qcache.SWITCH_VARIABLE, "0")
    calls = counting_quantiser(monkeypatch)
    load(str(tiny_checkpoint), plan("int8"), progress=False)  # not read ...
    load(str(tiny_checkpoint), plan("nf4"), progress=False)  # ... nor written
    assert calls and len(entries(cache)) == 1


def _truncate(entry):
    layer = sorted(entry.glob("*.safetensors"))[0]
    layer.write_bytes(layer.read_bytes()[:-10])


def _scramble_header(entry):
    layer = sorted(entry.glob("*.safetensors"))[0]
    data = bytearray(layer.read_bytes())
    data[8:40] = b"#" * 32  # same size, but the header is no longer JSON
    layer.write_bytes(bytes(data))


def _wrong_shape(entry):
    layer = sorted(entry.glob("*.safetensors"))[0]
    tensors = safetensors.torch.load_file(layer)
    name = next(n for n in tensors if n.endswith(".scale"))
    tensors[name] = tensors[name].reshape(-1)
    safetensors.torch.save_file(tensors, layer)
    manifest = json.loads((entry / qcache.MANIFEST).read_text())
    manifest["files"][layer.name]["bytes"] = layer.stat().st_size
    (entry / qcache.MANIFEST).write_text(json.dumps(manifest))


def _garbled_manifest(entry):
    (entry / qcache.MANIFEST).write_text("{not json")


def _missing_file(entry):
    sorted(entry.glob("*.safetensors"))[-1].unlink()


@pytest.mark.parametrize("damage", [_truncate, _scramble_header, _wrong_shape, _garbled_manifest, _missing_file])
def test_a_damaged_entry_is_detected_and_rebuilt(sharded, cache, monkeypatch, capfd, damage):
    reference = state(load(str(sharded), plan("int8"), progress=False).model)
    (entry,) = entries(cache)
    damage(cache / entry)
    calls = counting_quantiser(monkeypatch)
    rebuilt = state(load(str(sharded), plan("int8"), progress=False).model)
    err = capfd.readouterr().err
    assert calls and err.count("diffgen: warning:") == 1
    assert "ignoring the quantised-weights cache" in err and "rebuilding it" in err
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    assert entries(cache) == [entry]  # rebuilt in place, no leftovers
    no_quantising(monkeypatch)
    load(str(sharded), plan("int8"), progress=False)  # and the rebuilt entry is used


def test_concurrent_writers_of_one_entry_keep_one_whole_entry(tiny_checkpoint, cache):
    model = load(str(tiny_checkpoint), plan("int8"), progress=False).model
    modules = quantised_modules(model)
    shutil.rmtree(cache)
    key = qcache.checkpoint_key(tiny_checkpoint, [tiny_checkpoint / "model.safetensors"], "int8", "float32")
    first, second = qcache.QuantCache(key).writer(modules), qcache.QuantCache(key).writer(modules)
    for writer in (first, second):
        writer.write_ready(set(modules))
    assert first.commit() is True
    assert second.commit() is False  # the other run's entry stays; this one is dropped
    second.close()
    assert entries(cache) == [key.name]
    assert qcache.QuantCache(key).lookup(modules) is not None


def test_an_expert_tensor_missing_from_the_checkpoint_is_an_error(tiny_checkpoint):
    from transformers import AutoConfig

    def tensors():
        with safetensors.safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as shard:
            for key in shard.keys():
                if key != "model.decoder.layers.1.experts.down_proj":
                    yield key, shard.get_tensor(key)

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    with pytest.raises(NotACheckpointError) as info:
        build_quantized(config, tensors(), plan("int8"))
    assert "model.decoder.layers.1.experts" in str(info.value)


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFGEN_CACHE", str(tmp_path / "d"))
    assert qcache.cache_root() == tmp_path / "d" / "quantized"
    monkeypatch.delenv("DIFFGEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert qcache.cache_root() == tmp_path / "x" / "diffgen" / "quantized"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert qcache.cache_root() == tmp_path / "h" / ".cache" / "diffgen" / "quantized"
