"""Experiment tracking (`tracking:` in a pipeline): each run's config, training curves, evaluation figures
and reports sent to MLflow or TensorBoard.

A run is opened when the flow starts (`open_run`) and named by a `TrackerRef`: a small picklable value
the training stages are given, so a stage (or each rank torchrun launched) reaches the same run to send
its curve live (`curve_callback`). A stage that came from the cache sends the curve it recorded
(`replay`), so a cached re-run's curves equal the first run's. What is sent is redacted
(dpoflow.base.redact) and the tracking URI, which may hold a password, is never printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dpoflow.base.errors import Explained
from dpoflow.base.redact import redact, redact_text

# Training log keys that are wall-clock figures (dpoflow.engine.training.deterministic_log leaves them out too).
_TIMING = ("runtime", "per_second")
# Run-folder files sent as artifacts (those present).
REPORTS = ("summary.md", "summary.json", "config.json", "data_report.md", "data_report.json", "forgetting.md",
           "forgetting.png", "judge.md", "judge.json", "judge_samples.md")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError, Explained):
    """The tracker cannot be reached or its client is missing: one line naming the backend and setting."""


@dataclass(frozen=True)
class TrackerRef:
    """One tracked run: enough to reach it from another process (a rank torchrun launched)."""

    backend: str  # mlflow | tensorboard
    uri: str  # MLflow tracking URI, or the TensorBoard log folder of this run
    run_id: str
    experiment: str = ""


def default_uri(backend: str, workdir: str) -> str:
    if backend == "mlflow":
        return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    return str(Path(workdir).resolve() / "tensorboard")


def shown_uri(uri: str) -> str:
    """The URI as it may be printed: any user name and password taken out."""
    parts = urlsplit(uri)
    if parts.password is not None or parts.username is not None:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return redact_text(uri)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The (already redacted) config as `dpo.beta` -> "0.1" parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def log_metrics(entry: dict[str, Any], stage: str) -> dict[str, float]:
    """A Trainer log line as `stage/key` metrics: numbers only, no wall-clock figures, no step itself."""
    return {f"{stage}/{k}": float(v) for k, v in entry.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(t in k for t in _TIMING) and math.isfinite(float(v))}


def result_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's results as metrics: held-out preference metrics (eval/*), the forgetting check per task
    (forgetting/<task>/{base,tuned,delta}) and the judge's figures (judge/*)."""
    out = {f"eval/{k.removeprefix('eval/')}": float(v) for k, v in (summary.get("metrics") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in (summary.get("forgetting") or {}).get("table") or []:
        for field in ("base", "tuned", "delta"):
            if isinstance(row.get(field), (int, float)):
                out[f"forgetting/{row['task']}/{field}"] = float(row[field])
    for k, v in (summary.get("judge") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"judge/{k}"] = float(v)
    return out


# --- Backends ------------------------------------------------------------------------------------------

class MlflowTracker:
    """A run in MLflow, through `mlflow.MlflowClient` (the mlflow-skinny client)."""

    def __init__(self, uri: str):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise TrackingError("tracking.backend mlflow needs the MLflow client: pip install "
                                "'dpoflow[tracking]'") from None
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def start(self, experiment: str, run_name: str, tags: dict[str, str]) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=self.artifact_location())
        return self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def artifact_location(self) -> str | None:
        """A SQLite store's artifacts beside its database (MLflow's default is ./mlruns in whatever
        folder the run was started from); other stores and servers keep their own default."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return None

    def metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def params(self, run_id: str, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, v[:6000]) for k, v in values.items()]  # MLflow's longest parameter value
        for i in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[i:i + 100])

    def tags(self, run_id: str, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def text(self, run_id: str, name: str, text: str) -> None:
        self.client.log_text(run_id, text, name)

    def files(self, run_id: str, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path="reports")

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def location(self, run_id: str, experiment: str) -> str:
        shown = shown_uri(self.uri)
        if shown.startswith(("http://", "https://")):
            experiment_id = self.client.get_run(run_id).info.experiment_id
            return f"{shown.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return shown


class TensorBoardTracker:
    """A run as TensorBoard event files: one folder per run under <log dir>/<experiment>/."""

    def __init__(self, uri: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackingError("tracking.backend tensorboard needs the tensorboard package: pip install "
                                "'dpoflow[tracking]'") from None
        self.root, self.writer_class, self.writers = Path(uri), SummaryWriter, {}

    def start(self, experiment: str, run_name: str, tags: dict[str, str]) -> str:
        run_id = run_name
        folder = self.root / experiment / run_id
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise TrackingError(f"tracking.uri (tensorboard log folder {self.root}): cannot make {folder}: "
                                f"{e.strerror or e}") from None
        self.tags(run_id, tags, experiment)
        return run_id

    def _writer(self, run_id: str, experiment: str):
        if run_id not in self.writers:
            self.writers[run_id] = self.writer_class(log_dir=str(self.root / experiment / run_id))
        return self.writers[run_id]

    def metrics(self, run_id: str, values: dict[str, float], step: int, experiment: str = "") -> None:
        writer = self._writer(run_id, experiment)
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    def params(self, run_id: str, values: dict[str, str], experiment: str = "") -> None:
        table = "| parameter | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in values.items())
        self.text(run_id, "config", table, experiment)

    def tags(self, run_id: str, values: dict[str, str], experiment: str = "") -> None:
        if values:
            self.text(run_id, "tags", "\n".join(f"- {k}: {v}" for k, v in values.items()), experiment)

    def text(self, run_id: str, name: str, text: str, experiment: str = "") -> None:
        writer = self._writer(run_id, experiment)
        writer.add_text(name, text)
        writer.flush()

    def files(self, run_id: str, paths: list[Path], experiment: str = "") -> None:
        for path in paths:
            if path.suffix in (".md", ".json"):
                self.text(run_id, f"reports/{path.name}", path.read_text(), experiment)

    def end(self, run_id: str, status: str, experiment: str = "") -> None:
        self.text(run_id, "status", status, experiment)
        writer = self.writers.pop(run_id, None)
        if writer is not None:
            writer.close()

    def location(self, run_id: str, experiment: str) -> str:
        return str(self.root / experiment / run_id)


_CLIENTS: dict[tuple[str, str], Any] = {}  # (backend, uri) -> its client, one per process


def client(backend: str, uri: str):
    """The backend's client for `uri`, made once per process (a TensorBoard writer is kept open)."""
    if (backend, uri) not in _CLIENTS:
        _CLIENTS[backend, uri] = MlflowTracker(uri) if backend == "mlflow" else TensorBoardTracker(uri)
    return _CLIENTS[backend, uri]


def send(ref: TrackerRef, method: str, *args: Any) -> None:
    """`method` of the run's client called for this run (TensorBoard also needs the experiment folder)."""
    tracker = client(ref.backend, ref.uri)
    extra = (ref.experiment,) if ref.backend == "tensorboard" else ()
    getattr(tracker, method)(ref.run_id, *args, *extra)


def send_curve(ref: TrackerRef, stage: str, entries: list[dict[str, Any]]) -> int:
    """Each Trainer log line (with its `step`) as `stage/*` metrics at that step; returns how many lines."""
    sent = 0
    for entry in entries:
        values = log_metrics(entry, stage)
        if values and "step" in entry:
            send(ref, "metrics", values, int(entry["step"]))
            sent += 1
    return sent


def replay(ref: TrackerRef, stage: str, out_dir: str | Path) -> int:
    """The curve a stage recorded (log_history.json in its output folder) sent again: for a stage that
    came from the cache. Returns how many log lines were sent (0: the stage recorded none)."""
    file = Path(out_dir) / "log_history.json"
    return send_curve(ref, stage, json.loads(file.read_text())) if file.is_file() else 0


def curve_callback(ref: TrackerRef, stage: str):
    """A Trainer callback that sends the stage's log lines as they come (`dpo/loss`, `dpo/rewards/accuracies`
    ...), on the main process only. Resumed from a checkpoint, it first sends the lines the checkpoint's
    log_history already holds, so the run has the whole curve."""
    from transformers import TrainerCallback

    from dpoflow.base.ranks import is_main_process

    class Curve(TrainerCallback):
        def __init__(self):
            self.sent_through = -1  # the last step sent

        def _send(self, entries: list[dict[str, Any]]) -> None:
            fresh = [e for e in entries if e.get("step", -1) > self.sent_through or "train_loss" in e]
            if not fresh or not is_main_process():
                return
            try:
                send_curve(ref, stage, fresh)
            except Exception as e:  # noqa: BLE001 - a tracker hiccup must not end hours of training
                print(f"{stage}: tracking: could not send the curve at step {fresh[-1].get('step')}: "
                      f"{type(e).__name__}: {redact_text(str(e))}")
            self.sent_through = max([self.sent_through, *(e.get("step", -1) for e in fresh)])

        def on_train_begin(self, args, state, control, **kwargs):
            self._send(list(state.log_history))  # a resumed run: what the checkpoint holds

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self._send([{**logs, "step": state.global_step}])

    return Curve()


# --- The flow's run ------------------------------------------------------------------------------------

class TrackedRun:
    """A pipeline run (or a sweep variant) in the tracker: opened when the flow starts, finished with
    the run's results, or ended FAILED / KILLED."""

    def __init__(self, ref: TrackerRef, spec):
        self.ref, self.spec, self.ended = ref, spec, False

    @property
    def location(self) -> str:
        return client(self.ref.backend, self.ref.uri).location(self.ref.run_id, self.ref.experiment)

    def record(self) -> dict[str, str]:
        """summary["tracking"]: where to look (never the URI's password)."""
        return {"backend": self.ref.backend, "experiment": self.ref.experiment, "run_id": self.ref.run_id,
                "location": self.location}

    def line(self) -> str:
        return f"{self.ref.backend} experiment {self.ref.experiment!r}, run {self.ref.run_id} ({self.location})"

    def finish(self, summary: dict[str, Any], run_dir: Path, passed: bool, reason: str | None = None) -> None:
        """Results as metrics, the run folder's reports as artifacts; FINISHED, or FAILED with `reason`
        (a run the gate blocked)."""
        send(self.ref, "metrics", result_metrics(summary), 0)
        send(self.ref, "files", [run_dir / name for name in REPORTS if (run_dir / name).is_file()])
        if not passed:
            send(self.ref, "tags", {"dpoflow.failure": redact_text(reason or "failed")[:4000]})
        self.end("FINISHED" if passed else "FAILED")

    def end(self, status: str, reason: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if reason:
            send(self.ref, "tags", {"dpoflow.failure": redact_text(reason)[:4000]})
        send(self.ref, "end", status)


def open_run(config, run_name: str, tags: dict[str, str] | None = None) -> TrackedRun | None:
    """The tracked run of a pipeline run (None: tracking.backend none), with the config as parameters.
    An unreachable tracker or a missing client is a TrackingError naming the backend and setting."""
    spec = config.tracking
    if spec.backend == "none":
        return None
    uri = spec.uri or default_uri(spec.backend, config.workdir)
    experiment = spec.experiment or config.name
    all_tags = {"dpoflow.pipeline": config.name, **(tags or {}), **spec.tags}
    try:
        tracker = client(spec.backend, uri)
        with _quick_failure():
            run_id = tracker.start(experiment, run_name, redact(all_tags))
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any client error: one line, the URI without its password
        raise TrackingError(f"tracking.backend {spec.backend}: cannot reach tracking.uri {shown_uri(uri)}: "
                            f"{reason(e)}") from None
    run = TrackedRun(TrackerRef(spec.backend, uri, run_id, experiment), spec)
    shown = redact(config.model_dump(mode="json", exclude={"tracking": {"uri"}}))
    send(run.ref, "params", flat_params(shown))
    return run


def reason(error: Exception) -> str:
    """A client error in a few words: the operating system's reason when there is one (a refused
    connection is wrapped in three layers of urllib3 text), never a user name or password of a URL."""
    text = str(error) or type(error).__name__
    found = re.search(r"\[Errno -?\d+\] [^'\"()]+", text)
    why = found.group(0) if found else " ".join(text.split())
    why = re.sub(r"://[^/\s@]+@", "://", why)  # user:password@ of any URL in it
    return f"{type(error).__name__}: {redact_text(why)[:200]}"


class _quick_failure:
    """MLflow's REST client retries a refused connection with backoff for minutes by default; opening a
    run tries a few times only, so an unreachable tracker is said at once. A value the user set is kept."""

    VARIABLES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

    def __enter__(self):
        self.set = [k for k in self.VARIABLES if k not in os.environ]
        os.environ.update({k: self.VARIABLES[k] for k in self.set})

    def __exit__(self, *exc):
        for k in self.set:
            os.environ.pop(k, None)
