"""Run-time overrides of a pipeline's config as one typed model, so the Prefect UI renders a form for
them: `PipelineOverrides` is `PipelineConfig` with every field optional (nested sections too). What a
run sets is turned into `--set` items, so it goes through the same loading and checks as the CLI."""

from __future__ import annotations

import json
from functools import cache
from typing import Any, Optional, get_origin

from pydantic import BaseModel, ConfigDict, create_model

from .config import PipelineConfig

NOT_OVERRIDABLE = {"name", "deploy"}  # the deployment's identity and its own scheduling


@cache
def partial(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every field optional and None by default; nested models made partial too."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if model is PipelineConfig and name in NOT_OVERRIDABLE:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and get_origin(annotation) is None:
            annotation = partial(annotation)
        fields[name] = (Optional[annotation], None)  # noqa: UP045 - a runtime-built type
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"),
                        __doc__=f"Fields of {model.__name__} to change for this run; unset ones keep the file's.",
                        **fields)


PipelineOverrides = partial(PipelineConfig)


def as_set_items(overrides: BaseModel | dict | None) -> list[str]:
    """`{"dpo": {"beta": 0.2}}` -> ["dpo.beta=0.2"]: the CLI's --set form, values as JSON (valid YAML)."""
    data = overrides.model_dump(exclude_none=True) if isinstance(overrides, BaseModel) else (overrides or {})
    items: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            items.append(f"{prefix}={json.dumps(value)}")

    walk("", data)
    return items


