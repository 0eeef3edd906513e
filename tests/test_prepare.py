import json

import pytest

from dpoflow.base.artifacts import is_intact, read_jsonl_rows, read_rows
from dpoflow.base.config import DataSpec
from dpoflow.base.records import ModelRef
from dpoflow.tasks.prepare import DataError, is_heldout, prepare_data

GOOD = {"prompt": "Is the sky blue?", "chosen": "yes", "rejected": "no"}


def lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.fixture
def base(tiny_model):
    return ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")


def many(n):
    return [{"prompt": f"question {i}?", "chosen": f"right {i}", "rejected": f"wrong {i}"} for i in range(n)]


def test_bad_rows_are_quarantined_counted_and_kept(tmp_path, base):
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(lines(*many(30), b"{not json", {"prompt": "p", "chosen": "a"},
                          {"prompt": "p", "chosen": 3, "rejected": "b"}, {"prompt": " ", "chosen": "a", "rejected": "b"},
                          {"prompt": "p", "chosen": "same ", "rejected": "same"}, b"\xff\xfe{}", b"[1, 2]"))
    out = prepare_data([str(src)], DataSpec(sources=[str(src)], heldout_fraction=0.3), base, tmp_path / "out")
    c = out.counts
    assert c["read"] == 37 and c["rejected"] == 7
    assert c["train"] + c["heldout"] + c["rejected"] == c["read"]
    rejected = read_jsonl_rows(out.rejected)
    by_reason = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], r)
    assert by_reason["bad_json"]["source"] == f"{src}:31"
    assert by_reason["missing_field"] == {"source": f"{src}:32", "reason": "missing_field", "field": "rejected",
                                          "detail": "missing", "row": {"prompt": "p", "chosen": "a"}}
    assert by_reason["bad_json"]["row"] == "{not json"  # the line as read, to fix and feed back
    assert by_reason["wrong_type"]["field"] == "chosen"
    assert by_reason["empty_field"]["field"] == "prompt"
    assert by_reason["chosen_equals_rejected"]["source"] == f"{src}:35"
    assert by_reason["not_utf8"]["source"] == f"{src}:36"
    assert sum(1 for r in rejected if r["reason"] == "bad_json") == 2
    assert is_intact(tmp_path / "out")


def test_fail_mode_names_file_line_and_field(tmp_path, base):
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(lines(GOOD, GOOD, {"prompt": "p", "rejected": "b"}))
    spec = DataSpec(sources=[str(src)], on_error="fail")
    with pytest.raises(DataError, match=rf"^{src}:3: field 'chosen': missing$"):
        prepare_data([str(src)], spec, base, tmp_path / "out")


def test_missing_and_empty_files_are_clear_errors(tmp_path, base):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        prepare_data([str(missing)], DataSpec(sources=[str(missing)]), base, tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        prepare_data([str(empty)], DataSpec(sources=[str(empty)]), base, tmp_path / "out")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: no rows"):
        prepare_data([str(blank)], DataSpec(sources=[str(blank)]), base, tmp_path / "out")


def test_rows_are_rendered_with_the_chat_template_and_eos(tmp_path, base):
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(lines(*many(40)))
    out = prepare_data([str(src)], DataSpec(sources=[str(src)], system_prompt="Be brief."), base, tmp_path / "o")
    row = read_rows(out.train)[0]
    assert row["prompt"].startswith("<|begin|><|system|>\nBe brief.<|end|>\n<|user|>\nquestion")
    assert row["prompt"].endswith("<|assistant|>\n")
    assert row["chosen"].endswith("<|end|>") and row["rejected"].endswith("<|end|>")
    assert row["source"].startswith(f"{src}:")


def test_split_is_deterministic_and_disjoint_by_prompt(tmp_path, base):
    src = tmp_path / "pairs.jsonl"
    rows = many(200)
    rows += [{"prompt": r["prompt"], "chosen": r["chosen"] + "!", "rejected": r["rejected"]} for r in rows[:50]]
    src.write_bytes(lines(*rows))
    spec = DataSpec(sources=[str(src)], heldout_fraction=0.2)
    a = prepare_data([str(src)], spec, base, tmp_path / "a")
    b = prepare_data([str(src)], spec, base, tmp_path / "b")
    assert a.digest == b.digest
    train = {r["prompt"] for r in read_rows(a.train)}
    heldout = {r["prompt"] for r in read_rows(a.heldout)}
    assert train and heldout and not train & heldout
    assert 0.1 < a.counts["heldout"] / 250 < 0.3


def test_heldout_bucket_depends_only_on_the_prompt():
    assert is_heldout("same prompt", 0.5) == is_heldout("same prompt", 0.5)
    share = sum(is_heldout(f"p{i}", 0.25) for i in range(4000)) / 4000
    assert 0.22 < share < 0.28
