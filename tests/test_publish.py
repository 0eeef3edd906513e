"""Publishing with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1
(tests/hubserver.py): one commit per push, none when nothing changed, retries on 5xx and dropped
connections, and no partial commit when a push fails."""

import os

import pytest

from dpoflow.config import PublishSpec
from dpoflow.hub import PublishError, push, resolve_token

from hubserver import HubServer

TOKEN = "hf_test_" + "x7" * 12


@pytest.fixture
def hub():
    with HubServer(TOKEN) as server:
        yield server


@pytest.fixture
def release(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(os.urandom(3000))
    (tmp_path / "merged" / "config.json").write_text('{"a": 1}')
    (tmp_path / "README.md").write_text("---\ntags: [dpo]\n---\n# card\n")
    return {"README.md": tmp_path / "README.md", "merged/model.safetensors": tmp_path / "merged" / "model.safetensors",
            "merged/config.json": tmp_path / "merged" / "config.json"}


def spec(hub, **kw):
    return PublishSpec(enabled=True, repo_id="someone/model-dpo", endpoint=hub.url, **kw)


def test_a_push_is_one_private_commit_and_an_unchanged_push_is_none(hub, release):
    first = push(release, spec(hub), TOKEN, "dpoflow: pipeline demo, run a", base_delay=0)
    assert first["new_commit"] and hub.repos["someone/model-dpo"].private
    assert [c["title"] for c in hub.commits("someone/model-dpo")] == ["dpoflow: pipeline demo, run a"]
    assert hub.file("someone/model-dpo", "merged/model.safetensors") == release["merged/model.safetensors"].read_bytes()
    again = push(release, spec(hub), TOKEN, "dpoflow: pipeline demo, run b", base_delay=0)
    assert not again["new_commit"] and again["commit"] == first["commit"]
    assert len(hub.commits("someone/model-dpo")) == 1

    release["merged/config.json"].write_text('{"a": 2}')
    changed = push(release, spec(hub), TOKEN, "run c", base_delay=0)
    assert changed["new_commit"] and hub.commits("someone/model-dpo")[-1]["files"] == ["merged/config.json"]


def test_a_branch_is_created_and_committed_to(hub, release):
    push(release, spec(hub, revision="candidates"), TOKEN, "to a branch", base_delay=0)
    assert len(hub.commits("someone/model-dpo", "candidates")) == 1
    assert hub.commits("someone/model-dpo", "main") == []


def test_a_500_then_success_makes_one_commit(hub, release):
    hub.fail("POST", r"/commit/", "500", times=1)
    logs = []
    result = push(release, spec(hub), TOKEN, "retried", logs.append, base_delay=0)
    assert result["new_commit"] and len(hub.commits("someone/model-dpo")) == 1
    assert any("attempt 1 failed" in line and "retrying" in line for line in logs)


def test_a_connection_dropped_mid_upload_is_retried(hub, release):
    hub.fail("PUT", r"^/lfs/", "drop", times=1)
    result = push(release, spec(hub), TOKEN, "after a drop", base_delay=0)
    assert result["new_commit"] and len(hub.commits("someone/model-dpo")) == 1


def test_a_push_that_keeps_failing_leaves_no_partial_commit(hub, release, monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's own upload retries wait too
    hub.fail("PUT", r"^/lfs/", "drop", times=100)
    with pytest.raises(PublishError, match="failed after 3 attempt"):
        push(release, spec(hub, max_attempts=3), TOKEN, "never lands", base_delay=0)
    assert hub.commits("someone/model-dpo") == []
    assert hub.repos["someone/model-dpo"].files["main"] == {}


def test_a_bad_token_fails_at_once_without_showing_it(hub, release):
    with pytest.raises(PublishError) as e:
        push(release, spec(hub), "hf_wrong_token", "x", base_delay=0)
    assert "failed after 1 attempt" in str(e.value) and "hf_wrong_token" not in str(e.value)


def test_the_token_comes_from_hf_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PublishError, match="set HF_TOKEN"):
        resolve_token(PublishSpec())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_token(PublishSpec()) == TOKEN


def test_a_429_is_retried_after_the_wait_the_hub_asks_for(hub, release, monkeypatch):
    import time

    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    hub.fail("POST", r"/commit/", "429:7", times=1)
    logs = []
    result = push(release, spec(hub), TOKEN, "rate limited once", logs.append, base_delay=0)
    assert result["new_commit"] and len(hub.commits("someone/model-dpo")) == 1
    assert 7.0 in waits and any("429" in line and "retrying in 7 s" in line for line in logs)


def test_a_retry_after_beyond_the_cap_is_capped(hub, release, monkeypatch):
    import time

    from dpoflow.hub import MAX_RETRY_AFTER

    waits = []
    monkeypatch.setattr(time, "sleep", waits.append)
    hub.fail("POST", r"/api/repos/create", "429:86400", times=1)
    assert push(release, spec(hub), TOKEN, "capped", base_delay=0)["new_commit"]
    assert waits == [MAX_RETRY_AFTER]


def test_offline_mode_fails_at_once_with_one_clear_line(hub, release, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    logs = []
    with pytest.raises(PublishError) as e:
        push(release, spec(hub), TOKEN, "x", logs.append, base_delay=0)
    assert str(e.value) == "publish needs the network, but HF_HUB_OFFLINE=1 is set"
    assert logs == [] and hub.requests == []


def test_an_offline_error_from_the_client_is_not_retried():
    from huggingface_hub.errors import OfflineModeIsEnabled

    from dpoflow.hub import with_retries

    calls = []

    def action():
        calls.append(1)
        raise OfflineModeIsEnabled("offline")

    with pytest.raises(PublishError, match="after 1 attempt"):
        with_retries(action, attempts=5, what="x", log=print, base_delay=0)
    assert len(calls) == 1


def test_a_token_pasted_as_the_secret_block_name_is_not_shown():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        with pytest.raises(PublishError, match="no Prefect Secret block named") as e:
            resolve_token(PublishSpec(token_secret=TOKEN))
    assert TOKEN not in str(e.value)
