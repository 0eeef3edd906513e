"""The MLflow backend of experiment tracking (dpoflow.engine.tracking): a run through `mlflow.MlflowClient`
(the mlflow-skinny client). Any process can reach a run by its id, so a rank torchrun launched sends its
stage's curve itself."""

from __future__ import annotations

import time
from pathlib import Path

from dpoflow.engine.tracking_base import import_client, shown_uri


class MlflowTracker:
    """A run in MLflow, at a tracking URI: a SQLite file, a folder or a tracking server."""

    any_process = True  # any process reaches a run by its id (a rank torchrun launched)

    def __init__(self, uri: str, folder: str = ""):
        mlflow = import_client("mlflow", "mlflow", "the MLflow client")
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)

    def start(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=self.artifact_location())
        run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.params(run_id, params)
        return run_id

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
