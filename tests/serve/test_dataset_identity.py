"""Issue 34: a ``veil serve --dataset`` image's record is its CONTENT, not its file name. Each served file is named
by the export's data file with the same SHA-256 (its path in the data folder, the record ``veil edit`` charges):
a renamed copy is charged as the original's record (same budget); a different photo under a known name, or any
file that is not the data's, is not offered; with the data's own folder gone, --dataset is refused in one line.
Through the HTTP API with a stand-in editor (no model is run: a pick creates a session, nothing is edited)."""

import logging
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from veil.errors import DataError
from veil.privacy.accounting import price_release
from veil.privacy.locations import ledger_path_for
from veil.serve.app import ServeSettings, create_app
from veil.serve.dataset import FolderDataset
from veil.serve.state import open_state

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["smiling"]


class StandInEditor:
    """What create_app and a dataset pick read of an editor; no model (no classifier: the CSV's labels are used)."""
    attribute_names = classifier_attribute_names = NAMES
    can_check, resolution, batch_size, num_steps = False, 32, 4, 2
    backend, provider, model_privacy = "stand-in", "cpu", None


def _photo(seed):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _folder(root, photos: dict[str, int]):
    """``root`` with one PNG per name (its pixels from the seed given) and a labels.csv listing them."""
    root.mkdir(parents=True)
    for name, seed in photos.items():
        Image.fromarray(_photo(seed)).save(root / name)
    (root / "labels.csv").write_text("file,smiling\n" + "".join(f"{n},1\n" for n in photos))
    return root


def _spec(root):
    return {"source": "folder", "root": str(root), "csv": str(root / "labels.csv"), "resolution": 32}


@pytest.fixture
def data(tmp_path):
    """The export's data: p0..p3.png, photos of seeds 0..3."""
    return _folder(tmp_path / "photos", {f"p{i}.png": i for i in range(4)})


@pytest.fixture
def serve(tmp_path):
    stores = []

    def start(folder, spec):
        store = open_state(str(tmp_path / "ledger.sqlite"), budget=10.0)
        stores.append(store)
        dataset = FolderDataset(folder, attribute_names=NAMES, resolution=32)
        app = create_app(editor=StandInEditor(), store=store, settings=ServeSettings(), data_spec=spec,
                         dataset=dataset)
        return TestClient(app, raise_server_exceptions=False), store, dataset

    yield start
    for store in stores:
        store.close()


def _offered(client):
    return [item["id"] for item in client.get("/v1/dataset").json()["items"]]


def _pick(client, image_id):
    return client.post("/v1/sessions", data={"dataset_image": image_id})


def test_a_renamed_copy_is_charged_as_the_originals_record(tmp_path, data, serve):
    # HEAD: the copy's ids were its own file names (q0..q3.png), each a fresh record with a fresh budget.
    copy = _folder(tmp_path / "renamed", {f"q{i}.png": (i + 1) % 4 for i in range(4)})  # q0 holds p1's photo, ...
    client, store, _ = serve(copy, _spec(data))
    store.ledger.record(image_id="p1.png", protected=["smiling"], epsilon=1.0, strength=0.7, seed=1, level="high",
                        released_attributes={"smiling": 1},
                        price=price_release(epsilon=1.0, protected=["smiling"], encoding="fresh", pixel_mus=[0.0]))
    with client:
        assert _offered(client) == ["p1.png", "p2.png", "p3.png", "p0.png"]  # the copy's CSV order, data's names
        picked = _pick(client, "p1.png")
        assert picked.status_code == 201, picked.text
        state = picked.json()
        assert state["image_id"] == "p1.png"  # the record an accept is charged to
        assert len(state["history"]) == 1 and state["spent"] == store.ledger.spends("p1.png")  # its budget
        assert _pick(client, "q0.png").status_code == 422  # the copy's own name is no record


def test_a_different_photo_under_a_known_name_is_not_offered(tmp_path, data, serve, caplog):
    # HEAD: p2.png (another person's photo here) was offered and charged as the data's p2.png record.
    mixed = _folder(tmp_path / "mixed", {"p0.png": 0, "p1.png": 1, "p2.png": 99, "p3.png": 3, "new.png": 98})
    with caplog.at_level(logging.WARNING, logger="veil.serve"):
        client, _, dataset = serve(mixed, _spec(data))
    assert dataset.left_out == ["p2.png", "new.png"] and dataset.listed == 5
    assert "p2.png" in caplog.text and "new.png" in caplog.text  # the names go to the server's log
    with client:
        assert _offered(client) == ["p0.png", "p1.png", "p3.png"]
        assert client.get("/v1/info").json()["dataset"]["count"] == 3
        assert _pick(client, "p2.png").status_code == 422
        assert _pick(client, "new.png").status_code == 422
        assert _pick(client, "p3.png").json()["image_id"] == "p3.png"


def test_the_data_folder_itself_keeps_its_file_names(data, serve):
    # Unchanged behaviour for the data's own folder (on HEAD this fails only at `left_out`/`listed`, which are new).
    client, _, dataset = serve(data, _spec(data))
    assert dataset.ids == ["p0.png", "p1.png", "p2.png", "p3.png"] and dataset.left_out == [] and dataset.listed == 4
    with client:
        assert _offered(client) == dataset.ids
        assert _pick(client, "p2.png").json()["image_id"] == "p2.png"


def test_refused_in_one_line_when_the_data_folder_is_gone(tmp_path, data, serve):
    # HEAD: the content index (written when the data's ledger was found, as training does) still listed the data's
    # digests, so the copy passed and was charged by its file names, none of them checked against the data.
    ledger_path_for(_spec(data))  # the index now knows the folder's images
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    shutil.rmtree(data)
    with pytest.raises(DataError) as refused:
        serve(copy, _spec(data))
    message = str(refused.value)
    assert "\n" not in message and str(data) in message and "gone" in message and "restore" in message
