"""prepare's sources: every file type and glob, Hub datasets through `datasets` (a local dataset in
tests), mixing by weight and count."""

import csv
import json

import pytest

from dpoflow.base.artifacts import read_jsonl_rows, read_rows
from dpoflow.base.config import DataSpec, SourceSpec
from dpoflow.engine.pairs import DataError
from dpoflow.base.records import ModelRef
from dpoflow.tasks.prepare import prepare_data


@pytest.fixture
def base(tiny_model):
    return ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")


def rows(n, tag="q"):
    return [{"prompt": f"{tag} question number {i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"}
            for i in range(n)]


def prepare(tmp_path, base, sources, **spec):
    specs = [s if isinstance(s, SourceSpec) else SourceSpec(path=str(s)) for s in sources]
    return prepare_data(specs, DataSpec(sources=specs, heldout_fraction=0.25, **spec), base, tmp_path / "out")


def kept(out):
    return sorted(r["prompt"] for r in read_rows(out.train) + read_rows(out.heldout))


def test_jsonl_json_parquet_csv_and_globs_give_the_same_pairs(tmp_path, base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = rows(40)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "b.json").write_text(json.dumps(data))
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "c.parquet")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(data)
    results = {name: prepare(tmp_path / f"out-{name}", base, [tmp_path / name])
               for name in ("a.jsonl", "b.json", "c.parquet", "d.csv")}
    expected = kept(results["a.jsonl"])
    assert len(expected) == 40
    for name, out in results.items():
        assert kept(out) == expected, name
    assert read_rows(results["c.parquet"].train)[0]["source"].startswith(f"{tmp_path / 'c.parquet'}:row ")
    assert read_rows(results["d.csv"].train)[0]["source"].startswith(f"{tmp_path / 'd.csv'}:")

    both = prepare(tmp_path / "glob", base, [tmp_path / "[ab].*"])
    assert both.counts["read"] == 80 and both.counts["rejected_duplicate"] == 40


def test_file_level_problems_are_errors_naming_the_file(tmp_path, base):
    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: no file matches"):
        prepare(tmp_path, base, [tmp_path / "nothing-*.jsonl"])
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "a",\n "chosen": }]')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        prepare(tmp_path, base, [bad])
    odd = tmp_path / "pairs.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        prepare(tmp_path, base, [odd])


def test_csv_rows_with_bad_bytes_or_extra_cells_are_set_aside_with_their_line(tmp_path, base):
    src = tmp_path / "pairs.csv"
    body = "prompt,chosen,rejected\n" + "".join(f"q{i}?,yes {i},no {i}\n" for i in range(20))
    src.write_bytes(body.encode() + b"caf\xe9?,yes,no\n" + b"a,b,c,d\n")
    out = prepare(tmp_path, base, [src])
    rejected = {r["reason"]: r for r in read_jsonl_rows(out.rejected)}
    assert rejected["not_utf8"]["source"] == f"{src}:22" and rejected["not_utf8"]["field"] == "prompt"
    assert rejected["bad_csv"]["source"] == f"{src}:23"
    assert out.counts["train"] + out.counts["heldout"] == 20


def test_hub_datasets_load_through_datasets_by_split(tmp_path, base):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows(30)), "test": Dataset.from_list(rows(8, "t"))}).save_to_disk(saved)
    out = prepare(tmp_path / "1", base, [SourceSpec(hub=str(saved), split="train")])
    assert out.counts["read"] == 30
    assert read_rows(out.train)[0]["source"].startswith(f"hub:{saved}[train] row ")
    # A folder of data files goes through load_dataset, the call a Hub id takes.
    files = tmp_path / "repo" / "data"
    files.mkdir(parents=True)
    Dataset.from_list(rows(12, "p")).to_parquet(files / "train-00000-of-00001.parquet")
    out = prepare(tmp_path / "2", base, [SourceSpec(hub=str(tmp_path / "repo"), split="train")])
    assert out.counts["read"] == 12
    with pytest.raises(DataError, match=r"\[nope\]: no split 'nope'|cannot load"):
        prepare(tmp_path / "3", base, [SourceSpec(hub=str(saved), split="nope")])


def test_sources_mix_by_weight_and_count_deterministically_and_say_what_was_left(tmp_path, base):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows(200, "a")))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows(100, "b")))
    mix = [SourceSpec(path=str(a), weight=0.5), SourceSpec(path=str(b), count=30)]
    out = prepare(tmp_path / "1", base, mix)
    report = json.loads(open(out.report).read())
    from_a = sum(report["sources"][str(a)]["kept"].values())
    from_b = sum(report["sources"][str(b)]["kept"].values())
    assert 80 <= from_a <= 120 and from_b == 30
    assert out.counts["rejected_sampled_out"] == 300 - from_a - from_b
    assert kept(prepare(tmp_path / "2", base, mix)) == kept(out)

    more = prepare(tmp_path / "3", base, [SourceSpec(path=str(b), count=500)])
    assert more.counts["read"] == 100 and "sampled_out" not in json.dumps(more.counts)
    assert any("count 500 asked but only 100" in w for w in json.loads(open(more.report).read())["warnings"])


def test_a_hub_dataset_with_a_hostile_row_fails_naming_the_row(tmp_path, base):
    # `datasets` builds a split as one table: a row it cannot parse fails the whole source. The error
    # is one line that says which row, not its generic "error while generating the dataset" alone.
    repo = tmp_path / "repo"
    repo.mkdir()
    lines = [json.dumps(r) for r in rows(5)] + ['{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}']
    (repo / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"cannot load \(.*surrogate.* in row 5\)$"):
        prepare(tmp_path, base, [SourceSpec(hub=str(repo), split="train")])


def test_parquet_strings_that_are_not_utf8_reject_their_own_row(tmp_path, base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow writers need not check that a string column holds UTF-8; `view` skips the check as they do.
    data = rows(30)
    prompts = [r["prompt"].encode() for r in data]
    prompts[7] = b"caf\xe9?"
    table = pa.table({"prompt": pa.array(prompts, pa.binary()).view(pa.string()),
                      "chosen": [r["chosen"] for r in data], "rejected": [r["rejected"] for r in data]})
    pq.write_table(table, tmp_path / "d.parquet")
    out = prepare(tmp_path, base, [tmp_path / "d.parquet"])
    [bad] = read_jsonl_rows(out.rejected)
    assert (bad["source"], bad["reason"], bad["field"]) == (f"{tmp_path / 'd.parquet'}:row 8", "not_utf8", "prompt")
    assert out.counts["train"] + out.counts["heldout"] == 29
