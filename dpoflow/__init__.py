"""dpoflow: preference alignment (SFT + DPO) for LLMs as cached Prefect flows.

Layers, top first; a module imports its own layer and those below it, never one above
(tests/test_imports.py checks it):

- `dpoflow.app`: the command line and what only it uses.
- `dpoflow.flows`: the Prefect flows that compose the stages (the repository's flows/).
- `dpoflow.tasks`: one Prefect task per stage, thin (the repository's tasks/).
- `dpoflow.engine`: the work itself, plain functions: data, models, training, evaluation, release.
- `dpoflow.base`: config schema, records, cache keys, artifacts, errors, redaction, runtime facts.
"""
