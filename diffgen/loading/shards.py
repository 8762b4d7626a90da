"""The checkpoint's safetensors files: which they are, and whether each is whole.

A safetensors file is an 8-byte little-endian header length, a JSON header giving every
tensor's byte range, then the data. Reading the headers alone (kilobytes, no torch) catches a
file cut short by an interrupted download or copy, or one whose header is garbage, before a
long load starts; a damaged file then gets one line that says how to replace it instead of a
safetensors traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffgen.errors import DamagedCheckpointError, NotACheckpointError

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header size


def shard_files(path: Path) -> list[Path]:
    """The weight files: those the index names when there is one, else every ``*.safetensors``."""
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NotACheckpointError(f"{path}/{INDEX} is not a valid safetensors index ({exc})",
                                      "download the checkpoint again") from exc
        return [path / name for name in names]
    return sorted(path.glob("*.safetensors"))


def check_shards(path: Path, name: str | None = None, *, from_hub: bool = False) -> None:
    """Refuse a missing, truncated or corrupt weight file, from the headers alone."""
    for file in shard_files(path):
        problem = _problem(file)
        if problem is not None:
            raise _damaged(file, problem, name or str(path), from_hub)


def read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a (checked) safetensors file as ``name -> (dtype, shape)``, from its header
    alone: safetensors' dtype names (``BF16``, ``F8_E4M3``, ``U8``...), no data read, no torch."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length).decode("utf-8"))
    return {key: (entry["dtype"], list(entry["shape"])) for key, entry in header.items() if key != "__metadata__"}


def _problem(file: Path) -> str | None:
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, too few for a safetensors header"
            length = int.from_bytes(head, "little")
            if length > min(MAX_HEADER, size - 8):
                return f"its header claims {length} bytes but the file has {size}"
            header = json.loads(handle.read(length).decode("utf-8"))
    except FileNotFoundError:
        return "it is missing"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                  default=0)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return "its header does not describe tensors"
    needed = 8 + length + end
    if needed > size:
        return f"it has {size} bytes but its header needs {needed} (truncated)"
    return None


def _damaged(file: Path, problem: str, label: str, from_hub: bool) -> DamagedCheckpointError:
    if from_hub:
        # A cached file of the right name is never fetched again: the damaged blob must go first.
        hint = (f"the download was probably interrupted; delete {file.resolve()} and run "
                f"`diffgen pull {label}` to fetch it again")
    else:
        hint = (f"it was probably cut short by an interrupted download or copy; copy or download {file.name} "
                f"again (or `diffgen pull` the Hub id and use that) and check its size")
    return DamagedCheckpointError(f"the weights file {file.name} of {label} is damaged: {problem}", hint)
