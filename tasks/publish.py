"""card + publish: the model card of the release, then one Hub commit of the exports and the card.
The flow calls publish only after the forgetting check passed (dpoflow.base.config refuses publish without
the check), and its cache key leaves out the run's name (the commit message), so a re-run with nothing
changed pushes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.engine import hub, modelcard
from dpoflow.base.artifacts import MANIFEST, NotIntact, fresh_dir, json_digest, seal, sealed_files
from dpoflow.base.config import PipelineConfig, PublishSpec, SourceSpec
from dpoflow.base.redact import redact, redact_text
from dpoflow.base.records import Artifact, DataSource, Exports, PreparedData, Published, TrainedAdapter

from . import stage_logger, stage_task


def export_summary(exports: Exports) -> dict:
    """Sizes and checks of what the export stage wrote, in the card's terms."""
    out: dict = {}
    for kind in ("adapter", "merged"):
        folder = getattr(exports, kind)
        if folder:
            size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
            c = exports.checks
            check = (f"weights reloaded bit-exact, logits within {c.get('merged_max_logit_diff_reloaded', 0):.2g}; "
                     f"16-bit rounding moved logits by up to {c.get('merged_max_logit_diff_vs_fp32', 0):.3g}, "
                     f"top token unchanged at {c.get('merged_top1_agreement_vs_fp32', 1):.0%} of positions"
                     if kind == "merged" else "as trained")
            out[kind] = {"path": f"{kind}/", "size_bytes": size, "check": check}
    if exports.gguf:
        out["gguf"] = exports.gguf
    return out


def local_name(path: str) -> str:
    """A local path as a public card names it: by its last component (where it sat on the machine that
    ran the pipeline says nothing about the model, and can say a lot about that machine)."""
    return Path(path).name if Path(path).is_absolute() else path


def public_source(spec: SourceSpec) -> SourceSpec:
    """A data source with local paths by name; its content hash identifies it."""
    return spec.model_copy(update={k: local_name(v) for k in ("path", "hub") if (v := getattr(spec, k))})


def card_config(config: PipelineConfig) -> dict:
    """The config as the card shows it: secrets masked, local paths by name, no workdir."""
    shown = config.model_dump(mode="json", exclude={"workdir"})
    shown["model"]["source"] = local_name(config.model.source)
    shown["data"]["sources"] = [local_name(s) if isinstance(s, str) else public_source(s).model_dump(mode="json")
                                for s in config.data.sources]
    # Which tracker and experiment the run is in, never where that is: the URI may hold a password, and
    # a changed address or run tag re-makes no card.
    tracking = config.tracking
    shown["tracking"] = {"backend": tracking.backend, "experiment": tracking.experiment or config.name}
    return redact(shown)


def write_card(shown: dict, data: PreparedData, adapter: TrainedAdapter, forgetting_md: str | None,
               exports: Exports, commit: str, sources: list[DataSource], out_dir: Path,
               judge_md: str | None = None) -> Artifact:
    """`shown`: the config as the card shows it (`card_config`); `sources`: the data sources, in order;
    `judge_md`: the judged comparison's figures (None: not judged)."""
    fresh_dir(out_dir)
    named = [{"label": public_source(s.spec).label, "fingerprint": s.digest} for s in sources]
    text = modelcard.render(shown, shown["model"]["source"], {"sources": named, "counts": data.counts},
                            adapter.metrics, forgetting_md, export_summary(exports), commit,
                            shown["publish"]["repo_id"], judge_md)
    (out_dir / "README.md").write_text(redact_text(text))
    return Artifact(path=str(out_dir), digest=seal(out_dir))


def release_files(exports: Exports, card: Artifact, include: list[str]) -> dict[str, Path]:
    """{path in the repo: local file}: the chosen exports as the export stage produced them, and the card.
    Only the files the stage sealed (its manifest, the one its record's digest is of): whatever else
    was dropped into the export folder since (`.DS_Store`, notes) is never pushed, and an export file
    missing or changed since fails the push in one line instead of publishing it."""
    root = Path(exports.path)
    try:
        produced = sealed_files(root)
    except NotIntact as e:
        raise hub.PublishError(f"{e}; re-run the pipeline to redo the export") from None
    if json_digest(produced) != exports.digest:
        raise hub.PublishError(f"{root / MANIFEST} is not the manifest the export stage sealed; re-run the pipeline "
                           "to redo the export")
    files = {"README.md": Path(card.path) / "README.md"}
    files.update({name: root / name for name in sorted(produced) if name.split("/")[0] in include})
    return files


@stage_task
def card_task(out_dir: str, config: dict, data: PreparedData, adapter: TrainedAdapter, forgetting_md: str | None,
              exports: Exports, commit: str, sources: list[DataSource], judge_md: str | None = None) -> Artifact:
    """`config`: the pipeline's config as the card shows it (`card_config`)."""
    return write_card(config, data, adapter, forgetting_md, exports, commit, sources, Path(out_dir), judge_md)


@stage_task(not_key={"message": "the commit message names the flow run: the same release from another run is "
                                "the same release, and pushes nothing"})
def publish_task(out_dir: str, exports: Exports, card: Artifact, spec: PublishSpec,
                 message: str) -> Published:
    log = stage_logger()
    files = release_files(exports, card, spec.include)
    result = hub.push(files, spec, hub.resolve_token(spec), message, log)
    log(f"published {len(files)} files to {spec.repo_id}@{spec.revision}: "
        + (f"commit {result['commit']}" if result["new_commit"] else "nothing changed, no new commit"))
    folder = fresh_dir(Path(out_dir))
    (folder / "publish.json").write_text(json.dumps(result, indent=1))
    return Published(path=str(folder), digest=seal(folder), **result)
