"""answers + judge: is the tuned model's generated answer better than the start model's?

1. `answers`: the start model answers the judged prompts (the first `limit` held-out prompts, plus an
   optional prompts file). Keyed by the start model, the data and the generation settings only, so a
   sweep generates them once.
2. `judge`: the tuned model (start + adapter) answers the same prompts with the same settings, and the
   judge compares each pair in both orders (dpoflow.engine.judging). Writes pairs.jsonl (every answer and
   verdict), judge.json (the figures), judge.md and samples.md (best wins, worst losses).
The gate's judge thresholds are applied by the flow to the cached figures, so changing them re-judges
nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpoflow.engine import generation, judging, tiny_reward
from dpoflow.base.artifacts import folder_digest, fresh_dir, read_rows, seal, write_jsonl
from dpoflow.base.config import JudgeSpec
from dpoflow.engine.models import hub_commit, load_model, load_tokenizer, plain_float32
from dpoflow.engine.pairs import DataError
from dpoflow.base.records import Answers, JudgeReport, ModelRef, PreparedData, TrainedAdapter
from dpoflow.base.redact import redact_text

from . import stage_logger, stage_task


class JudgeError(DataError):
    """Judge input that cannot be used (a bad prompts file row, a missing Secret block): one line."""


def settings(spec: JudgeSpec) -> generation.GenerationSettings:
    return generation.GenerationSettings(spec.max_new_tokens, spec.temperature, spec.top_p, spec.seed,
                                         spec.batch_size)


def read_prompts_file(path: str) -> list[str]:
    """Plain questions from a JSONL file of {prompt: ...} rows; a bad row stops with file:line and why."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise JudgeError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise JudgeError(f"{path}:{n}: field 'prompt': expected a non-empty string")
            questions.append(row["prompt"])
    if not questions:
        raise JudgeError(f"{path}: no prompts")
    return questions


def judged_prompts(data: PreparedData, spec: JudgeSpec, tokenizer) -> list[dict]:
    """[{question (plain text, for the judge), prompt (rendered, for the models), source}]."""
    prompts = heldout_prompts(data)
    prompts = prompts[:spec.limit] if spec.limit else prompts
    items = [{"question": generation.plain_question(tokenizer, prompt), "prompt": prompt, "source": "held-out"}
             for prompt in prompts]
    if spec.prompts_file:
        items += [{"question": q, "prompt": generation.render_question(tokenizer, q),
                   "source": Path(spec.prompts_file).name} for q in read_prompts_file(spec.prompts_file)]
    return items


def heldout_prompts(data: PreparedData) -> list[str]:
    """The held-out pairs' prompts (one per pair), then the held-out unpaired examples' prompts not among them
    (once each: several feedback rows may share a prompt)."""
    prompts = [r["prompt"] for r in read_rows(data.heldout)]
    if data.heldout_unpaired:
        seen = set(prompts)
        prompts += [p for p in dict.fromkeys(r["prompt"] for r in read_rows(data.heldout_unpaired)) if p not in seen]
    return prompts


def reward_pairs(data: PreparedData) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) texts the built-in reward model learns from: the train pairs, and for unpaired
    data, a desirable and an undesirable completion of the same prompt (the first of each)."""
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in read_rows(data.train)]
    if data.train_unpaired:
        by_prompt: dict[str, dict[bool, str]] = {}
        for r in read_rows(data.train_unpaired):
            by_prompt.setdefault(r["prompt"], {}).setdefault(bool(r["label"]), r["completion"])
        pairs += [(prompt, found[True], found[False]) for prompt, found in by_prompt.items() if len(found) == 2]
    if not pairs:
        raise JudgeError(f"evaluate.judge.model {tiny_reward.NAME} learns from pairs, and the training data has "
                         "none: its unpaired examples never answer one prompt both ways. Name another reward model "
                         "or endpoint, or set evaluate.judge.enabled: false")
    return pairs


def answer_with_start_model(start: ModelRef, data: PreparedData, spec: JudgeSpec, out_dir: Path) -> Answers:
    fresh_dir(out_dir)
    tokenizer = load_tokenizer(start.path, padding_side="left")
    items = judged_prompts(data, spec, tokenizer)
    model = load_model(start.path, "float32").to(generation.device())
    answers = generation.generate(model, tokenizer, [i["prompt"] for i in items], settings(spec))
    write_jsonl(out_dir / "answers.jsonl", [{**i, **a} for i, a in zip(items, answers)])
    return Answers(path=str(out_dir), digest=seal(out_dir), file=str(out_dir / "answers.jsonl"), count=len(items))


def api_key(spec: JudgeSpec) -> str | None:
    """From a Prefect Secret block when `api_key_secret` names one, else the `api_key_env` variable; handed
    to the HTTP client only."""
    if spec.api_key_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(spec.api_key_secret).get()
        except ValueError:
            raise JudgeError(f"evaluate.judge.api_key_secret: no Prefect Secret block named "
                             f"{redact_text(spec.api_key_secret)!r}") from None
    return os.environ.get(spec.api_key_env) if spec.api_key_env else None


def judge_name(spec: JudgeSpec) -> str:
    if spec.kind == "openai":
        return redact_text(f"chat model {spec.model or '(server default)'} at {spec.url}")
    return f"reward model {Path(spec.model).name if Path(spec.model).is_absolute() else spec.model}"


def make_judge(spec: JudgeSpec, data: PreparedData, start: ModelRef, out_dir: Path, log):
    if spec.kind == "openai":
        return judging.OpenAIJudge(spec.url, spec.model, api_key(spec), seed=spec.seed,
                                   timeout=spec.timeout_seconds, max_attempts=spec.max_attempts,
                                   extra_body=spec.extra_body)
    path = spec.model
    if spec.model == tiny_reward.NAME:
        tokenizer = load_tokenizer(start.path)

        def plain(text):  # an answer as the judge sees generated ones: special tokens (EOS) dropped
            return tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True).strip()

        pairs = [(generation.plain_question(tokenizer, prompt), plain(better), plain(worse))
                 for prompt, better, worse in reward_pairs(data)]
        path = str(tiny_reward.build_tiny_reward_model(pairs, out_dir / "reward_model", generation.device(), log))
    return judging.RewardModelJudge(path, generation.device(), spec.batch_size)


def judge_key_inputs(spec: JudgeSpec, data: PreparedData) -> dict:
    """What identifies the judge: the endpoint and model name, or the reward model's content (the built-in
    one is trained on the run's data)."""
    if spec.kind == "openai":
        return {"url": spec.url, "model": spec.model, "extra_body": spec.extra_body}
    if spec.model == tiny_reward.NAME:
        return {"builtin": spec.model, "data": data.digest}
    if Path(spec.model).is_absolute():
        return {"local_digest": folder_digest(Path(spec.model))}
    return {"hub": spec.model, "commit": hub_commit(spec.model, None)}


def judge_tuned_model(adapter: TrainedAdapter, data: PreparedData, answers: Answers, spec: JudgeSpec,
                      out_dir: Path) -> JudgeReport:
    from peft import PeftModel

    log = stage_logger()
    fresh_dir(out_dir)
    start = adapter.start
    items = read_rows(answers.file)
    tokenizer = load_tokenizer(start.path, padding_side="left")
    model = PeftModel.from_pretrained(load_model(start.path, "float32"), adapter.path).to(generation.device())
    tuned = generation.generate(model, tokenizer, [i["prompt"] for i in items], settings(spec))
    del model
    judge = make_judge(spec, data, start, out_dir, log)
    if isinstance(judge, judging.RewardModelJudge):  # every answer scored in batches up front
        judge.score_all([(i["question"], a) for i, t in zip(items, tuned) for a in (i["answer"], t["answer"])])
    rows, verdicts = [], []
    for item, t in zip(items, tuned):
        v = judging.judge_pair(judge, item["question"], item["answer"], t["answer"])
        verdicts.append(v)
        margin = None
        if isinstance(judge, judging.RewardModelJudge):
            s, u = judge.score_all([(item["question"], item["answer"]), (item["question"], t["answer"])])
            margin = u - s
        rows.append({"question": item["question"], "source": item["source"], "start": item["answer"],
                     "tuned": t["answer"], "start_tokens": item["tokens"], "tuned_tokens": t["tokens"],
                     "outcome": v.outcome, "tuned_first": v.tuned_first, "start_first": v.start_first,
                     "margin": margin, **({"judge_said": v.raw} if v.raw else {})})
    figures = judging.summarize(verdicts, [r["start_tokens"] for r in rows], [r["tuned_tokens"] for r in rows])
    name = judge_name(spec)
    log(f"judge: win rate {figures['win_rate']:.3f}, length-controlled {figures['lc_win_rate']:.3f} "
        f"({figures['wins']} wins, {figures['ties']} ties, {figures['losses']} losses; "
        f"{figures['unparseable']} unreadable judge answers)")
    write_jsonl(out_dir / "pairs.jsonl", rows)
    (out_dir / "judge.json").write_text(json.dumps({"judge": name, **figures}, indent=1))
    (out_dir / "judge.md").write_text(redact_text("# Judged: tuned model vs start model\n\n"
                                                  + judging.figures_markdown(figures, name)))
    (out_dir / "samples.md").write_text(redact_text(judging.samples_markdown(rows)))
    return JudgeReport(path=str(out_dir), digest=seal(out_dir), judge=name, figures=figures)


def answers_spec(spec: JudgeSpec) -> JudgeSpec:
    """The part of a judge spec the answers depend on, the rest at its defaults: what the answers task is
    given, so runs that differ only in the judge share the start model's answers."""
    return JudgeSpec(**spec.model_dump(include={"prompts_file", "limit", "max_new_tokens", "temperature", "top_p",
                                                "seed", "batch_size"}))


def judge_identity(inputs: dict) -> dict:
    """What the judge's verdicts depend on beyond the arguments: which judge it is (`judge_key_inputs`)."""
    return {"judge": judge_key_inputs(inputs["spec"], inputs["data"])}


@stage_task(stage="answers")
def start_answers_task(out_dir: str, start: ModelRef, data: PreparedData, spec: JudgeSpec) -> Answers:
    with plain_float32():
        return answer_with_start_model(start, data, spec, Path(out_dir))


@stage_task(depends_on=judge_identity)
def judge_task(out_dir: str, adapter: TrainedAdapter, data: PreparedData, answers: Answers,
               spec: JudgeSpec) -> JudgeReport:
    with plain_float32():
        return judge_tuned_model(adapter, data, answers, spec, Path(out_dir))
