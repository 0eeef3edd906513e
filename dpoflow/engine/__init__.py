"""The engine: the work itself, as plain functions with no Prefect in them: reading and cleaning data,
loading models, training (backends, objectives, distributed ranks), evaluation and judging, export and
publishing, experiment tracking. Imports base only."""
