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
