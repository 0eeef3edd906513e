"""`dpoflow`: run and validate the pipelines declared in pipelines.yaml."""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_FILE, ConfigError, load_pipeline, pipeline_names, validate_file
from .runtime import configure_environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpoflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_common(p, needs_name: bool):
        if needs_name:
            p.add_argument("pipeline", help="name of a pipeline in the file")
        else:
            p.add_argument("pipeline", nargs="?", help="one pipeline (default: all)")
        p.add_argument("-f", "--file", default=DEFAULT_FILE, help="pipelines file (default: ./pipelines.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config field, e.g. --set dpo.beta=0.2 (repeatable)")

    add_common(sub.add_parser("run", help="run a pipeline end to end (cached stages are reused)"), True)
    add_common(sub.add_parser("validate", help="check the pipelines file; non-zero exit on any bad field"), False)
    add_common(sub.add_parser("show", help="print a pipeline's fully resolved config as JSON"), True)
    p = sub.add_parser("list", help="list the pipelines in the file")
    p.add_argument("-f", "--file", default=DEFAULT_FILE)
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            print("\n".join(pipeline_names(args.file)))
            return 0
        if args.command == "validate":
            if args.pipeline:
                configs = [load_pipeline(args.pipeline, args.file, args.overrides)]
            else:
                configs = validate_file(args.file, args.overrides)
            for c in configs:
                print(f"ok: {c.name}")
            return 0
        config = load_pipeline(args.pipeline, args.file, args.overrides)
        if args.command == "show":
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
    except ConfigError as e:
        print("invalid config:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    return run(config)


def run(config) -> int:
    configure_environment()
    from dpoflow.flows.pipeline import pipeline
    from dpoflow.summary import StageRow, text_table

    try:
        summary = pipeline(config)
    except Exception as e:  # the flow run is marked failed in Prefect; say why here in one line
        print(f"\ndpoflow: pipeline {config.name!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    rows = [StageRow(**r) for r in summary["stages"]]
    print(f"\ndpoflow: pipeline {config.name!r} finished\n")
    print(text_table(rows))
    print(f"\nbackend:       {summary['backend']['name']} ({summary['backend']['reason']})")
    print(f"DPO reference: {summary['reference']}")
    print(f"run folder:    {summary['run_dir']}")
    for name, path in summary["exports"].items():
        if path:
            print(f"{name + ':':<15}{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
