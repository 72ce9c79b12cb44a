"""Image folder + label CSV: 0/1 mapping, crops, id column, malformed rows, missing files.

Fast and deterministic: fake folders are written into tmp_path and synthetic sets are small.
"""

from __future__ import annotations

import numpy as np
import pytest
from fake_data import GREEN, make_folder

from veil.errors import ConfigError, DataError
from veil.lightning_modules.data.image_folder import ImageFolderCSV


def test_image_folder_csv_loads_maps_01_and_crops(tmp_path):
    csv_path = make_folder(tmp_path / "faces")
    ds = ImageFolderCSV(tmp_path / "faces", csv_path, resolution=16)
    assert ds.ids == ["a.png", "b.png", "sub/c.png"] and ds.attribute_names == ["smiling", "hat", "young"]
    assert ds.attribute_matrix.tolist() == [[1, -1, 1], [-1, 1, 1], [1, 1, -1]]
    image, attrs = ds[2]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    assert np.abs(ds.image_uint8(2).astype(int) - np.array(GREEN)).max() <= 2
    sub = ImageFolderCSV(tmp_path / "faces", csv_path, attributes=["young", "smiling"], resolution=8)
    assert sub.attribute_matrix.tolist() == [[1, 1], [1, -1], [-1, 1]]


def test_image_folder_csv_id_column(tmp_path):
    csv_path = make_folder(tmp_path / "f", header="smiling,image_id", rows=["1,a.png", "-1,b.png"], file_column=1)
    assert ImageFolderCSV(tmp_path / "f", csv_path, resolution=8).ids == ["a.png", "b.png"]
    (tmp_path / "f" / "other.csv").write_text("x,smiling,img\n1,1,a.png\n2,-1,b.png\n")
    ds = ImageFolderCSV(tmp_path / "f", tmp_path / "f" / "other.csv", id_column="img", attributes=["smiling"])
    assert ds.ids == ["a.png", "b.png"] and ds.attribute_matrix.tolist() == [[1], [-1]]
    with pytest.raises(ConfigError, match="id_column"):
        ImageFolderCSV(tmp_path / "f", csv_path, id_column="name")


@pytest.mark.parametrize("rows, error, pattern", [
    (["a.png,1,0,1", "b.png,0,1"], DataError, r"labels.csv, line 3: expected 4"),
    (["a.png,1,0,1", "b.png,0,2,1"], DataError, r"line 3, column 'hat'.*'2'"),
    (["a.png,1,0,1", "a.png,0,1,1"], DataError, r"listed twice"),
])
def test_image_folder_csv_malformed_rows(tmp_path, rows, error, pattern):
    csv_path = make_folder(tmp_path / "f", rows=rows)
    with pytest.raises(error, match=pattern):
        ImageFolderCSV(tmp_path / "f", csv_path)


def test_image_folder_csv_missing_things(tmp_path):
    csv_path = make_folder(tmp_path / "f")
    (tmp_path / "f" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b.png.*absent"):
        ImageFolderCSV(tmp_path / "f", csv_path)
    with pytest.raises(DataError, match="nope.csv"):
        ImageFolderCSV(tmp_path / "f", tmp_path / "nope.csv")
    with pytest.raises(DataError, match="missing_dir"):
        ImageFolderCSV(tmp_path / "missing_dir", csv_path)
    with pytest.raises(ConfigError, match=r"'smile'.*smiling"):
        ImageFolderCSV(tmp_path / "f", csv_path, attributes=["smile"])


@pytest.mark.parametrize("bad_id", ["../outside.png", "sub/../../outside.png", "ABSOLUTE", "link.png", "sublink/x.png"])
def test_image_folder_csv_refuses_ids_outside_the_folder(tmp_path, bad_id):
    """Ids are paths inside the folder: '..', absolute paths and links leading out are refused, naming CSV, line, id."""
    outside = tmp_path / "outside.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(outside)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "x.png")
    csv_path = make_folder(tmp_path / "f")
    (tmp_path / "f" / "link.png").symlink_to(outside)
    (tmp_path / "f" / "sublink").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    bad_id = str(outside) if bad_id == "ABSOLUTE" else bad_id
    csv_path.write_text(f"filename,smiling,hat,young\na.png,1,0,1\n{bad_id},0,1,1\n")
    with pytest.raises(DataError, match=r"labels.csv, line 3: id .* outside the image folder") as info:
        ImageFolderCSV(tmp_path / "f", csv_path, resolution=8)
    assert repr(bad_id) in str(info.value)


def test_image_folder_csv_accepts_links_inside_and_unicode_names(tmp_path):
    csv_path = make_folder(tmp_path / "f")
    (tmp_path / "f" / "alias.png").symlink_to(tmp_path / "f" / "a.png")  # inside the folder: fine
    (tmp_path / "f" / "a.png").rename(tmp_path / "f" / "visage é 1.png")
    (tmp_path / "f" / "alias.png").unlink()
    (tmp_path / "f" / "alias.png").symlink_to(tmp_path / "f" / "visage é 1.png")
    csv_path.write_text("filename,smiling\nvisage é 1.png,1\nalias.png,0\nsub/./c.png,1\n", encoding="utf-8")
    ds = ImageFolderCSV(tmp_path / "f", csv_path, resolution=8)
    assert ds.ids == ["visage é 1.png", "alias.png", "sub/./c.png"] and ds[1][0].shape == (3, 8, 8)
