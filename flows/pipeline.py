"""The pipeline flow: which stages run, in what order, and what feeds what.

model -> prepare -> [sft] -> dpo -> evaluate -> export -> card -> [publish] (dpo trains with the objective
`dpo.method` names; ORPO trains the SFT term itself, so sft does not run with it). Each stage is a Prefect task
cached under a key derived from the arguments it is called with: records by content digest, config
sections by their fields, plus its code (dpoflow.base.cache); a cache hit whose output folder is missing or
altered on disk is refreshed instead of trusted.
"""

from __future__ import annotations

import base64
import inspect
import json
import shutil
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from prefect import Task, flow, get_run_logger
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_table_artifact)
from prefect.runtime import flow_run

from dpoflow.engine import forgetting, judging, modelcard, sources
from dpoflow.base.artifacts import is_intact, json_digest
from dpoflow.engine.backends import activate, choose_backend
from dpoflow.base.cache import StageInputs, Workspace
from dpoflow.base.config import PipelineConfig
from dpoflow.base.errors import Explained
from dpoflow.base.hardware import TrainingPlan, plan_stage
from dpoflow.engine.model_reuse import ModelKeeper
from dpoflow.base.redact import redact, redact_flow_parameters, redact_text
from dpoflow.base.records import (Artifact, DataSource, EvalReport, Exports, JudgeReport, ModelRef, PreparedData,
                             Published, ReferenceLogps, TrainedAdapter)
from dpoflow.base.runtime import set_cpu_threads
from dpoflow.base.summary import StageRow, key_metric, markdown, rows_as_dicts
from dpoflow.engine.tracking import TrackedRun, TrackerRef, curve_to_send, open_run, replay
from dpoflow.tasks import stage_policy
from dpoflow.tasks.dpo import dpo_task, reference_spec, reference_task
from dpoflow.tasks.evaluate import apply_gate, evaluate_task, start_scores_task, write_gate_report
from dpoflow.tasks.export import export_task
from dpoflow.tasks.judge import answers_spec, judge_task, start_answers_task
from dpoflow.tasks.model import model_task
from dpoflow.tasks.prepare import prepare_task
from dpoflow.tasks.publish import card_config, card_task, publish_task
from dpoflow.tasks.sft import sft_task

R = TypeVar("R")
T = TypeVar("T")


class StageRunner:
    """Runs stage tasks and records what ran, what came from cache, and how long.

    A stage's key is derived from the arguments it is called with (its task's cache policy,
    dpoflow.base.cache.StageInputs); the runner asks that policy for the key first, because the key names
    the stage's output folder and its lock, and a cache hit whose folder is missing or altered on disk
    is run again (`refresh_cache`) instead of trusted."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.rows: list[StageRow] = []
        self.outputs: dict[str, str] = {}
        self.failed: tuple[str, Path] | None = None  # (stage, its output folder) of a stage that raised

    def __call__(self, task: Task[..., R], **arguments: Any) -> R:
        policy, key, material = stage_key(task, arguments)
        stage = policy.stage
        self.workspace.save_key_material(stage, key, material)  # lets `dpoflow explain` say what changed
        out_dir = self.workspace.stage_dir(stage, key)
        if "checkpoint_dir" in inspect.signature(task.fn).parameters:
            arguments["checkpoint_dir"] = str(self.workspace.checkpoints(stage, key))
        started = time.perf_counter()
        with self.workspace.stage_lock(stage, key):
            state = task.with_options(
                cache_policy=policy,  # the policy with this call's `depends_on` answer, not asked again
                result_storage=self.workspace.results,
                refresh_cache=not is_intact(out_dir),
            )(out_dir=str(out_dir), **arguments, return_state=True)
        if state.is_failed():
            self.failed = (stage, out_dir)
        record = state.result()  # raises the stage's own error if it failed
        status = "cached" if state.name == "Cached" else "ran"
        self.rows.append(StageRow(stage, status, time.perf_counter() - started, key_metric(record), str(out_dir),
                                  key))
        self.outputs[stage] = str(out_dir)
        return record

    def derive(self, fn: Callable[..., T], *args: Any) -> T:
        """A plain step on stage outputs (the gate's verdict): run here and now."""
        return fn(*args)


def stage_key(task, arguments: dict[str, Any]) -> tuple[StageInputs, str, dict[str, Any]]:
    """(the task's cache policy for this call, the stage's key, the material the key is the digest of)
    for `task` called with `arguments` (defaults filled in, as Prefect fills them in)."""
    bound = inspect.signature(task.fn).bind_partial(**arguments)
    bound.apply_defaults()
    inputs = dict(bound.arguments)
    policy = stage_policy(task).resolved(inputs)
    material = policy.material(inputs)
    return policy, json_digest(material), material


class GateBlocked(RuntimeError, Explained):
    """The forgetting check failed in enforce mode: nothing is exported or published."""

    def __init__(self, outputs: Outputs):
        self.outputs = outputs
        super().__init__("forgetting check failed, export skipped: " + "; ".join(outputs.gate.failures)
                         + " (table: forgetting.md in the run folder)")


@dataclass
class Trained:
    """What the training half of the pipeline produced: the input of the evaluation and release half."""

    base: ModelRef
    data: PreparedData
    sources: list[DataSource]
    start: ModelRef  # the model DPO started from: the SFT model, or the base
    reference: ReferenceLogps | None
    adapter: TrainedAdapter
    plans: dict[str, TrainingPlan]


@dataclass
class Outputs(Trained):
    """The records one pass over the pipeline produced (or, for `explain`, will produce)."""

    report: EvalReport | None = None  # None: evaluate.enabled is off
    gate: forgetting.GateResult | None = None
    exports: Exports | None = None  # None: the gate stopped the run before export
    card: Artifact | None = None
    published: Published | None = None
    judged: JudgeReport | None = None  # None: evaluate.judge is off


class Runner(Protocol):
    """What the wiring needs of whoever carries the stages out: the flow's StageRunner runs them,
    `explain` forecasts them."""

    def __call__(self, task: Task[..., R], **arguments: Any) -> R: ...

    def derive(self, fn: Callable[..., T], *args: Any) -> T: ...


PlanFor = Callable[[Any, ModelRef], TrainingPlan | None]


def compose(config: PipelineConfig, run: Runner, plan_for: PlanFor, tracker: TrackerRef | None = None) -> Outputs:
    """The stages, their order and what feeds what: the one place the pipeline is wired. `run` runs
    (or looks up) a stage; `plan_for(spec, model)` is the hardware plan; `tracker`: the tracked run the
    training stages send their curves to."""
    with ModelKeeper() as keeper:  # the reference pass and the dpo stage share one loaded model
        trained = compose_training(config, run, plan_for, keeper, tracker)
    return compose_release(config, run, trained)


def compose_training(config: PipelineConfig, run: Runner, plan_for: PlanFor,
                     keeper: ModelKeeper | None = None, tracker: TrackerRef | None = None) -> Trained:
    """model -> prepare -> [sft] -> [reference] -> dpo. `keeper`: where the training stages keep their
    loaded model for the next one (None: each loads its own); `tracker`: where their curves go."""
    base, data, data_sources = compose_data(config, run)
    plans: dict[str, TrainingPlan] = {}
    start = base
    if config.sft_skipped:
        flow_log(config.sft_skipped)
    if config.runs_sft:
        plans["sft"] = plan = plan_for(config.sft, base)
        start = run(sft_task, base=base, data=data, spec=config.sft, setup=config.train, plan=plan, seed=config.seed,
                    keeper=keeper, tracker=tracker)
    plans["dpo"] = plan = plan_for(config.dpo, start)
    reference = None
    if config.dpo.precompute_ref_log_probs:  # DPO only: the config refuses it with a reference-free method
        reference = run(reference_task, start=start, data=data, spec=reference_spec(config.dpo), setup=config.train,
                        plan=plan, seed=config.seed, keeper=keeper)
    adapter = run(dpo_task, start=start, data=data, spec=config.dpo, setup=config.train, plan=plan, seed=config.seed,
                  reference=reference, keeper=keeper, tracker=tracker)
    return Trained(base, data, data_sources, start, reference, adapter, {k: v for k, v in plans.items() if v})


def compose_release(config: PipelineConfig, run: Runner, trained: Trained) -> Outputs:
    """evaluate (the forgetting gate) -> export -> card -> [publish], for what `compose_training` made."""
    out = Outputs(**vars(trained))
    if config.evaluate.enabled:
        # The start model's scores depend on neither DPO nor the gate: a sweep scores it once.
        baseline = run(start_scores_task, start=out.start, data=out.data, spec=config.evaluate)
        out.report = run(evaluate_task, base=out.base, adapter=out.adapter, data=out.data, spec=config.evaluate,
                         start_scores=baseline, beta=config.dpo.reward_beta, max_length=config.dpo.max_length)
        if config.evaluate.judge.enabled:
            out.judged = compose_judge(config, run, out.start, out.data, out.adapter)
        out.gate = run.derive(apply_gate, out.report, config.evaluate.gate)
        if out.judged is not None:
            out.gate = run.derive(with_judge_gate, out.gate, out.judged, config.evaluate.gate)
        if not out.gate.passed and config.evaluate.gate.mode == "enforce":
            raise GateBlocked(out)
    out.exports = run(export_task, adapter=out.adapter, spec=config.export)
    # The card is built from what the run did; apart from the exports so that editing it never redoes them.
    # As the card shows the config (secrets masked, files by name) and the sources by content: a worker's
    # fresh clone of the same commit makes the same card.
    forgetting_md = run.derive(forgetting.report_markdown, out.gate) if out.gate is not None else None
    judge_md = run.derive(judge_markdown, out.judged) if out.judged is not None else None
    out.card = run(card_task, config=card_config(config), data=out.data, adapter=out.adapter,
                   forgetting_md=forgetting_md, exports=out.exports, commit=modelcard.git_commit(Path.cwd()),
                   sources=out.sources, judge_md=judge_md)
    if config.publish.enabled and (out.gate is None or out.gate.passed):  # config refuses publish without the check
        out.published = run(publish_task, exports=out.exports, card=out.card, spec=config.publish,
                            message=f"dpoflow: pipeline {config.name}, run {flow_run.get_name() or 'local'}")
    return out


# --- The judged comparison (evaluate.judge): generated answers, start model vs tuned ----------------

def compose_judge(config: PipelineConfig, run: Runner, start: ModelRef, data: PreparedData,
                  adapter: TrainedAdapter) -> JudgeReport:
    """answers (the start model's, keyed without the adapter or the judge: a sweep generates them once) -> judge."""
    spec = config.evaluate.judge
    answers = run(start_answers_task, start=start, data=data, spec=answers_spec(spec))
    return run(judge_task, adapter=adapter, data=data, answers=answers, spec=spec)


def with_judge_gate(gate: forgetting.GateResult, judged: JudgeReport, spec) -> forgetting.GateResult:
    """The forgetting check's verdict with the judge's thresholds (win rates, length growth) added."""
    failures = judging.gate_failures(judged.figures, spec.min_win_rate, spec.min_lc_win_rate,
                                     spec.max_length_growth)
    return forgetting.GateResult(gate.passed and not failures, gate.rows, gate.failures + failures)


def judge_markdown(judged: JudgeReport) -> str:
    return judging.figures_markdown(judged.figures, judged.judge)


def record_judge(judged: JudgeReport, run_dir: Path, key: str) -> None:
    """judge.md, judge.json and judge_samples.md in the run folder, and a markdown artifact of both."""
    folder = Path(judged.path)
    (run_dir / "judge.json").write_bytes((folder / "judge.json").read_bytes())
    report = (folder / "judge.md").read_text() + "\n" + (folder / "samples.md").read_text()
    (run_dir / "judge.md").write_text((folder / "judge.md").read_text())
    (run_dir / "judge_samples.md").write_text((folder / "samples.md").read_text())
    create_markdown_artifact(redact_text(report), key=key + "-judge",
                             description="Generated answers judged pairwise: tuned model vs start model")


def flow_log(text: str) -> None:
    """An info line in the flow run's log, which the CLI prints; nothing outside a run (`explain`)."""
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(text)
    except MissingContextError:
        pass


def compose_data(config: PipelineConfig, run: Runner) -> tuple[ModelRef, PreparedData, list[DataSource]]:
    """The first two stages (the model's tokenizer renders the data): the whole of `dpoflow prepare`.
    Also the data sources as prepare read them (with their content fingerprints), for the model card."""
    # Each source's files hashed once: the prepare key and the model card both name them.
    data_sources = [DataSource(spec=s, digest=sources.fingerprint(s)) for s in config.data.source_specs]
    base = run(model_task, spec=config.model)
    data = run(prepare_task, sources=data_sources, spec=config.data, model=base, max_length=config.dpo.max_length,
               eval_tasks=tuple(decontamination_tasks(config)))
    return base, data, data_sources


@redact_flow_parameters
@flow(name="dpoflow-prepare")
def prepare_only(config: PipelineConfig) -> dict[str, Any]:
    """Only the model and prepare stages, for looking at the data before training on it."""
    set_cpu_threads(config.cpu_threads)
    workspace = Workspace(config.workdir)
    run = StageRunner(workspace)
    with keep_failed_data_report(workspace, config, run):
        _, data, _ = compose_data(config, run)
    run_dir = new_run_folder(workspace, config)
    summary = {"pipeline": config.name, "flow_run": flow_run.get_name(), "stages": rows_as_dicts(run.rows),
               "run_dir": str(run_dir), "data": data.counts}
    write_run_folder(run_dir, summary, run.outputs, markdown(config.name, run.rows, []))
    publish_data_report(config, data, run_dir)
    return summary


DATA_REPORT_FILES = ("data_report.json", "data_report.md", "rejected.jsonl")


@contextmanager
def keep_failed_data_report(workspace: Workspace, config: PipelineConfig, run: StageRunner):
    """When prepare fails on the data, its report and the rows it set aside say why: copied to a run
    folder (the stage folder is redone on the next run), and named on the error for the CLI's line."""
    try:
        yield
    except Exception as e:
        stage, out_dir = run.failed or (None, None)
        if stage == "prepare" and (out_dir / "data_report.json").is_file():
            run_dir = new_run_folder(workspace, config)
            for name in DATA_REPORT_FILES:
                if (out_dir / name).is_file():
                    shutil.copyfile(out_dir / name, run_dir / name)
            e.data_report = str(run_dir / "data_report.md")
            get_run_logger().error("prepare failed; data report and rows set aside: %s", run_dir)
        raise


def publish_data_report(config: PipelineConfig, data, run_dir: Path, key: str | None = None) -> None:
    """data_report.json and .md at a stable place in the run folder (rejected.jsonl linked beside
    them), and the report as a Prefect artifact."""
    report, key = Path(data.report), key or artifact_key(config.name)
    markdown_text = report.with_suffix(".md").read_text()
    (run_dir / "data_report.json").write_bytes(report.read_bytes())
    (run_dir / "data_report.md").write_text(markdown_text)
    if Path(data.rejected).is_file() and not (run_dir / "rejected.jsonl").exists():
        (run_dir / "rejected.jsonl").symlink_to(data.rejected)
    create_markdown_artifact(redact_text(markdown_text), key=key + "-data",
                             description=f"dpoflow data report of {config.name}")
    chart_artifact(report.with_suffix(".png"), key + "-data-chart", f"Token lengths of {config.name}'s pairs")


def chart_artifact(png: Path, key: str, description: str) -> None:
    """A PNG chart as an image artifact the Prefect UI shows. Inlined as a data URL: the file is on the
    machine that ran the flow, which the UI's browser cannot reach."""
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        create_image_artifact(image_url=f"data:image/png;base64,{data}", key=key, description=description)


@redact_flow_parameters
@flow(name="dpoflow")
def pipeline(config: PipelineConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Align `config.model` on `config.data` and export it; returns the run summary. `overrides` are
    the --set items (CLI, or a deployment run's form) already applied to `config`, for the record."""
    set_cpu_threads(config.cpu_threads)
    workspace = Workspace(config.workdir)
    run = StageRunner(workspace)
    tracked = open_run(config, run_folder_name())  # before any stage: an unreachable tracker stops the run now
    with ending_tracked_run(tracked):
        backend = start_backend(config)
        blocked = None
        try:
            with keep_failed_data_report(workspace, config, run):
                out = compose(config, run, hardware_plans(config, backend.name), tracked.ref if tracked else None)
        except GateBlocked as e:  # still leave the summary and the score table before failing the run
            blocked, out = e, e.outputs
        summary = record_run(config, backend, run, out, blocked, new_run_folder(workspace, config), overrides or [],
                             tracked=tracked)
        if blocked:
            raise blocked
        return summary


@contextmanager
def ending_tracked_run(tracked: TrackedRun | None):
    """A tracked run that did not finish is ended: KILLED on Ctrl-C, FAILED with the error as a tag."""
    try:
        yield
    except BaseException as e:
        if tracked is not None and not tracked.ended:
            try:
                if isinstance(e, KeyboardInterrupt):
                    tracked.end("KILLED", f"interrupted {e}".strip())
                else:
                    tracked.end("FAILED", f"{type(e).__name__}: {e}")
            except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
                get_run_logger().warning("tracking: could not mark the run ended: %s",
                                         redact_text(f"{type(err).__name__}: {err}"))
        raise


def track_training(tracked: TrackedRun, run: StageRunner) -> None:
    """The curves of training stages that did not reach the run as they were logged, sent from what they
    recorded: a stage from the cache, or one that ran on ranks that cannot write to a W&B or Trackio run."""
    for row in run.rows:
        if row.stage in ("sft", "dpo") and curve_to_send(tracked.ref, row.stage, row.status):
            lines = replay(tracked.ref, row.stage, row.output)
            why = "came from the cache" if row.status == "cached" else "ran outside the flow process"
            get_run_logger().info("tracking: %s %s: sent its recorded curve (%d log lines)", row.stage, why, lines)


def start_backend(config: PipelineConfig):
    """The training backend for `config`, imported before any stage imports transformers or TRL."""
    backend = choose_backend(config.train)
    activate(backend, config.train)
    get_run_logger().info("training backend: %s (%s)", backend.name, backend.reason)
    return backend


def hardware_plans(config: PipelineConfig, backend: str):
    return lambda spec, model: plan_stage(config.train, spec, model.path, backend=backend)


def record_run(config: PipelineConfig, backend, run: StageRunner, out: Outputs, blocked: GateBlocked | None,
               run_dir: Path, overrides: list[str], artifact_name: str | None = None,
               latest: bool = True, tracked: TrackedRun | None = None) -> dict[str, Any]:
    """The run folder (summary, stage links, forgetting table, data report), the Prefect artifacts and
    the tracked run's results; returns the summary."""
    key = artifact_key(artifact_name or config.name)
    overrides = redact(overrides)  # for the record only: the config already has them applied
    if out.gate is not None:
        write_gate_report(out.gate, run_dir)
        create_table_artifact(out.gate.rows, key=key + "-forgetting",
                              description="Forgetting check: start model vs tuned, accuracy points per task")
        chart_artifact(run_dir / "forgetting.png", key + "-forgetting-chart", "Forgetting check: accuracy per task")
    if out.judged is not None:
        record_judge(out.judged, run_dir, key)
    summary, summary_md = summarize(config, backend, run, out, blocked, run_dir, overrides, tracked)
    write_run_folder(run_dir, summary, run.outputs, summary_md, latest=latest)
    publish_data_report(config, out.data, run_dir, key)
    create_markdown_artifact(redact_text(summary_md), key=key,
                             description=f"dpoflow summary of {artifact_name or config.name}")
    get_run_logger().info("run folder: %s", run_dir)
    if tracked is not None:
        track_training(tracked, run)
        tracked.finish(redact(summary), run_dir, passed=blocked is None, reason=str(blocked) if blocked else None)
        location = summary["tracking"]["location"]
        if location.startswith(("http://", "https://")):
            create_link_artifact(location, link_text=f"{config.tracking.backend} run", key=key + "-tracking",
                                 description=f"The tracked run of {artifact_name or config.name}")
        get_run_logger().info("tracked: %s", tracked.line())
    return redact(summary)  # the flow's result, which Prefect may store too


def summarize(config: PipelineConfig, backend, run: StageRunner, out: Outputs, blocked: GateBlocked | None,
              run_dir: Path, overrides: list[str], tracked: TrackedRun | None = None) -> tuple[dict[str, Any], str]:
    """The run summary as JSON-able dict and as markdown (notes under the stage table)."""
    adapter, exports, gate = out.adapter, out.exports, out.gate

    def in_run_folder(path: str) -> str:
        """A stage output as the run folder links it (`export/adapter`): the summary is read in the Prefect
        UI too, where a path on the machine that ran it means nothing without the folder it is in."""
        for stage, out_dir in run.outputs.items():
            if Path(path).is_relative_to(out_dir):
                return str(Path(stage) / Path(path).relative_to(out_dir))
        return path

    notes = [f"run folder: {run_dir} on {socket.gethostname()}; the paths below are inside it",
             f"overrides: {', '.join(overrides)}" if overrides else "overrides: none (the file's config)",
             f"training backend: {backend.name} ({backend.reason})",
             *[f"{stage} plan: {p.precision}, 4-bit {'yes' if p.load_in_4bit else 'no'}, per-device batch "
               f"{p.per_device_batch} x accumulation {p.gradient_accumulation_steps}; "
               + "; ".join(p.reasons + [f"WARNING {w}" for w in p.warnings]) for stage, p in out.plans.items()],
             f"objective: {config.dpo.method}; reference: {adapter.reference}",
             *([config.sft_skipped] if config.sft_skipped else []),
             *[f"collapse guard: attempt {r['attempt']} collapsed at step {r['step']} (lr {r['learning_rate']:g}); "
               f"retried from {r['restart_from']} with lr halved" for r in adapter.retries]]
    if out.report is not None:
        notes += out.report.notes
    if gate is not None:
        verdict = "passed" if gate.passed else f"FAILED ({config.evaluate.gate.mode})"
        notes.append(f"forgetting check {verdict}: forgetting.md"
                     + ("" if gate.passed else "; " + "; ".join(gate.failures)))
    if out.judged is not None:
        f = out.judged.figures
        notes.append(f"judged ({out.judged.judge}): win rate {f['win_rate']:.3f}, length-controlled "
                     f"{f['lc_win_rate']:.3f}, {f['wins']}/{f['ties']}/{f['losses']} win/tie/loss, answers "
                     f"{f['mean_tokens_start']:.1f} -> {f['mean_tokens_tuned']:.1f} tokens: judge.md, judge_samples.md")
    if out.card is not None:
        notes.append(f"model card: {in_run_folder(out.card.path)}/README.md")
    if out.published is not None:
        p = out.published
        notes.append(f"published to {p.repo_id}@{p.revision}: "
                     + (f"commit {p.commit} ({p.url})" if p.new_commit else f"unchanged at {p.commit}, no new commit"))
    elif config.publish.enabled:
        notes.append("publish skipped: the forgetting check did not pass")
    notes.append(f"exports: {in_run_folder(exports.merged or exports.adapter)}" if exports else
                 f"exports: none: {blocked}")
    if tracked is not None:
        notes.append(f"tracked: {tracked.line()}")
    summary = {
        "pipeline": config.name,
        "overrides": overrides,
        "flow_run": flow_run.get_name(),
        "stages": rows_as_dicts(run.rows),
        "run_dir": str(run_dir),
        "metrics": out.report.metrics if out.report else {},
        "evaluation_notes": out.report.notes if out.report else [],
        "forgetting": {"passed": gate.passed, "failures": gate.failures, "table": gate.rows} if gate else None,
        "judge": {"judge": out.judged.judge, **out.judged.figures} if out.judged is not None else None,
        "method": config.dpo.method,
        "reference": adapter.reference,
        "backend": {"name": backend.name, "reason": backend.reason},
        "retries": adapter.retries,
        "dpo_metrics": adapter.metrics,
        "plans": {stage: asdict(p) for stage, p in out.plans.items()},
        "exports": ({"adapter": exports.adapter, "merged": exports.merged,
                     **{f"gguf_{t}": g["file"] for t, g in exports.gguf.items()}} if exports else {}),
        "gguf_checks": exports.gguf if exports else {},
        "card": f"{out.card.path}/README.md" if out.card else None,
        "published": out.published.model_dump(exclude={"path", "digest"}) if out.published else None,
        "tracking": tracked.record() if tracked is not None else None,
    }
    md = markdown(config.name, run.rows, notes)
    if gate is not None:
        md += "\n" + (run_dir / "forgetting.md").read_text()
    if out.judged is not None:
        md += "\n## Judged: tuned model vs start model\n\n" + judge_markdown(out.judged)
    return summary, md


def new_run_folder(workspace: Workspace, config: PipelineConfig, run_dir: Path | None = None) -> Path:
    """runs/<pipeline>/<time>-<flow run>/ (or `run_dir`), with the resolved config."""
    run_dir = run_dir or workspace.runs(config.name) / run_folder_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(redact(config.model_dump(mode="json")), indent=1))
    return run_dir


def run_folder_name() -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name()}"


def write_run_folder(run_dir: Path, summary: dict, outputs: dict[str, str], summary_md: str,
                     latest: bool = True) -> None:
    """The summary, a link per stage output, and (`latest`) runs/<pipeline>/latest pointing here."""
    (run_dir / "summary.json").write_text(json.dumps(redact(summary), indent=1))
    (run_dir / "summary.md").write_text(redact_text(summary_md))
    for stage, out_dir in outputs.items():
        (run_dir / stage).symlink_to(out_dir, target_is_directory=True)
    if not latest:
        return
    # Swapped in one rename, so a concurrent run never sees `latest` missing.
    link = run_dir.parent / f".latest.{run_dir.name}"
    link.symlink_to(run_dir.name, target_is_directory=True)
    link.replace(run_dir.parent / "latest")


def decontamination_tasks(config: PipelineConfig) -> list[str]:
    """The forgetting-check tasks whose items no training prompt may overlap."""
    return config.evaluate.tasks if config.evaluate.enabled and config.data.decontamination.enabled else []


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "dpoflow-" + "".join(c if c.isalnum() else "-" for c in name.lower())
