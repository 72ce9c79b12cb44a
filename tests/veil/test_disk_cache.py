"""tests/helpers/disk_cache.py, the on-disk cache of the tiny models the suite builds: built once per key,
reused while complete and unchanged, rebuilt after a failed build, refused when a test wrote into it."""

import disk_cache
import pytest


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """These tests' folders are not the session's cached models: keep them out of its end-of-session check."""
    monkeypatch.setattr(disk_cache, "USED", set())


def _builder(calls, *, fail=False):
    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"w" * len(calls))
        if fail:
            raise RuntimeError("the build died")
    return build


def test_built_once_then_reused_and_a_new_key_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_TEST_CACHE", str(tmp_path))
    calls = []
    first = disk_cache.cached_dir("m", _builder(calls))
    again = disk_cache.cached_dir("m", _builder(calls))
    assert first == again and len(calls) == 1 and (first / "weights.bin").read_bytes() == b"w"
    other = disk_cache.cached_dir("m", _builder(calls), extra="another source")
    assert other != first and len(calls) == 2


def test_a_source_change_changes_the_key(tmp_path, monkeypatch):
    src = tmp_path / "repo"
    (src / "veil").mkdir(parents=True)
    (src / "veil" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(disk_cache, "REPO", src)
    before = disk_cache.source_key("m")
    (src / "veil" / "a.py").write_text("x = 2\n")
    assert disk_cache.source_key("m") != before


def test_a_failed_build_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_TEST_CACHE", str(tmp_path))
    calls = []
    with pytest.raises(RuntimeError, match="died"):
        disk_cache.cached_dir("m", _builder(calls, fail=True))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    folder = disk_cache.cached_dir("m", _builder(calls))
    assert len(calls) == 2 and (folder / ".complete").exists()


def test_a_test_writing_into_the_shared_copy_is_caught(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_TEST_CACHE", str(tmp_path))
    folder = disk_cache.cached_dir("m", _builder([]))
    (folder / "weights.bin").write_bytes(b"changed by a test")
    assert disk_cache.changed_since_built() == [str(folder / "weights.bin")]  # what the session's end reports
    with pytest.raises(RuntimeError, match="changed after it was built"):
        disk_cache.cached_dir("m", _builder([]))


def test_off_builds_afresh_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv("VEIL_TEST_CACHE", "off")
    calls = []
    a, b = disk_cache.cached_dir("m", _builder(calls)), disk_cache.cached_dir("m", _builder(calls))
    assert a != b and len(calls) == 2
