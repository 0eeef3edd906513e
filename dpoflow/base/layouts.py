"""The row layouts `format: auto` recognises: one table, most specific first, each entry the fields that
identify it and how a row of it becomes one of the four shapes `pairs` turns into pairs:

- explicit: prompt/chosen/rejected strings (optional score_chosen/score_rejected);
- conversational: chosen/rejected message lists (whole conversations, or TRL's prompt list + one answer);
- implicit: two HH-RLHF transcripts sharing everything before the last assistant turn;
- scored: a prompt (string or messages) and several completions with scores.

Layouts come from the public datasets' cards (UltraFeedback, HH-RLHF, Intel/orca_dpo_pairs and argilla's
distilabel sets, PKU-SafeRLHF, Stanford SHP, HelpSteer2, OpenAssistant trees, TRL's dataset formats).
HelpSteer's attribute-scored rows hold one response each: `grouped_by_prompt` gathers a source's rows of
one prompt into one row first, which is then paired like scored completions. OpenAssistant's message rows
(one message each) are recognised so that the rejection says what to do, not "unknown format".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


class Unusable(ValueError):
    """A row of a known layout that makes no pair: (reason, field, detail) for the rejection."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


@dataclass(frozen=True)
class Layout:
    name: str
    shape: str  # what `convert` returns: explicit | conversational | implicit | scored (a list of rows) | unpaired
    fields: tuple[str, ...]  # all present in a row of this layout
    test: Callable[[dict], bool] = lambda row: True  # a further look at the values, for auto detection
    convert: Callable[[dict, str], dict | list[tuple[str, dict]]] = lambda row, prefer: row
    about: str = ""


def _is(kind, *fields):
    return lambda row: all(isinstance(row.get(f), kind) for f in fields)


def _user(text: str, system=None) -> list[dict]:
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [{"role": "user", "content": text}]


def _one_answer(prompt_field: str):
    """Orca-style rows: a system prompt (often empty), a question and two answer strings."""
    def convert(row: dict, prefer: str) -> dict:
        if row.get("status") == "tie":  # argilla's distilabel relabelling marks pairs its judge rated equal
            raise Unusable("tie", "status", "the pair is marked a tie (status: tie)")
        if not isinstance(row[prompt_field], str):
            raise Unusable("wrong_type", prompt_field, f"expected a string, got {type(row[prompt_field]).__name__}")
        return {"prompt": _user(row[prompt_field], row.get("system")),
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    return convert


def _rated(chosen_key: str, rejected_key: str):
    """Binarized rows whose two ratings sit beside them: kept as score_chosen/score_rejected (min_margin
    applies), and equal ratings set aside as a tie (no preference to learn)."""
    def convert(row: dict, prefer: str) -> dict:
        scores = row.get(chosen_key), row.get(rejected_key)
        if all(_number(s) for s in scores) and scores[0] == scores[1]:
            raise Unusable("tie", rejected_key, f"{chosen_key} and {rejected_key} are equal ({scores[0]:g})")
        return {**row, "score_chosen": scores[0], "score_rejected": scores[1]}
    return convert


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pku(row: dict, prefer: str) -> dict:
    field = f"{prefer}_response_id"
    best = row.get(field)
    if best not in (0, 1) or isinstance(best, bool):
        raise Unusable("missing_field" if best is None else "wrong_type", field, "expected 0 or 1")
    return {"prompt": row["prompt"], "chosen": row[f"response_{best}"], "rejected": row[f"response_{1 - best}"]}


def _shp(row: dict, prefer: str) -> dict:
    label = row["labels"]
    if label not in (0, 1) or isinstance(label, bool):
        raise Unusable("wrong_type", "labels", "expected 1 (A preferred) or 0 (B preferred)")
    a, b = ("A", "B") if label == 1 else ("B", "A")
    return {"prompt": row["history"], "chosen": row[f"human_ref_{a}"], "rejected": row[f"human_ref_{b}"],
            "score_chosen": row.get(f"score_{a}"), "score_rejected": row.get(f"score_{b}")}


def _helpsteer2_preference(row: dict, prefer: str) -> dict:
    strength = row["preference_strength"]  # -3..3: below 0 prefers response_1, above 0 response_2
    if not _number(strength):
        raise Unusable("wrong_type", "preference_strength", "expected a number from -3 to 3")
    if strength == 0:
        raise Unusable("tie", "preference_strength", "0: neither response is preferred")
    chosen, rejected = ("response_1", "response_2") if strength < 0 else ("response_2", "response_1")
    return {"prompt": row["prompt"], "chosen": row[chosen], "rejected": row[rejected],
            "score_chosen": abs(strength), "score_rejected": 0}


def _oasst_tree(row: dict, prefer: str) -> list[tuple[str, dict]]:
    """Every prompter message with two or more ranked assistant replies, as a scored row: the
    conversation down to it, and its replies scored by rank (0 is best)."""
    found: list[tuple[str, dict]] = []
    stack = [(row["prompt"], [])]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("text"), str):
            continue
        turns = path + [{"role": "user" if node.get("role") == "prompter" else "assistant", "content": node["text"]}]
        replies = [r for r in node.get("replies") or [] if isinstance(r, dict)]
        ranked = [r for r in replies if r.get("role") == "assistant" and _number(r.get("rank"))
                  and isinstance(r.get("text"), str)]
        if turns[-1]["role"] == "user" and len(ranked) >= 2:
            found.append((f"@{node.get('message_id', len(found))}",
                          {"prompt": turns, "completions": [{"response": r["text"], "score": -r["rank"]}
                                                            for r in ranked]}))
        stack += [(r, turns) for r in reversed(replies)]
    if not found:
        raise Unusable("no_ranked_replies", "prompt", "no prompter message with two or more ranked assistant replies")
    return found


def _needs_grouping(how: str):
    def convert(row: dict, prefer: str):
        raise Unusable("one_response_per_row", None, how)
    return convert


def _helpsteer(row: dict, prefer: str) -> list[tuple[str, dict]]:
    """A prompt's responses (gathered by `grouped_by_prompt`) as scored completions: scored by
    helpfulness, or by another attribute or their `sum` with `data.columns.score`."""
    if "responses" not in row:
        raise Unusable("one_response_per_row", None, "a HelpSteer row holds one response; prepare pairs the rows "
                                                     "that share a prompt")
    completions = []
    for response in row["responses"]:
        scores = {a: response[a] for a in HELPSTEER_ATTRIBUTES if _number(response.get(a))}
        total = sum(scores.values()) if len(scores) == len(HELPSTEER_ATTRIBUTES) else None
        completions.append({"response": response.get("response"), "score": scores.get("helpfulness"),
                            **scores, "sum": total})
    return [("", {"prompt": row["prompt"], "completions": completions})]


def grouped_by_prompt(rows: Iterable[tuple[str, object, object]], fmt: str) -> Iterator[tuple[str, object, object]]:
    """A source's (where, row, rejection) triples, with HelpSteer rows (one response each) gathered into
    one row per prompt, {prompt, responses}, yielded after the other rows at the first row's place."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for where, row, rejection in rows:
        if (rejection is None and fmt in ("auto", "helpsteer-attributes") and isinstance(row, dict)
                and all(f in row for f in HELPSTEER_FIELDS)):
            groups.setdefault(json.dumps(row["prompt"], sort_keys=True, default=str), []).append((where, row))
            continue
        yield where, row, rejection
    for members in groups.values():
        where, first = members[0]
        if len(members) > 1:
            where += f" (+{len(members) - 1} rows with this prompt)"
        yield where, {"prompt": first["prompt"], "responses": [row for _, row in members]}, None


def _implicit_prompt(row: dict, prefer: str) -> dict:
    """TRL's implicit-prompt standard rows: the prompt is what chosen and rejected share, cut at a word
    boundary (as TRL's extract_prompt does)."""
    chosen, rejected = row["chosen"], row["rejected"]
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
    if cut <= 0:
        raise Unusable("no_prompt", "chosen", "no prompt: 'chosen' and 'rejected' share no leading words")
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPSTEER_FIELDS = ("prompt", "response", "helpfulness")

LAYOUTS: tuple[Layout, ...] = (
    Layout("ultrafeedback-raw", "scored", ("instruction", "completions"), _is(list, "completions"),
           lambda row, prefer: [("", {"prompt": row["instruction"], "completions": row["completions"]})],
           "openbmb/UltraFeedback: instruction + completions[].response/overall_score (data.columns.score: "
           "fine-grained_score for the mean of the aspect ratings)"),
    Layout("oasst-tree", "scored", ("prompt",), lambda row: isinstance(row.get("prompt"), dict), _oasst_tree,
           "OpenAssistant trees (one tree a row): prompt {text, role, replies: [{text, role, rank, replies}]}"),
    Layout("scored", "scored", ("prompt", "completions"), lambda row: "chosen" not in row,
           lambda row, prefer: [("", row)], "a prompt and completions [{response, score}]"),
    Layout("pku-saferlhf", "explicit", ("prompt", "response_0", "response_1", "better_response_id"), convert=_pku,
           about="PKU-Alignment/PKU-SafeRLHF: response_0/1 and better_response_id (data.prefer: safer for "
                 "safer_response_id)"),
    Layout("shp", "explicit", ("history", "human_ref_A", "human_ref_B", "labels"), convert=_shp,
           about="stanfordnlp/SHP: history, human_ref_A/B, labels (1: A preferred), score_A/B"),
    Layout("helpsteer2-preference", "explicit", ("prompt", "response_1", "response_2", "preference_strength"),
           convert=_helpsteer2_preference,
           about="nvidia/HelpSteer2 preference: response_1/2 and preference_strength (-3..3; 0 is a tie)"),
    Layout("helpsteer-attributes", "scored", ("prompt",),
           lambda row: isinstance(row.get("responses"), list) or all(f in row for f in HELPSTEER_FIELDS), _helpsteer,
           "nvidia/HelpSteer(2): one response a row with helpfulness, correctness, ...; a prompt's rows are paired "
           "by helpfulness (data.columns.score: another attribute, or sum)"),
    Layout("oasst-messages", "explicit", ("message_id", "parent_id", "text", "role"),
           convert=_needs_grouping("OpenAssistant message rows hold one message each; use the trees export "
                                   "(one tree a row), which is read as oasst-tree"),
           about="OpenAssistant message rows (not pairable row by row)"),
    Layout("ultrafeedback-binarized", "conversational", ("chosen", "rejected", "score_chosen", "score_rejected"),
           _is(list, "chosen", "rejected"), _rated("score_chosen", "score_rejected"),
           "HuggingFaceH4/ultrafeedback_binarized: prompt, chosen/rejected conversations, score_chosen/rejected"),
    Layout("argilla-binarized", "conversational", ("chosen", "rejected", "chosen-rating", "rejected-rating"),
           _is(list, "chosen", "rejected"), _rated("chosen-rating", "rejected-rating"),
           "argilla/ultrafeedback-binarized-preferences-cleaned: chosen/rejected conversations, chosen-/rejected-rating"),
    Layout("argilla-rated", "conversational", ("chosen", "rejected", "chosen_rating", "rejected_rating"),
           _is(list, "chosen", "rejected"), _rated("chosen_rating", "rejected_rating"),
           "argilla's distilabel sets (capybara, dpo-mix): chosen/rejected conversations, chosen_/rejected_rating"),
    Layout("orca-dpo", "conversational", ("question", "chosen", "rejected"), _is(str, "chosen", "rejected"),
           _one_answer("question"), "Intel/orca_dpo_pairs: system, question, chosen, rejected"),
    Layout("distilabel-orca", "conversational", ("input", "chosen", "rejected"), _is(str, "chosen", "rejected"),
           _one_answer("input"), "argilla/distilabel-intel-orca-dpo-pairs: system, input, chosen, rejected (status: "
                                 "tie set aside)"),
    # Not a pair: one answer and its thumbs-up/down (dpoflow.engine.unpaired; dpoflow.engine.examples reads it). A row that
    # also has chosen or rejected is read as a pair (a label column beside a pair is just an extra column).
    Layout("unpaired", "unpaired", ("prompt", "completion", "label"),
           lambda row: not {"chosen", "rejected"} & row.keys(),
           about="unpaired feedback: prompt, completion, label (true/false, 1/0, thumbs_up/thumbs_down): for "
                 "dpo.method kto"),
    Layout("conversational", "conversational", ("chosen", "rejected"),
           lambda row: isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list),
           about="TRL conversational: chosen/rejected message lists, with or without a prompt list"),
    Layout("explicit", "explicit", ("prompt", "chosen", "rejected"), about="TRL standard: prompt/chosen/rejected"),
    Layout("implicit", "implicit", ("chosen", "rejected"),
           lambda row: isinstance(row.get("chosen"), str) and "\n\nAssistant:" in row["chosen"],
           about="Anthropic/hh-rlhf: two transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...')"),
    # Not when the row has a column that looks like a prompt under another name: more likely that than this.
    Layout("implicit-prompt", "explicit", ("chosen", "rejected"),
           lambda row: _is(str, "chosen", "rejected")(row) and not any(k in row for k in SYNONYMS["prompt"]),
           _implicit_prompt,
           "TRL implicit-prompt standard: chosen/rejected strings that start with the same prompt"),
)
BY_NAME = {layout.name: layout for layout in LAYOUTS}
NAMES = tuple(BY_NAME)


def detect(row: dict) -> Layout | None:
    """The first layout whose fields the row has and whose values fit; None when none does."""
    for layout in LAYOUTS:
        if all(f in row for f in layout.fields) and layout.test(row):
            return layout
    return None


# Column names public sets use for the canonical fields: when a row misses one of these, the error says
# which `data.columns` entry would map it.
SYNONYMS = {
    "prompt": ("instruction", "question", "input", "query", "history", "context", "text"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "better", "good", "accepted", "winner"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "worse", "bad", "loser"),
    "completion": ("response", "output", "answer", "generation"),
    "label": ("thumbs_up", "feedback", "liked", "is_good"),
}


def column_hint(field: str | None, row) -> str | None:
    """"rows have `instruction`, not `prompt`: set `data.columns.prompt: instruction`" when exactly one
    known alternative name for the missing field is in the row."""
    if not isinstance(row, dict) or field not in SYNONYMS or field in row:
        return None
    found = [name for name in SYNONYMS[field] if name in row]
    if len(found) != 1:
        return None
    return f"rows have `{found[0]}`, not `{field}`: set `data.columns.{field}: {found[0]}`"
