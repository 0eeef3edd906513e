"""The model card (README.md) of a release: where the model came from, what it was trained on and how,
what the forgetting check measured, what was exported and how each export was verified, and how to
run it. Built from the run's records only, so it says what happened, not what was configured to."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml


def git_commit(folder: Path) -> str:
    """The commit of the repository holding the pipelines file, marked when the tree has changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        if not commit:
            return "not in a git repository"
        return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "git not available"


def render(config: dict, base_source: str, data: dict, metrics: dict, forgetting_md: str | None,
           exports: dict, commit: str, repo_id: str | None, judge_md: str | None = None) -> str:
    """`data`: {"sources": [{label, fingerprint}], "counts": {...}}; `exports`: {"merged": {...},
    "adapter": {...}, "gguf": {type: {...}}} with sizes and checks."""
    front = {"base_model": base_source, "library_name": "transformers", "tags": ["dpo", "trl", "peft", "dpoflow"]}
    name = repo_id or config["name"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"{config['name']}: `{base_source}` aligned with DPO by "
             "dpoflow (TRL `DPOTrainer`, LoRA, reference = the start model with the "
             "adapter off).", "",
             "## Data", "",
             "| source | content hash |", "|---|---|"]
    lines += [f"| `{s['label']}` | `{s['fingerprint'][:16]}` |" for s in data["sources"]]
    c = data["counts"]
    lines += ["", f"{c.get('read', 0)} items read, {c.get('train', 0)} train and {c.get('heldout', 0)} held-out "
                  f"pairs kept, {c.get('rejected', 0)} set aside"
              + (" (" + ", ".join(f"{k.removeprefix('rejected_')} {v}" for k, v in sorted(c.items())
                                  if k.startswith("rejected_")) + ")" if c.get("rejected") else "") + ".", "",
              "## Training", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    lines += ["", "## Forgetting check (start model vs tuned, accuracy points)", "",
              forgetting_md.strip() if forgetting_md else "Not run.", ""]
    if judge_md:
        lines += ["## Generated answers judged against the start model", "",
                  "Each prompt's two answers judged in both orders; a win or loss only when both orders agree. "
                  "The length-controlled win rate is the win rate at equal answer length.", "", judge_md.strip(), ""]
    lines += ["## Files", "",
              "| file | size | verification |", "|---|---|---|"]
    for kind in ("adapter", "merged"):
        if kind in exports:
            e = exports[kind]
            lines.append(f"| `{e['path']}` | {_size(e['size_bytes'])} | {e['check']} |")
    for gguf_type, g in exports.get("gguf", {}).items():
        ties = len(g.get("greedy_near_ties", []))
        check = (f"loads in llama.cpp; tokenization identical; greedy agrees {g['greedy_agree']} "
                 f"({ties} near-ties); min cosine {g['min_cosine']}; top-1 agreement {g['top1_agreement']}")
        lines.append(f"| `gguf/{Path(g['file']).name}` ({gguf_type}) | {_size(g['size_bytes'])} | {check} |")
    lines += ["", "## Use it", ""]
    if "merged" in exports:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(name)}, subfolder=\"merged\")",
                  f"model = AutoModelForCausalLM.from_pretrained({json.dumps(name)}, subfolder=\"merged\")",
                  "```", ""]
    if exports.get("gguf"):
        first = Path(next(iter(exports["gguf"].values()))["file"]).name
        lines += ["```sh", f"llama-cli -m gguf/{first} -cnv        # llama.cpp (chat template embedded)",
                  "cd gguf && ollama create my-model -f Modelfile && ollama run my-model", "```", ""]
    tracking = config.get("tracking") or {}
    # Which tracker holds the run, never where it is; the run id is in the run folder (a cached card is
    # shared by runs).
    if tracking.get("backend", "none") != "none":
        lines += [f"Tracked: {tracking['backend']}, experiment `{tracking['experiment']}` (the run id is in the run "
                  "folder's summary.md).", ""]
    lines += ["## Reproduce", "", f"Pipeline commit: `{commit}`", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
