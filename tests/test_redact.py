"""What counts as a secret in what a run records (dpoflow/base/redact.py), and that the records keep what
is not one: digests, paths, names, numbers."""

from dpoflow.base.redact import MASK, redact, redact_flow_parameters, redact_text, secret_key

HF = "hf_" + "Ab3dE" * 7
RANDOM = "Zx8Qw3Lp9Vb2Nm7Ks4Jd6Hf1Gt5Ry0UeT"


def test_token_formats_in_free_text_are_masked():
    for secret in (HF, "sk-proj-" + "aB1" * 8, "ghp_" + "x9Y" * 9, "github_pat_" + "11ABC" * 6, "AKIAIOSFODNN7EXAMPLE",
                   "xoxb-123456789012-abcdefABCDEF", RANDOM):
        text = redact_text(f"prefix {secret} suffix")
        assert secret not in text and text == f"prefix {MASK} suffix", secret
    assert redact_text("Authorization: Bearer abc.def-ghi_123") == f"Authorization: Bearer {MASK}"
    assert redact_text("https://me:s3cr3t@github.com/org/repo.git") == f"https://me:{MASK}@github.com/org/repo.git"


def test_what_is_not_a_secret_is_kept():
    kept = ["a" * 64, "3f2a9c" * 10 + "abcd", "0193b6d2-7a1c-7c3e-9a4e-1f2b3c4d5e6f",  # digests, run ids
            "/work/run/.dpoflow/stages/prepare/3f2a9c3f2a9c3f2a9c3f2a9c/train.parquet",
            "meta-llama/Llama-3.2-1B-Instruct", "20261202-114400-bright-otter", "rewards/accuracies",
            "dpoflow: pipeline demo, run bright-otter", "the bearer of news", "https://huggingface.co/org/model"]
    for text in kept:
        assert redact_text(text) == text
    config = {"dpo": {"beta": 0.1, "loss_type": ["sigmoid"]}, "export": {"gguf_pre_tokenizer": "gpt-2"},
              "train": {"max_length": 128}, "name": "demo", "seed": 42, "cpu_threads": None}
    assert redact(config) == config
    report = {"token_lengths": {"prompt": {"min": 3, "max": 40}}, "counts": {"read": 10}}
    assert redact(report) == report


def test_keys_named_like_secrets_and_env_values_are_masked_whatever_they_hold():
    doc = {"deploy": {"job_variables": {"image": "img:1", "env": {"HF_TOKEN": "short", "DEBUG": "1", "EMPTY": ""},
                                        "api_key": "plain", "nested": {"clientSecret": "x"}}},
           "password": None}
    assert redact(doc) == {"deploy": {"job_variables": {"image": "img:1",
                                                        "env": {"HF_TOKEN": MASK, "DEBUG": MASK, "EMPTY": ""},
                                                        "api_key": MASK, "nested": {"clientSecret": MASK}}},
                           "password": None}
    assert [k for k in ("HF_TOKEN", "hubToken", "db_password", "AWS_SECRET_ACCESS_KEY", "api_key", "apiKey")
            if not secret_key(k)] == []
    assert [k for k in ("gguf_pre_tokenizer", "max_tokens", "author", "tokenizer", "key") if secret_key(k)] == []


def test_set_items_are_masked_like_the_field_they_set():
    items = ["deploy.job_variables.env.HF_TOKEN=plain", "deploy.job_variables={image: a, env: {X: y}}",
             "dpo.beta=0.2", f"description=see {HF}", "export.formats=[adapter]"]
    assert redact(items) == ["deploy.job_variables.env.HF_TOKEN=" + MASK,
                             "deploy.job_variables={env: {X: " + MASK + "}, image: a}",
                             "dpo.beta=0.2", f"description=see {MASK}", "export.formats=[adapter]"]


def test_a_flow_stores_redacted_parameters_but_runs_with_the_real_ones():
    from prefect import flow

    seen = []

    @redact_flow_parameters
    @flow
    def f(config: dict, overrides: list[str]):
        seen.append(config["env"]["HF_TOKEN"])

    stored = f.serialize_parameters({"config": {"env": {"HF_TOKEN": HF}}, "overrides": [f"description={HF}"]})
    assert stored == {"config": {"env": {"HF_TOKEN": MASK}}, "overrides": [f"description={MASK}"]}
    f.fn({"env": {"HF_TOKEN": HF}}, [])
    assert seen == [HF]
