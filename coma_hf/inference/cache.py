"""Cache keys for an embedded image folder: the folder's listing and what else the vectors depend on.

A folder embedded once is reused until the model, its rendering settings or the folder changes: the key covers the
model's fingerprint (`coma_hf.training.weights_fingerprint`), any settings the caller names (the processor's saved
settings, the instruction) and every image file `image_folder_rows` reads — its relative path, size and modification
time — so retraining, editing the processor, or adding, removing, renaming or rewriting a file gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..data.sources import image_files

ListingEntry = tuple[str, int, int]  # (relative POSIX path, size in bytes, modification time in ns)


def folder_listing(folder: str | os.PathLike) -> list[ListingEntry]:
    """The image files under `folder` in the order `image_folder_rows` reads them (sorted relative paths), each with
    its size and modification time. A missing folder raises `FileNotFoundError`."""
    root = Path(folder)
    entries = []
    for relative in image_files(root):
        status = (root / relative).stat()
        entries.append((relative, status.st_size, status.st_mtime_ns))
    return entries


def corpus_cache_key(model_fingerprint: str, listing: Sequence[ListingEntry], **settings: object) -> str:
    """A hex SHA-256 over the model's fingerprint, `settings` (JSON-serialisable values, by name) and `listing`:
    equal keys mean the same model embedding the same files the same way."""
    digest = hashlib.sha256()
    digest.update(model_fingerprint.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for relative, size, modified in listing:
        digest.update(f"\0{relative}\0{size}\0{modified}".encode())
    return digest.hexdigest()
