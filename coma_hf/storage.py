"""Files written so that a kill never leaves half of one, and checked when read back, so that a damaged one is never
trusted.

Atomic writes (a temporary file in the same folder, then a rename) protect against a killed writer, not against the
storage: a full disk, an interrupted copy or a bad sector can still cut or garble a file later. So everything a
resumed run reuses is checked first — JSON records (`load_record`), safetensors files (`safetensors_damage`: the
header and every tensor's byte range against the file's size, without loading a tensor), and, where a digest was
recorded, the bytes themselves (`file_sha256`). A damaged file is reported with a warning naming it and what is
wrong, and the part it held is redone; a reader that cannot redo it raises `DamagedFileError`, which names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its JSON header's length, a little-endian u64


class DamagedFileError(ValueError):
    """A file that was written whole has since been cut or garbled; the message names it and what is wrong."""

    def __init__(self, path: str | os.PathLike, damage: str):
        super().__init__(f"{path} is damaged: {damage}")
        self.path, self.damage = Path(path), damage


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary)` for a temporary file beside `path` (`.{name}.{pid}.{thread}.tmp`), then rename it to
    `path`: readers see the old file or the whole new one, never a half-written one. The temporary file is removed if
    `write` fails; a killed process leaves it behind, under a name no reader takes for the real file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # threads write apart
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_record(path: str | os.PathLike, record: dict, indent: int | None = 1) -> None:
    """Write `record` as a JSON file (its folder made if needed), atomically (`write_atomically`); `load_record`
    reads it back."""
    text = json.dumps(record, indent=indent)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def load_record(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`; `None` when there is no such file, or — with a warning naming the file and what is
    wrong — when it is damaged (cut mid-line, not UTF-8, not JSON, not an object), so the caller redoes what it
    recorded instead of trusting or crashing on it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        return _damaged_record(path, f"cannot be read ({error})")
    try:
        value = json.loads(text)
    except ValueError as error:
        return _damaged_record(path, f"not whole JSON ({len(text.encode())} bytes; {error})")
    if not isinstance(value, dict):
        return _damaged_record(path, f"a JSON {type(value).__name__}, not an object")
    return value


def _damaged_record(path: Path, damage: str) -> None:
    logger.warning("Ignoring the damaged file %s (%s): treated as missing; what it recorded is redone", path, damage)
    return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of the file's bytes, read in chunks (a shard may be larger than memory allows twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the safetensors file at `path` — cut inside its header or inside a tensor, or a header
    safetensors refuses — or `None` when it is whole. Cheap: only the header is read, no tensor is loaded (a bit
    flipped inside a tensor needs a recorded digest to be seen, `file_sha256`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
            if size < _HEADER_LENGTH_BYTES or _HEADER_LENGTH_BYTES + header_length > size:
                return f"cut inside its header ({size} bytes)"
            header = json.loads(handle.read(header_length))
    except OSError as error:
        return f"cannot be read ({error})"
    except ValueError as error:
        return f"its header is not JSON ({error})"
    data_bytes = size - _HEADER_LENGTH_BYTES - header_length
    try:
        ends = {name: int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"}
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "its header does not list tensors as safetensors does"
    for name, end in ends.items():
        if end > data_bytes:
            return f"cut inside tensor {name!r} (its bytes end at {end}, the file holds {data_bytes} bytes of data)"
    return _refused_by_safetensors(path)


def _refused_by_safetensors(path: Path) -> str | None:
    """What safetensors' own reader says about the header (overlapping or missing ranges, unknown dtypes), if
    anything."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as error:
        return f"safetensors cannot open it ({error})"
