"""One privacy database per dataset: where it lives, who may read it, the budgets it keeps and their
history, and the DP training runs it composes (basic composition)."""

import json
import math
import os
import shutil
import stat

import pytest

from veil.errors import ConfigError, DataError, PrivacyError
from veil.privacy.accounting import price_release
from veil.privacy.ledger import DEFAULT_BUDGET, PrivacyLedger, ledger_path_for
from veil.privacy.locations import content_digest

SYNTH = {"source": "synthetic", "seed": 0, "num_images": 64, "resolution": 32}


def _price(epsilon):
    """The price of protecting smiling at ``epsilon`` with the image not read (labels only)."""
    return price_release(epsilon=epsilon, protected=["smiling"], encoding="fresh", pixel_mus=[0.0])


def test_one_database_per_dataset_under_veil_home(veil_home, tmp_path, monkeypatch):
    path = ledger_path_for(SYNTH)
    assert path == veil_home / "datasets" / "synthetic-seed0.sqlite"
    assert ledger_path_for({**SYNTH, "num_images": 3000, "resolution": 64}) == path  # image i depends on (seed, i)
    assert ledger_path_for({**SYNTH, "seed": 1}) != path
    root = tmp_path / "My CelebA"
    _images(root, b"face-a", b"face-b")
    celeba = ledger_path_for({"source": "celeba", "root": str(root)})
    assert celeba.parent == veil_home / "datasets" and celeba.name.startswith("celeba-My_CelebA-")
    assert celeba == ledger_path_for({"source": "celeba", "root": str(root / ".." / root.name), "csv": "x.csv"})
    assert ledger_path_for({"source": "folder", "root": str(root)}) == celeba  # the same images, read as a folder
    alone = ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "f", b"f"))})
    assert alone.name.startswith("folder-f-")
    other = _images(tmp_path / "other", b"face-c")
    assert ledger_path_for({"source": "folder", "root": str(other)}) != ledger_path_for({"source": "folder",
                                                                                        "root": str(root)})
    monkeypatch.delenv("VEIL_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ledger_path_for(SYNTH) == tmp_path / ".veil" / "datasets" / "synthetic-seed0.sqlite"


def _images(folder, *contents, names=None):
    """``folder`` with one image file per content (bytes; the name is not read as an image), and a labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:06d}.jpg" for i in range(len(contents))]
    for name, content in zip(names, contents):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    (folder / "labels.csv").write_text("file,smiling\n" + "".join(f"{n},1\n" for n in names))
    return folder


def test_a_dataset_is_found_by_its_content_not_its_path(veil_home, tmp_path):
    # Issue 30: the database was named by sha256(resolved root), so a copied folder started fresh budgets.
    faces = _images(tmp_path / "faces", b"face-a", b"face-b", b"face-c")
    spec = {"source": "folder", "root": str(faces), "csv": str(faces / "labels.csv")}
    with PrivacyLedger.for_dataset(spec, budget=4.0) as ledger:
        ledger.record(image_id="000000.jpg", protected=["smiling"], epsilon=3.0, strength=0.5, seed=1,
                      released_attributes={"smiling": 1}, price=_price(3.0))
        path = ledger.path
    copy = tmp_path / "elsewhere" / "faces-copy"
    shutil.copytree(faces, copy)
    (copy / "labels.csv").write_text("file,smiling\n000000.jpg,-1\n000001.jpg,1\n000002.jpg,1\n")  # relabelled
    (copy / "notes.txt").write_text("not an image")
    assert ledger_path_for({"source": "folder", "root": str(copy)}) == path  # another path, another folder name
    with PrivacyLedger.for_dataset({"source": "folder", "root": str(copy)}) as ledger:
        assert ledger.path == path and ledger.spends("000000.jpg") == {"smiling": 3.0}
    moved = tmp_path / "moved"
    faces.rename(moved)
    _images(moved, b"face-a", b"face-b", b"face-c", names=["x/a.jpg", "b.jpg", "c.png"])  # renamed, in a subfolder
    for name in ("000000.jpg", "000001.jpg", "000002.jpg"):
        (moved / name).unlink()
    assert ledger_path_for({"source": "folder", "root": str(moved)}) == path
    (moved / "b.jpg").write_bytes(b"another face")  # one image changed: the others still name the database
    assert ledger_path_for({"source": "folder", "root": str(moved)}) == path
    with pytest.raises(DataError, match="no image files"):
        ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "empty"))})
    with pytest.raises(DataError, match="no such folder"):
        ledger_path_for({"source": "folder", "root": str(tmp_path / "nowhere")})


def test_one_image_added_removed_or_changed_keeps_the_database_and_its_budget(veil_home, tmp_path):
    # Issue 30: the database was named by the folder's path (a copy started fresh budgets), then by a hash
    # of all its images (one image added, removed or changed started fresh budgets for all the others).
    faces = _images(tmp_path / "faces", b"face-a", b"face-b", b"face-c")
    with PrivacyLedger.for_dataset({"source": "folder", "root": str(faces)}, budget=4.0) as ledger:
        ledger.record(image_id="000000.jpg", protected=["smiling"], epsilon=3.0, strength=0.5, seed=1,
                      released_attributes={"smiling": 1}, price=_price(3.0))
        path = ledger.path
    added = _images(tmp_path / "added", b"face-a", b"face-b", b"face-c", b"face-d")
    removed = _images(tmp_path / "removed", b"face-a", b"face-b")
    changed = _images(tmp_path / "changed", b"face-a", b"face-B", b"face-c")
    for folder in (added, removed, changed):
        with PrivacyLedger.for_dataset({"source": "folder", "root": str(folder)}) as ledger:
            assert ledger.path == path and ledger.spends("000000.jpg") == {"smiling": 3.0}, folder.name
    (faces / "000002.jpg").unlink()  # in place, too
    (faces / "000001.jpg").write_bytes(b"face-b, retouched")
    _images(faces, b"face-a", b"face-b, retouched", names=["000000.jpg", "000001.jpg"])
    assert ledger_path_for({"source": "folder", "root": str(faces)}) == path
    # A superset's new images joined the database: a folder of only those is the same dataset.
    assert ledger_path_for({"source": "celeba", "root": str(_images(tmp_path / "d", b"face-d"))}) == path
    assert ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "B", b"face-B"))}) == path


def test_datasets_sharing_no_image_get_their_own_databases(veil_home, tmp_path):
    first = ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "one", b"a", b"b", b"c"))})
    second = ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "two", b"x", b"y"))})
    assert first != second and first.parent == second.parent == veil_home / "datasets"
    assert second.name.startswith("folder-two-")
    # One image in common is the same dataset; with both, the database sharing the most images wins.
    assert ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "mixed", b"a", b"x", b"y"))}) == second
    assert ledger_path_for({"source": "folder", "root": str(_images(tmp_path / "three", b"z"))}) not in (first, second)
    index = veil_home / "datasets" / "content-index.db"
    assert stat.S_IMODE(index.stat().st_mode) == 0o600  # which images each dataset holds: owner-only
    assert not list((veil_home / "datasets").glob("*.sqlite"))  # the index is no dataset's database


def test_a_database_from_before_the_index_is_adopted(veil_home, tmp_path):
    # A database named from its folder's path (before this index), found again from a copy of the folder.
    faces = _images(tmp_path / "faces", b"face-a", b"face-b")
    legacy = veil_home / "datasets" / "folder-faces-0123456789ab.sqlite"
    with PrivacyLedger.for_dataset({"source": "folder", "root": str(faces)}, budget=4.0, path=legacy) as ledger:
        ledger.record(image_id="000001.jpg", protected=["smiling"], epsilon=3.0, strength=0.5, seed=1,
                      released_attributes={"smiling": 1}, price=_price(3.0))
    (veil_home / "datasets" / "content-index.db").unlink(missing_ok=True)  # as before the index (or with it lost)
    copy = _images(tmp_path / "copy", b"face-b", b"face-new")
    assert ledger_path_for({"source": "folder", "root": str(copy)}) == legacy


def test_the_content_digests_are_cached_by_size_and_mtime(veil_home, tmp_path):
    faces = _images(tmp_path / "faces", b"face-a", b"face-b")
    first = content_digest(faces)
    cache = list((veil_home / "cache" / "dataset-content").glob("*.json"))
    assert len(cache) == 1 and stat.S_IMODE(cache[0].stat().st_mode) == 0o600
    image = faces / "000000.jpg"
    st = image.stat()
    image.write_bytes(b"face-A")  # same size: with the mtime put back, the cached digest is used
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_digest(faces) == first
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read again
    assert content_digest(faces) != first


@pytest.mark.parametrize("spec", [{"source": "synthetic"}, {"source": "celeba"}, {"source": "folder", "root": ""},
                                  {}, {"source": "imagenet", "root": "/x"}])
def test_a_dataset_without_a_location_is_refused(spec, tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        ledger_path_for(spec)
    with pytest.raises(ConfigError, match="--data"):  # even with an explicit path: releases need a dataset
        PrivacyLedger.for_dataset(spec, path=tmp_path / "l.sqlite")


def test_successive_openings_share_the_dataset_database(veil_home):
    # Item 8: before, each `veil edit` run got a fresh OUT/ledger.sqlite: three runs at budget 4 spent 12.
    for run in range(3):
        with PrivacyLedger.for_dataset(SYNTH, budget=4.0) as ledger:
            attempt = lambda: ledger.record(image_id="synth-0-000000", protected=["smiling"], epsilon=2.0,  # noqa: E731
                                            strength=0.55, seed=run, released_attributes={"smiling": 1},
                                            price=_price(2.0))
            if run < 2:
                attempt()
            else:
                with pytest.raises(PrivacyError, match="spent epsilon 4 of its budget 4"):
                    attempt()
    assert ledger.path == veil_home / "datasets" / "synthetic-seed0.sqlite"
    assert PrivacyLedger.for_dataset(SYNTH).summary()["dataset"] == {"slug": "synthetic-seed0", "source": "synthetic",
                                                                      "seed": 0}


def test_the_database_is_owner_only(veil_home):
    # Item 11: it holds every release's randomized-response seed.
    with PrivacyLedger.for_dataset(SYNTH) as ledger:
        ledger.record(image_id="a", protected=["smiling"], epsilon=1.0, strength=0.5, seed=1,
                      released_attributes={"smiling": 1}, price=_price(1.0))
        for path in (ledger.path, ledger.path.with_name(ledger.path.name + "-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for folder in (ledger.path.parent, veil_home / "datasets"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    loose = veil_home / "loose.sqlite"
    PrivacyLedger(loose).close()
    os.chmod(loose, 0o644)
    PrivacyLedger(loose).close()  # an existing database found readable by others is tightened
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600


def test_the_budget_is_set_once_and_changed_only_by_a_recorded_act(tmp_path):
    path = tmp_path / "l.sqlite"
    assert PrivacyLedger(path).budget == DEFAULT_BUDGET  # the default, stored at creation
    with pytest.raises(PrivacyError, match="set-budget 4"):
        PrivacyLedger(path, budget=4.0)
    ledger = PrivacyLedger(path, budget=DEFAULT_BUDGET)  # the same value is fine
    with pytest.raises(ConfigError, match="--reason"):
        ledger.set_budget(4.0, reason=" ")
    ledger.set_budget(4.0, reason="four medium releases per attribute")
    ledger.set_training_budget(12.0, reason="cap on DP training")
    assert PrivacyLedger(path, budget=4.0).budget == 4.0 and ledger.training_budget == 12.0
    created, changed, training = ledger.budget_changes()
    assert (created["budget"], created["old_value"], created["new_value"]) == ("release", None, DEFAULT_BUDGET)
    assert (changed["old_value"], changed["new_value"], changed["reason"]) == (DEFAULT_BUDGET, 4.0,
                                                                               "four medium releases per attribute")
    assert "@" in changed["changed_by"] and changed["changed_at"].endswith("+00:00")
    assert (training["budget"], training["old_value"], training["new_value"]) == ("training", "inf", 12.0)
    ledger.set_budget(math.inf, reason="unlimited")
    assert ledger.budget is None and ledger.budget_changes()[-1]["new_value"] == "inf"


def _run(ledger, name="runs/a", *, private=True, planned=4.0, kind="diffusion"):
    return ledger.start_training_run(run=name, kind=kind, private=private, planned_epsilon=planned, delta=1e-6,
                                     details={"config": "synthetic32.yaml", "steps": 100})


def test_training_runs_compose_by_sum_and_are_recorded(tmp_path):
    # Item 10: every DP training run on the dataset, in the same database as its releases.
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    assert ledger.training_spent() == (0.0, 0.0) and ledger.training_budget is None
    a = _run(ledger)
    assert ledger.training_spent() == (4.0, 1e-6)  # running: counts its planned epsilon
    ledger.finish_training_run(a, epsilon=3.5, delta=2e-6, steps=100)
    b = _run(ledger, "runs/b", kind="classifier", planned=2.0)
    ledger.finish_training_run(b, epsilon=0.7, delta=None, steps=10, status="failed")  # failed: its planned 2.0
    eps, delta = ledger.training_spent()
    assert eps == pytest.approx(5.5) and delta == pytest.approx(3e-6)
    runs = ledger.training_runs()
    assert [(r["run"], r["kind"], r["status"], r["counted_epsilon"]) for r in runs] == \
        [("runs/a", "diffusion", "finished", 3.5), ("runs/b", "classifier", "failed", 2.0)]
    assert runs[0]["details"]["config"] == "synthetic32.yaml" and runs[0]["finished_at"] and runs[0]["steps"] == 100
    with pytest.raises(ConfigError, match="only a running run"):
        ledger.finish_training_run(a, epsilon=1.0, delta=None, steps=1)
    c = _run(ledger, "runs/control", private=False, planned=None)  # a non-private control on the same data
    ledger.finish_training_run(c, epsilon=None, delta=None, steps=50)
    assert ledger.training_spent()[0] == math.inf
    summary = ledger.summary()
    json.dumps(summary, allow_nan=False)  # JSON-able: no bare inf
    assert summary["training"]["epsilon"] == "inf" and len(summary["training"]["runs"]) == 3


def test_a_training_run_over_the_training_budget_is_refused_before_it_starts(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_training_budget(10.0, reason="dataset cap")
    ledger.finish_training_run(_run(ledger, planned=6.0), epsilon=6.0, delta=1e-6, steps=100)
    with pytest.raises(PrivacyError, match=r"spent epsilon 6 .*budget 10.*plans epsilon 5"):
        _run(ledger, "runs/too-much", planned=5.0)
    with pytest.raises(PrivacyError, match="not private"):
        _run(ledger, "runs/control", private=False, planned=None)
    with pytest.raises(PrivacyError, match="not private"):
        _run(ledger, "runs/unbounded", planned=None)  # private but no epsilon bound
    assert [r["run"] for r in ledger.training_runs()] == ["runs/a"]
    _run(ledger, "runs/fits", planned=4.0)
    with pytest.raises(PrivacyError):  # the running one counts: 6 + 4 = 10, nothing left
        _run(ledger, "runs/tiny", planned=0.5)


@pytest.mark.parametrize("kw, match", [
    (dict(run=""), "run="), (dict(kind=None), "kind="), (dict(private=1), "private="),
    (dict(planned_epsilon=-1), "planned_epsilon"), (dict(delta=1.5), "delta="), (dict(details={"x": object()}), "JSON"),
])
def test_bad_training_run_arguments_are_named(tmp_path, kw, match):
    args = {**dict(run="r", kind="diffusion", private=True, planned_epsilon=1.0, delta=1e-6, details={}), **kw}
    with pytest.raises(ConfigError, match=match):
        PrivacyLedger(tmp_path / "l.sqlite").start_training_run(**args)


def test_summary_counts_release_spends_per_attribute(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", budget=2.0)
    for image_id, eps in (("a", 2.0), ("b", 1.0)):
        ledger.record(image_id=image_id, protected=["smiling"], epsilon=eps, strength=0.5, seed=0,
                      released_attributes={"smiling": 1, "hat": -1}, price=_price(eps))
    r = ledger.summary()["releases"]
    assert (r["releases"], r["images"], r["budget"], r["max_spent"], r["least_left"]) == (2, 2, 2.0, 2.0, 0.0)
    assert r["attributes"]["smiling"] == {"images_protected": 2, "protected_releases": 2, "max_spent": 2.0,
                                          "at_budget": 1, "images_published_exactly": 0}
    assert r["attributes"]["hat"]["images_published_exactly"] == 2
    records = ledger.summary()["records"]  # what the budget limits: each record's composed epsilon
    assert (records["records"], records["pixels"]) == (2, "protected")
    assert records["max_epsilon"] == pytest.approx(2.0, abs=1e-4) and records["least_left"] == pytest.approx(0, abs=1e-4)
    assert "seed" not in json.dumps(ledger.summary())
