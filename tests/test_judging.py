"""The judged comparison's parts: the order-swap protocol, the statistics (confidence intervals, the
length-controlled win rate), reading a judge's reply, the endpoint judge against a real HTTP server,
the built-in reward model with a tokenizer of its own, and batched generation."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpoflow.engine import generation, judging
from dpoflow.engine.judging import START, TIE, TUNED, Judged


class Positional:
    """Always prefers the answer shown first: a position-biased judge."""

    def compare(self, question, first, second):
        return "first"


class Longer:
    def compare(self, question, first, second):
        return "first" if len(first) > len(second) else "second" if len(second) > len(first) else "tie"


class Mute:
    def compare(self, question, first, second):
        return None


def test_a_win_needs_both_orders_to_agree():
    assert judging.judge_pair(Longer(), "q", "short", "much longer").outcome == "win"
    assert judging.judge_pair(Longer(), "q", "much longer", "short").outcome == "loss"
    assert judging.judge_pair(Longer(), "q", "same", "same").outcome == "tie"
    biased = judging.judge_pair(Positional(), "q", "a", "b")
    assert (biased.tuned_first, biased.start_first) == (TUNED, START)
    assert biased.outcome == "tie" and biased.inconsistent
    mute = judging.judge_pair(Mute(), "q", "a", "b")
    assert mute.outcome == "tie" and not mute.inconsistent


def test_summary_counts_position_bias_and_unreadable_answers_as_ties():
    judged = [judging.judge_pair(Positional(), "q", "a", "b") for _ in range(6)] + \
             [judging.judge_pair(Mute(), "q", "a", "b") for _ in range(2)] + \
             [Judged(TUNED, TUNED), Judged(START, START)]
    f = judging.summarize(judged, [10] * 10, [10] * 10)
    assert (f["wins"], f["ties"], f["losses"]) == (1, 8, 1)
    assert f["inconsistent"] == 6 and f["unparseable"] == 4
    assert f["win_rate"] == pytest.approx(0.5)
    assert f["length_growth"] == pytest.approx(1.0)


def test_wilson_interval():
    low, high = judging.wilson(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert judging.wilson(0, 20)[0] == 0.0 and 0.1 < judging.wilson(0, 20)[1] < 0.2
    assert judging.wilson(20, 20)[1] == 1.0


def outcomes_from(scores):
    return [{1.0: "win", 0.5: "tie", 0.0: "loss"}[s] for s in scores]


def test_length_control_equals_the_win_rate_when_lengths_are_equal():
    rng = random.Random(1)
    outcomes = [rng.choice(["win", "win", "tie", "loss"]) for _ in range(200)]
    raw = sum(judging.scores_of(outcomes)) / 200
    assert judging.length_controlled_win_rate(outcomes, [0] * 200) == pytest.approx(raw, abs=1e-3)


def test_length_control_removes_a_win_rate_that_only_length_explains():
    """The tuned answers are mostly longer, and the judge simply prefers the longer one: a high raw win
    rate, but at equal length the models are even."""
    rng = random.Random(0)
    diff = [rng.uniform(-40, 120) for _ in range(400)]
    # The judge picks the longer answer, the more surely the larger the difference; even at equal length.
    outcomes = ["win" if rng.random() < judging.sigmoid(d / 15) else "loss" for d in diff]
    raw = sum(judging.scores_of(outcomes)) / 400
    lc = judging.length_controlled_win_rate(outcomes, diff)
    assert raw > 0.7
    assert 0.35 < lc < 0.65, lc
    f = judging.summarize([Judged(TUNED, TUNED) if o == "win" else Judged(START, START) for o in outcomes],
                          [100] * 400, [100 + d for d in diff])
    assert f["lc_win_rate"] == pytest.approx(lc) and f["length_coefficient"] > 1
    assert f["lc_win_rate_ci"][0] < lc < f["lc_win_rate_ci"][1]
    assert f["win_rate_ci"][0] < raw < f["win_rate_ci"][1]
    assert f["length_growth"] > 1.3


def test_length_control_keeps_a_win_rate_that_length_does_not_explain():
    rng = random.Random(2)
    diff = [rng.uniform(-40, 120) for _ in range(400)]
    outcomes = ["win" if rng.random() < 0.8 else "loss" for _ in diff]
    raw = sum(judging.scores_of(outcomes)) / 400
    assert judging.length_controlled_win_rate(outcomes, diff) == pytest.approx(raw, abs=0.05)


def test_every_prompt_a_win_stays_finite():
    lc = judging.length_controlled_win_rate(["win"] * 30, list(range(30)))
    assert 0.95 < lc <= 1.0


@pytest.mark.parametrize("reply, verdict", [
    ("A", "first"), ("B", "second"), ("**B**", "second"), ("Answer: A", "first"), ("tie", "tie"),
    ('{"winner": "B"}', "second"), ("The better answer is A.", "first"), ("Verdict: B", "second"),
    ("I cannot decide between them", None), ("", None), ("Both are good", None), ('{"winner": "C"}', None),
])
def test_reading_a_judge_reply(reply, verdict):
    assert judging.parse_verdict(reply) == verdict


def test_gate_failures():
    f = {"win_rate": 0.6, "lc_win_rate": 0.45, "length_growth": 1.5, "mean_tokens_start": 10.0,
         "mean_tokens_tuned": 15.0}
    assert judging.gate_failures(f, 0.5, None, None) == []
    failures = judging.gate_failures(f, 0.7, 0.5, 1.2)
    assert len(failures) == 3
    assert "length-controlled win rate 0.450 below the required 0.5" in failures[1]
    assert "1.50x" in failures[2] and "10.0 -> 15.0" in failures[2]


# --- the endpoint judge, against a real local HTTP server --------------------------------------------

class ChatServer:
    """An OpenAI-style /v1/chat/completions that fails `failures` times with 503, then answers `reply`."""

    def __init__(self, reply="A", failures=0, status=503):
        self.reply, self.failures, self.status, self.seen = reply, failures, status, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if server.failures > 0:
                    server.failures -= 1
                    self.send_response(server.status)
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": server.reply}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_endpoint_judge_retries_then_reads_the_verdict_and_sends_the_key():
    server = ChatServer(reply="B", failures=2)
    try:
        judge = judging.OpenAIJudge(server.url, "judge-model", "sk-test-0123456789abcdef", max_attempts=3,
                                    backoff=0.01, extra_body={"top_k": 1})
        assert judge.compare("q?", "one", "two") == "second"
    finally:
        server.close()
    assert len(server.seen) == 3 and server.seen[-1]["path"] == "/v1/chat/completions"
    body = server.seen[-1]["body"]
    assert server.seen[-1]["auth"] == "Bearer sk-test-0123456789abcdef"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["top_k"] == 1
    assert "[Answer A]\none" in body["messages"][1]["content"]


def test_endpoint_judge_gives_up_with_one_line():
    server = ChatServer(failures=99)
    try:
        judge = judging.OpenAIJudge(server.url, None, None, max_attempts=2, backoff=0.01)
        with pytest.raises(judging.JudgeUnreachable, match=r"unreachable after 2 attempts \(HTTP 503\)"):
            judge.compare("q", "a", "b")
    finally:
        server.close()
    closed = judging.OpenAIJudge(server.url, None, None, max_attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(judging.JudgeUnreachable) as e:
        closed.compare("q", "a", "b")
    assert str(e.value).startswith(f"judge endpoint {server.url}/chat/completions unreachable after 2 attempts (")
    assert "\n" not in str(e.value)


def test_endpoint_judge_does_not_retry_a_refused_key():
    server = ChatServer(failures=5, status=401)
    try:
        judge = judging.OpenAIJudge(server.url, None, "sk-wrong-0123456789abcdef", max_attempts=3, backoff=0.01)
        with pytest.raises(judging.JudgeUnreachable, match="answered HTTP 401"):
            judge.compare("q", "a", "b")
    finally:
        server.close()
    assert len(server.seen) == 1


# --- the built-in reward model and generation, with real tiny models ---------------------------------

@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from dpoflow.engine.tiny_reward import build_tiny_reward_model

    rows = [json.loads(line) for line in open("data/demo/sentiment.jsonl")][:400]
    pairs = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    return build_tiny_reward_model(pairs, tmp_path_factory.mktemp("rm") / "model", log=lambda *_: None), rows


def test_builtin_reward_model_learns_the_pairs_and_reads_text_with_its_own_tokenizer(reward_model, tiny_model):
    from transformers import AutoTokenizer

    path, rows = reward_model
    assert len(AutoTokenizer.from_pretrained(path)) != len(AutoTokenizer.from_pretrained(tiny_model))
    judge = judging.RewardModelJudge(str(path))
    held = [json.loads(line) for line in open("data/demo/sentiment.jsonl")][400:480]
    right = [judging.judge_pair(judge, r["prompt"], r["rejected"], r["chosen"]).outcome for r in held]
    assert right.count("win") / len(right) > 0.8, right
    assert judging.judge_pair(judge, held[0]["prompt"], "positive", "positive").outcome == "tie"


def test_generation_is_batched_without_changing_greedy_answers(tiny_model):
    from dpoflow.engine.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_model(str(tiny_model), "float32")
    questions = ["Is it good?", "Classify the sentiment of this review: the food was great.", "Hello", "Why?" * 5]
    prompts = [generation.render_question(tokenizer, q) for q in questions]
    assert [generation.plain_question(tokenizer, p) for p in prompts] == questions
    one = generation.generate(model, tokenizer, prompts, generation.GenerationSettings(12, 0.0, 1.0, 0, 1))
    batched = generation.generate(model, tokenizer, prompts, generation.GenerationSettings(12, 0.0, 1.0, 0, 4))
    assert [a["answer"] for a in one] == [a["answer"] for a in batched]
    assert [a["tokens"] for a in one] == [a["tokens"] for a in batched] and all(0 <= a["tokens"] <= 12 for a in one)
    sampled = [generation.generate(model, tokenizer, prompts, generation.GenerationSettings(12, 1.0, 1.0, 7, 4))
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed fixes sampled answers too


def test_length_control_does_not_extrapolate_from_a_constant_length_difference():
    """Every tuned answer some 12 tokens shorter (the demo's case): length cannot be told from quality,
    so the length-controlled win rate stays near the plain one instead of swinging to an extreme."""
    rng = random.Random(3)
    diff = [-12 - rng.choice([0, 0, 0, 1]) for _ in range(80)]
    outcomes = ["win"] * 78 + ["tie", "loss"]
    raw = sum(judging.scores_of(outcomes)) / 80
    assert judging.length_controlled_win_rate(outcomes, diff) == pytest.approx(raw, abs=0.03)


def test_an_unreadable_endpoint_reply_is_a_tie_and_is_counted():
    server = ChatServer(reply="Both answers have merits.")
    try:
        judge = judging.OpenAIJudge(server.url, None, None)
        judged = [judging.judge_pair(judge, "q", "a", "b") for _ in range(3)]
    finally:
        server.close()
    assert [j.outcome for j in judged] == ["tie"] * 3 and judged[0].raw == ["Both answers have merits."] * 2
    f = judging.summarize(judged, [3, 3, 3], [4, 4, 4])
    assert f["unparseable"] == 6 and f["ties"] == 3
    assert "| judge answers that could not be read (ties) | 6 of 6 |" in judging.figures_markdown(f, "x")


def test_judge_config_is_checked_when_it_loads(tmp_path):
    from dpoflow.base.config import ConfigError, load_pipeline

    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "p.yaml").write_text("pipelines:\n  x:\n    data: {sources: [d.jsonl]}\n")

    def problems(*overrides):
        with pytest.raises(ConfigError) as e:
            load_pipeline("x", tmp_path / "p.yaml", list(overrides))
        return "\n".join(e.value.problems)

    assert "needs evaluate.judge.enabled" in problems("evaluate.gate.min_lc_win_rate=0.5")
    assert "needs judge.url" in problems("evaluate.judge.enabled=true", "evaluate.judge.kind=openai")
    assert "is a reward model" in problems("evaluate.judge.enabled=true", "evaluate.judge.kind=openai",
                                           "evaluate.judge.url=http://x/v1", "evaluate.judge.model=builtin:tiny-reward")
    assert "prompts file not found" in problems("evaluate.judge.enabled=true", "evaluate.judge.model=builtin:tiny-reward",
                                                "evaluate.judge.prompts_file=missing.jsonl")
    config = load_pipeline("x", tmp_path / "p.yaml", ["evaluate.judge.enabled=true", "evaluate.judge.model=builtin:tiny-reward"])
    assert config.evaluate.judge.model == "builtin:tiny-reward" and config.evaluate.judge.limit == 64
    assert not load_pipeline("x", tmp_path / "p.yaml").evaluate.judge.enabled  # off by default


def test_the_api_key_comes_from_a_secret_block_or_the_variable(monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from dpoflow.base.config import JudgeSpec
    from dpoflow.tasks.judge import JudgeError, api_key

    key = "sk-fromblock-0123456789abcdef"
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-fromenv-0123456789abcdef")
    assert api_key(JudgeSpec(api_key_env="MY_JUDGE_KEY")) == "sk-fromenv-0123456789abcdef"
    assert api_key(JudgeSpec(api_key_env="NOT_SET_ANYWHERE")) is None
    with prefect_test_harness(server_startup_timeout=180):  # a loaded 2-core machine starts it slowly
        Secret(value=key).save("judge-key")
        assert api_key(JudgeSpec(api_key_secret="judge-key", api_key_env="MY_JUDGE_KEY")) == key
        with pytest.raises(JudgeError, match="no Prefect Secret block named") as e:
            api_key(JudgeSpec(api_key_secret=key))  # a key pasted where the block's name goes
    assert key not in str(e.value)
