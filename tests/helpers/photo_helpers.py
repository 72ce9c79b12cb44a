"""The own-photos path on a tiny random model, shared by tests/veil/test_prepare.py and
tests/privacy/test_pseudonymous_ids.py: ``prepare_and_edit_astronaut`` prepares scikit-image's astronaut at
32 px and releases one `veil edit --no-check` of the prepared folder."""

from pathlib import Path

from dp_helpers import write_tiny_release
from PIL import Image

from veil.cli import main


def prepare_and_edit_astronaut(tmp_path: Path) -> tuple[Path, Path]:
    """(the prepared dataset folder, the `veil edit --out` folder) under ``tmp_path``."""
    from skimage import data

    from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES

    (tmp_path / "p").mkdir()
    Image.fromarray(data.astronaut()).save(tmp_path / "p/astronaut.png")
    names = list(SYNTHETIC_ATTRIBUTES)
    (tmp_path / "l.csv").write_text(f"photo,{','.join(names)}\nastronaut.png,{','.join(['1'] * len(names))}\n")
    ds = tmp_path / "faces"
    assert main(["prepare", "--photos", str(tmp_path / "p"), "--out", str(ds), "--size", "32",
                 "--csv", str(tmp_path / "l.csv")]) == 0
    run = write_tiny_release(tmp_path / "run", data_spec={"source": "synthetic", "seed": 0, "resolution": 32})
    assert main(["edit", "--checkpoint", str(run), "--data", "folder", "--root", str(ds), "--csv",
                 str(ds / "labels.csv"), "--resolution", "32", "--first", "1", "--protect", "smiling",
                 "--no-check", "--steps", "4", "--out", str(tmp_path / "edits")]) == 0
    return ds, tmp_path / "edits"
