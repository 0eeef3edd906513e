"""The Trackio backend of experiment tracking (dpoflow.engine.tracking): Hugging Face's local-first
tracker, a SQLite database per project (experiment) in a folder, <workdir>/trackio unless tracking.uri
names another. `trackio show --project NAME` (with TRACKIO_DIR set to that folder) opens its dashboard.

Trackio reads its folder (TRACKIO_DIR) once, when it is imported: one process writes to one folder.
Only the process that opened a run writes to it, as for W&B (dpoflow.engine.tracking_wandb): a rank
torchrun launched could only reopen the run by name, before the flow's first write may have created it.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

from dpoflow.engine.tracking_base import ProcessLocalRuns, TrackingError, import_client


class TrackioTracker(ProcessLocalRuns):
    """Runs in a Trackio folder: one SQLite database per experiment, reports as Trackio artifacts."""

    backend, product = "trackio", "Trackio"  # runs of this process only: see the module's docstring

    def __init__(self, uri: str, folder: str = ""):
        super().__init__()
        self.root = Path(uri).resolve()
        if "trackio" not in sys.modules:
            os.environ["TRACKIO_DIR"] = str(self.root)  # read by trackio when it is imported, just below
        self.trackio = import_client("trackio", "trackio", "the trackio package")
        from trackio.sqlite_storage import SQLiteStorage
        from trackio.utils import TRACKIO_DIR

        if Path(TRACKIO_DIR).resolve() != self.root:
            raise TrackingError(f"tracking.uri (trackio folder {self.root}): trackio in this process already "
                                f"writes to {TRACKIO_DIR} (it reads its folder once, when imported)")
        self.storage = SQLiteStorage

    def start(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri (trackio folder {self.root}): cannot make it: "
                                f"{e.strerror or e}") from None
        with redirect_stdout(io.StringIO()):  # each init prints how to open the dashboard
            run = self.trackio.init(project=experiment, name=run_name, group=tags.get("dpoflow.sweep"),
                                    config={**params, **{f"tag.{k}": v for k, v in tags.items()}},
                                    embed=False, auto_log_cpu=False, auto_log_gpu=False)
        self.runs[run.name] = run
        return run.name

    def metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        # Writing goes through the Run object: trackio.init of another run (a sweep opens every variant's
        # first) marks this one finished, after which Run.log still writes, at once rather than batched.
        self._run(run_id).log(values, step=step)

    def tags(self, run_id: str, values: dict[str, str]) -> None:
        """Tags set after the start (the reason a run failed) as Trackio alerts: its config is written
        once, with the first values."""
        from trackio.alerts import AlertLevel

        for key, value in values.items():
            self._run(run_id).alert(title=key, text=value, level=AlertLevel.WARN)

    def files(self, run_id: str, paths: list[Path]) -> None:
        """The reports as Trackio artifacts (type `report`); images also as Trackio images."""
        run = self._run(run_id)
        for path in paths:
            run.log_artifact(path, name=path.name, type="report")
        images = {f"reports/{p.stem}": self.trackio.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            run.log(images, step=0)

    def end(self, run_id: str, status: str) -> None:
        from trackio.alerts import AlertLevel

        run = self._run(run_id)
        del self.runs[run_id]
        if status != "FINISHED":
            run.alert(title=f"dpoflow.status {status}", level=AlertLevel.ERROR)
        with redirect_stdout(io.StringIO()):
            run.finish()

    def location(self, run_id: str, experiment: str) -> str:
        return f"{self.storage.get_project_db_path(experiment)} (trackio project {experiment!r})"
