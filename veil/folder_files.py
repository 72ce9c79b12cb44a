"""An image folder's label CSV and its file names, read the same way by training, ``veil edit`` and the server.

    table = read_label_csv(Path("faces/labels.csv"))   # LabelTable(header, rows [(line, cells)], delimiter, encoding)
    on_disk = find_on_disk(Path("faces"), ["café.png", "sub/b.png"])   # {name: the file's name on disk, or None}

The CSV's encoding is read from its byte-order mark: UTF-16 (LE or BE) or UTF-8 with a BOM; without one,
UTF-16 when every other byte of its start is NUL, else UTF-8 (a file that is none of these is refused,
naming the byte found and how to save it). Its delimiter is
the one of comma, semicolon and tab that splits the header row into the most fields (a comma on a tie), as
spreadsheet programs in many locales write semicolons and "Unicode text" exports use tabs and UTF-16.

File names are matched in Unicode NFC on both sides: a CSV naming ``café.png`` (composed é, as typed) finds
a file stored decomposed (``cafe\\u0301.png``, as macOS copies write), and the other way round; an exact
match wins, and the name found on disk is the one opened. Torch-free (the server imports it).
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from veil.errors import DataError

__all__ = ["LabelTable", "read_label_csv", "find_on_disk", "DELIMITER_NAMES", "ID_COLUMNS", "id_column", "listed_ids"]

DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}
ID_COLUMNS = ("image_id", "id", "filename", "file")  # the id column's names, in order of preference; else the first
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_SAVE_AS = "save it as CSV UTF-8 (comma, semicolon or tab separated)"


@dataclass(frozen=True)
class LabelTable:
    """A CSV's header (stripped cells), its non-blank rows as (line number, cells), and how it was read."""

    header: list[str]
    rows: list[tuple[int, list[str]]]
    delimiter: str
    encoding: str

    @property
    def delimiter_name(self) -> str:
        return DELIMITER_NAMES[self.delimiter]


def _text(data: bytes, path: Path) -> tuple[str, str]:
    """(text, encoding) from the bytes: a BOM decides, else UTF-8; DataError naming what was found."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), "UTF-16 with a byte-order mark" if "16" in encoding else "UTF-8 with BOM"
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: starts with a {encoding.upper()} byte-order mark but is not valid "
                                f"{encoding.upper()} ({e.reason} at byte {e.start}); {_SAVE_AS}") from None
    head = data[:400]
    if head.count(0) >= max(2, len(head) // 4):  # ASCII text in UTF-16 without a BOM: every other byte is NUL
        encoding = "utf-16-le" if head[1::2].count(0) > head[0::2].count(0) else "utf-16-be"
        try:
            return data.decode(encoding), f"{encoding.upper()} without a byte-order mark"
        except UnicodeDecodeError:
            raise DataError(f"{path}: the label CSV looks like UTF-16 without a byte-order mark (NUL bytes between "
                            f"the characters) but is not; {_SAVE_AS}") from None
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the label CSV is not UTF-8 (byte 0x{data[e.start]:02x} at position {e.start}; "
                        f"a Windows or Latin-1 code page, or not a text file?); {_SAVE_AS}") from None


def _delimiter(first_line: str) -> str:
    """The candidate that splits the header row into the most fields; a comma on a tie."""
    def fields(d: str) -> int:
        return len(next(csv.reader([first_line], delimiter=d), []))
    return max(DELIMITER_NAMES, key=lambda d: (fields(d), d == ","))


def read_label_csv(path: Path, *, missing_hint: str = "pass csv= the path of a CSV with a header row") -> LabelTable:
    """The CSV at ``path``: DataError naming the file when it is absent or unreadable (the encoding found)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: label CSV not found; {missing_hint}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the label CSV ({e})") from None
    text, encoding = _text(data, path)
    lines = text.splitlines()
    delimiter = _delimiter(lines[0] if lines else "")
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e}; read as {encoding}, "
                        f"{DELIMITER_NAMES[delimiter]}-separated); expected a header, then a row per image") from None
    return LabelTable(header, rows, delimiter, encoding)


def _listing(folder: Path, cache: dict) -> tuple[set[str], dict[str, str]]:
    """(names in ``folder``, {NFC name: name on disk}); empty when it is not a readable folder."""
    if folder not in cache:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        nfc: dict[str, str] = {}
        for n in names:
            nfc.setdefault(unicodedata.normalize("NFC", n), n)
        cache[folder] = (set(names), nfc)
    return cache[folder]


def _match(folder: Path, name: str, cache: dict) -> str | None:
    """``name`` (relative to ``folder``) as it is spelled on disk, component by component; None if absent."""
    parts, here = [], folder
    for part in name.replace(os.sep, "/").split("/"):
        if part in ("", ".", ".."):
            parts.append(part)
            here = here / part
            continue
        present, nfc = _listing(here, cache)
        found = part if part in present else nfc.get(unicodedata.normalize("NFC", part))
        if found is None:
            return None
        parts.append(found)
        here = here / found
    if len(parts) == 1 and parts[0] not in ("", ".", ".."):
        return parts[0]  # a plain name found in the folder's listing: no stat per file (CelebA has 200,000)
    return "/".join(parts) if here.is_file() else None


def find_on_disk(folder: Path, names: Sequence[str]) -> dict[str, str | None]:
    """{name: its spelling on disk (exact first, else the NFC-equal one), or None when there is no such file}."""
    folder, cache = Path(folder), {}
    return {n: _match(folder, n, cache) for n in names}


def id_column(header: Sequence[str]) -> int:
    """The index of the id column of a label CSV's header: the first of ``ID_COLUMNS`` present, else 0."""
    return next((list(header).index(c) for c in ID_COLUMNS if c in header), 0)


def listed_ids(path: Path) -> list[str]:
    """The ids (stripped, as spelled in the CSV: the record ids training and ``veil edit`` use) ``path`` lists."""
    table = read_label_csv(path)
    col = id_column(table.header)
    return [cells[col].strip() for _, cells in table.rows if len(cells) > col]
