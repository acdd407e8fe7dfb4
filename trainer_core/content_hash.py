"""A model file's identity from its bytes: a BLAKE3 hash of its whole content, computed once and remembered.

Two bases with the same header and size but other weights (Flux-dev and Flux-dev2pro converted by one tool) must
never share an identity, so the whole file is hashed. BLAKE3 reads at disk speed on several cores, and the result is
kept in an index in the run store, keyed by the file's real path, size, mtime and inode: the second lookup of an
unchanged 12 GB base reads no weights. A folder (diffusers layout, tokenizers) hashes every file in it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import blake3

from .checkpoints import atomic_write, folder_lock

log = logging.getLogger(__name__)

INDEX_NAME = "content_hashes.json"
_CHUNK = 64 * 2**20  # large enough for BLAKE3's threads to share, small enough to report progress
_PROGRESS_SECONDS = 10.0  # a file still being hashed after this long says how far it got, at this interval
_remembered: dict[tuple, str] = {}  # (real path, size, mtime_ns, inode) -> hash, for this process


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_size, st.st_mtime_ns, st.st_ino


def hash_file(path: str | Path) -> str:
    """BLAKE3 of the file's bytes (32 hex digits), read in chunks, logging its progress when it takes a while."""
    path = Path(path)
    size = path.stat().st_size
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    done, start, last = 0, time.monotonic(), time.monotonic()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            hasher.update(view[:n])
            done += n
            if time.monotonic() - last > _PROGRESS_SECONDS:
                last = time.monotonic()
                log.info("hashing %s for its identity (once per file): %.1f of %.1f GB, %.0f MB/s", path.name,
                         done / 1e9, size / 1e9, done / 1e6 / (last - start))
    return hasher.hexdigest()[:32]


class ContentIndex:
    """File hashes remembered in `<folder>/content_hashes.json` (the run store's folder), shared by every process
    using that store under its lock. A file whose real path, size, mtime or inode changed is hashed again."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / INDEX_NAME

    def file_hash(self, path: str | Path) -> str:
        key = _stat_key(Path(path))
        if key in _remembered:
            return _remembered[key]
        entry = self._read().get(key[0])
        if entry is not None and tuple(entry[:3]) == key[1:]:
            _remembered[key] = entry[3]
            return entry[3]
        digest = hash_file(key[0])
        _remembered[key] = digest
        try:
            with folder_lock(self.folder):
                index = self._read()
                index[key[0]] = [*key[1:], digest]
                atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(index, indent=0)))
        except OSError as e:  # the hash is right; only the next process will hash the file again
            log.warning("could not remember the hash of %s in %s (%s)", path, self.path, e)
        return digest

    def _read(self) -> dict[str, list]:
        try:
            index = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s); model files are hashed again", self.path, e)
            return {}
        return index if isinstance(index, dict) else {}


def content_identity(path: str | Path, index: ContentIndex | None = None) -> str:
    """The identity of a model file or folder from its bytes: a file's hash, or a folder's every file (names and
    hashes; hidden files left out). `index` remembers the hashes (None: hashed each time, for small files)."""
    path = Path(path)
    file_hash = index.file_hash if index is not None else hash_file
    if not path.is_dir():
        return file_hash(path)
    hasher = blake3.blake3()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            hasher.update(f"{rel.as_posix()}\0{file_hash(p)}\n".encode())
    return hasher.hexdigest()[:32]
