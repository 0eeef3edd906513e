"""`dpoflow init`: from "I have a model and a data file" to a validated entry in pipelines.yaml.

Answers come from flags or prompts; the data file is read to show what the pipeline will train on;
the seed recipe's values are written with comments saying why; the entry is inserted as text into the
`pipelines:` block, so every other line of the file (comments, order) stays exactly as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dpoflow.base.config import ConfigError, DPOSpec, SFTSpec, load_pipeline

HARDWARE = {
    # name: (train.precision, train.quantize, what it means)
    "auto": ("auto", "auto", "decide on the machine that runs it (dpoflow doctor shows the choice)"),
    "cpu": ("auto", "none", "CPU only: fp32, TRL + PEFT"),
    "gpu": ("bf16", "none", "a GPU with bf16 and room for 16-bit weights"),
    "gpu-small": ("bf16", "4bit", "a GPU short on memory: 4-bit base weights (QLoRA, unsloth backend)"),
    "gpu-fp8": ("fp8", "none", "an Ada/Hopper GPU (compute capability 8.9+): FP8 weights (unsloth backend)"),
}
EXPORTS = ("adapter", "merged", "gguf")
DEFAULT_EXPORTS = ("adapter", "merged")


@dataclass
class Answers:
    name: str
    model: str
    data: list[str]
    sft: bool
    hardware: str = "auto"
    exports: list[str] = field(default_factory=lambda: list(DEFAULT_EXPORTS))
    hub_repo: str | None = None  # publish here after the forgetting check passes


def inspect_data(path: Path, show: int = 3) -> tuple[str, list[dict], int]:
    """(format, first `show` usable pairs as {prompt, chosen, rejected}, rows read). Raises ValueError
    naming file and line when the file cannot be used."""
    from dpoflow.base.config import SourceSpec
    from dpoflow.engine.pairs import DataError, Rejection, detect_format, to_pairs
    from dpoflow.engine.sources import read_source

    pairs, read, problems, formats = [], 0, [], set()
    try:
        for where, row, rejection in read_source(SourceSpec(path=str(path))):
            read += 1
            items = [(where, rejection)] if rejection else to_pairs(where, row)
            for _, pair in items:
                if isinstance(pair, Rejection):
                    problems.append(pair.message())
                    continue
                formats.add(detect_format(row))
                if len(pairs) < show:
                    pairs.append({"prompt": pair.messages[-1]["content"], "chosen": pair.chosen,
                                  "rejected": pair.rejected})
            if read >= 200 and pairs:
                break
    except DataError as e:
        raise ValueError(str(e)) from None
    if not pairs:
        first = problems[0] if problems else f"{path}: no rows"
        raise ValueError(f"no usable preference pair found; first problem: {first}. Expected rows (JSONL, "
                         "JSON, Parquet or CSV) with prompt/chosen/rejected strings, chosen/rejected message "
                         "lists, two '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts, or a prompt with "
                         "scored completions.")
    return " + ".join(sorted(formats)), pairs, read


def render_entry(a: Answers, indent: str = "  ") -> str:
    precision, quantize, meaning = HARDWARE[a.hardware]
    dpo, sft = DPOSpec(), SFTSpec()
    sources = ", ".join(json.dumps(s) for s in a.data)
    lines = [
        f"{a.name}:",
        "  description: written by dpoflow init",
        "  model:",
        f"    source: {json.dumps(a.model)}",
        "  data:",
        f"    sources: [{sources}]",
        f"  train:  # hardware: {a.hardware}: {meaning}",
        f"    precision: {precision}",
        f"    quantize: {quantize}",
        "  sft:",
        f"    enabled: {'true' if a.sft else 'false'}",
        f"    learning_rate: {sft.learning_rate:g}  # the seed recipe's LoRA SFT rate",
        "  dpo:",
        f"    learning_rate: {dpo.learning_rate:g}  # the seed recipe; if the model collapses or forgets, "
        "lower it and keep beta near 0.1",
        f"    beta: {dpo.beta:g}",
        f"    per_device_batch_size: {dpo.per_device_batch_size}",
        f"    gradient_accumulation_steps: {dpo.gradient_accumulation_steps}  # effective batch "
        f"{dpo.per_device_batch_size * dpo.gradient_accumulation_steps}; the seed uses 8-16 accumulation steps",
        "  export:",
        f"    formats: [{', '.join(a.exports)}]" + ("  # gguf: pip install 'dpoflow[gguf]'" if "gguf" in a.exports
                                                   else ""),
    ]
    if a.hub_repo:
        lines += [
            "  publish:  # only after the forgetting check passes; token from HF_TOKEN (or token_secret)",
            "    enabled: true",
            f"    repo_id: {json.dumps(a.hub_repo)}",
            "    private: true",
        ]
    return "\n".join(indent + line for line in lines) + "\n"


def insert_entry(text: str, name: str, entry: str) -> str:
    """`text` with `entry` added at the end of its `pipelines:` block (created when missing)."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"pipelines:\s*(#.*)?$", line)), None)
    if start is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + "pipelines:\n" + entry
    # The block is every line up to the next top-level key; the entry goes after its last indented
    # line, so blank lines and column-0 comments that follow the block stay after it.
    block_end = start + 1
    while block_end < len(lines) and (not lines[block_end].strip() or lines[block_end][0] in " \t#"):
        block_end += 1
    end = start + 1
    for i in range(start + 1, block_end):
        if lines[i].strip() and lines[i][0] in " \t":
            end = i + 1
    if any(re.match(rf"\s+{re.escape(name)}:\s*(#.*)?$", line) for line in lines[start + 1:end]):
        raise ValueError(f"a pipeline named {name!r} already exists")
    prefix = "" if lines[end - 1].endswith("\n") else "\n"
    return "".join(lines[:end]) + prefix + "\n" + entry + "".join(lines[end:])


def entry_indent(text: str) -> str:
    """The indentation the file's existing pipeline entries use (two spaces if it has none)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"pipelines:\s*(#.*)?$", line):
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.lstrip().startswith("#"):
                    return nxt[: len(nxt) - len(nxt.lstrip())] or "  "
    return "  "


def ask_all(partial: dict, ask: Callable[[str, str], str], say: Callable[[str], None]) -> Answers:
    """Fill what the flags left open by asking; show what the data file holds."""
    name = partial.get("name") or ask("pipeline name", "my-dpo")
    model = partial.get("model") or ask("model (Hub id, local folder, or builtin:tiny-llama)", "builtin:tiny-llama")
    data = partial.get("data") or [s.strip() for s in ask("data files (JSONL, comma separated)", "").split(",")
                                   if s.strip()]
    sft = partial.get("sft")
    if sft is None:
        sft = ask("run LoRA SFT on the chosen answers first? (y/n)", "n").lower().startswith("y")
    hardware = partial.get("hardware") or ask(f"target hardware ({'/'.join(HARDWARE)})", "auto")
    if hardware not in HARDWARE:
        raise ValueError(f"target hardware {hardware!r}: choose one of {', '.join(HARDWARE)}")
    exports = partial.get("exports") or [s.strip() for s in ask(f"exports ({','.join(EXPORTS)})",
                                                                ",".join(DEFAULT_EXPORTS)).split(",") if s.strip()]
    bad = [e for e in exports if e not in EXPORTS]
    if bad:
        raise ValueError(f"exports {bad}: choose from {', '.join(EXPORTS)}")
    hub_repo = partial.get("hub_repo")
    if hub_repo is None:
        hub_repo = ask("Hugging Face Hub repo to publish to, e.g. my-org/my-model-dpo (empty: don't publish)", "")
    hub_repo = hub_repo.strip() or None
    if hub_repo and not re.fullmatch(r"[\w.-]+/[\w.-]+", hub_repo):
        raise ValueError(f"Hub repo {hub_repo!r}: expected owner/name")
    return Answers(name=name, model=model, data=data, sft=sft, hardware=hardware, exports=exports,
                   hub_repo=hub_repo)


def write_pipeline(file: Path, answers: Answers, say: Callable[[str], None]) -> None:
    """Check the data, insert the entry, and validate the result before the file is replaced."""
    if not answers.data:
        raise ValueError("at least one data file is needed")
    for source in answers.data:
        path = (file.parent / source) if not Path(source).is_absolute() else Path(source)
        fmt, pairs, read = inspect_data(path)
        say(f"{source}: format {fmt}; first {len(pairs)} pairs:")
        for p in pairs:
            say(f"  prompt:   {_short(p['prompt'])}\n  chosen:   {_short(p['chosen'])}\n"
                f"  rejected: {_short(p['rejected'])}")
    text = file.read_text(encoding="utf-8") if file.exists() else ""
    new_text = insert_entry(text, answers.name, render_entry(answers, entry_indent(text)))
    tmp = file.with_name(file.name + ".init-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    try:
        load_pipeline(answers.name, tmp)
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(file)


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
