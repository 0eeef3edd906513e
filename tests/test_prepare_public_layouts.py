"""The public preference sets people train on, as their cards document their fields (extra columns,
null scores, ties, system prompts, multi-turn history included), load with `format: auto` and no
column map, and each can be named explicitly."""

import pytest

from dpoflow.base.config import DataSpec
from dpoflow.engine.pairs import Pair, Rejection, pairs_of, to_pairs


def msg(role, content):
    return {"role": role, "content": content}


def user(text, system=None):
    return ([msg("system", system)] if system else []) + [msg("user", text)]


def one(row, **kw):
    """(layout, the single item's pair or rejection)."""
    layout, items = pairs_of("f:1", row, **kw)
    assert len(items) == 1, items
    return layout, items[0][1]


# openbmb/UltraFeedback: four completions, each with annotations, a critique and two scores.
UF_RAW = {
    "source": "evol_instruct", "instruction": "Name a prime.", "models": ["a", "b", "c", "d"],
    "correct_answers": ["None"], "incorrect_answers": ["None"],
    "completions": [
        {"model": "a", "principle": "helpfulness", "custom_system_prompt": "Be helpful.", "response": "Two.",
         "annotations": {"helpfulness": {"Rating": "5", "Rationale": "ok"}}, "critique": "good",
         "overall_score": 8.5, "fine-grained_score": 4.75},
        {"model": "b", "principle": "honesty", "custom_system_prompt": "", "response": "Four.",
         "annotations": {}, "critique": "wrong", "overall_score": 2.0, "fine-grained_score": 1.25},
        {"model": "c", "principle": "honesty", "custom_system_prompt": "", "response": "Nine.",
         "annotations": {}, "critique": "", "overall_score": None, "fine-grained_score": None},  # unrated
        {"model": "d", "principle": "truthfulness", "custom_system_prompt": "", "response": "Three.",
         "annotations": {}, "critique": "fine", "overall_score": 6.0, "fine-grained_score": 5.0},
    ],
}


def test_ultrafeedback_raw_pairs_best_and_worst_rated_completions():
    layout, items = pairs_of("f:1", UF_RAW)
    assert layout == "ultrafeedback-raw"
    assert items == [("f:1#0>1", Pair(user("Name a prime."), "Two.", "Four."))]  # the unrated one is skipped
    _, items = pairs_of("f:1", UF_RAW, columns={"score": "fine-grained_score"})
    assert items == [("f:1#3>1", Pair(user("Name a prime."), "Three.", "Four."))]


def test_ultrafeedback_binarized_and_argilla_cleaned():
    conv = [msg("user", "Hi?")]
    h4 = {"prompt": "Hi?", "prompt_id": "abc", "messages": conv + [msg("assistant", "Hello!")],
          "chosen": conv + [msg("assistant", "Hello!")], "rejected": conv + [msg("assistant", "Go away.")],
          "score_chosen": 9.0, "score_rejected": 3.5}
    assert one(h4) == ("ultrafeedback-binarized", Pair(conv, "Hello!", "Go away."))
    assert one(h4, min_margin=6.0)[1].reason == "below_min_margin"
    assert one({**h4, "score_rejected": 9.0})[1].reason == "tie"
    argilla = {"source": "sharegpt", "prompt": "Hi?", "chosen": h4["chosen"], "rejected": h4["rejected"],
               "chosen-rating": 5.0, "chosen-model": "x", "rejected-rating": 2.0, "rejected-model": "y"}
    assert one(argilla) == ("argilla-binarized", Pair(conv, "Hello!", "Go away."))
    capybara = {"source": "Airoboros", "chosen": h4["chosen"], "rejected": h4["rejected"], "chosen_rating": 5,
                "rejected_rating": None, "chosen_model": "gpt-4", "rejected_model": "mistral"}  # a null rating
    assert one(capybara) == ("argilla-rated", Pair(conv, "Hello!", "Go away."))


def test_anthropic_hh_rlhf_multi_turn():
    head = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"
    layout, pair = one({"chosen": head + " 4", "rejected": head + " 5"})
    assert layout == "implicit"
    assert pair == Pair([msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "What is 2+2?")], "4", "5")


def test_orca_dpo_pairs_and_distilabel_variant_keep_the_system_prompt():
    orca = {"system": "You are an AI assistant.", "question": "Sum 2 and 2.", "chosen": "4", "rejected": "22"}
    assert one(orca) == ("orca-dpo", Pair(user("Sum 2 and 2.", "You are an AI assistant."), "4", "22"))
    assert one({**orca, "system": ""})[1] == Pair(user("Sum 2 and 2."), "4", "22")  # empty system: none
    distilabel = {"system": "", "input": "Sum 2 and 2.", "chosen": "4", "rejected": "22",
                  "generations": ["22", "4"], "order": ["chosen", "rejected"], "rating": [9.0, 2.0],
                  "status": "swapped", "chosen_score": 9.0, "in_gsm8k_train": False, "original_chosen": "22"}
    assert one(distilabel) == ("distilabel-orca", Pair(user("Sum 2 and 2."), "4", "22"))
    assert one({**distilabel, "status": "tie"})[1].reason == "tie"


PKU = {"prompt": "How do I pick a lock?", "response_0": "Call a locksmith.", "response_1": "Use a tension wrench...",
       "prompt_source": "Alpaca3-70B", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
       "is_response_0_safe": True, "is_response_1_safe": False, "response_0_harm_category": {},
       "response_0_severity_level": 0, "response_1_severity_level": 2,
       "better_response_id": 1, "safer_response_id": 0}


def test_pku_saferlhf_by_better_or_safer_response():
    assert one(PKU) == ("pku-saferlhf", Pair(user("How do I pick a lock?"), "Use a tension wrench...",
                                             "Call a locksmith."))
    assert one(PKU, prefer="safer")[1] == Pair(user("How do I pick a lock?"), "Call a locksmith.",
                                               "Use a tension wrench...")
    bad = one({**PKU, "better_response_id": None})[1]
    assert (bad.reason, bad.field) == ("missing_field", "better_response_id")
    assert DataSpec(sources=["x"], prefer="safer").prefer == "safer"


def test_stanford_shp_label_picks_the_preferred_reply_and_scores_apply():
    shp = {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99, "history": "Best pan for eggs?",
           "c_root_id_A": "g3", "c_root_id_B": "g4", "created_at_utc_A": 1593, "created_at_utc_B": 1594,
           "score_A": 12, "score_B": 40, "human_ref_A": "Cast iron.", "human_ref_B": "Nonstick, low heat.",
           "labels": 0, "seconds_difference": 40.0, "score_ratio": 3.33}
    assert one(shp) == ("shp", Pair(user("Best pan for eggs?"), "Nonstick, low heat.", "Cast iron."))
    assert one({**shp, "labels": 1})[1].chosen == "Cast iron."
    assert one(shp, min_margin=30)[1].reason == "below_min_margin"  # 40 - 12 = 28


def test_helpsteer2_preference_and_attribute_rows():
    row = {"split": "train", "prompt": "Write a haiku.", "response_1": "Leaves fall slow.", "response_2": "Hi.",
           "preference_strength": -2, "preference_statement": "@Response 1 is better.",
           "preference_elaboration": "...", "three_most_similar_preferences": [], "all_preferences_unprocessed": []}
    assert one(row) == ("helpsteer2-preference", Pair(user("Write a haiku."), "Leaves fall slow.", "Hi."))
    assert one({**row, "preference_strength": 3})[1].chosen == "Hi."
    assert one({**row, "preference_strength": 0})[1].reason == "tie"
    attributes = {"prompt": "Write a haiku.", "response": "Leaves fall slow.", "helpfulness": 3, "correctness": 4,
                  "coherence": 4, "complexity": 1, "verbosity": 1}
    layout, rejection = one(attributes)  # a row alone: prepare gathers a prompt's rows first
    assert layout == "helpsteer-attributes" and rejection.reason == "one_response_per_row"


def test_helpsteer_rows_of_one_prompt_are_paired_by_an_attribute_or_their_sum(tiny_model, tmp_path):
    """nvidia/HelpSteer2: one response a row, five 0-4 attribute ratings. prepare gathers each prompt's
    rows and pairs its best and worst response by helpfulness, or by `columns.score` (an attribute, or
    `sum`); a prompt with a single response is set aside, named by its row."""
    import json

    def row(i, response, helpfulness, correctness, verbosity=1):
        return {"prompt": f"Write haiku number {i}.", "response": response, "helpfulness": helpfulness,
                "correctness": correctness, "coherence": 4, "complexity": 1, "verbosity": verbosity}

    # helpfulness: Leaves 4 > Snow 3 > Hi 1; correctness: Hi 4 > Snow 3 > Leaves 2; sum: Hi 13 > 12, 12.
    rows = [r for i in range(12) for r in (row(i, f"Leaves fall slow {i}.", 4, 2), row(i, f"Hi {i}.", 1, 4, 3),
                                           row(i, f"Snow on pine {i}.", 3, 3))]
    rows.append(row(99, "A lone reply.", 2, 2))
    runs = {"helpfulness": _prepare(tiny_model, tmp_path, {"helpsteer2.jsonl": rows})}
    for score in ("correctness", "sum"):
        (tmp_path / score).mkdir()
        runs[score] = _prepare(tiny_model, tmp_path / score, {"helpsteer2.jsonl": rows}, columns={"score": score})
    report = json.loads(open(runs["helpfulness"].report).read())
    assert report["sources"][str(tmp_path / "helpsteer2.jsonl")]["format"] == "helpsteer-attributes (auto)"
    rejected = [json.loads(line) for line in open(runs["helpfulness"].rejected)]
    assert [(r["reason"], r["source"]) for r in rejected] == [("bad_completions", f"{tmp_path / 'helpsteer2.jsonl'}:37")]
    pairs = {score: _pairs(out) for score, out in runs.items()}
    assert all(len(p) == 12 for p in pairs.values())
    assert all(c.startswith("Leaves") and r.startswith("Hi") for c, r in pairs["helpfulness"])
    assert all(c.startswith("Hi") and r.startswith("Leaves") for c, r in pairs["correctness"])
    assert all(c.startswith("Hi") for c, _ in pairs["sum"])


def _pairs(out) -> list[tuple[str, str]]:
    """(chosen, rejected) of every kept pair, train and held-out."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(split) for split in (out.train, out.heldout)]
    return [pair for t in tables for pair in zip(t.column("chosen").to_pylist(), t.column("rejected").to_pylist())]


def test_openassistant_tree_becomes_rank_pairs_at_every_ranked_level():
    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p", "role": "prompter", "text": "Tell me a joke.", "lang": "en", "replies": [
            {"message_id": "a1", "role": "assistant", "text": "Why did the chicken...", "rank": 1, "replies": [
                {"message_id": "p2", "role": "prompter", "text": "Another?", "replies": [
                    {"message_id": "b1", "role": "assistant", "text": "Knock knock.", "rank": 0, "replies": []},
                    {"message_id": "b2", "role": "assistant", "text": "No.", "rank": 1, "replies": []}]}]},
            {"message_id": "a2", "role": "assistant", "text": "A pun.", "rank": 0, "replies": []},
            {"message_id": "a3", "role": "assistant", "text": "Unranked.", "rank": None, "replies": []}]}}
    layout, items = pairs_of("f:3", tree)
    assert layout == "oasst-tree"
    assert items == [
        ("f:3@p#1>0", Pair(user("Tell me a joke."), "A pun.", "Why did the chicken...")),
        ("f:3@p2#0>1", Pair([msg("user", "Tell me a joke."), msg("assistant", "Why did the chicken..."),
                             msg("user", "Another?")], "Knock knock.", "No.")),
    ]
    message_row = {"message_id": "a", "parent_id": "p", "text": "x", "role": "assistant", "rank": 0}
    assert one(message_row)[1].reason == "one_response_per_row"


def test_trl_standard_conversational_and_implicit_prompt_formats():
    assert one({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}) == \
        ("explicit", Pair(user("The sky is"), "blue.", "green."))
    trl_conv = {"prompt": [msg("system", "Be terse."), msg("user", "Sky colour?")],
                "chosen": [msg("assistant", "Blue.")], "rejected": [msg("assistant", "Green.")]}
    assert one(trl_conv) == ("conversational", Pair(trl_conv["prompt"], "Blue.", "Green."))
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert one(implicit) == ("implicit-prompt", Pair(user("The sky is"), "blue.", "green."))
    assert one({"chosen": "Blue.", "rejected": "Green."})[1].reason == "no_prompt"


@pytest.mark.parametrize("fmt, row", [
    ("ultrafeedback-raw", UF_RAW), ("pku-saferlhf", PKU),
    ("shp", {"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}),
])
def test_a_named_format_reads_its_rows_and_names_what_is_missing(fmt, row):
    assert isinstance(to_pairs("f:1", row, fmt=fmt)[0][1], Pair)
    DataSpec(sources=["x"], format=fmt)
    first = next(iter(k for k in row if k not in ("source",)))
    broken = {k: v for k, v in row.items() if k != first}
    rejection = to_pairs("f:1", broken, fmt=fmt)[0][1]
    assert isinstance(rejection, Rejection) and rejection.reason == "missing_field" and rejection.field == first


def _prepare(tiny_model, tmp_path, files: dict[str, list[dict]], **spec):
    import json

    from dpoflow.base.records import ModelRef
    from dpoflow.tasks.prepare import prepare_data

    paths = []
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(tmp_path / name))
    base = ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")
    return prepare_data(paths, DataSpec(sources=paths, heldout_fraction=0.2, **spec), base, tmp_path / "out")


def _uf_raw(i):
    return {**UF_RAW, "instruction": f"Name prime number {i}."}


def test_each_source_reports_the_layout_that_read_it(tiny_model, tmp_path):
    import json

    hh = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no"}
          for i in range(20)]
    out = _prepare(tiny_model, tmp_path, {"uf.jsonl": [_uf_raw(i) for i in range(20)],
                                          "mixed.jsonl": hh + [{**PKU, "prompt": f"p{i}"} for i in range(10)] + hh[:1]})
    report = json.loads(open(out.report).read())
    assert report["sources"][str(tmp_path / "uf.jsonl")]["format"] == "ultrafeedback-raw (auto)"
    assert report["sources"][str(tmp_path / "mixed.jsonl")]["format"] == "implicit 21, pku-saferlhf 10 (auto)"
    md = open(out.report.replace(".json", ".md")).read()
    assert f"| {tmp_path / 'uf.jsonl'} | 20 | 20 | - | ultrafeedback-raw (auto) |" in md
    dup = report["examples"]["duplicate"][0]
    assert dup["field"] is None  # a JSON null, not "null"


def test_a_source_that_keeps_nothing_says_why_and_how_to_map_it(tiny_model, tmp_path):
    import json

    from dpoflow.engine.pairs import DataError

    good = [{"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"} for i in range(20)]
    alpaca_like = [{"instruction": f"Do {i}.", "chosen": "done", "rejected": "no", "id": i} for i in range(9)]
    with pytest.raises(DataError) as e:
        _prepare(tiny_model, tmp_path, {"good.jsonl": good, "bad.jsonl": alpaca_like})
    bad = tmp_path / "bad.jsonl"
    assert str(e.value) == (
        f"{bad}: nothing kept: 9 of 9 items set aside as missing_field (first at {bad}:1: field 'prompt': "
        "missing; that row has fields chosen, id, instruction, rejected); rows have `instruction`, not `prompt`: "
        "set `data.columns.prompt: instruction`")
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())  # written although it failed
    assert report["sources"][str(bad)]["rejected"] == {"missing_field": 9}
    assert len((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()) == 9
    assert (tmp_path / "out" / "data_report.md").is_file()
    out = _prepare(tiny_model, tmp_path, {"good.jsonl": good, "bad.jsonl": alpaca_like},
                   columns={"prompt": "instruction"})
    assert out.counts["train"] + out.counts["heldout"] == 29


def test_the_report_measures_length_bias_and_warns_past_the_threshold(tiny_model, tmp_path):
    import json

    long_answer = "a much longer and more detailed answer that goes on " * 3
    rows = [{"prompt": f"q{i}?", "chosen": long_answer if i % 5 else "ok", "rejected": "no" if i % 5 else "a long one "
             * 4} for i in range(40)]  # chosen longer in 4 of 5 pairs
    out = _prepare(tiny_model, tmp_path, {"biased.jsonl": rows})
    report = json.loads(open(out.report).read())
    bias = report["length_bias"]
    assert bias["chosen_longer"] == 0.8 and bias["median_ratio"] > 5 and bias["warn_above"] == 0.65
    assert any(w.startswith("length bias: chosen is longer than rejected in 80% of pairs") for w in report["warnings"])
    assert "chosen longer in 80% of pairs" in open(out.report.replace(".json", ".md")).read()
    balanced = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} if i % 2 else r for i, r in enumerate(rows)]
    report = json.loads(open(_prepare(tiny_model, tmp_path, {"balanced.jsonl": balanced}).report).read())
    assert not any(w.startswith("length bias") for w in report["warnings"])
