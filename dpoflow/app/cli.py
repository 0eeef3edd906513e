"""`dpoflow`: run and validate the pipelines declared in pipelines.yaml."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dpoflow.app import tempserver
from dpoflow.base.config import DEFAULT_FILE, ConfigError, load_pipeline, pipeline_names, validate_file
from dpoflow.base.runtime import configure_environment, freeze_imports, quiet_data_tracebacks, skip_exit_collection
from dpoflow.engine.tracking import TrackingError


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments and the function that carries it out (exit code).
    A command that runs a Prefect flow names it in `flow` ("module:function"); its handler is then
    given `call_flow`, the flow behind Prefect's temporary server (see `flow_caller`)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[..., int]
    flow: str | None = None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if command.flow is None:
            return command.handler(args)
        return command.handler(args, flow_caller(command.flow))
    except KeyboardInterrupt as e:
        return interrupted(e, args)
    except ConfigError as e:
        print("invalid config:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return parser


# Arguments, shared by several commands.

def file_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", default=DEFAULT_FILE, help="pipelines file (default: ./pipelines.yaml)")


def set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field, e.g. --set dpo.beta=0.2 (repeatable)")


def one_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="name of a pipeline in the file")
    file_argument(p)
    set_argument(p)


def any_pipelines(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", nargs="?", help="one pipeline (default: all)")
    file_argument(p)
    set_argument(p)


def just_the_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", default=DEFAULT_FILE)


def sweep_arguments(p: argparse.ArgumentParser) -> None:
    one_pipeline(p)
    p.add_argument("--vary", action="append", default=[], metavar="KEY.PATH=V1,V2,...",
                   help="a field and its values, e.g. --vary dpo.beta=0.05,0.1,0.2 (repeatable: every combination "
                        "runs); list values as [a,b],[c]")


def init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?")
    p.add_argument("-f", "--file", default=DEFAULT_FILE)
    p.add_argument("--model")
    p.add_argument("--data", action="append", help="a JSONL file of prompt/chosen/rejected (repeatable)")
    p.add_argument("--sft", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--hardware", help="auto, cpu, gpu, gpu-small (4-bit) or gpu-fp8")
    p.add_argument("--export", help="comma separated: adapter,merged,gguf")
    p.add_argument("--hub-repo", help="publish to this Hub repo (owner/name) after the forgetting check passes; "
                                      "'' for none")
    p.add_argument("--yes", action="store_true", help="take defaults for anything not given; never prompt")


def schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", action="store_true")


def sync_arguments(p: argparse.ArgumentParser) -> None:
    just_the_file(p)
    p.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    p.add_argument("--commit", help="commit the deployments pull (deploy.repository); default: this checkout's HEAD")


# Handlers of the commands that read the file and run nothing.

def list_command(args) -> int:
    print("\n".join(pipeline_names(args.file)))
    return 0


def validate_command(args) -> int:
    if args.pipeline:
        configs = [load_pipeline(args.pipeline, args.file, args.overrides)]
    else:
        configs = validate_file(args.file, args.overrides)
    for c in configs:
        print(f"ok: {c.name}")
    return 0


def show_command(args) -> int:
    config = load_pipeline(args.pipeline, args.file, args.overrides)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return 0


def explain_command(args) -> int:
    config = load_pipeline(args.pipeline, args.file, args.overrides)
    configure_environment()
    from dpoflow.flows.explain import explain, render

    print(render(config, explain(config)))
    return 0


def doctor_command(args) -> int:
    from dpoflow.app.doctor import doctor

    return doctor(load_pipeline(args.pipeline, args.file, args.overrides) if args.pipeline else None)


def schema_command(args) -> int:
    from dpoflow.app.schema import SCHEMA_PATH, schema_text

    if args.write:
        SCHEMA_PATH.parent.mkdir(exist_ok=True)
        SCHEMA_PATH.write_text(schema_text())
        print(f"wrote {SCHEMA_PATH}")
    else:
        print(schema_text(), end="")
    return 0


def deployments_command(args) -> int:
    """`sync` (work-pool deployments, made equal to the file) and `serve` (pool-less ones, run here)."""
    from prefect.settings import get_current_settings

    from dpoflow.app import deploy

    configure_environment()
    if not get_current_settings().api.url:  # the environment, or the active Prefect profile
        print(f"dpoflow {args.command}: set PREFECT_API_URL to the Prefect server "
              + ("whose deployments to update" if args.command == "sync" else "to serve the deployments to")
              + " (without it there is only a temporary local one)", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            deploy.serve(Path(args.file))
            return 0
        changes, notes = deploy.sync(Path(args.file), dry_run=args.dry_run, commit=args.commit)
    except deploy.DeployError as e:
        print(f"dpoflow {args.command}: {e}", file=sys.stderr)
        return 2
    for line in [c.line() for c in changes] + notes:
        print(line)
    todo = [c for c in changes if c.action != "unchanged"]
    print(f"{'would make' if args.dry_run else 'made'} {len(todo)} change(s)" + (" (dry run)" if args.dry_run else ""))
    return 0


# The commands that run a flow.

def flow_caller(flow: str) -> Callable[..., Any]:
    """`flow` ("module:function") as a function that the command calls once its input is read and checked
    (a bad config exits before anything starts). The one place Prefect's temporary server starts (when
    no API is configured): it boots while the flow's module, torch and, for a run that trains with
    `train`, its training backend import (Unsloth's import takes ~30 s on a GPU machine; the flow then
    finds it imported), and the flow is called once it answers."""

    def call_flow(*args: Any, train=None) -> Any:
        configure_environment()
        skip_exit_collection()
        boot = tempserver.start()
        module, name = flow.split(":")
        function = getattr(importlib.import_module(module), name)
        import torch  # noqa: F401  (every run needs it)

        if train is not None:
            from dpoflow.engine.backends import BackendError, activate, choose_backend

            try:
                activate(choose_backend(train), train)
            except BackendError:
                pass  # the flow says it, as the run's failure
        quiet_data_tracebacks()
        freeze_imports()
        with tempserver.serving(boot):
            return function(*args)

    return call_flow


def failure(e: Exception) -> str:
    """A failed run's one line: the error, and where the data report of a prepare that failed was kept."""
    report = getattr(e, "data_report", None)
    return f"{type(e).__name__}: {e}" + (f" (data report: {report})" if report else "")


def interrupted(e: KeyboardInterrupt, args: argparse.Namespace) -> int:
    """Ctrl-C, wherever it lands: one line saying what it stopped and what to do next, no traceback;
    130, the shell's code for an interrupted command. A stage names itself in `e` ("prepare", "dpo at
    step 7; checkpoint kept: ..."); finished stages are cached and a training stage resumes from its
    checkpoint, so re-running the same command goes on where this one stopped."""
    name = getattr(args, "pipeline", None)
    typed = f"`dpoflow {args.command}{' ' + name if name else ''}`"
    if args.command in ("run", "prepare", "sweep"):
        where = f"during {e}" if str(e) else "(finished stages are cached)"
        again = "the same `dpoflow sweep` command" if args.command == "sweep" else typed
        line = f"interrupted {where}; re-run {again} to resume"
    else:
        line = f"interrupted during {typed}; run it again to finish"
    print(f"\ndpoflow: {line}", file=sys.stderr)
    return 130


def prepare_command(args, call_flow) -> int:
    config = load_pipeline(args.pipeline, args.file, args.overrides)
    try:
        summary = call_flow(config)
    except Exception as e:
        print(f"\ndpoflow: prepare of {config.name!r} failed: {failure(e)}", file=sys.stderr)
        return 1
    run_dir = Path(summary["run_dir"])
    print((run_dir / "prepare" / "data_report.md").read_text())
    print(f"report:     {run_dir / 'data_report.json'}")
    print(f"set aside:  {run_dir / 'prepare' / 'rejected.jsonl'}")
    return 0


def run_command(args, call_flow) -> int:
    config = load_pipeline(args.pipeline, args.file, args.overrides)
    try:
        summary = call_flow(config, list(args.overrides), train=config.train)
    except TrackingError as e:  # a setting that cannot work, found before any stage ran
        print(f"\ndpoflow: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the flow run is marked failed in Prefect; say why here in one line
        print(f"\ndpoflow: pipeline {config.name!r} failed: {failure(e)}", file=sys.stderr)
        return 1
    from dpoflow.base.summary import StageRow, text_table

    rows = [StageRow(**r) for r in summary["stages"]]
    print(f"\ndpoflow: pipeline {config.name!r} finished\n")
    print(text_table(rows))
    print(f"\nbackend:       {summary['backend']['name']} ({summary['backend']['reason']})")
    print(f"objective:     {summary.get('method', 'dpo')}; reference: {summary['reference']}")
    for note in summary.get("evaluation_notes") or []:  # what evaluation could not measure, and why
        print(f"evaluation:    {note}")
    if summary.get("forgetting"):
        print(f"forgetting:    {'passed' if summary['forgetting']['passed'] else 'FAILED (warn mode)'} "
              f"({len(summary['forgetting']['table'])} tasks, start model vs tuned)")
    if summary.get("judge"):
        j = summary["judge"]
        print(f"judged:        win rate {j['win_rate']:.3f} [{j['win_rate_ci'][0]:.3f}, {j['win_rate_ci'][1]:.3f}], "
              f"length-controlled {j['lc_win_rate']:.3f}; answers {j['mean_tokens_start']:.1f} -> "
              f"{j['mean_tokens_tuned']:.1f} tokens (judge.md in the run folder)")
    print(f"run folder:    {summary['run_dir']}")
    if summary.get("tracking"):
        t = summary["tracking"]
        print(f"tracked:       {t['backend']} experiment {t['experiment']!r}, run {t['run_id']} ({t['location']})")
    for name, path in summary["exports"].items():
        if path:
            print(f"{name + ':':<15}{path}")
    return 0


def sweep_command(args, call_flow) -> int:
    from dpoflow.base.sweeps import plan_sweep

    variants = plan_sweep(args.pipeline, args.vary, args.file, args.overrides)
    name = variants[0].config.name
    print(f"dpoflow: sweep of {name!r}: {len(variants)} variants")
    try:
        result = call_flow(variants, list(args.overrides), train=variants[0].config.train)
    except TrackingError as e:
        print(f"\ndpoflow: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if getattr(e, "sweep_dir", None):  # some variants failed: the table still shows every one
            print("\n" + (Path(e.sweep_dir) / "sweep.md").read_text())
        print(f"\ndpoflow: sweep of {name!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\n" + (Path(result["sweep_dir"]) / "sweep.md").read_text())
    print(f"sweep folder: {result['sweep_dir']}")
    return 0


def init_command(args) -> int:
    from dpoflow.app.wizard import ask_all, write_pipeline

    partial = {"name": args.name, "model": args.model, "data": args.data, "sft": args.sft,
               "hardware": args.hardware, "exports": args.export.split(",") if args.export else None,
               "hub_repo": args.hub_repo}

    def ask(question: str, default: str) -> str:
        if args.yes:
            return default
        answer = input(f"{question} [{default}]: ").strip()
        return answer or default

    try:
        answers = ask_all(partial, ask, print)
        write_pipeline(Path(args.file), answers, print)
    except (ValueError, OSError) as e:
        print(f"dpoflow init: {e}", file=sys.stderr)
        return 2
    print(f"added pipeline {answers.name!r} to {args.file}; check it with: dpoflow explain {answers.name}")
    return 0


# The subcommands, in the order `dpoflow --help` lists them.
COMMANDS: dict[str, Command] = {
    "run": Command("run a pipeline end to end (cached stages are reused)", one_pipeline, run_command,
                   flow="dpoflow.flows.pipeline:pipeline"),
    "sweep": Command("run a pipeline once per combination of --vary values, in one process (shared stages and "
                     "one loaded model), and compare the variants", sweep_arguments, sweep_command,
                     flow="dpoflow.flows.sweep:sweep"),
    "prepare": Command("run only the prepare stage (and the model it tokenizes with) and print the data report",
                       one_pipeline, prepare_command, flow="dpoflow.flows.pipeline:prepare_only"),
    "validate": Command("check the pipelines file; non-zero exit on any bad field", any_pipelines, validate_command),
    "show": Command("print a pipeline's fully resolved config as JSON", one_pipeline, show_command),
    "doctor": Command("check this machine: GPU, backend and a training plan", any_pipelines, doctor_command),
    "explain": Command("resolved config, which stages would run or come from cache and why, and the hardware "
                       "plan; runs nothing", one_pipeline, explain_command),
    "init": Command("write a new pipeline into the file, asking for what flags leave open", init_arguments,
                    init_command),
    "schema": Command("print the JSON Schema of pipelines.yaml (or --write it to schema/)", schema_arguments,
                      schema_command),
    "sync": Command("make the work-pool deployments match the pipelines with deploy.enabled and a "
                    "deploy.work_pool (creates, updates, deletes only dpoflow-managed ones)", sync_arguments,
                    deployments_command),
    "serve": Command("register the deploy-enabled pipelines without a work pool and run them on this machine "
                     "(their schedules and UI runs execute here)", just_the_file, deployments_command),
    "list": Command("list the pipelines in the file", just_the_file, list_command),
}


if __name__ == "__main__":
    sys.exit(main())
