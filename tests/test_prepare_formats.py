"""Every supported input format becomes the same kind of pair, rendered once with the chat template;
malformed conversations are rejected with the rule, the field and the line."""

import json

import pytest

from dpoflow.base.artifacts import read_jsonl_rows, read_rows
from dpoflow.base.config import DataSpec
from dpoflow.base.records import ModelRef
from dpoflow.engine.pairs import Pair, Rejection, detect_format, to_pair
from dpoflow.tasks.prepare import prepare_data

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def prepare_rows(tiny_model, tmp_path, rows: list[dict]):
    """prepare_data on `rows` written as one JSONL file; returns (file, PreparedData)."""
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")
    return src, prepare_data([str(src)], DataSpec(sources=[str(src)], heldout_fraction=0.2), base, tmp_path / "out")


def test_explicit_conversational_and_implicit_rows_give_the_same_pair():
    explicit = {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No."}
    conversational = {"chosen": [msg(USER, "Is water wet?"), msg(ASSISTANT, "Yes.")],
                      "rejected": [msg(USER, "Is water wet?"), msg(ASSISTANT, "No.")]}
    trl_style = {"prompt": [msg(USER, "Is water wet?")], "chosen": [msg(ASSISTANT, "Yes.")],
                 "rejected": [msg(ASSISTANT, "No.")]}
    implicit = {"chosen": "\n\nHuman: Is water wet?\n\nAssistant: Yes.",
                "rejected": "\n\nHuman: Is water wet?\n\nAssistant: No."}
    expected = Pair([msg(USER, "Is water wet?")], "Yes.", "No.")
    for row, fmt in ((explicit, "explicit"), (conversational, "conversational"), (trl_style, "conversational"),
                     (implicit, "implicit")):
        assert detect_format(row) == fmt
        assert to_pair("f:1", row) == expected


def test_multi_turn_and_system_prompts_are_kept():
    history = [msg(SYSTEM, "Be brief."), msg(USER, "Hi"), msg(ASSISTANT, "Hello!"), msg(USER, "2+2?")]
    row = {"chosen": history + [msg(ASSISTANT, "4")], "rejected": history + [msg(ASSISTANT, "5")]}
    assert to_pair("f:1", row) == Pair(history, "4", "5")
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5"}
    assert to_pair("f:1", hh) == Pair(history[1:], "4", "5")


def test_column_map_renames_fields():
    row = {"question": "Q?", "good": "A", "bad": "B"}
    assert to_pair("f:1", row, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}) == \
        Pair([msg(USER, "Q?")], "A", "B")


@pytest.mark.parametrize("row, reason, field", [
    ({"chosen": [msg(USER, "q"), msg(ASSISTANT, "a")], "rejected": [msg(USER, "other"), msg(ASSISTANT, "b")]},
     "prompts_differ", "rejected"),
    ({"chosen": [msg(USER, "q"), msg(USER, "a")], "rejected": [msg(USER, "q"), msg(USER, "b")]},
     "no_assistant_turn", "chosen"),
    ({"chosen": [msg(ASSISTANT, "x"), msg(ASSISTANT, "a")], "rejected": [msg(ASSISTANT, "x"), msg(ASSISTANT, "b")]},
     "roles_out_of_order", "chosen"),
    ({"chosen": [{"role": "bot", "content": "a"}], "rejected": [msg(ASSISTANT, "b")]}, "bad_messages", "chosen"),
    ({"chosen": [msg(USER, "q"), msg(ASSISTANT, "same")], "rejected": [msg(USER, "q"), msg(ASSISTANT, "same ")]},
     "chosen_equals_rejected", "rejected"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     "prompts_differ", "rejected"),
    ({"chosen": "Assistant: no human turn\n\nAssistant: a", "rejected": "Assistant: no human turn\n\nAssistant: b"},
     "roles_out_of_order", "chosen"),
])
def test_malformed_rows_are_rejected_with_rule_and_field(row, reason, field):
    result = to_pair("data.jsonl:7", row)
    assert isinstance(result, Rejection) and (result.reason, result.field) == (reason, field)
    assert result.message().startswith(f"data.jsonl:7: field '{field}': ")


def test_mixed_formats_in_one_file_prepare_together(tiny_model, tmp_path):
    rows = []
    for i in range(30):
        rows.append({"prompt": f"explicit {i}?", "chosen": "yes", "rejected": "no"})
        rows.append({"chosen": [msg(USER, f"conv {i}?"), msg(ASSISTANT, "yes")],
                     "rejected": [msg(USER, f"conv {i}?"), msg(ASSISTANT, "no")]})
        rows.append({"chosen": f"\n\nHuman: hh {i}?\n\nAssistant: yes",
                     "rejected": f"\n\nHuman: hh {i}?\n\nAssistant: no"})
    rows.append({"chosen": [msg(USER, "q")], "rejected": [msg(USER, "q")]})
    _, out = prepare_rows(tiny_model, tmp_path, rows)
    assert out.counts["read"] == 91 and out.counts["rejected_no_assistant_turn"] == 1
    assert out.counts["train"] + out.counts["heldout"] == 90
    prompts = {r["prompt"] for r in read_rows(out.train) + read_rows(out.heldout)}
    assert "<|begin|><|user|>\nhh 3?<|end|>\n<|assistant|>\n" in prompts
    assert "<|begin|><|user|>\nconv 3?<|end|>\n<|assistant|>\n" in prompts


def test_text_is_normalized_and_duplicates_are_counted_and_kept_aside(tiny_model, tmp_path):
    from dpoflow.engine.pairs import normalize_text

    assert normalize_text("  Cafe\u0301  is\t\tnice \r\nline two  \n") == "Caf\u00e9 is nice\nline two"
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes", "rejected": "No"} for i in range(20)]
    rows += [{"prompt": "Question  3?", "chosen": " yes", "rejected": "NO "},  # normalized duplicate of row 4
             {"prompt": "Question 5?", "chosen": "Yes", "rejected": "No"},  # exact duplicate of row 6
             {"prompt": "Q?", "chosen": "same \t answer", "rejected": "same answer"}]  # equal once normalized
    src, out = prepare_rows(tiny_model, tmp_path, rows)
    assert out.counts["rejected_duplicate"] == 2 and out.counts["rejected_chosen_equals_rejected"] == 1
    assert out.counts["train"] + out.counts["heldout"] == 20
    dups = [r for r in read_jsonl_rows(out.rejected) if r["reason"] == "duplicate"]
    assert dups[0]["source"] == f"{src}:21" and dups[0]["detail"] == f"same pair as {src}:4 (after normalization)"
