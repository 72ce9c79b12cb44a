"""Issue 34: a published revision names its records by pseudonym (HMAC-SHA256 under a key kept only in the
dataset's privacy database), the same in every revision; only the owner maps them back (reveal-ids), and the
paste-back of `veil prepare` still finds each face from a published revision."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from veil.cli import main
from veil.privacy.ledger import PrivacyLedger, ledger_path_for
from veil.privacy.revision_manifest import RevisionChange, load_published, pseudonym, publish_revision, \
    reveal_ids, write_revision

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["smiling", "eyeglasses"]
TELLING = ["anna_mueller_glasses.png", "bob-smith-no-smile.jpg"]  # what real photo names look like
PSEUDONYM = re.compile(r"^r-[0-9a-f]{16}$")
DATA = {"source": "synthetic", "seed": 0, "resolution": 8, "attributes": NAMES}


def _revision(path, ids, *, withheld=(), seed=0):
    changes = [RevisionChange(i, {"smiling": 1, "eyeglasses": -1}, {"smiling": -1, "eyeglasses": -1}, ["smiling"],
                              1.0, 1.0) for i in ids]
    images = {i: np.random.default_rng(k).uniform(-1, 1, (3, 8, 8)).astype(np.float32) for k, i in enumerate(ids)}
    return write_revision(path, base_spec={**DATA, "seed": seed}, attribute_names=NAMES, changes=changes,
                          images=images, withheld=list(withheld))


def _record_releases(ids, seed=0):
    """Releases of ``ids`` in the dataset's database (what `veil edit` leaves before a revision is published)."""
    from veil.privacy.accounting import price_release

    with PrivacyLedger.for_dataset({**DATA, "seed": seed}) as ledger:
        for i in ids:
            ledger.record(image_id=i, protected=["smiling"], epsilon=1.0, strength=1.0, seed=1,
                          released_attributes={"smiling": -1, "eyeglasses": -1},
                          price=price_release(epsilon=1.0, protected=["smiling"], encoding="fresh", pixel_mus=[]))


def test_publish_revision_names_records_by_pseudonym_and_reveal_maps_them_back(tmp_path, capsys):
    _record_releases(TELLING + ["carol.png"])
    rev = _revision(tmp_path / "rev", TELLING, withheld=["carol.png"])
    assert main(["privacy", "publish-revision", "--revision", str(rev), "--out", str(tmp_path / "pub")]) == 0
    pub = load_published(tmp_path / "pub")
    ids = [c["id"] for c in pub["changes"]] + pub["withheld"]
    assert len(ids) == 3 and all(PSEUDONYM.match(i) for i in ids) and pub["ids"] == "pseudonymous"
    everything = " ".join([(tmp_path / "pub/manifest.json").read_text()] +
                          [p.name for p in (tmp_path / "pub").rglob("*")])
    for name in TELLING + ["carol"]:  # no file name, nor its stem, anywhere in the shared folder
        assert name.split(".")[0] not in everything
    assert all(c["file"] == f"images/{c['id']}.png" for c in pub["changes"])
    # the key is only in the owner's database: not in the published folder, not in the account it prints
    with PrivacyLedger(ledger_path_for(DATA)) as ledger:
        key = ledger.pseudonym_key()
        assert ledger.pseudonym_key() == key and len(key) == 32  # made once, kept
        assert key.hex() not in everything and key.hex() not in json.dumps(ledger.summary())
    assert ids == [pseudonym(i, key=key) for i in TELLING + ["carol.png"]]
    capsys.readouterr()
    assert main(["privacy", "reveal-ids", "--revision", str(tmp_path / "pub"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == dict(zip(ids, TELLING + ["carol.png"]))


def test_a_record_keeps_its_pseudonym_across_revisions_and_datasets_differ(tmp_path):
    _record_releases(TELLING)
    _record_releases(TELLING, seed=1)
    first = _revision(tmp_path / "r1", TELLING[:1])
    second = _revision(tmp_path / "r2", TELLING)
    other = _revision(tmp_path / "r3", TELLING[:1], seed=1)  # another dataset: another key
    for rev in (first, second, other):
        assert main(["privacy", "publish-revision", "--revision", str(rev), "--out", str(rev) + "-pub"]) == 0
    a, b, c = (load_published(str(r) + "-pub")["changes"] for r in (first, second, other))
    assert a[0]["id"] == b[0]["id"] != b[1]["id"]  # unlearning and consumers can update by id
    assert c[0]["id"] != a[0]["id"]


def test_without_the_key_nothing_maps_back_and_file_names_are_an_explicit_choice(tmp_path):
    rev = _revision(tmp_path / "rev", TELLING)
    pub = load_published(publish_revision(rev, tmp_path / "pub", id_key=b"a" * 32))
    assert reveal_ids(pub, key=b"b" * 32, record_ids=TELLING) == {c["id"]: None for c in pub["changes"]}
    assert reveal_ids(pub, key=b"a" * 32, record_ids=TELLING) == {pseudonym(i, key=b"a" * 32): i for i in TELLING}
    kept = load_published(publish_revision(rev, tmp_path / "kept", id_key=None, ids="file-names"))
    assert [c["id"] for c in kept["changes"]] == TELLING and kept["ids"] == "file-names"
    with pytest.raises(Exception, match="secret key"):
        publish_revision(rev, tmp_path / "nokey", id_key=None)


def test_publish_needs_the_datasets_database(tmp_path, capsys):
    rev = _revision(tmp_path / "rev", TELLING)  # nothing recorded for this dataset: no key to name its records
    assert main(["privacy", "publish-revision", "--revision", str(rev), "--out", str(tmp_path / "pub")]) == 2
    assert "no privacy database" in capsys.readouterr().err
    assert not (tmp_path / "pub").exists()


def test_paste_back_from_a_published_revision_finds_each_face(tmp_path):
    """`veil prepare` on the astronaut, a tiny edit, publish-revision, and the paste-back from the published copy
    equals the one from the owner's revision (the pseudonyms mapped back with the prepared folder's key)."""
    from photo_helpers import prepare_and_edit_astronaut
    from skimage import data

    ds, _ = prepare_and_edit_astronaut(tmp_path)
    assert main(["privacy", "publish-revision", "--revision", str(tmp_path / "edits/revision"), "--out",
                 str(tmp_path / "pub")]) == 0
    assert PSEUDONYM.match(load_published(tmp_path / "pub")["changes"][0]["id"])
    for edits, out in ((tmp_path / "edits", "own"), (tmp_path / "pub", "shared")):
        assert main(["prepare", "--paste-back", "--dataset", str(ds), "--edits", str(edits),
                     "--out", str(tmp_path / out)]) == 0
    own, shared = (np.array(Image.open(tmp_path / d / "astronaut.png")) for d in ("own", "shared"))
    assert np.array_equal(own, shared) and not np.array_equal(own, data.astronaut())
