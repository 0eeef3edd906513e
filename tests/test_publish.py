"""Publishing with the real huggingface_hub client against a Hub-compatible server on 127.0.0.1
(tests/hubserver.py): one commit per push, none when nothing changed, retries on 5xx and dropped
connections, and no partial commit when a push fails."""

import os
from pathlib import Path

import pytest

from dpoflow.base.config import PublishSpec
from dpoflow.engine.hub import PublishError, push, resolve_token

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

    from dpoflow.engine.hub import MAX_RETRY_AFTER

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

    from dpoflow.engine.hub import with_retries

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


@pytest.fixture
def export(tmp_path):
    """(Exports record, card record) as the export and card stages leave them: sealed folders."""
    from dpoflow.base.artifacts import seal
    from dpoflow.base.records import Artifact, Exports

    root = tmp_path / "export"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(2000))
    (root / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (root / "merged").mkdir()
    (root / "merged" / "config.json").write_text('{"a": 1}')
    exports = Exports(path=str(root), digest=seal(root), adapter=str(root / "adapter"), merged=str(root / "merged"),
                      checks={})
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\ntags: [dpo]\n---\n# card\n")
    return exports, Artifact(path=str(card), digest=seal(card))


def test_a_stray_file_in_the_export_folder_is_never_pushed(hub, export):
    from dpoflow.tasks.publish import release_files

    exports, card = export
    root = Path(exports.path)
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "adapter" / "notes.txt").write_text("private notes about this run")
    (root / "merged" / "._config.json").write_bytes(b"\0\5\26\7")
    (root / "merged" / "extra").mkdir()
    (root / "merged" / "extra" / "scratch.bin").write_bytes(b"\1" * 10)
    push(release_files(exports, card, ["adapter", "merged"]), spec(hub), TOKEN, "release", base_delay=0)
    [commit] = hub.commits("someone/model-dpo")
    assert sorted(commit["files"]) == ["README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                       "merged/config.json"]
    assert release_files(exports, card, ["adapter"]).keys() == {"README.md", "adapter/adapter_config.json",
                                                                 "adapter/adapter_model.safetensors"}


@pytest.mark.parametrize("damage", ["missing", "changed", "resealed"])
def test_an_export_missing_or_changed_since_the_stage_fails_the_push_in_one_line(hub, export, damage):
    from dpoflow.base.artifacts import seal
    from dpoflow.tasks.publish import release_files

    exports, card = export
    root = Path(exports.path)
    weights = root / "adapter" / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "changed":
        weights.write_bytes(os.urandom(2000))
    else:  # a manifest written again over a folder with something added: not what the stage sealed
        (root / "adapter" / "notes.txt").write_text("notes")
        seal(root)
    with pytest.raises(PublishError) as raised:
        release_files(exports, card, ["adapter", "merged"])
    message = str(raised.value)
    assert "\n" not in message and message.endswith("re-run the pipeline to redo the export")
    expected = {"missing": f"{weights} is missing", "changed": f"{weights} has changed since its stage produced it",
                "resealed": f"{root / 'manifest.json'} is not the manifest the export stage sealed"}[damage]
    assert message.startswith(expected), message
    assert "someone/model-dpo" not in hub.repos
