"""The Weights & Biases backend of experiment tracking (dpoflow.engine.tracking), through the `wandb` client.

A run is offline unless W&B is configured: tracking.uri names a W&B server, or WANDB_API_KEY is set (then
W&B's default server); WANDB_MODE, when set, decides. Offline runs are folders under <workdir>/wandb/
(`wandb sync <folder>` uploads one later); online runs keep their local files there too, never in the
folder the command was started from.

Only the process that opened a run writes to it. W&B can have several processes write one run only
online ("shared" mode); offline, a second `wandb.init(id=..., resume="allow")` in a rank torchrun launched
would write a second run folder of the same id, which `wandb sync` uploads as a resumed run whose steps
may clash. So a stage that ran on several ranks has its recorded curve sent from the flow process after
it (dpoflow.engine.tracking.curve_to_send).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dpoflow.engine.tracking_base import ProcessLocalRuns, TrackingError, import_client, reason

# W&B's longest tag.
TAG_LENGTH = 64


class WandbTracker(ProcessLocalRuns):
    """Runs in W&B, their local folders under `folder` (the workdir)."""

    backend, product = "wandb", "W&B"  # runs of this process only: see the module's docstring

    def __init__(self, uri: str, folder: str):
        super().__init__()
        self.wandb = import_client("wandb", "wandb", "the wandb client")
        self.uri, self.folder = uri, Path(folder)
        self.locations = {}
        self.stepped: dict[str, set[str]] = {}  # run id -> the metric groups given their own step axis

    def mode(self) -> str:
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if self.uri or os.environ.get("WANDB_API_KEY") else "offline"

    def start(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        mode = self.mode()
        settings = self.wandb.Settings(
            silent=True, console="off",  # the CLI's own output stays as it is, and is not copied to W&B
            disable_git=True, save_code=False, x_save_requirements=False, x_disable_stats=True,
            **({"base_url": self.uri.rstrip("/")} if self.uri else {}))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            run = self.wandb.init(project=experiment, name=run_name, dir=str(self.folder), mode=mode,
                                  config=params, tags=[f"{k}:{v}"[:TAG_LENGTH] for k, v in tags.items()],
                                  group=tags.get("dpoflow.sweep"), reinit="create_new", settings=settings)
        except Exception as e:  # noqa: BLE001 - offline there is no server to blame: say where it wrote
            if mode == "online":
                raise
            raise TrackingError(f"tracking.backend wandb (offline, in {self.folder / 'wandb'}): cannot start "
                                f"a run: {reason(e)}") from None
        run.summary.update(tags)  # the whole values (a W&B tag is cut at 64 characters)
        self.runs[run.id], self.stepped[run.id] = run, set()
        self.locations[run.id] = run.url if mode == "online" else str(Path(run.dir).parent)
        return run.id

    def metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        """`values` at `step` of their group (`sft/loss` -> `sft/step`). W&B's own step must grow through
        a run, and the dpo curve starts again at step 1 after the sft one: each group gets its own step
        axis (define_metric), and W&B's step just counts the rows."""
        run = self._run(run_id)
        groups = {key.split("/", 1)[0] for key in values}
        for group in sorted(groups - self.stepped[run_id]):
            run.define_metric(f"{group}/step")
            run.define_metric(f"{group}/*", step_metric=f"{group}/step")
            self.stepped[run_id].add(group)
        run.log({**values, **{f"{group}/step": step for group in groups}})

    def params(self, run_id: str, values: dict[str, str]) -> None:
        self._run(run_id).config.update(values, allow_val_change=True)

    def tags(self, run_id: str, values: dict[str, str]) -> None:
        self._run(run_id).summary.update(values)

    def files(self, run_id: str, paths: list[Path]) -> None:
        """The reports copied into the run's files (reports/...), which `wandb sync` uploads; images also
        as W&B images, shown on the run's page."""
        run = self._run(run_id)
        reports = Path(run.dir) / "reports"
        reports.mkdir(exist_ok=True)
        for path in paths:
            shutil.copyfile(path, reports / path.name)  # a copy: a symlink would break if the run folder moves
            run.save(str(reports / path.name), base_path=run.dir, policy="now")
        images = {f"reports/{p.stem}": self.wandb.Image(str(p)) for p in paths if p.suffix == ".png"}
        if images:
            run.log(images)

    def end(self, run_id: str, status: str) -> None:
        run = self._run(run_id)
        run.summary["dpoflow.status"] = status
        run.finish(exit_code=0 if status == "FINISHED" else 1)
        del self.runs[run_id]

    def location(self, run_id: str, experiment: str) -> str:
        return self.locations[run_id]
