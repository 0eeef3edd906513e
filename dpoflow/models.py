"""Model sources (built-in tiny, local folder, Hub id) and loading a model + tokenizer from a folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .artifacts import folder_digest, json_digest, seal
from .config import ModelSpec

BUILTIN = "builtin:"
# For base models that ship without one: plain role markers, ending each turn with the EOS token.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def source_kind(spec: ModelSpec) -> str:
    if spec.source.startswith(BUILTIN):
        return "builtin"
    if Path(spec.source).is_absolute():
        return "local"
    return "hub"


def key_inputs(spec: ModelSpec) -> dict[str, Any]:
    """What identifies the model's content: the built-in name, a local folder's digest, or the Hub
    commit (resolved when the Hub answers, else the configured revision)."""
    kind = source_kind(spec)
    if kind == "builtin":
        return {"builtin": spec.source}
    if kind == "local":
        folder = Path(spec.source)
        if not folder.is_dir():
            raise FileNotFoundError(f"model.source: {folder} is not a folder")
        return {"local_digest": folder_digest(folder)}
    return {"hub": spec.source, "commit": _hub_commit(spec.source, spec.revision)}


def materialize(spec: ModelSpec, out_dir: Path) -> tuple[str, str]:
    """Make the model loadable from a local folder; returns (folder, content digest)."""
    kind = source_kind(spec)
    info = {"source": spec.source, "revision": spec.revision, "kind": kind}
    if kind == "builtin":
        from .tiny import build_tiny_model

        build_tiny_model(spec.source[len(BUILTIN):], out_dir)
        return str(out_dir), seal(out_dir)
    if kind == "local":
        folder = Path(spec.source)
        digest = folder_digest(folder)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.source, revision=spec.revision))
        digest = json_digest({"hub": spec.source, "commit": folder.name})
    (out_dir / "source.json").write_text(json.dumps({**info, "path": str(folder), "digest": digest}, indent=1))
    seal(out_dir)
    return str(folder), digest


def _hub_commit(repo_id: str, revision: str | None) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return revision or "main"
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha or (revision or "main")
    except Exception:  # offline or unreachable: the configured revision is the best identity we have
        return revision or "main"


def torch_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
