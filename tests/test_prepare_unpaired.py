"""Unpaired feedback rows (prompt, completion, label) through prepare, as a user brings them beside or
instead of pairs: read in every file type, labels in the spellings feedback tools write, the same
cleaning, split, decontamination and counts as pairs, and every bad row set aside with file:line, the
field and why, never a crash."""

import json

import pytest

from dpoflow.base.artifacts import read_jsonl_rows, read_rows
from dpoflow.base.config import DataSpec, DecontaminationSpec
from dpoflow.engine.examples import examples_of
from dpoflow.engine.pairs import DataError, Pair, Rejection
from dpoflow.base.records import ModelRef
from dpoflow.tasks.prepare import prepare_data
from dpoflow.engine.unpaired import Unpaired, parse_label


@pytest.fixture
def base(tiny_model):
    return ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")


def _prepare(base, tmp_path, *files, **spec):
    spec = DataSpec(sources=[str(f) for f in files], heldout_fraction=0.25,
                    decontamination=DecontaminationSpec(enabled=False), **spec)
    return prepare_data([str(f) for f in files], spec, base, tmp_path / "out")


def _feedback(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question number {i}: is {i} even?", "completion": "yes" if i % 2 == 0 else "no",
             "label": i % 3 != 0} for i in range(start, start + n)]


def _jsonl(path, rows) -> object:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("value, label", [
    (True, True), (False, False), (1, True), (0, False), ("true", True), ("False", False), ("1", True),
    ("0", False), ("yes", True), ("thumbs_up", True), ("THUMBS_DOWN", False), ("\U0001F44D", True),
    ("\U0001F44E\U0001F3FD", False), ("maybe", None), (2, None), (None, None), ("", None), ([True], None),
])
def test_labels_in_the_spellings_feedback_tools_write(value, label):
    assert parse_label(value) is label


def test_a_row_is_read_as_a_pair_or_an_unpaired_example_by_its_fields():
    layout, [(_, example)] = examples_of("f:1", {"prompt": "Q?", "completion": " A ", "label": "👍"})
    assert layout == "unpaired" and example == Unpaired([{"role": "user", "content": "Q?"}], "A", True)
    messages = {"prompt": [{"role": "user", "content": "Q?"}],
                "completion": [{"role": "assistant", "content": "A"}], "label": False}
    assert examples_of("f:2", messages)[1][0][1] == Unpaired([{"role": "user", "content": "Q?"}], "A", False)
    assert examples_of("f:3", {"prompt": "Q?", "chosen": "A", "rejected": "B"})[1][0][1] == \
        Pair([{"role": "user", "content": "Q?"}], "A", "B")
    # data.columns maps other names, as for pairs.
    mapped = examples_of("f:4", {"question": "Q?", "response": "A", "thumbs_up": 1},
                         columns={"prompt": "question", "completion": "response", "label": "thumbs_up"})
    assert mapped[1][0][1] == Unpaired([{"role": "user", "content": "Q?"}], "A", True)


def test_unpaired_rows_are_cleaned_split_and_counted_like_pairs(base, tmp_path):
    rows = _feedback(40)
    src = _jsonl(tmp_path / "feedback.jsonl", rows + [rows[3]])  # a duplicate
    data = _prepare(base, tmp_path, src, system_prompt="Be brief.")
    train, heldout = read_rows(data.train_unpaired), read_rows(data.heldout_unpaired)
    assert len(train) + len(heldout) == 40 and train and heldout
    assert read_rows(data.train) == [] and read_rows(data.heldout) == []  # no pair: empty pair files
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}  # split by prompt
    first = train[0]
    assert first["prompt"].startswith("<|begin|><|system|>\nBe brief.") and first["completion"].endswith("<|end|>")
    assert isinstance(first["label"], bool)
    c = data.counts
    assert (c["train"], c["heldout"]) == (c["train_unpaired"], c["heldout_unpaired"]) == (len(train), len(heldout))
    assert (c["desirable"], c["undesirable"]) == (sum(r["label"] for r in rows), sum(not r["label"] for r in rows))
    assert c["read"] == 41 and c["rejected_duplicate"] == 1
    report = (tmp_path / "out" / "data_report.md").read_text()
    assert f"Unpaired examples (for dpo.method kto): {c['desirable']} desirable, {c['undesirable']} undesirable" \
        in report
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"][str(src)]["format"] == \
        "unpaired (auto)"


def test_hostile_unpaired_rows_are_quarantined_with_file_line_and_field(base, tmp_path):
    hostile = [
        {"prompt": "What is 1+1?", "completion": "2"},                     # line 21: no label
        {"prompt": "What is 1+2?", "completion": "3", "label": "maybe"},   # 22
        {"prompt": "What is 1+3?", "completion": "   ", "label": True},    # 23: empty once normalized
        {"prompt": "What is 1+4?", "label": False},                        # 24: no completion
        {"prompt": "What is 1+5?", "completion": 5, "label": True},        # 25: not text
        {"question": "What is 1+6?", "answer": "7"},                       # 26: neither shape
        '{"prompt": "What is 1+7?", "completion": "8", "label": tru',      # 27: bad JSON
        {"prompt": "What is 1+8?", "completion": "9", "label": True, "chosen": "9"},  # 28: half a pair
    ]
    src = _jsonl(tmp_path / "mixed.jsonl", _feedback(20) + hostile)
    data = _prepare(base, tmp_path, src)
    rejected = {r["source"]: r for r in read_jsonl_rows(tmp_path / "out" / "rejected.jsonl")}
    expected = {21: ("missing_field", "label"), 22: ("bad_label", "label"), 23: ("empty_field", "completion"),
                24: ("missing_field", "completion"), 25: ("wrong_type", "completion"),
                26: ("unknown_format", None), 27: ("bad_json", None), 28: ("missing_field", "rejected")}
    for line, (reason, field) in expected.items():
        got = rejected[f"{src}:{line}"]
        assert (got["reason"], got["field"]) == (reason, field), got
    assert "got \"maybe\"" in rejected[f"{src}:22"]["detail"]
    assert "or unpaired feedback (prompt/completion/label); got fields answer, question" in \
        rejected[f"{src}:26"]["detail"]
    assert data.counts["rejected"] == len(hostile) and data.counts["read"] == 20 + len(hostile)


def test_a_bom_d_csv_of_feedback_is_read_and_its_bad_rows_set_aside(base, tmp_path):
    src = tmp_path / "feedback.csv"
    lines = ["prompt,completion,label"] + [f"Is {i} even?,{'yes' if i % 2 == 0 else 'no'},{['true', '0', 'yes'][i % 3]}"
                                           for i in range(24)]
    lines += ["Is 99 even?,no,maybe", "Is 98 even?,,1", "Is 97 even?,no,"]
    src.write_bytes("\ufeff".encode() + "\r\n".join(lines).encode() + b"\r\n")
    data = _prepare(base, tmp_path, src)
    assert data.counts["train"] + data.counts["heldout"] == 24  # the BOM is no part of the `prompt` column name
    rejected = {r["source"]: (r["reason"], r["field"]) for r in read_jsonl_rows(tmp_path / "out" / "rejected.jsonl")}
    assert rejected == {f"{src}:26": ("bad_label", "label"), f"{src}:27": ("empty_field", "completion"),
                        f"{src}:28": ("bad_label", "label")}


def test_a_file_mixing_pairs_and_feedback_keeps_both_and_names_both_layouts(base, tmp_path):
    pairs = [{"prompt": f"Pair question {i}?", "chosen": "good", "rejected": "bad"} for i in range(12)]
    src = _jsonl(tmp_path / "mixed.jsonl", pairs + _feedback(12))
    data = _prepare(base, tmp_path, src)
    c = data.counts
    assert len(read_rows(data.train)) + len(read_rows(data.heldout)) == 12
    assert c["train_unpaired"] + c["heldout_unpaired"] == 12 and c["train"] + c["heldout"] == 24
    layout = json.loads((tmp_path / "out" / "data_report.json").read_text())["sources"][str(src)]["format"]
    assert layout == "explicit 12, unpaired 12 (auto)"


def test_feedback_overlapping_a_heldout_prompt_is_decontaminated(base, tmp_path):
    text = "please tell me whether the following long review of the old hotel by the lake is positive"
    copies = [{"prompt": f"{text} ({i})", "completion": "yes", "label": True} for i in range(16)]
    src = _jsonl(tmp_path / "feedback.jsonl", _feedback(24) + copies)
    data = prepare_data([str(src)], DataSpec(sources=[str(src)], heldout_fraction=0.25), base, tmp_path / "out")
    rejected = [r for r in read_jsonl_rows(tmp_path / "out" / "rejected.jsonl") if r["reason"] == "contaminated"]
    # 16 prompts share the n-gram, under the 20 of a template: a train copy of a held-out one is set aside.
    assert rejected and all(text in r["row"]["prompt"] for r in rejected)
    kept = read_rows(data.train_unpaired)
    assert not any(text in r["prompt"] for r in kept)


def test_fail_mode_stops_at_the_first_bad_feedback_row_naming_file_line_and_field(base, tmp_path):
    src = _jsonl(tmp_path / "feedback.jsonl", _feedback(3) + [{"prompt": "Q?", "completion": "A", "label": "meh"}])
    with pytest.raises(DataError, match=rf"{src}:4: field 'label': expected true/false"):
        _prepare(base, tmp_path, src, on_error="fail")


def test_a_rejection_is_a_rejection_not_an_example():
    assert isinstance(examples_of("f:1", {"prompt": "", "completion": "A", "label": True})[1][0][1], Rejection)
