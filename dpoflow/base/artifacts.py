"""Content hashes of files and folders, and sealed stage output folders.

A stage writes its outputs into a folder and seals it: `manifest.json` (written last) lists every
file's sha256. A folder is intact when its manifest exists and every file it lists still has that hash,
so a cache hit is only used while its artifacts on disk are exactly what the stage produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys): equal content, equal digest."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 for every file below `folder` (the manifest itself excluded)."""
    return {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def folder_digest(folder: Path) -> str:
    return json_digest(folder_files(folder))


def fresh_dir(folder: Path) -> Path:
    """An empty `folder`, removing what a failed or stale earlier attempt left there."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def seal(folder: Path) -> str:
    """Write the manifest of `folder` and return its digest (the folder's content hash)."""
    files = folder_files(folder)
    digest = json_digest(files)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"digest": digest, "files": files}, indent=1, sort_keys=True))
    tmp.replace(folder / MANIFEST)
    return digest


class NotIntact(ValueError):
    """A stage output folder that no longer holds exactly what its stage produced; the message names
    the folder's file that is missing or changed."""


def sealed_files(folder: Path) -> dict[str, str]:
    """What the stage produced in `folder`: relative path -> sha256 as its manifest lists them, once
    every one is checked to be there with that hash (NotIntact otherwise). Files the manifest does not
    list are not among them: a stray file beside the outputs (a desktop's `.DS_Store`, an editor's
    backup, notes) is no part of what the stage produced."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise NotIntact(f"{manifest} is missing: {folder} is not a finished stage output")
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise NotIntact(f"{manifest} is not a manifest this stage wrote")
    for name, sha in recorded.items():
        path = folder / name
        if not path.is_file():
            raise NotIntact(f"{path} is missing (its stage produced it)")
        if file_sha256(path) != sha:
            raise NotIntact(f"{path} has changed since its stage produced it")
    return recorded


def is_intact(folder: Path) -> bool:
    """True when `folder` was sealed and every file its manifest lists is still there with that hash.
    Files the manifest does not list are ignored: what a stage produced is unchanged, and a stray
    file beside it is no reason to rebuild it and all that follows."""
    try:
        sealed_files(folder)
    except NotIntact:
        return False
    return True


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a split: Parquet (what prepare writes) or JSONL."""
    if str(path).endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl_rows(path)


def write_atomically(path: Path, text: str) -> None:
    """Readers (other ranks, concurrent runs sharing a workdir) see the old content or the new, never
    a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(text)
    part.replace(path)
