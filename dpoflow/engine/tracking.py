"""Experiment tracking (`tracking:` in a pipeline): each run's config, training curves, evaluation figures
and reports sent to MLflow, Weights & Biases, Trackio or TensorBoard (one module each:
dpoflow.engine.tracking_<backend>).

A run is opened when the flow starts (`open_run`) and named by a `TrackerRef`: a small picklable value
the training stages are given, so a stage (or each rank torchrun launched) reaches the same run to send
its curve live (`curve_callback`). W&B and Trackio runs are written by the process that opened them
only: a stage that ran on several ranks has its recorded curve sent from the flow process after it
(`curve_to_send`). A stage that came from the cache sends the curve it recorded (`replay`), so a cached
re-run's curves equal the first run's. What is sent is redacted (dpoflow.base.redact) and the tracking
URI, which may hold a password or token, is never printed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoflow.base.redact import redact, redact_text
from dpoflow.engine.tracking_base import TrackingError, reason, shown_uri

__all__ = ["TrackingError", "TrackerRef", "TrackedRun", "open_run", "curve_callback", "replay", "send",
           "shown_uri", "flat_params", "result_metrics", "curve_to_send"]

# Training log keys that are wall-clock figures (dpoflow.engine.training.deterministic_log leaves them out too).
_TIMING = ("runtime", "per_second")
# Run-folder files sent as artifacts (those present).
REPORTS = ("summary.md", "summary.json", "config.json", "data_report.md", "data_report.json", "forgetting.md",
           "forgetting.png", "judge.md", "judge.json", "judge_samples.md")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


@dataclass(frozen=True)
class TrackerRef:
    """One tracked run: enough to reach it from another process (a rank torchrun launched)."""

    backend: str  # mlflow | wandb | trackio | tensorboard
    uri: str  # MLflow tracking URI, W&B server ("": W&B's default), Trackio folder, TensorBoard log folder
    run_id: str
    experiment: str = ""
    folder: str = ""  # W&B: the folder its local run folders go under (the workdir)


def default_uri(backend: str, workdir: str) -> str:
    """Where a backend's runs go when tracking.uri is not set: a store in the workdir (W&B: its own default
    server when an API key is set, else an offline run in the workdir)."""
    root = Path(workdir).resolve()
    return {"mlflow": f"sqlite:///{root / 'mlflow.db'}", "wandb": "", "trackio": str(root / "trackio"),
            "tensorboard": str(root / "tensorboard")}[backend]


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


_CLIENTS: dict[tuple[str, str, str], Any] = {}  # (backend, uri, folder) -> its client, one per process
# (run id, stage) of the curves this process sent to a run as they were logged.
_SENT_LIVE: set[tuple[str, str]] = set()


def tracker_class(backend: str):
    """The backend's client class, imported when first used (each needs its own optional package)."""
    if backend == "mlflow":
        from dpoflow.engine.tracking_mlflow import MlflowTracker
        return MlflowTracker
    if backend == "wandb":
        from dpoflow.engine.tracking_wandb import WandbTracker
        return WandbTracker
    if backend == "trackio":
        from dpoflow.engine.tracking_trackio import TrackioTracker
        return TrackioTracker
    from dpoflow.engine.tracking_tensorboard import TensorBoardTracker
    return TensorBoardTracker


def client(backend: str, uri: str, folder: str = ""):
    """The backend's client for `uri`, made once per process (it keeps open writers and runs)."""
    if (backend, uri, folder) not in _CLIENTS:
        _CLIENTS[backend, uri, folder] = tracker_class(backend)(uri, folder)
    return _CLIENTS[backend, uri, folder]


def client_of(ref: TrackerRef):
    return client(ref.backend, ref.uri, ref.folder)


def reachable_here(ref: TrackerRef) -> bool:
    """Whether this process can write to the run: any process can for MLflow and TensorBoard; a W&B or
    Trackio run only from the process that opened it (the flow's). Asked in a rank, it makes no client
    there (a W&B or Trackio client that could not write anyway)."""
    if tracker_class(ref.backend).any_process:
        return True
    opened = _CLIENTS.get((ref.backend, ref.uri, ref.folder))
    return opened is not None and opened.holds(ref.run_id)


def send(ref: TrackerRef, method: str, *args: Any) -> None:
    """`method` of the run's client called for this run (TensorBoard also needs the experiment folder)."""
    extra = (ref.experiment,) if ref.backend == "tensorboard" else ()
    getattr(client_of(ref), method)(ref.run_id, *args, *extra)


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


def curve_to_send(ref: TrackerRef, stage: str, status: str) -> bool:
    """Whether the flow sends a training stage's recorded curve after it: the stage came from the cache,
    or it ran where its curve could not reach the run live (the ranks torchrun launched, for a W&B or
    Trackio run; sending from there would open a second writer of one run, which neither supports
    offline)."""
    if status == "cached":
        return True
    return status == "ran" and not tracker_class(ref.backend).any_process and (ref.run_id, stage) not in _SENT_LIVE


def curve_callback(ref: TrackerRef, stage: str):
    """A Trainer callback that sends the stage's log lines as they come (`dpo/loss`, `dpo/rewards/accuracies`
    ...), on the main process only. Resumed from a checkpoint, it first sends the lines the checkpoint's
    log_history already holds, so the run has the whole curve. Where the run cannot be reached from this
    process (a W&B or Trackio run, in a rank torchrun launched) it sends nothing: the flow sends the
    recorded curve after the stage (`curve_to_send`)."""
    from transformers import TrainerCallback

    from dpoflow.base.ranks import is_main_process

    class Curve(TrainerCallback):
        def __init__(self):
            self.sent_through = -1  # the last step sent

        def _send(self, entries: list[dict[str, Any]]) -> None:
            fresh = [e for e in entries if e.get("step", -1) > self.sent_through or "train_loss" in e]
            if not fresh or not is_main_process() or not reachable_here(ref):
                return
            try:
                send_curve(ref, stage, fresh)
                _SENT_LIVE.add((ref.run_id, stage))
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
        return client_of(self.ref).location(self.ref.run_id, self.ref.experiment)

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
    folder = str(Path(config.workdir).resolve()) if spec.backend == "wandb" else ""
    experiment = spec.experiment or config.name
    all_tags = {"dpoflow.pipeline": config.name, **(tags or {}), **spec.tags}
    params = flat_params(redact(config.model_dump(mode="json", exclude={"tracking": {"uri"}})))
    try:
        tracker = client(spec.backend, uri, folder)
        with _quick_failure():
            run_id = tracker.start(experiment, run_name, redact(all_tags), params)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any client error: one line, the URI without its password
        where = shown_uri(uri) if uri else "(W&B's default server)"
        raise TrackingError(f"tracking.backend {spec.backend}: cannot reach tracking.uri {where}: "
                            f"{reason(e)}") from None
    return TrackedRun(TrackerRef(spec.backend, uri, run_id, experiment, folder), spec)


class _quick_failure:
    """MLflow's REST client retries a refused connection with backoff for minutes by default, W&B for its
    90 s init timeout; opening a run tries for a few seconds only, so an unreachable tracker is said at
    once. A value the user set is kept."""

    VARIABLES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                 "WANDB_INIT_TIMEOUT": "20"}

    def __enter__(self):
        self.set = [k for k in self.VARIABLES if k not in os.environ]
        os.environ.update({k: self.VARIABLES[k] for k in self.set})

    def __exit__(self, *exc):
        for k in self.set:
            os.environ.pop(k, None)
