"""The TensorBoard backend of experiment tracking (dpoflow.engine.tracking): a run as event files, one
folder per run under <log folder>/<experiment>/. Any process can add event files to a run's folder, so a
rank torchrun launched sends its stage's curve itself."""

from __future__ import annotations

from pathlib import Path

from dpoflow.engine.tracking_base import TrackingError, import_client


class TensorBoardTracker:
    """Runs as TensorBoard event files under a log folder (tracking.uri)."""

    any_process = True  # any process reaches a run by its id (a rank torchrun launched)

    def __init__(self, uri: str, folder: str = ""):
        tensorboard = import_client("torch.utils.tensorboard", "tensorboard", "the tensorboard package")
        self.root, self.writer_class, self.writers = Path(uri), tensorboard.SummaryWriter, {}

    def start(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        run_id = run_name
        folder = self.root / experiment / run_id
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            raise TrackingError(f"tracking.uri (tensorboard log folder {self.root}): cannot make {folder}: "
                                f"{e.strerror or e}") from None
        self.tags(run_id, tags, experiment)
        self.params(run_id, params, experiment)
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
