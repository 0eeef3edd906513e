"""prepare's cleaning rules beyond single rows: scored completions, score margins, max_length with
the pipeline's tokenizer, decontamination, the data report, and the count invariant (property test)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.base.artifacts import read_jsonl_rows, read_rows
from dpoflow.base.config import DataSpec, DecontaminationSpec
from dpoflow.engine.forgetting import EVALS_DIR
from dpoflow.engine.pairs import DataError, to_pairs
from dpoflow.base.records import ModelRef
from dpoflow.tasks.prepare import prepare_data


@pytest.fixture(scope="module")
def base(tiny_model):
    return ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")


def write(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def filler(n, tag="q"):
    return [{"prompt": f"{tag} filler question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def test_scored_completions_pair_best_vs_worst_or_all_pairs_past_the_margin():
    row = {"prompt": "Name a colour.", "completions": [
        {"response": "Blue.", "overall_score": 9}, {"response": "Bleu?", "overall_score": 4},
        {"response": "Seven.", "overall_score": 1}]}
    [(where, pair)] = to_pairs("f:1", row)
    assert (pair.chosen, pair.rejected, where) == ("Blue.", "Seven.", "f:1#0>2")
    every = to_pairs("f:1", row, pairing="all", min_margin=4)
    assert [(p.chosen, p.rejected) for _, p in every] == [("Blue.", "Bleu?"), ("Blue.", "Seven.")]
    tied = {"prompt": "x", "completions": [{"text": "a", "rating": 3}, {"text": "b", "rating": 3}]}
    [(_, rejection)] = to_pairs("f:2", tied)
    assert rejection.reason == "below_min_margin"
    custom = {"instruction": "hi", "answers": [{"out": "A", "s": 2}, {"out": "B", "s": 1}]}
    [(_, pair)] = to_pairs("f:3", custom, columns={"prompt": "instruction", "completions": "answers",
                                                   "response": "out", "score": "s"})
    assert (pair.messages[-1]["content"], pair.chosen, pair.rejected) == ("hi", "A", "B")
    [(_, bad)] = to_pairs("f:4", {"prompt": "x", "completions": [{"response": "a"}, {"response": "b"}]})
    assert (bad.reason, bad.detail) == ("bad_completions", "completion 0: no numeric score")


def test_min_margin_applies_to_binarized_scores_too():
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 7.0, "score_rejected": 6.5}
    assert to_pairs("f:1", row, min_margin=1.0)[0][1].reason == "below_min_margin"
    assert to_pairs("f:1", row, min_margin=0.5)[0][1].chosen == "a"


def test_unrecognized_rows_are_set_aside_naming_their_fields():
    [(_, rejection)] = to_pairs("f:9", {"question": "q", "answer": "a"})
    assert rejection.reason == "unknown_format" and "got fields answer, question" in rejection.detail


def test_pairs_over_max_length_are_set_aside_with_token_counts(tmp_path, base):
    long_prompt = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}
    long_answer = {"prompt": "short?", "chosen": "yes " * 100, "rejected": "no"}
    src = write(tmp_path / "d.jsonl", filler(30) + [long_prompt, long_answer])
    out = prepare_data([str(src)], DataSpec(sources=[str(src)]), base, tmp_path / "out", max_length=64)
    reasons = {r["reason"]: r for r in read_jsonl_rows(out.rejected)}
    assert reasons["prompt_too_long"]["source"] == f"{src}:31"
    assert reasons["pair_too_long"]["field"] == "chosen" and "max_length is 64" in reasons["pair_too_long"]["detail"]
    kept = read_rows(out.train) + read_rows(out.heldout)
    assert len(kept) == 30
    keep_all = prepare_data([str(src)], DataSpec(sources=[str(src)], drop_over_max_length=False), base,
                            tmp_path / "out2", max_length=64)
    assert keep_all.counts["rejected"] == 0


def test_train_prompts_sharing_an_ngram_with_eval_items_are_dropped(tmp_path, base):
    passage = json.loads((EVALS_DIR / "reading.jsonl").read_text().splitlines()[0])["passage"]
    leaked = {"prompt": f"Summarize: {passage}", "chosen": "A summary.", "rejected": "No."}
    src = write(tmp_path / "d.jsonl", filler(60) + [leaked])
    spec = DataSpec(sources=[str(src)], heldout_fraction=0.2)
    out = prepare_data([str(src)], spec, base, tmp_path / "out", eval_tasks=("dpoflow_reading", "hellaswag"))
    [hit] = [r for r in read_jsonl_rows(out.rejected) if r["reason"] == "contaminated"]
    assert hit["source"] == f"{src}:61" and "dpoflow_reading #1" in hit["detail"]
    report = json.loads(open(out.report).read())
    assert report["decontamination"]["checked_against"] == ["held-out split", "dpoflow_reading"]
    assert any("hellaswag" in w for w in report["warnings"])
    off = prepare_data([str(src)], spec.model_copy(update={"decontamination": DecontaminationSpec(enabled=False)}),
                       base,
                       tmp_path / "off", eval_tasks=("dpoflow_reading",))
    assert off.counts["rejected"] == 0


def test_near_copies_of_heldout_prompts_are_dropped_but_shared_templates_are_not(tmp_path, base):
    template = "You are a careful assistant. Read the question below and answer it in one short sentence please."
    rows = [{"prompt": f"{template}\nQuestion {i}: what is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"{2 * i + 1}."} for i in range(80)]
    src = write(tmp_path / "d.jsonl", rows)
    spec = DataSpec(sources=[str(src)], heldout_fraction=0.2)
    out = prepare_data([str(src)], spec, base, tmp_path / "out")
    assert out.counts["rejected"] == 0  # the instruction is in every prompt: template text, not a leak
    heldout = read_rows(out.heldout)[0]
    question = heldout["prompt"].split("Question ")[1].split("<|end|>")[0]
    # Copies of a held-out prompt with a few words added: whichever land in train must go.
    copies = [{"prompt": f"{template}\nQuestion {question} Thanks, {n}!", "chosen": "ok", "rejected": "no"}
              for n in ("Ann", "Bob", "Cy", "Di", "Ed", "Flo")]
    src2 = write(tmp_path / "d2.jsonl", rows + copies)
    out2 = prepare_data([str(src2)], spec.model_copy(update={"sources": [str(src2)]}), base, tmp_path / "out2")
    hits = read_jsonl_rows(out2.rejected)
    assert hits and {h["reason"] for h in hits} == {"contaminated"}
    line = heldout["source"].rsplit(":", 1)[1]
    assert all(int(h["source"].rsplit(":", 1)[1]) > 80 and h["detail"].endswith(f"{src2}:{line}") for h in hits)
    assert len(hits) == sum(1 for r in read_rows(out2.train) + hits if "Thanks" in r.get("prompt", "")
                            or "Thanks" in str(r.get("row", "")))


def test_the_report_counts_every_rule_with_examples_and_draws_the_lengths(tmp_path, base):
    src = write(tmp_path / "d.jsonl", filler(40) + ["{broken\n", {"prompt": "p", "chosen": "same", "rejected": "same"}]
                + filler(3))
    out = prepare_data([str(src)], DataSpec(sources=[str(src)]), base, tmp_path / "out", max_length=128)
    report = json.loads(open(out.report).read())
    assert report["counts"]["read"] == 45
    assert report["sources"][str(src)]["rejected"] == {"bad_json": 1, "chosen_equals_rejected": 1, "duplicate": 3}
    assert report["examples"]["duplicate"][0]["source"] == f"{src}:43"
    assert report["token_lengths"]["prompt"]["max"] > report["token_lengths"]["chosen"]["max"] > 0
    assert (tmp_path / "out" / "data_report.png").stat().st_size > 2000
    md = (tmp_path / "out" / "data_report.md").read_text()
    assert "45 items read" in md and "| duplicate" not in md and "duplicate 3" in md


# Lines that once crashed the stage (a tokenizer TypeError, a UnicodeEncodeError writing rejected.jsonl,
# a RecursionError, Python's int digit limit), as (line, rule, field, detail).
HOSTILE = [
    ('{"prompt": "\\ud800 lone", "chosen": "a", "rejected": "b"}', "not_utf8", "prompt",
     "lone surrogate \\ud800: not valid Unicode text"),
    ("[" * 100_000, "bad_json", None, "nested too deeply to decode"),
    ('{"prompt": "big", "chosen": "a", "rejected": "b", "id": ' + "9" * 5000 + "}", "bad_json", "id",
     "a number of 5000 digits (at most 100)"),
    ('{"prompt": "s", "completions": [{"response": "a", "score": 1' + "0" * 400 + '}, {"response": "b", "score": 1}]}',
     "bad_json", "completions", "a number of 401 digits (at most 100)"),
    ('{"prompt": "deep", "chosen": "a", "rejected": "b", "meta": ' + "[" * 40 + "]" * 40 + "}", "bad_json", "meta",
     "nested more than 32 levels deep"),
]


good_rows = st.builds(lambda i, j: {"prompt": f"question {i}?", "chosen": f"answer {j}", "rejected": f"other {j}"},
                      st.integers(0, 30), st.integers(0, 3))
bad_rows = st.sampled_from([
    "{not json\n", b"\xff\xfe\n", "[1, 2]\n", {"prompt": "p"}, {"prompt": 1, "chosen": "a", "rejected": "b"},
    {"prompt": "p", "chosen": " ", "rejected": "b"}, {"prompt": "p", "chosen": "x", "rejected": "x"},
    {"chosen": [{"role": "user", "content": "u"}], "rejected": [{"role": "assistant", "content": "a"}]},
    {"prompt": "p", "completions": [{"response": "a", "score": 2}, {"response": "b", "score": 1},
                                    {"response": "c", "score": 0}]},
    {"something": "else"}, "\n", *(h[0] + "\n" for h in HOSTILE)])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(good_rows, good_rows, bad_rows), min_size=1, max_size=60),
       st.sampled_from(["best_vs_worst", "all"]))
def test_every_item_read_is_kept_or_set_aside_exactly_once(tmp_path_factory, base, rows, pairing):
    tmp = tmp_path_factory.mktemp("prop")
    src = tmp / "d.jsonl"
    src.write_bytes(b"".join(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r) + "\n")
                             .encode() for r in rows))
    spec = DataSpec(sources=[str(src)], heldout_fraction=0.3, pairing=pairing)
    try:
        out = prepare_data([str(src)], spec, base, tmp / "out", max_length=64)
    except Exception as e:  # too few usable rows for both splits: a clear error, never a silent loss
        assert "split is empty" in str(e) or "no rows" in str(e) or "nothing kept" in str(e)
        return
    c = out.counts
    kept = len(read_rows(out.train)) + len(read_rows(out.heldout))
    assert (c["train"] + c["heldout"], len(read_jsonl_rows(out.rejected))) == (kept, c["rejected"])
    assert kept + c["rejected"] == c["read"]
    assert c["rejected"] == sum(n for k, n in c.items() if k.startswith("rejected_"))


def test_hostile_lines_are_set_aside_with_file_line_and_rule(tmp_path, base):
    good = [json.dumps(r) for r in filler(30)]
    src = tmp_path / "d.jsonl"
    # A BOM (some editors write one) is encoding: the first line is a good row, not bad JSON.
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(good[:10] + [h[0] for h in HOSTILE] + good[10:]).encode() + b"\n")
    out = prepare_data([str(src)], DataSpec(sources=[str(src)]), base, tmp_path / "out")
    assert (out.counts["read"], out.counts["train"] + out.counts["heldout"], out.counts["rejected"]) == (35, 30, 5)
    assert (out.counts["rejected_not_utf8"], out.counts["rejected_bad_json"]) == (1, 4)
    rejected = [json.loads(line) for line in open(out.rejected, encoding="utf-8")]
    assert [(r["source"], r["reason"], r["field"], r["detail"]) for r in rejected] == [
        (f"{src}:{11 + i}", rule, field, detail) for i, (_, rule, field, detail) in enumerate(HOSTILE)]
    # The quarantined row is written back as it was read: the lone surrogate as JSON's escape.
    assert rejected[0]["row"]["prompt"] == "\ud800 lone"
    report = json.loads(open(out.report, encoding="utf-8").read())
    assert report["sources"][str(src)]["rejected"] == {"not_utf8": 1, "bad_json": 4}

    with pytest.raises(DataError, match=f"^{src}:11: field 'prompt': lone surrogate"):
        prepare_data([str(src)], DataSpec(sources=[str(src)], on_error="fail"), base, tmp_path / "out-fail")


def test_json_lists_and_excel_csv_files_meet_the_same_checks(tmp_path, base):
    rows = filler(30)
    hostile = [{"prompt": "\ud800", "chosen": "a", "rejected": "b"},
               {"prompt": "n", "chosen": "a", "rejected": "b", "id": 10 ** 200},
               {"prompt": "deep", "chosen": "a", "rejected": "b", "meta": json.loads("[" * 40 + "]" * 40)}]
    src = tmp_path / "d.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[:10] + hostile + rows[10:]).encode())
    out = prepare_data([str(src)], DataSpec(sources=[str(src)]), base, tmp_path / "out")
    rejected = [json.loads(line) for line in open(out.rejected, encoding="utf-8")]
    assert [(r["source"], r["reason"], r["field"]) for r in rejected] == [
        (f"{src}:row 11", "not_utf8", "prompt"), (f"{src}:row 12", "bad_json", "id"),
        (f"{src}:row 13", "bad_json", "meta")]
    assert out.counts["train"] + out.counts["heldout"] == 30
    # One JSON document: a row its decoder cannot finish leaves nothing to read; a one-line error says so.
    src.write_text("[" + json.dumps(rows[0]) + ", " + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(DataError, match=f"^{src}: nested too deeply to decode"):
        prepare_data([str(src)], DataSpec(sources=[str(src)]), base, tmp_path / "out")

    # Excel writes CSV with a BOM; csv refuses a field past its size limit, and goes on after it.
    csv_file = tmp_path / "excel.csv"
    lines = ["prompt,chosen,rejected"] + [f"{r['prompt']},{r['chosen']},{r['rejected']}" for r in rows]
    lines.insert(5, "huge," + "x" * 200_000 + ",b")
    csv_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    out = prepare_data([str(csv_file)], DataSpec(sources=[str(csv_file)]), base, tmp_path / "out-csv")
    assert out.counts["read"] == 31 and out.counts["train"] + out.counts["heldout"] == 30
    [bad] = read_jsonl_rows(out.rejected)
    assert (bad["source"], bad["reason"]) == (f"{csv_file}:6", "bad_csv") and "field limit" in bad["detail"]


def test_prompt_and_answer_must_tokenize_at_a_clean_seam(tiny_model):
    """A prompt cut mid-word merges with its answer's first tokens: the trainer would move the prompt's
    end. Such a pair is set aside; a clean boundary (the template's turn end) passes."""
    from dpoflow.engine.cleaning import token_lengths
    from dpoflow.engine.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    (_, cut), (lengths, clean) = token_lengths(tokenizer, [
        {"prompt": "The answer is po", "chosen": "sitive", "rejected": " negative"},
        {"prompt": "<|user|>\nhi<|end|>\n<|assistant|>\n", "chosen": "yes<|end|>", "rejected": "no<|end|>"}])
    assert cut[:2] == ("template_seam", "chosen") and clean is None and lengths == (7, 3, 3)


def test_a_template_that_renders_the_answered_conversation_differently_is_caught(tiny_model, tmp_path):
    """The prompt rendered alone must be how the template renders it inside the whole conversation: here
    a template that puts BOS again before an answered conversation's last user turn (as some do with
    system prompts) sets every pair aside as template_round_trip, counted in the report."""
    import json
    import shutil

    from dpoflow.base.config import DataSpec
    from dpoflow.base.records import ModelRef
    from dpoflow.tasks.prepare import prepare_data

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    template = model / "chat_template.jinja"  # where transformers saves a tokenizer's template
    template.write_text("{% if messages[-1]['role'] == 'assistant' %}{{ bos_token }}{% endif %}" + template.read_text())
    rows = [{"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ModelRef(path=str(model), digest="x", source="local", role="base")
    spec = DataSpec(sources=[str(tmp_path / "d.jsonl")], heldout_fraction=0.2)
    with pytest.raises(Exception, match="template_round_trip"):
        prepare_data([str(tmp_path / "d.jsonl")], spec, base, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["examples"]["template_round_trip"][0]["field"] == "prompt"
    assert json.dumps(report).count("template_round_trip") >= 1
