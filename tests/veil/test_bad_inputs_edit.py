"""Bad inputs to ``veil edit`` (issue 12): each one exits 2 with a message naming the flag or file, prints no
traceback, releases and charges nothing, and leaves every existing file as it was.

Runs ``veil.cli.main`` in-process on a tiny random release (2 DDIM steps, 2 images). A case is a set of
overrides of a valid command line: ``{flag: value}`` replaces the flag's value, ``None`` drops the flag, ``True``
adds a bare switch, a flag ending in ``=`` is given as one word (``--flag=value``); ``"{tmp}"`` in a value is the test's folder, in which ``setup`` may first make files.
"""

import inspect
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from dp_helpers import write_tiny_release

from veil.cli import main
from veil.lightning_modules.data.synthetic_faces import SYNTHETIC_ATTRIBUTES
from veil.privacy.accounting import price_release
from veil.privacy.ledger import PrivacyLedger

DATA = dict(source="synthetic", root=None, csv=None, attributes=None, resolution=32, num_images=8, seed=0,
            batch_size=8, poisson=True, val_fraction=0.05, test_fraction=0.05, revision=None, num_workers=0)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run folder holding the release `veil train` writes (OUT/model), random weights."""
    out = write_tiny_release(tmp_path_factory.mktemp("run"), data_spec=DATA)
    return out


def _argv(checkpoint, tmp, overrides):
    options = {"--checkpoint": str(checkpoint), "--protect": "eyeglasses", "--first": "2", "--steps": "2",
               "--out": str(tmp / "out"), "--no-check": True}  # the tiny random model has no classifier to check with
    if overrides.get("--sweep"):
        options.pop("--no-check")
    for flag, value in overrides.items():
        if value is None:
            options.pop(flag, None)
        else:
            options[flag] = value if value is True else str(value).replace("{tmp}", str(tmp))
    argv = ["edit"]
    for flag, value in options.items():
        argv += [flag] if value is True else [flag + value] if flag.endswith("=") else [flag, value]
    return argv


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse refused an argument's type (it exits 2)
        return e.code


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its mode and, for files, its bytes."""
    return {p: (p.lstat().st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def _releases(veil_home: Path) -> int:
    """Releases in the default privacy databases (a --ledger given in the test folder is covered by the
    snapshot: its bytes do not change)."""
    n = 0
    for db in (veil_home / "datasets").glob("*.sqlite"):
        with PrivacyLedger(db) as book:
            n += len(book.releases())
    return n


# ------------------------------------------------------------------ files the cases use
def _text(tmp, name="notes.txt", text="my notes, not a database\n"):
    (tmp / name).write_text(text)


def _out_holds_revision(tmp):
    (tmp / "out" / "revision").mkdir(parents=True)
    (tmp / "out" / "revision" / "manifest.json").write_text('{"mine": true}')
    (tmp / "out" / "edit_report.json").write_text('{"earlier": "run"}')


def _out_holds_sweep(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "sweep.png").write_bytes(b"an earlier sweep")


def _random_file(tmp):
    (tmp / "model.bin").write_bytes(os.urandom(4096))


def _release_copy(checkpoint, tmp) -> Path:
    shutil.copytree(Path(checkpoint) / "model", tmp / "run" / "model")
    return tmp / "run" / "model"


def _damaged_ledger(tmp):
    """A veil database with one release, everything after its first page overwritten."""
    with PrivacyLedger.for_dataset(DATA, path=tmp / "ledger.sqlite") as book:
        book.record(image_id="synth-0-000005", protected=["smiling"], epsilon=1.0, strength=0.5, seed=1,
                    released_attributes={"smiling": 1},
                    price=price_release(epsilon=1.0, protected=["smiling"], encoding="fresh", pixel_mus=[0.0]))
    data = bytearray((tmp / "ledger.sqlite").read_bytes())
    data[4096:] = b"Z" * (len(data) - 4096)
    (tmp / "ledger.sqlite").write_bytes(bytes(data))


# ------------------------------------------------------------------ the corpus
# id: (overrides, what the message must name, setup(tmp) or setup(tmp, ck=checkpoint) or None)
CASES = {
    # every numeric flag: NaN, infinities, negative, zero where meaningless
    "guidance-nan": ({"--guidance": "nan"}, "--guidance", None),
    "guidance-inf": ({"--guidance": "inf"}, "--guidance", None),
    "guidance-negative": ({"--guidance": "-1"}, "--guidance", None),
    "guidance-minus-inf": ({"--guidance": "-inf"}, "--guidance", None),
    "steps-zero": ({"--steps": "0"}, "--steps", None),
    "steps-negative": ({"--steps": "-3"}, "--steps", None),
    "steps-nan": ({"--steps": "nan"}, "--steps", None),
    "steps-too-many": ({"--steps": "5000"}, "--steps", None),
    "epsilon-nan": ({"--epsilon": "nan"}, "--epsilon", None),
    "epsilon-negative": ({"--epsilon": "-1"}, "--epsilon", None),
    "strength-nan": ({"--strength": "nan"}, "--strength", None),
    "strength-zero": ({"--strength": "0"}, "--strength", None),
    "strength-over-one": ({"--strength": "1.5"}, "--strength", None),
    "strength-negative": ({"--strength": "-0.5"}, "--strength", None),
    "strength-inf": ({"--strength": "inf"}, "--strength", None),
    "budget-nan": ({"--budget": "nan"}, "--budget", None),
    "budget-negative": ({"--budget": "-1"}, "--budget", None),
    "first-zero": ({"--first": "0"}, "--first", None),
    "first-negative": ({"--first": "-2"}, "--first", None),
    "first-nan": ({"--first": "nan"}, "--first", None),
    "first-past-dataset": ({"--first": "99"}, "--first", None),
    "seed-negative": ({"--seed": "-1"}, "--seed", None),
    "seed-nan": ({"--seed": "nan"}, "--seed", None),
    "num-images-negative": ({"--num-images": "-5"}, "--num-images", None),
    "num-images-nan": ({"--num-images": "nan"}, "--num-images", None),
    "data-seed-negative": ({"--data-seed": "-1"}, "--data-seed", None),
    "resolution-zero": ({"--resolution": "0"}, "--resolution", None),
    "resolution-nan": ({"--resolution": "nan"}, "--resolution", None),
    "resolution-other": ({"--resolution": "64"}, "--resolution", None),
    "sweep-epsilons-negative": ({"--sweep": True, "--sweep-epsilons": "-1,2"}, "--sweep-epsilons", None),
    "sweep-epsilons-negative-equals": ({"--sweep": True, "--sweep-epsilons=": "-1,2"}, "--sweep-epsilons", None),
    "sweep-epsilons-nan": ({"--sweep": True, "--sweep-epsilons": "1,nan"}, "--sweep-epsilons", None),
    "sweep-epsilons-empty": ({"--sweep": True, "--sweep-epsilons": ","}, "--sweep-epsilons", None),
    "sweep-epsilons-without-sweep": ({"--sweep-epsilons": "0,1"}, "--sweep-epsilons", None),
    "sweep-with-ledger": ({"--sweep": True, "--ledger": "{tmp}/l.sqlite"}, "--ledger", None),
    "sweep-guidance-nan": ({"--sweep": True, "--guidance": "nan"}, "--guidance", None),
    # --out
    "out-is-a-file": ({"--out": "{tmp}/notes.txt"}, "--out", _text),
    "out-under-a-file": ({"--out": "{tmp}/notes.txt/out"}, "--out", _text),
    "out-holds-an-edit": ({}, "--out", _out_holds_revision),
    "sweep-out-under-a-file": ({"--sweep": True, "--out": "{tmp}/notes.txt/out"}, "--out", _text),
    "sweep-out-holds-a-sweep": ({"--sweep": True}, "--out", _out_holds_sweep),
    # --ledger
    "ledger-text-file": ({"--ledger": "{tmp}/notes.txt"}, "--ledger", _text),
    "ledger-folder": ({"--ledger": "{tmp}"}, "--ledger", None),
    "ledger-symlink-to-text": ({"--ledger": "{tmp}/link.sqlite"}, "--ledger",
                               lambda tmp: (_text(tmp), (tmp / "link.sqlite").symlink_to(tmp / "notes.txt"))),
    "ledger-damaged": ({"--ledger": "{tmp}/ledger.sqlite"}, "--ledger", _damaged_ledger),
    # --protect, --ids
    "protect-twice": ({"--protect": "eyeglasses,eyeglasses"}, "--protect", None),
    "protect-empty": ({"--protect": ""}, "--protect", None),
    "protect-only-commas": ({"--protect": ",,"}, "--protect", None),
    "protect-unknown": ({"--protect": "eyeglasses,mustache"}, "--protect", None),
    "ids-twice": ({"--first": None, "--ids": "synth-0-000001,synth-0-000001"}, "--ids", None),
    "ids-unknown": ({"--first": None, "--ids": "../outside.png"}, "--ids", None),
    # --checkpoint
    "checkpoint-random-file": ({"--checkpoint": "{tmp}/model.bin"}, "--checkpoint", _random_file),
    "checkpoint-empty-file": ({"--checkpoint": "{tmp}/empty"}, "--checkpoint", lambda tmp: _text(tmp, "empty", "")),
    "checkpoint-folder-without-release": ({"--checkpoint": "{tmp}"}, "--checkpoint", None),
    "checkpoint-missing": ({"--checkpoint": "{tmp}/nowhere"}, "--checkpoint", None),
    "checkpoint-corrupt-meta": ({"--checkpoint": "{tmp}/run"}, "--checkpoint",
                                lambda tmp, ck: (_release_copy(ck, tmp) / "veil_model.json").write_text("{not json")),
    "checkpoint-corrupt-weights": ({"--checkpoint": "{tmp}/run"}, "--checkpoint",
                                   lambda tmp, ck: (_release_copy(ck, tmp) / "model.safetensors").write_bytes(
                                       os.urandom(1000))),
    "checkpoint-truncated-weights": ({"--checkpoint": "{tmp}/run"}, "--checkpoint",
                                     lambda tmp, ck: _truncate(_release_copy(ck, tmp) / "model.safetensors")),
    "checkpoint-meta-without-kwargs": ({"--checkpoint": "{tmp}/run"}, "--checkpoint",
                                       lambda tmp, ck: _drop_key(_release_copy(ck, tmp) / "veil_model.json")),
    "checkpoint-lightning-ckpt": ({"--checkpoint": "{tmp}/last.ckpt"}, "--checkpoint",
                                  lambda tmp: (tmp / "last.ckpt").write_bytes(b"PK\x03\x04 not a release")),
}


def _drop_key(path: Path, key="model_kwargs") -> None:
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_refused_naming_it(case, checkpoint, tmp_path, veil_home, capsys):
    overrides, names, setup = CASES[case]
    if setup is not None:
        needs_release = "ck" in inspect.signature(setup).parameters  # the corrupt-release cases copy it
        setup(tmp_path, ck=checkpoint) if needs_release else setup(tmp_path)
    before = _snapshot(tmp_path)

    assert _run(_argv(checkpoint, tmp_path, overrides)) == 2

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err  # one line (argparse prints its usage above)
    assert lines[-1].startswith("veil edit: error:") and names in lines[-1], err
    assert _snapshot(tmp_path) == before  # existing files untouched, nothing new left behind
    assert _releases(veil_home) == 0


def test_the_protect_message_lists_the_valid_names(checkpoint, tmp_path, capsys):
    assert _run(_argv(checkpoint, tmp_path, {"--protect": "mustache"})) == 2
    err = capsys.readouterr().err
    assert "mustache" in err and all(name in err for name in SYNTHETIC_ATTRIBUTES)


def test_a_text_file_given_as_ledger_keeps_its_mode(checkpoint, tmp_path):
    _text(tmp_path)
    os.chmod(tmp_path / "notes.txt", 0o644)
    assert _run(_argv(checkpoint, tmp_path, {"--ledger": str(tmp_path / "notes.txt")})) == 2
    assert stat.S_IMODE((tmp_path / "notes.txt").stat().st_mode) == 0o644


# ------------------------------------------------------------------ unicode and spaces in paths work
@pytest.mark.parametrize("sweep", [False, True], ids=["edit", "sweep"])
def test_unicode_and_spaces_in_paths_work(checkpoint, tmp_path, veil_home, sweep):
    out = tmp_path / "édits ünïcode 日本 😀" / "out with spaces"
    ledger = tmp_path / "my ledgers é" / "faces ledger.sqlite"
    overrides = {"--out": str(out), "--sweep": True} if sweep else {"--out": str(out), "--ledger": str(ledger)}
    assert _run(_argv(checkpoint, tmp_path, overrides)) == 0
    if sweep:
        assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.png"]
        assert not (veil_home / "datasets").exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["before_after.png", "edit_report.json", "revision"]
        report = json.loads((out / "edit_report.json").read_text())
        assert report["ledger"] == str(ledger) and len(report["images"]) == 2
        with PrivacyLedger(ledger) as book:
            assert [r.release_id for r in book.releases()] == [i["release_id"] for i in report["images"]]


def test_negative_looking_values_reach_their_flag(checkpoint, tmp_path, capsys):
    # "-1,2" and "-inf" used to be read as unknown options ("expected one argument"); both forms now parse
    # and are refused for what they are: an epsilon below 0
    for argv in (["--sweep-epsilons", "-1,2"], ["--sweep-epsilons=-1,2"], ["--epsilon", "-inf"]):
        assert _run(["edit", "--checkpoint", str(checkpoint), "--protect", "smiling", "--first", "2", "--sweep",
                     "--out", str(tmp_path), *argv]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "must be a number >= 0" in last and argv[0].split("=")[0] in last
