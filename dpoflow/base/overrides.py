"""Run-time overrides of a pipeline's config as one typed model, so the Prefect UI renders a form for
them: `PipelineOverrides` is `PipelineConfig` with every field optional (nested sections too), each
keeping its description, its constraints (`beta > 0`, enums) and, in its description, its default.
What a run sets is turned into `--set` items, so it goes through the same loading and checks as the CLI.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, Optional, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticUndefined

from dpoflow.base.config import PipelineConfig

NOT_OVERRIDABLE = {"name", "deploy"}  # the deployment's identity and its own scheduling


def _describe(name: str, info) -> str:
    """The field's description, with its default: a form field left empty keeps the pipeline's value,
    which is this default unless pipelines.yaml sets another."""
    text = (info.description or name.replace("_", " ").capitalize() + ".").rstrip()
    if info.default is PydanticUndefined or isinstance(info.default, BaseModel):
        return text
    return f"{text} Default: {json.dumps(info.default)}."


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
        elif info.metadata:  # constraints (gt, ge, min_length...) apply to a value when one is given
            annotation = Annotated[(annotation, *info.metadata)]
        fields[name] = (Optional[annotation], Field(None, description=_describe(name, info)))  # noqa: UP045
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"),
                        __doc__=f"Fields of {model.__name__} to change for this run; empty ones keep the pipeline's "
                                "value from pipelines.yaml (`dpoflow show NAME` prints them all).",
                        **fields)


PipelineOverrides = partial(PipelineConfig)


def as_set_items(overrides: BaseModel | dict | None) -> list[str]:
    """`{"dpo": {"beta": 0.2}}` -> ["dpo.beta=0.2"]: the CLI's --set form, values as JSON (valid YAML).

    Only values that are set become items: no overrides, `{}` (what a plain Run or a schedule sends) and
    a section left empty in the form (`{"dpo": {}}`) change nothing."""
    data = overrides.model_dump(exclude_none=True) if isinstance(overrides, BaseModel) else (overrides or {})
    items: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if v is not None:
                    walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            items.append(f"{prefix}={json.dumps(value)}")

    walk("", data)
    return items
