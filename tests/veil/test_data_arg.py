"""``--data SPEC`` (issue 34): one parser (``veil.data_arg``) for every command and a config's ``data:``.

Each form parses to the spec the API takes; each command that names data accepts it and hands the API that
spec (the API functions are recorders here); one real ``veil privacy show --data folder:...`` run."""

import json
from pathlib import Path

import pytest
from PIL import Image

from veil import api
from veil.cli import build_parser, main
from veil.data_arg import parse_data_arg
from veil.errors import ConfigError


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """A folder of three tiny images and labels.csv; the test runs in tmp_path (relative paths)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my photos"
    folder.mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("id,smiling\n0.png,1\n1.png,-1\n2.png,1\n")
    return folder


def test_each_form_parses_to_its_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    here = tmp_path.resolve()
    assert parse_data_arg("folder:photos") == {"source": "folder", "root": str(here / "photos"),
                                               "csv": str(here / "photos" / "labels.csv")}
    assert parse_data_arg("folder:~/a:b,csv=l.csv,num_images=30") == {
        "source": "folder", "root": str(tmp_path / "home" / "a:b"), "csv": str(here / "l.csv"), "num_images": 30}
    assert parse_data_arg("celeba:/data/celeba,attributes=[smiling,eyeglasses],resolution=64") == {
        "source": "celeba", "root": "/data/celeba", "attributes": ["smiling", "eyeglasses"], "resolution": 64}
    assert parse_data_arg("synthetic") == {"source": "synthetic"}
    assert parse_data_arg("synthetic:3,num_images=50") == {"source": "synthetic", "seed": 3, "num_images": 50}
    assert parse_data_arg("source=synthetic,seed=0") == {"source": "synthetic", "seed": 0}  # the older form
    assert parse_data_arg("source=folder,root=p,csv=q.csv") == {"source": "folder", "root": str(here / "p"),
                                                                 "csv": str(here / "q.csv")}
    assert parse_data_arg("folder") == {"source": "folder"}  # `veil edit --data folder --root X`
    assert parse_data_arg(None) == {} and parse_data_arg("") == {}


def test_a_revision_folder_gives_its_base(tmp_path, monkeypatch):
    rev = tmp_path / "rev"
    rev.mkdir()
    base = {"source": "synthetic", "seed": 0, "num_images": 8}
    (rev / "manifest.json").write_text("{}")
    monkeypatch.setattr("veil.privacy.revision_manifest.load_manifest",
                        lambda path: {"base": base} if Path(path) == rev.resolve() else {})
    assert parse_data_arg(str(rev)) == base
    assert parse_data_arg(str(rev), keep_revision=True) == {**base, "revision": str(rev.resolve())}


@pytest.mark.parametrize("text, said", [("foo:x", "unknown source 'foo'"), ("folder:x,oops", "expects SOURCE:PATH"),
                                        ("synthetic:x", "must be an integer"),
                                        ("source=webcam", "unknown source 'webcam'"), ("folder:", "nothing after")])
def test_a_wrong_spec_is_refused_naming_data_with_an_example(text, said):
    with pytest.raises(ConfigError) as err:
        parse_data_arg(text)
    assert err.value.option == "--data" and said in str(err.value) and "e.g. --data folder:" in str(err.value)


@pytest.mark.parametrize("text, said", [("folder:x,bogus=1", "unknown option 'bogus'; valid: source, root, csv"),
                                        ("folder:x,nums_images=3", "did you mean 'num_images'")])
def test_a_wrong_key_is_refused_naming_data_and_the_valid_keys(text, said):
    with pytest.raises(ConfigError) as err:
        parse_data_arg(text)
    assert err.value.option == "--data" and said in str(err.value)


def _record(monkeypatch, name, result):
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        return result(kwargs)

    monkeypatch.setattr(api, name, record)
    return calls


def test_every_command_takes_data_spec(photos, monkeypatch):
    spec = {"source": "folder", "root": str(photos.resolve()), "csv": str(photos.resolve() / "labels.csv")}
    for argv in (["train", "--out", "R"], ["train-classifier", "--out", "C"],
                 ["edit", "--checkpoint", "X", "--first", "1", "--protect", "smiling", "--out", "E"],
                 ["privacy", "show"], ["privacy", "set-budget", "4", "--reason", "r"],
                 ["privacy", "reveal-ids", "--revision", "R"], ["privacy", "publish-revision", "--revision", "R",
                                                                  "--out", "P"]):
        assert build_parser().parse_args(argv + ["--data", "folder:my photos"]).data == "folder:my photos", argv

    train = _record(monkeypatch, "train", lambda kw: api.Run(Path(kw["out"]), {"enabled": False, "steps": 1}))
    assert main(["train", "--data", "folder:my photos", "--out", "R", "--no-progress"]) == 0
    assert train[0]["data"] == spec
    clf = _record(monkeypatch, "train_classifier", lambda kw: api.Run(Path(kw["out"]), {
        "privacy": {"private": True, "epsilon": 1.0}, "steps": 1, "seconds": 0.1, "test_accuracy": None}))
    assert main(["train-classifier", "--data", "folder:my photos,test_fraction=0.2", "--out", "C"]) == 0
    assert clf[0]["data"] == {**spec, "test_fraction": 0.2}

    class Editor:
        def release(self, **kwargs):
            picked.append(kwargs)
            return api.EditResult(Path(kwargs["out"]), {})

    picked = []
    monkeypatch.setattr(api, "load_editor", lambda *a, **k: Editor())
    monkeypatch.setattr("veil.cli.edit.summary", lambda report, out: "done")
    edit = ["edit", "--checkpoint", "X", "--first", "1", "--protect", "smiling", "--no-check", "--out", "E"]
    assert main(edit + ["--data", "folder:my photos"]) == 0
    assert main(edit + ["--data", "folder", "--root", "my photos"]) == 0  # the older spelling, same spec
    nones = {"num_images": None, "seed": None, "resolution": None}
    assert picked[0]["data"] == picked[1]["data"] == {**nones, **spec}


def test_edit_help_shows_the_spec_not_the_older_flags(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    out = capsys.readouterr().out
    assert "folder:PATH" in out and "--root" not in out and "--data-seed" not in out


def test_train_data_replaces_the_configs_dataset_and_set_still_applies():
    from veil.jobs.config import load_config

    seen = {}

    def fake_run(cfg, out, **kw):
        seen["cfg"] = cfg
        return {}

    import veil.jobs.train as job
    old, job.run_training = job.run_training, fake_run
    try:
        api.train(config="synthetic32", data={"source": "synthetic", "seed": 5, "num_images": 40},
                  overrides=["data.num_images=60"], out="unused")
    finally:
        job.run_training = old
    cfg = seen["cfg"]
    assert (cfg.data.source, cfg.seed, cfg.data.num_images) == ("synthetic", 5, 60)
    assert load_config("synthetic32").data.batch_size == cfg.data.batch_size  # its other data keys stay


def test_a_config_data_may_be_one_spec_string(photos, tmp_path):
    from veil.jobs.config import load_config

    (tmp_path / "c.yaml").write_text("data: folder:my photos,num_images=9\n")
    cfg = load_config(tmp_path / "c.yaml", ["data.batch_size=2"])
    assert (cfg.data.source, cfg.data.root, cfg.data.csv, cfg.data.batch_size) == (
        "folder", str(photos.resolve()), str(photos.resolve() / "labels.csv"), 2)


def test_privacy_show_runs_on_a_folder_spec(photos, capsys):
    """A real run: the folder's database is found from its images, the same for both spellings."""
    assert main(["privacy", "set-budget", "4", "--reason", "ours", "--data", "folder:my photos"]) == 0
    capsys.readouterr()
    assert main(["privacy", "show", "--data", "folder:my photos", "--json"]) == 0
    account = json.loads(capsys.readouterr().out)
    assert account["dataset"]["source"] == "folder" and account["dataset"]["root"] == str(photos.resolve())
    assert main(["privacy", "show", "--data", f"source=folder,root={photos}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["database"] == account["database"]


def test_a_classifier_recipe_names_its_data_with_the_same_string(tmp_path):
    from veil.jobs.train_classifier import load_recipe

    (tmp_path / "r.yaml").write_text("data: synthetic:3,num_images=200\nepochs: 1\n")
    assert load_recipe(str(tmp_path / "r.yaml"), [])[1] == {"source": "synthetic", "seed": 3, "num_images": 200}
