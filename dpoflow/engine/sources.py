"""Reading the rows of a data source, one at a time: local JSONL/JSON/Parquet/CSV files and globs, and
Hub datasets (or local dataset folders) through `datasets`. Each row comes with where it was read
(`file:line`, `file:row N`, `hub:id[split] row N`); a row that cannot even be parsed comes back as a
Rejection instead, so it is counted and kept aside like any other bad row; so does a row that would
crash a later step (`unsafe`).

File-level problems (no such file, nothing matches a glob, an empty file, a .json file that is not
valid JSON or too deeply nested to decode) are errors: there is no row to set aside.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

from dpoflow.base.artifacts import file_sha256, folder_digest, json_digest
from dpoflow.base.config import SourceSpec
from dpoflow.engine.pairs import DataError, Rejection

Row = tuple[str, dict | None, Rejection | None]
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")


def files_of(source: SourceSpec) -> list[Path]:
    """The files a path or glob names, sorted (so a glob reads in the same order every time)."""
    pattern = source.path
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"{pattern}: no file matches this pattern")
        return found
    path = Path(pattern)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return [path]


def read_source(source: SourceSpec) -> Iterator[Row]:
    if source.hub is not None:
        yield from checked(_read_hub(source))
        return
    for path in files_of(source):
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        reader = {".parquet": _read_parquet, ".csv": _read_csv, ".json": _read_json}.get(suffix, read_jsonl)
        yield from checked(reader(path))


def checked(rows: Iterator[Row]) -> Iterator[Row]:
    """Sets aside, as rejections, the rows that no later step could handle safely (see `unsafe`)."""
    for where, row, rejection in rows:
        problem = unsafe(where, row) if row is not None else None
        yield (where, None, problem) if problem else (where, row, rejection)


MAX_DEPTH = 32  # no preference format nests deeper than a few levels
MAX_DIGITS = 100  # a longer integer is no score or id; float() of one past ~308 digits overflows
SURROGATE = re.compile(r"[\ud800-\udfff]")


def unsafe(where: str, row: dict) -> Rejection | None:
    """Why a row would crash a later step instead of failing a rule: a lone surrogate (JSON's
    "\\ud800" escape decodes to one; it is not Unicode text, so UTF-8 writers and the tokenizer
    refuse it), nesting deeper than MAX_DEPTH, an integer longer than MAX_DIGITS. Walked with a
    stack, not recursion, so a deep row cannot exhaust Python's stack here."""
    stack: list[tuple[object, str | None, int]] = [(row, None, 0)]
    while stack:
        value, field, depth = stack.pop()
        if depth > MAX_DEPTH:  # the row is not kept: writing it to rejected.jsonl would recurse as deep
            return Rejection(where, "bad_json", field, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, LongNumber):
            return Rejection(where, "bad_json", field, f"a number of {len(value.digits)} digits (at most "
                                                       f"{MAX_DIGITS})", row)
        if isinstance(value, str):
            if not value.isascii() and (bad := SURROGATE.search(value)):
                return Rejection(where, "not_utf8", field, f"lone surrogate \\u{ord(bad.group()):04x}: not "
                                                           "valid Unicode text", row)
        elif isinstance(value, dict):
            for key, item in value.items():
                name = field or escaped(str(key))  # the top-level key names the field
                if not str(key).isascii():  # keys are text too
                    stack.append((key, name, depth + 1))
                stack.append((item, name, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack += [(item, field, depth + 1) for item in value]
    return None


def escaped(text: str) -> str:
    """`text` with lone surrogates written as \\udXXX escapes: safe to print and to write as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class LongNumber:
    """A JSON integer of more than MAX_DIGITS digits, kept as its digits: decoding it is slow
    (quadratic) and past 4300 digits Python refuses to; `unsafe` sets its row aside."""

    def __init__(self, digits: str):
        self.digits = digits

    def __str__(self) -> str:
        return self.digits


def _parse_int(digits: str) -> int | LongNumber:
    return int(digits) if len(digits) <= MAX_DIGITS else LongNumber(digits)


def _pattern_root(pattern: str) -> Path:
    """The folder a path or glob starts from: `/x/data/*.jsonl` -> /x/data, `/x/d.jsonl` -> /x."""
    if not glob.has_magic(pattern):
        return Path(pattern).parent
    parts = Path(pattern).parts
    return Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))])


def fingerprint(source: SourceSpec) -> str:
    """What the prepare stage's cache key holds for a source: its files' content, or the Hub dataset's
    id, split and revision (a local dataset folder: its content)."""
    mix = {"weight": source.weight, "count": source.count}
    if source.hub is not None:
        local = Path(source.hub)
        content = folder_digest(local) if local.is_dir() else None
        return json_digest({"hub": source.hub, "split": source.split, "subset": source.subset,
                            "revision": source.revision, "content": content, **mix})
    try:
        # Named relative to where the pattern starts, not by absolute path: the same data read from
        # another checkout (a worker's fresh clone of the repository) is the same cache key.
        root = _pattern_root(source.path)
        files = {p.relative_to(root).as_posix(): file_sha256(p) for p in files_of(source)}
    except DataError:
        files = {"missing": source.path}  # prepare itself reports it, with the file name
    return json_digest({"files": files, **mix})


def read_jsonl(path: Path) -> Iterator[Row]:
    """(file:line, row, None) for each good JSON object, (file:line, None, rejection) for a bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # written by some editors: encoding, not content
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"), parse_int=_parse_int)
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                yield where, None, Rejection(where, "not_utf8", None,
                                             f"bytes are not UTF-8 ({e.reason} at byte {e.start})", text)
                continue
            except json.JSONDecodeError as e:
                yield where, None, Rejection(where, "bad_json", None, f"not valid JSON ({e.msg}, column {e.colno})",
                                             raw.decode("utf-8").rstrip("\n"))
                continue
            except RecursionError:  # json's decoder recurses once per level of nesting
                yield where, None, Rejection(where, "bad_json", None, "nested too deeply to decode",
                                             raw.decode("utf-8").rstrip("\n"))
                continue
            if not isinstance(row, dict):
                yield where, None, Rejection(where, "bad_json", None,
                                             f"expected a JSON object, got {type(row).__name__}", row)
                continue
            yield where, row, None


def _read_json(path: Path) -> Iterator[Row]:
    """A .json file: a list of row objects, or an object holding one under "data" / "rows"."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"), parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: bytes are not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:  # one document: a row the decoder cannot finish leaves no rows to read
        raise DataError(f"{path}: nested too deeply to decode (as JSON Lines, only that line is set aside)") \
            from None
    rows = doc.get("data", doc.get("rows")) if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    for i, row in enumerate(rows, start=1):
        where = f"{path}:row {i}"
        if isinstance(row, dict):
            yield where, row, None
        else:
            yield where, None, Rejection(where, "bad_json", None, f"expected a JSON object, got {type(row).__name__}",
                                         row)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in parquet.iter_batches(batch_size=2048):
        try:
            rows = [(row, None) for row in batch.to_pylist()]
        except UnicodeDecodeError:  # Arrow writers need not check that strings are UTF-8: find the rows
            rows = [_parquet_row(batch.slice(j, 1)) for j in range(batch.num_rows)]
        for row, bad_column in rows:
            i += 1
            where = f"{path}:row {i}"
            if bad_column is None:
                yield where, row, None
            else:
                yield where, None, Rejection(where, "not_utf8", bad_column, "bytes are not UTF-8")


def _parquet_row(one) -> tuple[dict | None, str | None]:
    """(row, None) for a one-row batch, or (None, the column whose bytes are not UTF-8)."""
    row = {}
    for name, column in zip(one.schema.names, one.columns):
        try:
            row[name] = column.to_pylist()[0]
        except UnicodeDecodeError:
            return None, name
    return row, None


def _read_csv(path: Path) -> Iterator[Row]:
    """CSV with a header row. Undecodable bytes don't stop the file: they reject their own row."""
    # utf-8-sig: a BOM (Excel writes one) is encoding, not the start of the first column's name.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row")
        start = 2
        while True:
            where = f"{path}:{start}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # e.g. a field past csv's size limit; the reader goes on after it
                start = reader.line_num + 1
                yield where, None, Rejection(where, "bad_csv", None, f"not valid CSV ({e})", None)
                continue
            start = reader.line_num + 1
            bad = next((k for k, v in row.items() if isinstance(v, str) and _has_surrogates(v)), None)
            if bad is not None:
                yield where, None, Rejection(where, "not_utf8", bad, "bytes are not UTF-8",
                                             {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                              if isinstance(v, str) else v for k, v in row.items()})
                continue
            if None in row:  # more cells than header columns
                yield where, None, Rejection(where, "bad_csv", None,
                                             f"{len(row[None])} more cells than the header has columns",
                                             {k: v for k, v in row.items() if k is not None})
                continue
            yield where, row, None


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def _read_hub(source: SourceSpec) -> Iterator[Row]:
    """A Hub dataset by id, split and revision, through `datasets` (it caches downloads). A local
    folder written by `save_to_disk` is read with `load_from_disk`; any other local folder of data
    files goes through `load_dataset`, the same call a Hub id takes."""
    import datasets

    label = f"hub:{source.hub}[{source.split}]"
    local = Path(source.hub)
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            data = loaded[source.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            data = datasets.load_dataset(source.hub, source.subset, split=source.split, revision=source.revision)
    except KeyError:
        raise DataError(f"{label}: no split {source.split!r}") from None
    except Exception as e:  # datasets raises many types (not found, offline, bad revision)
        # `datasets` builds a whole split at once, so a bad row fails the source; its own error is
        # generic, the one it wraps names the row ("JSON parse error: ... in row 5").
        cause = e.__cause__ or e.__context__
        why = f"{type(e).__name__}: {e}" + (f"; {type(cause).__name__}: {cause}" if cause else "")
        raise DataError(f"{label}: cannot load ({' '.join(why.split())})") from None
    for i, row in enumerate(data, start=1):
        yield f"{label} row {i}", dict(row), None
