"""Issue 13: the guided edit backend (a label-free UNet steered by a noise-conditional DP classifier),
the check that an edit shows what it releases, attributes proposed for unlabelled images, and what
an edit costs: on the session's cached tiny models (``models``: a label-free UNet, its DP guide and the DP
``judge``). Issue 30: the check of a guided edit is never its guide (a separate --checker, here ``judge``, or
--no-check)."""

import json
import math
import secrets

import pytest
import torch
from unlearn_helpers import datamodule

from veil.cli import main
from veil.errors import ConfigError, EditRefused
from veil.lightning_modules.checkpoints import load_diffusion_checkpoint
from veil.lightning_modules.editing import editor as E
from veil.jobs import edit as J
from veil.lightning_modules.editing.editor import RETRY_STRENGTH_STEP, PrivateEditor
from veil.privacy.ledger import PrivacyLedger
from veil.privacy.revision_manifest import pseudonym
from veil.privacy.session import EditSession

pytestmark = pytest.mark.usefixtures("single_thread")

PROTECTED = ["smiling"]


def _editor(models, scale=30.0, **kw) -> PrivateEditor:
    """The guided editor, checked by the judge (``checker=None``: no check)."""
    return PrivateEditor.from_checkpoint(models / "unet", classifier=models / "guide", classifier_scale=scale,
                                         checker=kw.pop("checker", models / "judge"),
                                         num_steps=kw.pop("num_steps", 8), **kw)


def _faces(editor, n=4):
    dm = datamodule(num_images=160)
    x = torch.stack([dm.dataset[i][0] for i in range(n)])
    a = torch.stack([dm.dataset[i][1] for i in range(n)])
    return x, a


def _with(a, name, editor, value):
    out = a.clone()
    out[:, editor.attribute_names.index(name)] = value
    return out


def test_the_backend_follows_from_what_is_given(models):
    guided = _editor(models)
    assert guided.backend == "guided" and guided.label_free and guided.can_check
    unchecked = _editor(models, checker=None)  # issue 30: the guide never checks
    assert unchecked.backend == "guided" and unchecked.checker is None and not unchecked.can_check
    for nothing_steers in ({}, {"classifier": models / "guide", "classifier_scale": 0.0}):  # label-free UNet
        with pytest.raises(ConfigError, match="without attribute labels"):
            PrivateEditor.from_checkpoint(models / "unet", **nothing_steers)
    assert [c["role"] for c in guided.costs] == ["denoiser", "guidance classifier", "check classifier"]
    assert guided.costs[1]["private"] and guided.costs[0]["label_free"] and not guided.costs[0]["private"]


def test_guided_backend_moves_the_classifier_logit_towards_the_target(models):
    editor = _editor(models, scale=30.0, keep_unprotected=False)  # steer smiling only
    x, a = _faces(editor)
    j = editor.guide.attribute_names.index("smiling")
    logit = lambda images: editor.guide.logits(images)[:, j]  # noqa: E731  (what the guide steers, at t = 0)
    up = editor.edit(x, a, _with(a, "smiling", editor, 1.0), strength=0.7, protected=PROTECTED)
    down = editor.edit(x, a, _with(a, "smiling", editor, -1.0), strength=0.7, protected=PROTECTED)
    assert bool((logit(up) > logit(down)).all()), (logit(up), logit(down))
    unguided = _editor(models, scale=1e-9, keep_unprotected=False)  # the same walk with (almost) no push
    plain = unguided.edit(x, a, _with(a, "smiling", editor, 1.0), strength=0.7, protected=PROTECTED)
    assert logit(up).mean() > logit(plain).mean() > logit(down).mean()


def test_guided_inversion_never_sees_the_protected_values(models):
    """The label-free denoiser is called with zeros only, and x_t0 does not depend on the protected values."""
    editor = _editor(models)
    x, a = _faces(editor, n=2)
    seen = []
    inner = editor.model.forward

    def spy(x_t, t, attrs):
        seen.append(attrs.clone())
        return inner(x_t, t, attrs)

    editor.model.forward = spy
    try:
        one = editor.invert(x, _with(a, "smiling", editor, 1.0), strength=0.5, protected=PROTECTED)
        other = editor.invert(x, _with(a, "smiling", editor, -1.0), strength=0.5, protected=PROTECTED)
    finally:
        del editor.model.forward
    assert seen and all(bool((s == 0).all()) for s in seen)
    torch.testing.assert_close(one, other, rtol=0, atol=0)


def test_a_guided_edit_is_deterministic(models):
    editor = _editor(models)
    x, a = _faces(editor, n=3)
    target = _with(a, "smiling", editor, 1.0)
    first = editor.edit(x, a, target, strength=0.5, protected=PROTECTED)
    torch.testing.assert_close(first, editor.edit(x, a, target, strength=0.5, protected=PROTECTED), rtol=0, atol=0)
    batched_one = editor.edit(x[1:2], a[1:2], target[1:2], strength=0.5, protected=PROTECTED)
    torch.testing.assert_close(first[1:2], batched_one, rtol=1e-5, atol=1e-5)


def test_check_redoes_failing_edits_stronger_and_reports_the_rest(models, monkeypatch):
    editor = _editor(models, max_retries=2)
    x, a = _faces(editor, n=3)
    calls = []

    def shown(self, edited, targets, *, protected):  # row 0 passes at once, row 1 on the first re-do, row 2 never
        calls.append(edited.shape[0])
        k = len(calls) - 1
        return torch.tensor({0: [[0.9], [0.2], [0.1]], 1: [[0.8], [0.1]], 2: [[0.3]]}[k])

    monkeypatch.setattr(PrivateEditor, "shown", shown)
    got = editor.edit_checked(x, a, _with(a, "smiling", editor, -1.0), strength=0.5, protected=PROTECTED)
    assert calls == [3, 2, 1]  # only the failing rows are re-done
    assert got.passed.tolist() == [True, True, False] and got.attempts.tolist() == [1, 2, 3]
    torch.testing.assert_close(got.strength, torch.tensor([0.5, 0.5 + RETRY_STRENGTH_STEP, 0.5 + 2 * RETRY_STRENGTH_STEP]))
    assert got.guidance_factor.tolist() == [1.0, 1.5, 2.25]
    assert got.row(2) == {"passed": False, "attempts": 3, "strength": 0.8, "guidance_factor": 2.25, "shown": {"smiling": 0.3}}


def test_the_checker_reads_the_released_value(models):
    editor = _editor(models)
    x, a = _faces(editor, n=4)
    j = editor.checker.attribute_names.index("smiling")
    p_up = torch.sigmoid(editor.checker.logits(x)[:, j])
    shown = editor.shown(x, _with(a, "smiling", editor, 1.0), protected=PROTECTED)
    torch.testing.assert_close(shown[:, 0], p_up)
    torch.testing.assert_close(editor.shown(x, _with(a, "smiling", editor, -1.0), protected=PROTECTED)[:, 0], 1 - p_up)


def test_attributes_of_an_unlabelled_image_are_proposed_with_confidence(models):
    editor = _editor(models)
    x, _ = _faces(editor, n=3)
    proposed = editor.propose(x)
    logits = editor.checker.logits(x)
    for row, z in zip(proposed, logits):
        for name, guess in row.items():
            i = editor.checker.attribute_names.index(name)
            assert guess["value"] == (1 if z[i] >= 0 else -1)
            assert guess["confidence"] == pytest.approx(float(torch.sigmoid(z[i].abs())), abs=1e-4)
            assert 0.5 <= guess["confidence"] <= 1


def test_run_edit_guided_reports_costs_checks_and_charges_refusals(models, tmp_path, veil_home, monkeypatch):
    real_shown = PrivateEditor.shown

    def shown(self, edited, targets, *, protected):  # the second image never shows its released value
        p = real_shown(self, edited, targets, protected=protected)
        if edited.shape[0] == 3 or (edited.shape[0] == 1 and shown.refusing):
            p = p.clone()
            p[-2 if edited.shape[0] == 3 else 0] = 0.0
        return p

    shown.refusing = False
    monkeypatch.setattr(PrivateEditor, "shown", shown)
    report = J.run_edit(checkpoint=models / "unet", classifier=models / "guide", checker=models / "judge",
                        out=tmp_path / "e", protect=PROTECTED, first=3, level="high", steps=6, max_retries=0,
                        check_threshold=0.01)
    assert report["backend"] == "guided" and report["classifier_scale"] == 10.0
    assert report["data"]["seed"] == 3  # the images come from the classifier's (private) dataset
    assert [im["outcome"] for im in report["images"]] == ["released", "refused", "released"]
    assert report["images"][1]["file"] is None and report["images"][1]["released_attributes"] is None
    assert report["check"]["enabled"] and report["check"]["threshold"] == 0.01 and report["refused"] == 1
    cost = report["cost"]
    assert [m["role"] for m in cost["models"]] == ["denoiser", "guidance classifier", "check classifier"]
    assert cost["models"][1]["private"] and cost["models"][1]["edited_data"] is True
    assert cost["models"][2]["private"] and cost["models"][2]["edited_data"] is True  # the judge's epsilon counts
    assert cost["models"][0]["edited_data"] is False  # the denoiser's data (seed 0) is not the edited set
    assert cost["release"]["epsilon_per_protected_attribute"] == 1.0
    manifest = json.loads((tmp_path / "e/revision/manifest.json").read_text())
    assert [c["id"] for c in manifest["changes"]] == [report["images"][0]["id"], report["images"][2]["id"]]
    # issue 30: the refused record is listed as withheld, in the owner's revision and the published one
    assert manifest["withheld"] == [report["images"][1]["id"]]
    assert main(["privacy", "publish-revision", "--revision", str(tmp_path / "e/revision"), "--out",
                 str(tmp_path / "pub")]) == 0
    published = json.loads((tmp_path / "pub/manifest.json").read_text())
    with PrivacyLedger(report["ledger"]) as book:  # issue 34: published under its pseudonym
        hidden = pseudonym(report["images"][1]["id"], key=book.pseudonym_key())
    assert published["withheld"] == [hidden] and "charged" in published["withheld_note"]
    with PrivacyLedger(report["ledger"]) as book:
        rows = book.releases()
        assert [r.outcome for r in rows] == ["released", "refused", "released"]
        assert all(r.models == cost["models"] for r in rows)
        assert book.spent(report["images"][1]["id"], "smiling") == 1.0  # a refused draw is charged
        assert book.summary()["releases"]["refused"] == 1


def test_a_release_needs_a_check_or_an_explicit_no_check(models, tmp_path, veil_home, capsys):
    base = ["edit", "--checkpoint", str(models / "unet"), "--protect", "smiling", "--first", "2", "--steps", "4"]
    assert main(base + ["--out", str(tmp_path / "a"), "--classifier-scale", "3"]) == 2
    assert "--classifier-scale: only with --classifier" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b")]) == 2  # label-free UNet, no classifier: nothing checks
    assert "--no-check" in capsys.readouterr().err
    assert not (veil_home / "datasets").exists()  # refused before anything was opened or charged
    # issue 30: a checked guided edit without --checker is refused before anything loads (the guide never checks)
    guided = base + ["--classifier", str(models / "guide"), "--level", "max"]
    assert main(guided + ["--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--checker" in err and "--no-check" in err and "guided" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (veil_home / "datasets").exists()
    assert main(guided + ["--checker", str(models / "judge"), "--out", str(tmp_path / "d")]) == 0
    said = capsys.readouterr().out
    assert "(guided backend)" in said and "check: each released protected value" in said and "--checker" in said
    assert "guidance classifier: epsilon" in said and "check classifier: epsilon" in said
    assert "denoiser: not private" in said
    assert main(guided + ["--no-check", "--out", str(tmp_path / "e")]) == 0  # unchecked, and said so
    assert "NOT CHECKED" in capsys.readouterr().out
    assert json.loads((tmp_path / "e/edit_report.json").read_text())["check"]["enabled"] is False


def test_a_session_records_a_refused_edit_and_raises(models, tmp_path, monkeypatch):
    editor = _editor(models, max_retries=0)
    x, a = _faces(editor, n=1)
    attrs = {n: int(v) for n, v in zip(editor.attribute_names, a[0].tolist())}
    monkeypatch.setattr(PrivateEditor, "shown", lambda self, e, t, *, protected: torch.zeros(e.shape[0], 1))
    with PrivacyLedger(tmp_path / "l.sqlite", budget=10.0) as ledger:
        session = EditSession(image_id="img", image=x[0], attributes=attrs, protected=PROTECTED, editor=editor,
                              ledger=ledger, level="high")
        with pytest.raises(EditRefused, match="does not show its released values"):
            session.accept()
        assert session.state()["decision"] == "refused" and session.release is None
        assert [r.outcome for r in ledger.releases()] == ["refused"] and ledger.spent("img", "smiling") == 1.0
        assert ledger.releases()[0].models == editor.costs


def test_the_guidance_step_traces_into_one_graph(models):
    """The export issue's premise: make_fx traces a guided DDIM step (classifier gradient included) into a
    graph of plain ops that computes what the eager step computes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from veil.lightning_modules.diffusion.ddim import ddim_denoise_step

    editor = _editor(models)
    x = torch.randn(2, 3, 32, 32)
    t, t_prev = torch.tensor([300, 300]), torch.tensor([200, 200])
    attrs, targets = torch.zeros(2, 6), torch.tensor([[1.0, 0, 0, 0, 0, -1], [0, 1.0, 0, 0, 0, 0]])

    def step(x, t, t_prev, targets):
        return ddim_denoise_step(editor.model, x, t, t_prev, attrs, editor.alphas_cumprod, 1.0, True,
                                 guide=editor.guide, guide_targets=targets)

    graph = make_fx(step)(x, t, t_prev, targets)
    torch.testing.assert_close(graph(x, t, t_prev, targets), step(x, t, t_prev, targets), rtol=1e-4, atol=1e-5)
    assert load_diffusion_checkpoint(models / "unet").cond_drop_prob == 1.0


def test_sweep_previews_with_the_guided_backend(models, tmp_path, veil_home, capsys):
    out = tmp_path / "sweep"
    assert main(["edit", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                 "--protect", "smiling", "--first", "2", "--steps", "4", "--sweep", "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert report["backend"] == "guided" and len(report["rows"]) == 4 and "guided backend" in capsys.readouterr().out
    assert not (veil_home / "datasets").exists()  # previews open no ledger
    assert main(["edit", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                 "--protect", "smiling", "--first", "2", "--sweep", "--no-check", "--out", str(tmp_path / "x")]) == 2
    assert "--no-check" in capsys.readouterr().err
    assert main(["edit", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                 "--protect", "smiling", "--first", "2", "--steps", "4", "--sweep", "--sweep-epsilons", "0,1",
                 "--strength", "0.6", "--encoding", "invert", "--out", str(tmp_path / "inv")]) == 0
    rows = json.loads((tmp_path / "inv" / "sweep.json").read_text())["rows"]
    assert [(r["level"]["epsilon"], r["level"]["strength"], r["level"]["encoding"]) for r in rows] == \
        [(0.0, 0.6, "invert"), (1.0, 0.6, "invert")]
    with pytest.raises(SystemExit):
        main(["edit", "--checkpoint", str(models / "unet"), "--protect", "smiling", "--first", "2",
              "--encoding", "blur", "--out", str(tmp_path / "y")])
    assert "--encoding" in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["invert", "noise"])
def test_a_seeded_guided_release_repeats_its_draws_and_only_inverted_pixels(models, tmp_path, encoding):
    """A fixed --seed gives the same draws (each run its own database: the draw depends on how often the
    image was released before); the pixels repeat with inversion, never with the secret encoding noise."""
    for run in ("a", "b"):  # issue 30: inversion only where the pixels are said unprotected; noise is priced high
        with PrivacyLedger(tmp_path / f"{run}.sqlite", budget=math.inf) as book:
            if encoding == "invert":
                book.set_pixel_policy("not-protected", reason="this test releases inversions")
    reports = [J.run_edit(checkpoint=models / "unet", classifier=models / "guide", checker=models / "judge",
                          out=tmp_path / run,
                          protect=PROTECTED, first=2, level="max", encoding=encoding, steps=4, seed=4,
                          ledger=tmp_path / f"{run}.sqlite",
                          check_threshold=0.01)  # the tiny classifier barely reads smiling: let the edits pass
               for run in ("a", "b")]
    assert all(im["file"] for im in reports[0]["images"])
    assert reports[0]["level"]["encoding"] == encoding
    assert [im["released_attributes"] for im in reports[0]["images"]] == \
        [im["released_attributes"] for im in reports[1]["images"]]
    same = [(tmp_path / "a" / im["file"]).read_bytes() == (tmp_path / "b" / im["file"]).read_bytes()
            for im in reports[0]["images"]]
    assert same == [encoding == "invert"] * len(same)


def test_noise_encoding_is_the_forward_process_with_fresh_secret_noise(models, monkeypatch):
    editor = _editor(models)
    x, a = _faces(editor, n=2)
    noise = torch.randn_like(x)
    for strength in (0.5, 1.0):
        x_t0 = editor.encode(x, a, strength=strength, protected=PROTECTED, encoding="noise", noise=noise)
        ab = editor.alphas_cumprod[editor.timesteps(strength)[-1]]
        torch.testing.assert_close(x_t0, ab.sqrt() * x + (1 - ab).sqrt() * noise)
    # without noise=: a generator seeded from the OS CSPRNG at each call, not torch's global RNG (the config seed)
    seeds = []
    monkeypatch.setattr(E, "secret_seed", lambda: seeds.append(secrets.randbits(63)) or seeds[-1])
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(editor.encode(x, a, strength=1.0, protected=PROTECTED, encoding="noise"))
    assert len(seeds) == 2 and not torch.equal(*draws)
    edited = editor.edit(x, a, _with(a, "smiling", editor, 1.0), strength=0.5, protected=PROTECTED, encoding="noise")
    assert len(seeds) == 3 and edited.shape == x.shape and bool(edited.isfinite().all())
    with pytest.raises(ConfigError, match="noise"):
        editor.encode(x, a, strength=0.5, protected=PROTECTED, encoding="invert", noise=noise)
    with pytest.raises(ConfigError, match="--encoding"):
        editor.edit(x, a, a, strength=0.5, protected=PROTECTED, encoding="blur")
    with pytest.raises(ConfigError, match="--protect"):
        editor.encode(x, a, strength=0.5, protected=[], encoding="noise")


def test_previews_of_one_image_share_one_noise_draw(models, monkeypatch):
    """Candidates of a session's preview differ only by their released values: one encoding for all."""
    editor = _editor(models)
    x, a = _faces(editor, n=1)
    originals = dict(zip(editor.attribute_names, a[0].int().tolist()))
    seeds = []
    monkeypatch.setattr(E, "secret_seed", lambda: seeds.append(secrets.randbits(63)) or seeds[-1])
    same_target = [dict(originals)] * 2
    out = editor([x[0]] * 2, originals=[originals] * 2, targets=same_target, strength=0.6, protected=PROTECTED,
                 encoding="noise")
    assert len(seeds) == 1
    torch.testing.assert_close(out[0], out[1])


def test_an_independent_checker_judges_instead_of_the_guide_and_its_cost_is_stated(models, tmp_path, veil_home):
    """--checker: a classifier that did not steer the edit checks it (the guide can be fooled by its own
    guidance); it is the one read, and its training privacy is listed in the cost."""
    editor, *_ = J.load_edit_inputs(checkpoint=models / "unet", classifier=models / "guide", checker=models / "judge",
                                    data=None, ids=None, first=2, protect=PROTECTED, steps=4, guidance=None)
    assert editor.backend == "guided" and editor.checker is not editor.guide
    assert not editor.checker.model.noise_conditional  # a classifier of clean images can judge
    assert [m["role"] for m in editor.costs] == ["denoiser", "guidance classifier", "check classifier"]
    assert "check classifier: epsilon" in editor.model_privacy
    x, a = _faces(editor, n=2)
    target = _with(a, "smiling", editor, 1.0)
    j = editor.checker.attribute_names.index("smiling")
    torch.testing.assert_close(editor.shown(x, target, protected=PROTECTED)[:, 0],
                               torch.sigmoid(editor.checker.logits(x)[:, j]))
    report = J.run_edit(checkpoint=models / "unet", classifier=models / "guide", checker=models / "judge",
                        out=tmp_path / "e", protect=PROTECTED, first=2, level="high", steps=4, check_threshold=0.01)
    assert report["checker"] == str(models / "judge") and len(report["cost"]["models"]) == 3


# -- issue 30: the check is not the model that guided the edit ---------------------------------------------------
def _release_with_head(source, target, fn):
    """A copy of the classifier release ``source`` at ``target`` with its head's weights mapped by ``fn``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("private"))
    weights = target / "model" / "model.safetensors"
    state = load_file(str(weights))
    state = {k: fn(v) if k.startswith("model.head.") else v for k, v in state.items()}
    save_file(state, str(weights))
    return target


def test_a_checker_with_the_guides_weights_is_refused(models, tmp_path, veil_home, capsys):
    """The same release as the guide, or a copy of it under another name, is not a check: refused naming
    --checker, before anything is edited or charged."""
    copy = _release_with_head(models / "guide", tmp_path / "copy", lambda v: v)  # same weights, new path
    for same in (models / "guide", copy):
        with pytest.raises(ConfigError, match="--checker: the same weights as --classifier"):
            _editor(models, checker=same)
    assert main(["edit", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"),
                 "--checker", str(copy), "--protect", "smiling", "--first", "2", "--steps", "4",
                 "--out", str(tmp_path / "o")]) == 2
    assert "same weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (veil_home / "datasets").exists()
    guide = E._load_models(models / "unet", use_ema=True, classifier=models / "guide", classifier_scale=30.0,
                           checker=None)[1]
    assert E.weights_digest(guide) != E.weights_digest(_editor(models).checker)


def test_a_checker_that_does_not_know_a_protected_attribute_is_refused(models, tmp_path):
    judge = _release_with_head(models / "judge", tmp_path / "judge", lambda v: v)
    meta_path = judge / "model" / "veil_model.json"
    meta = json.loads(meta_path.read_text())
    meta["attribute_names"] = ["not_smiling" if n == "smiling" else n for n in meta["attribute_names"]]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"--protect: the check classifier \(--checker.*does not know \['smiling'\]"):
        J.load_edit_inputs(checkpoint=models / "unet", classifier=models / "guide", checker=judge, data=None,
                           ids=None, first=2, protect=PROTECTED, steps=4, guidance=None)


def test_a_released_edit_is_checked_by_the_checker_not_the_guide(models, tmp_path):
    """A checker that reads the opposite of the guide (its head negated: P = 1 - P_guide) decides: every row the
    guide would accept is refused, and what the check read is the checker's reading, not the guide's."""
    contrarian = _release_with_head(models / "guide", tmp_path / "contrarian", lambda v: -v)
    editor = _editor(models, checker=contrarian, max_retries=0)
    x, a = _faces(editor, n=4)
    targets = _with(a, "smiling", editor, 1.0)
    checked = editor.edit_checked(x, a, targets, strength=0.7, protected=PROTECTED)
    j = editor.guide.attribute_names.index("smiling")
    by_guide = torch.sigmoid(editor.guide.logits(checked.images)[:, j])  # the guide's reading of its own edits
    torch.testing.assert_close(checked.shown[:, 0], 1 - by_guide, atol=1e-5, rtol=0)
    assert checked.passed.tolist() == (1 - by_guide >= 0.5).tolist()
    guide_accepts = by_guide >= 0.5
    assert bool(guide_accepts.any()), by_guide  # the guide pushed these edits to read "smiling" to itself ...
    assert not bool(checked.passed[guide_accepts].any())  # ... and the checker refuses every one of them


def test_a_strength_that_walks_no_step_is_refused(models, tmp_path, veil_home, capsys):
    """Issue 31: --strength 1e-300 (t0 = 0: no DDIM step, the image released unchanged) exits 2 with one line."""
    base = ["edit", "--checkpoint", str(models / "unet"), "--classifier", str(models / "guide"), "--no-check",
            "--protect", "smiling", "--first", "2", "--steps", "10", "--level", "max"]
    for strength in ("1e-300", "0.04"):  # at 10 steps one step is r / T = 0.1: the least strength is above 0.05
        assert main(base + ["--strength", strength, "--out", str(tmp_path / strength)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--strength" in err and "no DDIM step" in err and "0.05" in err
        assert not (tmp_path / strength).exists() and not (veil_home / "datasets").exists()
    sweep = [a for a in base if a != "--no-check"] + ["--sweep", "--sweep-epsilons", "0,1", "--strength", "1e-300",
                                                      "--out", str(tmp_path / "s")]
    assert main(sweep) == 2
    assert "no DDIM step" in capsys.readouterr().err and not (tmp_path / "s").exists()
