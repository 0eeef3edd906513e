"""The JSON Schema of pipelines.yaml, generated from the one config schema (PipelineConfig).

Editors that speak yaml-language-server read it through the `$schema` comment at the top of
pipelines.yaml. Every field is optional here because `defaults:` may supply it; whether a pipeline is
complete is checked by `dpoflow validate`. Regenerate with `dpoflow schema --write`; a test fails when
the committed file is stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpoflow.base.config import PipelineConfig

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schema" / "pipelines.schema.json"


def _optional(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _optional(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [_optional(v) for v in node]
    return node


def pipelines_schema() -> dict[str, Any]:
    entry = PipelineConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = entry.pop("$defs", {})
    entry["properties"].pop("name")  # the key under `pipelines:` is the name
    defs["Pipeline"] = entry
    return _optional({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dpoflow pipelines.yaml",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "defaults": {"$ref": "#/$defs/Pipeline", "description": "Merged into every pipeline."},
            "pipelines": {"type": "object", "additionalProperties": {"$ref": "#/$defs/Pipeline"},
                          "description": "Named pipelines: `dpoflow run NAME`."},
        },
        "$defs": defs,
    })


def schema_text() -> str:
    return json.dumps(pipelines_schema(), indent=2, sort_keys=True) + "\n"
