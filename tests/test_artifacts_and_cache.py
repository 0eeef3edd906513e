import sys

from dpoflow.artifacts import folder_digest, is_intact, json_digest, seal
from dpoflow.cache import cache_key_from_param, code_digest, stage_key


def make(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_digest_follows_content_not_path(tmp_path):
    a = make(tmp_path / "a", w="weights", t="tok")
    b = make(tmp_path / "elsewhere" / "b", w="weights", t="tok")
    assert folder_digest(a) == folder_digest(b)
    (b / "w").write_text("weightz")
    assert folder_digest(a) != folder_digest(b)


def test_sealed_folder_detects_changed_and_missing_files_and_ignores_stray_ones(tmp_path):
    folder = make(tmp_path / "out", w="weights", t="tok")
    make(folder / "adapter", a="adapter weights")
    assert not is_intact(folder)
    seal(folder)
    assert is_intact(folder)
    (folder / "w").write_text("tampered")
    assert not is_intact(folder)
    seal(folder)
    # A file the manifest does not list (a desktop's .DS_Store) leaves what the stage made unchanged.
    (folder / ".DS_Store").write_bytes(b"")
    (folder / "nested").mkdir()
    (folder / "nested" / "Thumbs.db").write_text("x")
    assert is_intact(folder)
    (folder / "adapter" / "a").write_text("altered")
    assert not is_intact(folder)
    seal(folder)
    (folder / "t").unlink()
    assert not is_intact(folder)
    (folder / "manifest.json").write_text("{broken")
    assert not is_intact(folder)


def test_stage_key_changes_with_inputs_and_stage_not_with_dict_order():
    module = __name__
    k, material = stage_key("dpo", module, {"model": "m1", "spec": {"beta": 0.1, "lr": 1e-3}})
    assert k == json_digest(material) and material["inputs"]["model"] == "m1"
    assert k == stage_key("dpo", module, {"spec": {"lr": 1e-3, "beta": 0.1}, "model": "m1"})[0]
    assert k != stage_key("dpo", module, {"model": "m1", "spec": {"beta": 0.2, "lr": 1e-3}})[0]
    assert k != stage_key("dpo", module, {"model": "m2", "spec": {"beta": 0.1, "lr": 1e-3}})[0]
    assert k != stage_key("sft", module, {"model": "m1", "spec": {"beta": 0.1, "lr": 1e-3}})[0]


def test_code_digest_covers_the_stage_module(tmp_path, monkeypatch):
    path = tmp_path / "fake_stage.py"
    path.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_stage  # noqa: F401

    before = code_digest("fake_stage")
    path.write_text("X = 2\n")
    code_digest.cache_clear()
    assert code_digest("fake_stage") != before
    del sys.modules["fake_stage"]


def test_prefect_key_comes_from_the_key_parameter():
    assert cache_key_from_param(None, {"stage": "dpo", "key": "abc", "other": 1}) == "dpo-abc"
    assert json_digest({"a": 1}) == json_digest({"a": 1})


def test_code_digest_follows_only_the_dpoflow_modules_a_stage_imports(tmp_path):
    from pathlib import Path

    from dpoflow.cache import PACKAGE, _dpoflow_imports

    stage = tmp_path / "stage.py"
    stage.write_text("from dpoflow.records import ModelRef\n\ndef f():\n    from dpoflow.models import load_model\n")
    found = {p.relative_to(PACKAGE).as_posix() for p in _dpoflow_imports(stage)}
    assert {"records.py", "models.py", "config.py", "artifacts.py", "tiny.py"} <= found  # transitive too
    assert "cli.py" not in found and "wizard.py" not in found
    assert all(Path(PACKAGE / f).is_file() for f in found)


def test_code_digest_sees_an_edit_to_a_shared_module_after_parsing_it(tmp_path, monkeypatch):
    """Each dpoflow module's imports are parsed once per version of the file, not once per process."""
    from dpoflow import cache

    package = tmp_path / "dpoflow"
    package.mkdir()
    (package / "shared.py").write_text("X = 1\n")
    stage = tmp_path / "stage.py"
    stage.write_text("from dpoflow.shared import X\n")
    monkeypatch.setattr(cache, "PACKAGE", package)
    assert cache._dpoflow_imports(stage) == {package / "shared.py"}
    (package / "other.py").write_text("Y = 2\n")
    (package / "shared.py").write_text("from dpoflow.other import Y\nX = 1\n")  # a new import
    assert cache._dpoflow_imports(stage) == {package / "shared.py", package / "other.py"}
