"""Judging the tuned model's answers against the start model's: the pairwise protocol, the judges and
the statistics. Plain functions; torch, transformers and httpx are imported where used.

Protocol: every prompt's two answers are shown to the judge twice, in both orders. A pair is a win
(or a loss) only when both orders name the same answer; an order-dependent verdict, a tie, or a judge
answer that cannot be read makes the pair a tie. The win rate counts a tie as half a win.

Length control (in the spirit of AlpacaEval 2's length-controlled win rate): judges, human or model,
favour longer answers, and DPO makes answers longer. The pair outcomes (win 1, tie 0.5, loss 0) are
fitted with a logistic regression on the normalized length difference (in tokens),
    P(win) = sigmoid(b0 + b1 * tanh((len_tuned - len_start) / sd)),
and the length-controlled win rate is the fitted win rate at zero length difference, sigmoid(b0). A
ridge prior on b1 (L2) keeps the plain win rate when the length differences hardly vary.
With equal lengths everywhere it is the plain win rate; when only length decides, it is near 0.5.
Confidence intervals are 95%: Wilson's for the win, tie and loss shares, a seeded percentile bootstrap
over prompts for the two win rates.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from dpoflow.base.errors import Explained
from dpoflow.base.redact import redact_text

TUNED, START, TIE = "tuned", "start", "tie"
Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


# ----------------------------------------------------------------------------------------------------
# The pairwise protocol


class Judge(Protocol):
    """Which of two answers to `question` is better: "first", "second", "tie", or None when the judge's
    own answer could not be read."""

    def compare(self, question: str, first: str, second: str) -> str | None: ...


@dataclass
class Judged:
    """One prompt judged in both orders. `tuned_first` / `start_first`: the verdict (TUNED, START, TIE or
    None for unreadable) with the tuned answer shown first / second."""

    tuned_first: str | None
    start_first: str | None
    raw: list[str] = field(default_factory=list)  # the judge's own words, both orders (endpoint judges)

    @property
    def outcome(self) -> str:
        """"win" / "loss" only when both orders agree; "tie" otherwise."""
        if self.tuned_first == self.start_first == TUNED:
            return "win"
        if self.tuned_first == self.start_first == START:
            return "loss"
        return "tie"

    @property
    def inconsistent(self) -> bool:
        """Both orders gave a decisive verdict, and they disagree: the judge followed the position."""
        return {self.tuned_first, self.start_first} == {TUNED, START}


def _named(verdict: str | None, tuned_is: str) -> str | None:
    """A judge's "first"/"second" as TUNED/START, given where the tuned answer was shown."""
    if verdict in (None, "tie"):
        return TIE if verdict == "tie" else None
    return TUNED if verdict == tuned_is else START


def judge_pair(judge: Judge, question: str, start_answer: str, tuned_answer: str) -> Judged:
    a = judge.compare(question, tuned_answer, start_answer)
    raw_a = getattr(judge, "last_raw", None)
    b = judge.compare(question, start_answer, tuned_answer)
    raw_b = getattr(judge, "last_raw", None)
    return Judged(_named(a, "first"), _named(b, "second"), [r for r in (raw_a, raw_b) if r is not None])


# ----------------------------------------------------------------------------------------------------
# Statistics


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a share k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def scores_of(outcomes: list[str]) -> list[float]:
    return [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]


def length_feature(length_diff):
    """tanh of the length difference over its standard deviation (at least one token, so differences of a
    token or two are not blown up to full scale when the lengths hardly vary)."""
    import numpy as np

    d = np.asarray(length_diff, dtype=float)
    return np.tanh(d / max(float(d.std()), 1.0))


# Ridge penalties on (b0, b1): b0 only needs to stay finite (every pair a win); b1 gets a unit prior, so
# a length effect must be shown by pairs of varying length difference: when the differences hardly vary
# (every tuned answer, say, 12 tokens shorter), the data cannot tell length from quality, and the fit
# keeps the plain win rate instead of extrapolating to a length difference it never saw.
L2 = (1e-3, 1.0)


def fit_length_model(y, length_diff, steps: int = 100) -> tuple[float, float]:
    """(b0, b1) of P(win) = sigmoid(b0 + b1 * length_feature), fitted by Newton's method on the soft labels
    `y` (1 win, 0.5 tie, 0 loss), with the ridge penalties L2."""
    import numpy as np

    y = np.asarray(y, dtype=float)
    x = np.stack([np.ones_like(y), length_feature(length_diff)], axis=1)
    penalty = np.diag(L2)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + penalty @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def length_controlled_win_rate(outcomes: list[str], length_diff: list[float]) -> float:
    return sigmoid(fit_length_model(scores_of(outcomes), length_diff)[0])


def bootstrap_interval(outcomes: list[str], length_diff: list[float]) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of the win rate and the length-controlled win rate, resampling prompts."""
    import numpy as np

    rng = np.random.default_rng(BOOTSTRAP_SEED)
    y, d, n = np.asarray(scores_of(outcomes)), np.asarray(length_diff, dtype=float), len(outcomes)
    raw, lc = [], []
    for _ in range(BOOTSTRAP_SAMPLES):
        i = rng.integers(0, n, n)
        raw.append(y[i].mean())
        lc.append(sigmoid(fit_length_model(y[i], d[i])[0]))

    def interval(xs):
        return (float(np.quantile(xs, 0.025)), float(np.quantile(xs, 0.975)))

    return {"win_rate": interval(raw), "lc_win_rate": interval(lc)}


def summarize(judged: list[Judged], start_lengths: list[int], tuned_lengths: list[int]) -> dict:
    """The figures of a judged comparison (shares in 0-1, lengths in tokens)."""
    n = len(judged)
    if n == 0:
        raise ValueError("no prompts were judged")
    outcomes = [j.outcome for j in judged]
    diff = [t - s for s, t in zip(start_lengths, tuned_lengths)]
    counts = {k: outcomes.count(k) for k in ("win", "tie", "loss")}
    b0, b1 = fit_length_model(scores_of(outcomes), diff)
    ci = bootstrap_interval(outcomes, diff)
    mean_start, mean_tuned = sum(start_lengths) / n, sum(tuned_lengths) / n
    return {
        "prompts": n,
        "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
        **{f"{k}_share": v / n for k, v in counts.items()},
        **{f"{k}_share_ci": list(wilson(v, n)) for k, v in counts.items()},
        "win_rate": (counts["win"] + 0.5 * counts["tie"]) / n,
        "win_rate_ci": list(ci["win_rate"]),
        "lc_win_rate": sigmoid(b0),
        "lc_win_rate_ci": list(ci["lc_win_rate"]),
        "length_coefficient": b1,
        "inconsistent": sum(j.inconsistent for j in judged),
        "unparseable": sum((j.tuned_first is None) + (j.start_first is None) for j in judged),
        "mean_tokens_start": mean_start,
        "mean_tokens_tuned": mean_tuned,
        "length_growth": mean_tuned / mean_start if mean_start else float("inf") if mean_tuned else 1.0,
    }


def gate_failures(figures: dict, min_win_rate: float | None, min_lc_win_rate: float | None,
                  max_length_growth: float | None) -> list[str]:
    """What the judged comparison fails of the release gate (empty: it passes)."""
    failures = []
    if min_win_rate is not None and figures["win_rate"] < min_win_rate:
        failures.append(f"judge: win rate {figures['win_rate']:.3f} below the required {min_win_rate:g}")
    if min_lc_win_rate is not None and figures["lc_win_rate"] < min_lc_win_rate:
        failures.append(f"judge: length-controlled win rate {figures['lc_win_rate']:.3f} below the required "
                        f"{min_lc_win_rate:g}")
    if max_length_growth is not None and figures["length_growth"] > max_length_growth:
        failures.append(f"judge: answers grew {figures['length_growth']:.2f}x in length "
                        f"({figures['mean_tokens_start']:.1f} -> {figures['mean_tokens_tuned']:.1f} tokens), "
                        f"more than {max_length_growth:g}x allowed")
    return failures


# ----------------------------------------------------------------------------------------------------
# Reports


def figures_markdown(figures: dict, judge_name: str) -> str:
    f = figures

    def pct(x):
        return f"{100 * x:.1f}%"

    def ci(pair):
        return f"[{100 * pair[0]:.1f}, {100 * pair[1]:.1f}]"

    lines = [f"Judge: {judge_name}; {f['prompts']} prompts, each judged in both orders.", "",
             "| figure | value | 95% CI |", "|---|---:|---|",
             f"| win rate (ties count half) | {pct(f['win_rate'])} | {ci(f['win_rate_ci'])} |",
             f"| length-controlled win rate | {pct(f['lc_win_rate'])} | {ci(f['lc_win_rate_ci'])} |",
             f"| wins | {f['wins']} ({pct(f['win_share'])}) | {ci(f['win_share_ci'])} |",
             f"| ties | {f['ties']} ({pct(f['tie_share'])}) | {ci(f['tie_share_ci'])} |",
             f"| losses | {f['losses']} ({pct(f['loss_share'])}) | {ci(f['loss_share_ci'])} |",
             f"| mean answer length, start -> tuned (tokens) | {f['mean_tokens_start']:.1f} -> "
             f"{f['mean_tokens_tuned']:.1f} ({f['length_growth']:.2f}x) | |",
             f"| orders disagreed (counted as ties) | {f['inconsistent']} | |",
             f"| judge answers that could not be read (ties) | {f['unparseable']} of {2 * f['prompts']} | |"]
    return "\n".join(lines) + "\n"


def samples_markdown(rows: list[dict], n: int = 3, width: int = 600) -> str:
    """Side by side: the clearest wins and the clearest losses (by judge margin where the judge gives one)."""
    def clip(text: str) -> str:
        text = text.strip()
        return (text[:width] + " [...]") if len(text) > width else text

    def block(title: str, picked: list[dict]) -> list[str]:
        out = [f"## {title}", ""]
        if not picked:
            return out + ["(none)", ""]
        for r in picked:
            margin = f" (score margin {r['margin']:+.3f})" if r.get("margin") is not None else ""
            out += [f"### {r['outcome']}{margin}", "", "**Prompt**", "", "```text", clip(r["question"]), "```", "",
                    "| start model | tuned model |", "|---|---|",
                    f"| {_cell(clip(r['start']))} | {_cell(clip(r['tuned']))} |", ""]
        return out

    def strength(r):
        return r["margin"] if r.get("margin") is not None else 0.0

    wins = sorted((r for r in rows if r["outcome"] == "win"), key=strength, reverse=True)[:n]
    losses = sorted((r for r in rows if r["outcome"] == "loss"), key=strength)[:n]
    return "\n".join(["# Judged answers: start model vs tuned", ""] + block("Best wins", wins)
                     + block("Worst losses", losses))


def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|").replace("\n", "<br>")


# ----------------------------------------------------------------------------------------------------
# Judges


class RewardModelJudge:
    """A sequence-classification reward model (a local folder or a Hub id) scores each answer on its own;
    the higher score wins. It reads the question and answer as text through its own tokenizer and chat
    template, so it need not share the policy's tokenizer. Scores are kept, so each answer is scored once
    (the second order costs nothing and agrees by construction)."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16, max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.scores: dict[tuple[str, str], float] = {}

    def text(self, question: str, answer: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False)
        return f"{question}\n\n{answer}"

    def score_all(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Scores of (question, answer) pairs, batched."""
        import torch

        todo = [p for p in dict.fromkeys(pairs) if p not in self.scores]
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i:i + self.batch_size]
            # A rendered chat template already holds its special tokens (BOS...): not added twice.
            enc = self.tokenizer([self.text(q, a) for q, a in batch], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length,
                                 add_special_tokens=not self.tokenizer.chat_template).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            for p, s in zip(batch, logits[:, 0].tolist()):
                self.scores[p] = s
        return [self.scores[p] for p in pairs]

    def compare(self, question: str, first: str, second: str) -> str | None:
        a, b = self.score_all([(question, first), (question, second)])
        return "first" if a > b else "second" if b > a else "tie"


PAIRWISE_SYSTEM = (
    "You are an impartial judge. You compare two answers to the same user question and decide which one is "
    "better: more helpful, correct and relevant. Do not let the order of the answers or their length sway you. "
    'Reply with only the letter of the better answer, A or B, or the word tie; or as JSON: {"winner": "A"}.')
PAIRWISE_USER = "[Question]\n{question}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\nWhich answer is better?"
_LETTER = re.compile(r"^\W*(?:answer\W*)?(A|B|tie)\b", re.I)
_VERDICT = re.compile(r"(?:better answer|winner|verdict)\W{0,5}(?:is\W{0,3})?(?:answer\s*)?\b(A|B|tie)\b", re.I)


def parse_verdict(text: str) -> str | None:
    """"first" / "second" / "tie" from a judge's reply ("A", "**B**", "Answer: A", '{"winner": "B"}',
    "The better answer is B."), None when it names no answer."""
    text = (text or "").strip()
    found = None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            found = next((str(doc[k]) for k in ("winner", "verdict", "better") if k in doc), None)
    except ValueError:
        pass
    if found is None:
        m = _LETTER.match(text) or _VERDICT.search(text)
        found = m.group(1) if m else None
    return {"a": "first", "b": "second", "tie": "tie"}.get((found or "").strip().lower())


class JudgeUnreachable(RuntimeError, Explained):
    """The judge endpoint did not answer after the configured attempts, or refused the request."""


class OpenAIJudge:
    """A chat model behind an OpenAI-compatible endpoint (llama.cpp's server, vLLM, Ollama, a hosted API)
    asked which of two answers is better. Connection failures, timeouts, 429 and 5xx answers are retried
    with backoff; after `max_attempts` the stage fails with one line naming the endpoint."""

    def __init__(self, url: str, model: str | None, api_key: str | None, max_tokens: int = 16, seed: int = 0,
                 timeout: float = 60.0, max_attempts: int = 3, extra_body: dict | None = None, backoff: float = 1.0):
        import httpx

        self.url = url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.model, self.max_tokens, self.seed = model, max_tokens, seed
        self.max_attempts, self.extra_body, self.backoff = max_attempts, extra_body or {}, backoff
        self.last_raw: str | None = None

    def compare(self, question: str, first: str, second: str) -> str | None:
        body = {"messages": [{"role": "system", "content": PAIRWISE_SYSTEM},
                             {"role": "user", "content": PAIRWISE_USER.format(question=question, first=first,
                                                                              second=second)}],
                "temperature": 0.0, "max_tokens": self.max_tokens, "seed": self.seed, **self.extra_body}
        if self.model:
            body["model"] = self.model
        reply = self._post(body)
        try:
            self.last_raw = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            self.last_raw = json.dumps(reply)[:500]
            return None
        return parse_verdict(self.last_raw)

    def _post(self, body: dict) -> dict:
        import httpx

        why = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TransportError as e:
                why = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code != 429 and response.status_code < 500:
                    # A bad key, a wrong path or model: another try cannot fix it.
                    raise JudgeUnreachable(redact_text(f"judge endpoint {self.url} answered HTTP "
                                                       f"{response.status_code}: {_one_line(response.text)}"))
                why = f"HTTP {response.status_code}"
            if attempt < self.max_attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise JudgeUnreachable(redact_text(f"judge endpoint {self.url} unreachable after {self.max_attempts} "
                                           f"attempts ({why})"))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join((text or "").split())
    return text[:limit] + ("..." if len(text) > limit else "")
