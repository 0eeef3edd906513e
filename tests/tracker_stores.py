"""What dpoflow sent to W&B (offline) and Trackio, read back from the files those clients wrote, without
their servers.

W&B 0.31 writes an offline run's history, config and summary only into its transaction log
(`run-<id>.wandb`; no wandb-summary.json, and the Python reader and `wandb sync --view` are gone): the
log is LevelDB's log format (32 KiB blocks of chunks with a 7-byte header) after W&B's own 7-byte header,
each record one of W&B's protobuf `Record` messages, parsed here with the client's own definitions.
Trackio keeps each project in `<folder>/<project>.db`, a SQLite database whose schema Trackio documents
for direct queries (the metrics, configs and alerts tables)."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(log_file: Path):
    """Every protobuf Record of a W&B transaction log, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(log_file).read_bytes()
    assert data[:4] == b":W&B", f"not a W&B transaction log: {log_file}"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            yield record


def _update(values: dict, items) -> dict:
    """W&B's key/value items into `values`: a nested key (an image's fields) as nested dicts."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return values


@dataclass
class WandbRun:
    """An offline W&B run as its transaction log holds it."""

    folder: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    files: set[str] = field(default_factory=set)
    exit_code: int | None = None

    @classmethod
    def read(cls, folder: Path, timeout: float = 30) -> "WandbRun":
        """The run once its exit record is written: W&B's service process writes the log behind the
        client, so it may still be writing when `finish()` returns."""
        deadline = time.monotonic() + timeout
        while True:
            run = cls._read(Path(folder))
            if run.exit_code is not None or time.monotonic() > deadline:
                return run
            time.sleep(0.2)

    @classmethod
    def _read(cls, folder: Path) -> "WandbRun":
        (log_file,) = folder.glob("run-*.wandb")
        run = cls(folder)
        for record in wandb_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run  # the first names the run; later ones (an update) may leave fields empty
                run.run_id, run.name = run.run_id or r.run_id, run.name or r.display_name
                run.project, run.tags = run.project or r.project, run.tags or list(r.tags)
                _update(run.config, r.config.update)
            elif kind == "config":
                _update(run.config, record.config.update)
            elif kind == "summary":
                _update(run.summary, record.summary.update)
            elif kind == "history":
                run.history.append(_update({}, record.history.item))
            elif kind == "files":
                run.files |= {f.path for f in record.files.files}
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
        return run

    def curve(self, key: str) -> list[tuple[int, float]]:
        """`sft/loss` as (its group's step, value) rows, as the W&B UI plots it against `sft/step`."""
        step = key.split("/", 1)[0] + "/step"
        return [(row[step], row[key]) for row in self.history if key in row]


def wandb_run_folders(workdir: Path) -> dict[str, Path]:
    """run id -> its offline run folder under <workdir>/wandb."""
    return {p.name.rsplit("-", 1)[1]: p for p in (Path(workdir) / "wandb").glob("offline-run-*")}


class TrackioProject:
    """A Trackio project's database, read with SQL."""

    def __init__(self, folder: Path, project: str):
        self.folder, self.project = Path(folder), project
        self.db = sqlite3.connect(self.folder / f"{project}.db")

    def runs(self) -> list[str]:
        return sorted({name for (name,) in self.db.execute("SELECT run_name FROM configs")})

    def config(self, run: str) -> dict:
        (text,) = self.db.execute("SELECT config FROM configs WHERE run_name = ?", (run,)).fetchone()
        return json.loads(text)

    def rows(self, run: str) -> list[tuple[int, dict]]:
        return [(step, json.loads(text)) for step, text in
                self.db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (run,))]

    def curve(self, run: str, key: str) -> list[tuple[int, float]]:
        return [(step, values[key]) for step, values in self.rows(run) if key in values]

    def alerts(self, run: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT title, text FROM alerts WHERE run_name = ?", (run,)).fetchall())

    def artifacts(self, run: str) -> dict[str, bytes]:
        """name -> content of each artifact the run logged (from Trackio's content-addressed blobs)."""
        out = {}
        for name, manifest in self.db.execute(
                "SELECT a.name, v.manifest FROM run_artifact_links l JOIN artifact_versions v "
                "ON v.id = l.artifact_version_id JOIN artifacts a ON a.id = v.artifact_id "
                "WHERE l.run_name = ? AND l.direction = 'output'", (run,)):
            for entry in json.loads(manifest):
                digest = entry["digest"]
                blob = self.folder / "artifacts" / self.project / "blobs" / "sha256" / digest[:2] / digest
                out[name] = blob.read_bytes()
        return out
