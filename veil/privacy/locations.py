"""Which privacy database belongs to which dataset: one per dataset, under ``$VEIL_HOME/datasets``.

``ledger_path_for(spec)`` is ``$VEIL_HOME/datasets/<slug>.sqlite`` (VEIL_HOME defaults to
``~/.veil``): ``synthetic-seed<N>`` for the synthetic faces (image i depends only on (seed, i)); for
CelebA and folders, the database that already holds the dataset's images, else a new one named
``<source>-<folder name>-<12 hex of the images' content>``.

**A dataset is its content, not its path, and one shared image makes it the same dataset.** A CelebA or
folder dataset is the set of SHA-256 digests of its image files (every ``.png``, ``.jpg``, ``.jpeg``,
``.bmp``, ``.gif``, ``.webp``, ``.tif``/``.tiff`` file under the root, hidden names skipped, folder links
not followed; for CelebA under ``root/img_align_celeba`` when it exists). The index
``$VEIL_HOME/datasets/content-index.db`` (SQLite, owner-only) lists the image digests of every database.
A dataset resolves to the database that shares the most images with it (ties: the first by name), whatever
its source, folder name or path, and its images then join that database's list (a superset's new images
belong to it from then on). Only a dataset that shares no image with any database gets a new one. So a
copied, moved or renamed folder, one with images added, removed or changed, a subset and a superset all
keep the database and its budgets: merging two accounts is the safe direction, a missed match would be a
fresh budget. Still a new record inside it: a renamed file (records are the files' ids). Labels, CSVs and
other files are not part of a dataset (relabelled images are the same people). Not matched: a dataset none
of whose files is byte-identical to a known one (every image re-encoded): name its database (``--ledger``).

A database made before the index (named from its folder's path) is adopted the first time the index meets
it: the folder its ``dataset`` setting records is hashed then, if it still exists. A lost index is rebuilt
the same way. ``dataset_digests`` gives ``veil.lightning_modules.data.specs.same_dataset`` the same sets
(one image in common: the same data).

Hashing reads every image once; the digests are cached in ``$VEIL_HOME/cache/dataset-content/`` per
folder, keyed by each file's (relative path, size, mtime), so a re-run reads only what changed. A folder
with no image file is a DataError. Plain stdlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Mapping

from veil.errors import ConfigError, DataError

__all__ = ["veil_home", "dataset_slug", "ledger_path_for", "content_digest", "image_digests", "dataset_digests",
           "same_dataset", "matches_recorded", "file_digest"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CELEBA_IMAGES = "img_align_celeba"
INDEX_NAME = "content-index.db"  # not *.sqlite: it is no dataset's database
_CHUNK = 1 << 20
_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS databases (db TEXT PRIMARY KEY, source TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS images (digest BLOB NOT NULL, db TEXT NOT NULL, PRIMARY KEY (digest, db)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS roots (root TEXT PRIMARY KEY, db TEXT NOT NULL);
"""


def veil_home() -> Path:
    """``$VEIL_HOME``, or ``~/.veil``: where the per-dataset privacy databases live."""
    return Path(os.environ.get("VEIL_HOME") or "~/.veil").expanduser()


def dataset_slug(data_spec: Mapping) -> str:
    """The database name of a dataset: which images of which source it is (see the module docstring)."""
    source = data_spec.get("source") if isinstance(data_spec, Mapping) else None
    if source == "synthetic":
        seed = data_spec.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f": synthetic faces are located by their generator seed, got seed={seed!r}; "
                              f"give it, e.g. source=synthetic,seed=0", option="--data")
        return f"synthetic-seed{seed}"
    if source in ("celeba", "folder"):
        if not data_spec.get("root"):
            raise ConfigError(f": a {source} dataset is located by its folder; give root=PATH", option="--data")
        root = Path(str(data_spec["root"])).expanduser().resolve()
        if not root.is_dir():
            raise DataError(f"--data root={data_spec['root']}: no such folder; a {source} dataset's privacy "
                            f"database is found from its images: give the folder that holds them, or name the "
                            f"database itself (--ledger; veil serve: --state)")
        images = images_folder(source, root)
        digests = set(image_digests(images).values())
        if not digests:
            raise DataError(f"{images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder; a "
                            f"dataset's privacy database is found from its images")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", root.name).strip("._") or "root"
        return _resolve(source=source, name=name, root=str(images), digests=digests)
    raise ConfigError(f": source={source!r}: a privacy database belongs to a located dataset "
                      f"(source=synthetic,seed=N | source=celeba,root=PATH | source=folder,root=PATH)", option="--data")


def ledger_path_for(data_spec: dict) -> Path:
    """``$VEIL_HOME/datasets/<slug>.sqlite``: the one privacy database of the dataset ``data_spec`` names."""
    return veil_home() / "datasets" / f"{dataset_slug(data_spec)}.sqlite"


def images_folder(source: str, root: Path) -> Path:
    """Where a dataset's images are: ``root``, or for CelebA ``root/img_align_celeba`` when it exists."""
    return root / CELEBA_IMAGES if source == "celeba" and (root / CELEBA_IMAGES).is_dir() else root


def dataset_digests(data_spec: Mapping | None) -> frozenset[str] | None:
    """The image digests (hex) of a CelebA or folder data spec; None when they are not known.

    Read from the folder (cached); for a folder that is gone, unreadable or empty, the digests the index
    holds for the database that folder last resolved to (a superset: erring towards "the same data")."""
    source = data_spec.get("source") if isinstance(data_spec, Mapping) else None
    if source not in ("celeba", "folder") or not data_spec.get("root"):
        return None
    folder = images_folder(source, Path(str(data_spec["root"])).expanduser().resolve())
    if folder.is_dir():
        try:
            digests = frozenset(image_digests(folder).values())
        except DataError:  # an unreadable image
            digests = frozenset()
        if digests:
            return digests
    return _indexed_digests(str(folder))


def same_dataset(a: Mapping | None, b: Mapping | None) -> bool:
    """Do two data specs draw from the same images? Synthetic faces: the same seed. CelebA and folders: the same
    folder, or any image file in common, by content (whatever the folder or source). Torch-free (the server's
    ``--dataset`` check); ``veil.lightning_modules.data.specs`` re-exports it."""
    if not a or not b:
        return False
    if a.get("source") == "synthetic" or b.get("source") == "synthetic":  # image i depends only on (seed, i)
        return a.get("source") == b.get("source") and a.get("seed") == b.get("seed")
    if a.get("source") == b.get("source") and Path(str(a.get("root"))).resolve() == Path(str(b.get("root"))).resolve():
        return True
    digests_a, digests_b = dataset_digests(a), dataset_digests(b)
    return digests_a is not None and digests_b is not None and not digests_a.isdisjoint(digests_b)


def matches_recorded(data_spec: Mapping) -> bool | None:
    """Whether the folder of a CelebA or folder spec still holds the dataset the index recorded at that path when a
    run or release was recorded there (one image file in common); None when the index never saw the path."""
    source = data_spec.get("source")
    folder = images_folder(str(source), Path(str(data_spec["root"])).expanduser().resolve())
    recorded = _indexed_digests(str(folder))
    if recorded is None:
        return None
    return not frozenset(image_digests(folder).values()).isdisjoint(recorded)


def image_files(folder: Path) -> list[str]:
    """The image files under ``folder`` (relative POSIX paths, sorted; hidden names and folder links skipped)."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(top).relative_to(folder)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def image_digests(folder: Path) -> dict[str, str]:
    """``{relative path: SHA-256 hex}`` of the image files under ``folder`` (cached, see above; {} if none)."""
    folder = Path(folder).resolve()
    names = image_files(folder)
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    cache_path = veil_home() / "cache" / "dataset-content" / f"{key}.json"
    cached = _read_cache(cache_path) if names else {}
    entries, changed = {}, False
    for name in names:
        st = (folder / name).stat()
        hit = cached.get(name)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
            entries[name] = hit
        else:
            entries[name], changed = [st.st_size, st.st_mtime_ns, _file_sha256(folder / name)], True
    if names and (changed or set(cached) != set(entries)):
        _write_cache(cache_path, {"folder": str(folder), "files": entries})
    return {name: entry[2] for name, entry in entries.items()}


def content_digest(folder: Path) -> str:
    """SHA-256 hex over the sorted SHA-256 digests of the image files under ``folder`` (a new database's hex)."""
    digests = image_digests(folder)
    if not digests:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder; a "
                        f"dataset's privacy database is found from its images")
    return _content_hex(digests.values())


def _content_hex(digests) -> str:
    total = hashlib.sha256()
    for digest in sorted(digests):
        total.update(bytes.fromhex(digest))
    return total.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 hex of one file's bytes (DataError naming it if unreadable): the digest ``image_digests`` lists."""
    return _file_sha256(Path(path))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read this image to identify the dataset ({e}); check its "
                        f"permissions") from None
    return h.hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        files = json.loads(path.read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no cache, or an unreadable one: hash again


def _owner_only_folders(path: Path) -> None:
    for folder in reversed([p for p in (path.parent, *path.parent.parents) if not p.exists()]):
        folder.mkdir(mode=0o700, exist_ok=True)


def _write_cache(path: Path, content: dict) -> None:
    """Atomically, owner-only (0600 in 0700 folders); a cache that cannot be written is skipped."""
    try:
        _owner_only_folders(path)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except OSError:
        pass


# -- the index: which images each database holds ---------------------------------------------------------------
def _index_error(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read or update the index of the datasets' images ({e}); move it aside "
                     f"(veil rebuilds it from the databases' recorded folders) or name the database (--ledger)")


def _resolve(*, source: str, name: str, root: str, digests: set[str]) -> str:
    """In one write transaction: the database sharing the most images (else a new one), the images added to it."""
    path = veil_home() / "datasets" / INDEX_NAME
    try:
        _owner_only_folders(path)
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with closing(sqlite3.connect(path, timeout=60, isolation_level=None)) as conn:
            conn.executescript(_INDEX_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            try:
                _adopt_unindexed(conn, path.parent)
                conn.execute("CREATE TEMP TABLE want (digest BLOB PRIMARY KEY) WITHOUT ROWID")
                conn.executemany("INSERT OR IGNORE INTO want VALUES (?)", ((bytes.fromhex(d),) for d in digests))
                row = conn.execute("SELECT i.db, COUNT(*) AS n FROM want w JOIN images i ON i.digest = w.digest "
                                   "GROUP BY i.db ORDER BY n DESC, i.db LIMIT 1").fetchone()
                slug = row[0] if row else _new_slug(conn, path.parent, f"{source}-{name}-{_content_hex(digests)[:12]}")
                conn.execute("INSERT OR IGNORE INTO databases VALUES (?, ?, ?)", (slug, source, time.time()))
                conn.execute("INSERT OR IGNORE INTO images SELECT digest, ? FROM want", (slug,))
                conn.execute("INSERT INTO roots VALUES (?, ?) ON CONFLICT (root) DO UPDATE SET db = excluded.db",
                             (root, slug))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    except (OSError, sqlite3.Error) as e:
        raise _index_error(path, e) from None
    return slug


def _new_slug(conn, datasets: Path, slug: str) -> str:
    """``slug``, or ``slug-2``, ... if a database of no shared image already has that name."""
    n, candidate = 1, slug
    while (conn.execute("SELECT 1 FROM databases WHERE db = ?", (candidate,)).fetchone()
           or (datasets / f"{candidate}.sqlite").exists()):
        n += 1
        candidate = f"{slug}-{n}"
    return candidate


def _adopt_unindexed(conn, datasets: Path) -> None:
    """Index each database the index does not list yet (made before it, or the index was lost): its recorded
    folder's images, if that folder still exists; else it is listed with none (only its name is then taken)."""
    known = {row[0] for row in conn.execute("SELECT db FROM databases")}
    for path in sorted(datasets.glob("*.sqlite")):
        if path.stem in known:
            continue
        where = _recorded_dataset(path)
        source, root, digests = str(where.get("source")), where.get("root"), {}
        if source in ("celeba", "folder") and isinstance(root, str) and Path(root).is_dir():
            folder = images_folder(source, Path(root))
            try:
                digests = image_digests(folder)
            except DataError:
                digests = {}
            if digests:
                conn.execute("INSERT OR IGNORE INTO roots VALUES (?, ?)", (str(folder), path.stem))
        conn.execute("INSERT INTO databases VALUES (?, ?, ?)", (path.stem, source, time.time()))
        conn.executemany("INSERT OR IGNORE INTO images VALUES (?, ?)",
                         ((bytes.fromhex(d), path.stem) for d in set(digests.values())))


def _recorded_dataset(path: Path) -> dict:
    """The ``dataset`` setting a privacy database records (source, root, ...); {} if it has none or is unreadable."""
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = 'dataset'").fetchone()
        where = json.loads(row[0]) if row else {}
        return where if isinstance(where, dict) else {}
    except (sqlite3.Error, ValueError, TypeError):
        return {}


def _indexed_digests(root: str) -> frozenset[str] | None:
    """The images of the database the folder ``root`` last resolved to, from the index (None if unknown)."""
    path = veil_home() / "datasets" / INDEX_NAME
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
            rows = conn.execute("SELECT i.digest FROM roots r JOIN images i ON i.db = r.db WHERE r.root = ?",
                                (root,)).fetchall()
    except sqlite3.Error:
        return None
    return frozenset(row[0].hex() for row in rows) or None
