"""The owner's dataset beside the server (``veil serve --dataset DIR``): images to pick instead of uploading.

    ds = FolderDataset("faces/", attribute_names=["smiling", "eyeglasses", ...], resolution=32)
    ds.ids[:3]               # ["000001.png", ...] in CSV order
    ds.image_png("000001.png"), ds.attributes("000001.png")

The layout is the one ``veil train --data source=folder`` reads: the folder holds the images and a
``labels.csv`` (or the CSV given) with a header row; the id column (``image_id``, ``id``, ``filename``
or ``file``, else the first) names files inside the folder, the other columns are -1/1 or 0/1
attributes (0 reads as -1). Only the model's attributes are kept; one it has and the CSV lacks is
unknown (0). A picked image's id in the ledger is its CSV id, as ``veil edit`` records it, so
releases from the server and from the batch CLI compose; ``fingerprint(id)`` (``veil.privacy.identity``, of
the image at the model's resolution, as an upload is fingerprinted) lets the server give an upload of the
same face that id too. The CSV is read and its names matched as training reads them (``veil.folder_files``:
comma, semicolon or tab; UTF-8 or UTF-16 with a BOM; names equal in Unicode NFC match), and a thumbnail is
decoded and resized as training does (``veil.imaging``: the pixels ``veil edit`` edits for that id).
``check_export_data`` refuses a folder that is not the export's data (by content, ``veil.privacy.locations``)
or whose data folder is gone; ``create_app`` runs it, then ``identify_by_content``: **a picked image's record is
the data file with the same content** (SHA-256), so a renamed copy is charged as the original's record and a
different photo under a known name is not offered at all (nor is any file that is not the export's data: upload
those, they are matched by their fingerprint). Torch-free (PIL, csv).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from veil.errors import DataError
from veil.folder_files import find_on_disk, id_column, listed_ids, read_label_csv
from veil.imaging import read_image
from veil.privacy.identity import Fingerprint, fingerprint
from veil.serve.images import from_png, png_bytes, to_model_input

__all__ = ["FolderDataset", "check_export_data"]

VALUES = {"1": 1, "+1": 1, "1.0": 1, "-1": -1, "-1.0": -1, "0": -1, "0.0": -1}


class FolderDataset:
    def __init__(self, folder, *, attribute_names: Sequence[str], resolution: int, csv_path=None):
        self.folder = Path(folder).expanduser().resolve()
        path = Path(csv_path) if csv_path else self.folder / "labels.csv"
        if not self.folder.is_dir():
            raise DataError(f"--dataset {folder}: not a folder of images")
        if not path.is_file():
            raise DataError(f"--dataset {folder}: no {path.name} with the attributes (give --dataset-csv)")
        table = read_label_csv(path)  # comma/semicolon/tab, UTF-8 or UTF-16 with a BOM (veil.folder_files)
        rows = [table.header] + [cells for _, cells in table.rows]
        if len(rows) < 2 or len(rows[0]) < 2:
            raise DataError(f"{path}: expected a header with an id column and attribute columns, then a row per image")
        header = [h.strip() for h in rows[0]]
        id_col = id_column(header)
        columns = {name: header.index(name) for name in attribute_names if name in header}
        self.resolution, self.attribute_names = resolution, list(attribute_names)
        self._labels: dict[str, dict[str, int]] = {}
        self._files: dict[str, str] = {}  # id -> its name on disk (NFC-equal spellings match)
        on_disk = find_on_disk(self.folder, [row[id_col].strip() for row in rows[1:] if len(row) > id_col])
        for line, row in table.rows:
            name = row[id_col].strip()
            self._files[name] = on_disk.get(name) or name
            file = (self.folder / self._files[name]).resolve()
            if self.folder not in file.parents or not file.is_file():
                raise DataError(f"{path}, line {line}: {name!r} is not a file inside {self.folder}")
            try:
                values = {a: VALUES[row[c].strip()] for a, c in columns.items()}
            except (KeyError, IndexError):
                raise DataError(f"{path}, line {line}: attribute values must be -1/1 or 0/1") from None
            self._labels[name] = {a: values.get(a, 0) for a in attribute_names}
        self.ids = list(self._labels)
        self.listed, self.left_out = len(self.ids), []  # identify_by_content: CSV ids that are not the data's

    def identify_by_content(self, data_folder, data_spec: dict | None = None) -> list[str]:
        """Name each item by the export's data file with the same content, whatever it is called here: by the
        record id ``veil edit`` charges for that file (its CSV id, as the data's CSV spells it, which may differ
        from the name on disk in Unicode normalisation: ``record_names``); an item whose content is no data
        record's is dropped (not offered, charged to no record). Returns the CSV ids dropped (also ``self.left_out``)."""
        from veil.privacy.locations import file_digest, image_digests

        names = record_names(Path(data_folder), data_spec)
        record_of: dict[str, str] = {}
        for name, digest in sorted(image_digests(Path(data_folder)).items()):
            if names is None or name in names:  # a file the data's CSV does not list is no record
                record_of.setdefault(digest, name if names is None else names[name])
        here = image_digests(self.folder)
        labels, files, left_out = {}, {}, []
        for image_id in self.ids:
            rel = Path(os.path.normpath(self._files[image_id])).as_posix()
            record = record_of.get(here.get(rel) or file_digest(self.folder / rel))
            if record is None:
                left_out.append(image_id)
            elif record not in labels:  # the same photo twice here: offered once
                labels[record], files[record] = self._labels[image_id], self._files[image_id]
        self._labels, self._files, self.ids, self.left_out = labels, files, list(labels), left_out
        FolderDataset.image_png.cache_clear()  # ids now name other files: no thumbnail cached under an old id
        return left_out

    def __len__(self) -> int:
        return len(self.ids)

    def attributes(self, image_id: str) -> dict[str, int]:
        return dict(self._labels[image_id])

    @lru_cache(maxsize=1024)
    def image_png(self, image_id: str) -> bytes:
        """The item at the model's resolution as PNG (KeyError for an unknown id)."""
        if image_id not in self._labels:
            raise KeyError(image_id)
        # the owner's own file, decoded as training decodes it; Pillow's own bomb guard applies
        pixels = read_image(self.folder / self._files[image_id], what="--dataset image").pixels
        return png_bytes(to_model_input(pixels, resolution=self.resolution))

    def fingerprint(self, image_id: str) -> Fingerprint:
        """The perceptual fingerprint of the item as the model sees it (KeyError for an unknown id)."""
        return fingerprint(from_png(self.image_png(image_id)))


def record_names(data_folder: Path, data_spec: dict | None) -> dict[str, str] | None:
    """``{file under data_folder (relative, as on disk): its record id}`` for a folder dataset: the id is the
    name its label CSV gives it (``veil.folder_files.listed_ids``, matched on disk as training matches it), so a
    CSV typed ``café.png`` whose file a macOS copy stored decomposed is one record, as in ``veil edit``; None
    for other sources (CelebA: the file name is the id)."""
    spec = dict(data_spec or {})
    if spec.get("source") != "folder":
        return None
    csv = Path(str(spec.get("csv") or Path(data_folder) / "labels.csv")).expanduser()
    if not csv.is_file():
        raise DataError(f"{csv}: the export's data CSV (data.csv, from its veil_export.json) is gone, and it names "
                        f"the records the picks are charged to; restore it, or serve without --dataset")
    ids = listed_ids(csv)
    on_disk = find_on_disk(Path(data_folder), ids)
    return {Path(os.path.normpath(disk)).as_posix(): name for name, disk in on_disk.items() if disk is not None}


def check_export_data(folder, data_spec, *, export: str = "the export") -> Path:
    """DataError unless ``folder`` (``--dataset``) is the data the export's models were trained on (``data_spec``,
    from veil_export.json): the same dataset by content (``veil.privacy.locations.same_dataset``: one image file
    in common), so its images are charged to that dataset's ledger and to no other. The data's own folder must be
    there and readable (``FolderDataset.identify_by_content`` names each item by it); returns that folder."""
    from veil.privacy.locations import image_digests, images_folder, same_dataset

    folder = Path(folder).expanduser().resolve()
    spec = dict(data_spec or {})
    if not spec:
        raise DataError(f"--dataset {folder}: {export} records no data spec, so veil cannot tell whether this folder "
                        f"is its data (whose ledger the picks are charged to); serve without --dataset, or export "
                        f"models whose release records their data")
    if spec.get("source") == "synthetic":
        raise DataError(f"--dataset {folder}: {export}'s data is the synthetic faces (seed {spec.get('seed')}), not "
                        f"a folder, so a folder's images cannot be charged to its ledger; serve without --dataset "
                        f"(upload images), or export models trained on this folder (--data folder)")
    root = spec.get("root")
    if not root or not Path(str(root)).expanduser().is_absolute():
        raise DataError(f"--dataset {folder}: data.root {root!r} from {export}'s veil_export.json is relative (recorded "
                        f"before veil stored absolute paths), so veil cannot tell which folder it meant and does not "
                        f"guess; re-export from a release trained with an absolute data.root")
    data_folder = images_folder(str(spec.get("source")), Path(str(root)).expanduser().resolve())
    try:
        readable = data_folder.is_dir() and bool(image_digests(data_folder))
    except (DataError, OSError):
        readable = False
    if not readable:
        raise DataError(f"--dataset {folder}: {export}'s data folder {data_folder} (data.root {root}, from its "
                        f"veil_export.json) is gone, unreadable or holds no images, and each picked image is named "
                        f"by the data file with the same content (the index's digests alone cannot map names); "
                        f"restore that folder (or a copy) at {root}, or serve without --dataset and upload images")
    if not same_dataset({"source": "folder", "root": str(folder)}, spec):
        raise DataError(f"--dataset {folder}: not {export}'s data ({spec.get('source')} at {root}, from its "
                        f"veil_export.json): not one image file in common, by content, so its images would be charged "
                        f"to another dataset's ledger; give the folder the export's models were trained on")
    return data_folder
