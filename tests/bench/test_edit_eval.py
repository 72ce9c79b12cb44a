"""bench/edit_eval.py: the table logic on fabricated predictions (attacks are compared with the prior-aware
bound (issue 11, item 15), not with p_keep, which only bounds a 50/50 attribute; the stronger of the naive
and the adaptive attacker is flagged), KID against a brute-force reference, the adaptive attacker's
fine-tuning, and an end-to-end run (guided and conditional backends, then --combine) on tiny models whose
rows carry the formal price of one release, equal to what ``veil.privacy.accounting`` charges (issue 30)."""

import argparse
import json
import math

import pytest
from bench_helpers import load_bench
import torch

from veil.editing.load import load_editor
from veil.privacy.accounting import DEFAULT_RELEASE_DELTA, compose, gaussian_mu, image_sensitivity, price_release
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.mechanism import keep_probability

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny CNNs on a shared 2-core machine

NAMES = ["smiling", "eyeglasses", "hat"]
PROTECT = ["eyeglasses", "smiling"]
N = 2000


@pytest.fixture(scope="module")
def bench():
    return load_bench("edit_eval")


@pytest.fixture(scope="module")
def data():
    """A skewed synthetic protected attribute (eyeglasses: exactly 6.5% positive, as in CelebA), a
    balanced one (smiling) and an unprotected one; released = randomized response at epsilon 1."""
    gen = torch.Generator().manual_seed(0)
    original = torch.where(torch.rand(N, 3, generator=gen) < 0.5, 1.0, -1.0)  # (N,3)
    original[:, 1] = -1.0
    original[torch.randperm(N, generator=gen)[: round(0.065 * N)], 1] = 1.0
    flip = torch.rand(N, 3, generator=gen) >= keep_probability(epsilon=1.0)
    flip[:, 2] = False  # unprotected: released as it is
    released = torch.where(flip, -original, original)
    return original, released


def _row(bench, pred, original, released, priors, adaptive=None):
    """A table row as evaluate() makes it: the naive attacker's numbers from pred, the adaptive one's given."""
    row = bench.score_edits(pred, original, released, names=NAMES, protect=PROTECT, epsilon=1.0, priors=priors)
    return {"label": "test", "level": "high", "strength": 0.7, **row, "adaptive": adaptive or dict(row["naive"]),
            "n": N, "n_edited": N, "adaptive_n": N, "check": None, "psnr": 30.0, "ssim": 0.9, "kid": 0.01}


def _run(rows, priors):
    baseline = {"n": N, "adaptive_images": N, "accuracy_on_originals": dict.fromkeys(NAMES, 1.0), "priors": priors,
                "prior_n": 10 * N, "kid_floor": 0.001}
    return {"label": "test", "privacy": "not private", "protect": PROTECT, "rows": rows, "baseline": baseline}


def test_priors_come_from_known_labels(bench, data):
    original, _ = data
    priors = bench.attribute_priors(original, NAMES)
    assert priors["eyeglasses"] == pytest.approx(0.065)
    with_unknown = torch.cat([original, torch.zeros(5, 3)])  # unknown (0) labels do not count
    assert bench.attribute_priors(with_unknown, NAMES) == priors


def test_always_no_on_a_skewed_attribute_is_not_a_leak(bench, data):
    # The attacker ignores the image and says "no glasses": 93.5% right, far above p_keep = 0.731 at
    # epsilon 1 (the old comparison flagged that as a leak of +0.204) but exactly the Bayes-optimal
    # accuracy randomized response allows at prior 0.065. For smiling it reads the released value.
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    pred = released.clone()
    pred[:, 1] = -1.0
    row = _row(bench, pred, original, released, priors)
    p_keep = keep_probability(epsilon=1.0)
    assert row["naive"]["eyeglasses"] == pytest.approx(0.935) and row["naive"]["eyeglasses"] > p_keep + 0.2
    assert bench._excess(row["naive"]["eyeglasses"], p_keep, N).endswith("*")  # what the old table said
    assert row["bound"]["eyeglasses"] == pytest.approx(0.935) and row["p_keep"] == pytest.approx(p_keep)
    table = bench.markdown([_run([row], priors)])
    rows_only = table.split("\n\n")[0]
    assert "*" not in rows_only and "No attacker beats the prior-aware bound" in table
    assert "| 0.935 | 0.935 | 0.935 | - |" in table  # naive, adaptive, bound, excess of eyeglasses


def test_an_attacker_above_the_bound_is_flagged(bench, data):
    # Positive control: reading the ORIGINAL off the pixels (a perfect leak) beats every bound below 1.
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    row = _row(bench, original.clone(), original, released, priors)
    table = bench.markdown([_run([row], priors)])
    assert row["naive"] == {"eyeglasses": 1.0, "smiling": 1.0}
    assert "+0.065*" in table and "beats the prior-aware bound in 2 of 2 cells" in table
    assert row["unprotected"] == 1.0 and row["follows"]["smiling"] < 0.8


def test_only_the_adaptive_attacker_above_the_bound_is_flagged(bench, data):
    # The naive attacker sits at the bound (always "no glasses"; reads smiling's released value) while the
    # adaptive one reads the originals: the excess and the summary follow the stronger of the two.
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    pred = released.clone()
    pred[:, 1] = -1.0
    row = _row(bench, pred, original, released, priors, adaptive={"eyeglasses": 1.0, "smiling": 1.0})
    table = bench.markdown([_run([row], priors)])
    assert "| 0.935 | 1.000 | 0.935 | +0.065* |" in table
    assert "beats the prior-aware bound in 2 of 2 cells" in table


class _Brightness(torch.nn.Module):
    """An 'attacker' that says +1 for every attribute of an image brighter than 0, and embeds it as its mean."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, len(NAMES))

    def embed(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]


def test_a_rows_numbers_count_only_the_edits_that_passed_the_check(bench):
    # 6 edits of images whose attributes are all +1: the 4 that pass are bright (read as +1, right), the
    # 2 refused ones dark (read as -1, wrong). Counting the refused ones would give 4/6, not 1.
    edited = torch.cat([torch.ones(4, 3, 16, 16), -torch.ones(2, 3, 16, 16)])
    a = torch.ones(6, len(NAMES))
    passed = torch.tensor([True] * 4 + [False] * 2)
    attempts = torch.tensor([1, 1, 1, 2, 3, 3])
    score = dict(names=NAMES, protect=PROTECT, epsilon=1.0, priors=dict.fromkeys(NAMES, 0.5))
    row = bench.score_row(_Brightness(), _Brightness(), edited, torch.zeros(6, 3, 16, 16), a, a.clone(), passed,
                          attempts, checked=True, **score)
    assert row["n"] == 4 and row["n_edited"] == 6
    assert row["check"] == {"redone": pytest.approx(3 / 6), "refused": pytest.approx(2 / 6)}
    assert row["naive"] == row["adaptive"] == {"eyeglasses": 1.0, "smiling": 1.0} and row["unprotected"] == 1.0
    assert row["ssim"] == pytest.approx(bench.ssim(torch.ones(4, 3, 16, 16), torch.zeros(4, 3, 16, 16)))
    unchecked = bench.score_row(_Brightness(), _Brightness(), edited, edited, a, a, torch.ones(6, dtype=torch.bool),
                                torch.ones(6, dtype=torch.long), checked=False, **score)
    assert unchecked["check"] is None and unchecked["naive"]["smiling"] == pytest.approx(4 / 6)


# -------------------------------------------------------------------------------------------------- KID
def _kid_by_loops(x, y):
    """The unbiased MMD^2 of the KID paper written out term by term: the reference."""
    k = lambda a, b: (float(a @ b) / x.shape[1] + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_term_by_term_formula(bench):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    assert bench.kid(x, y) == pytest.approx(_kid_by_loops(x, y), rel=1e-9)  # float64 throughout
    assert bench.kid(x, y[:1]) != bench.kid(x, y[:1])  # NaN: one row has no pairs


def test_kid_is_zero_within_noise_for_one_distribution_and_positive_for_a_shift(bench):
    # ReLU'd gaussians like the probe's 128-d features. Unbiased: the mean over many small (n = 10) pairs
    # of samples of one distribution is ~0, where the biased (V-statistic) version would be clearly > 0.
    gen = torch.Generator().manual_seed(0)
    feats = lambda n, shift=0.0: torch.relu(torch.randn(n, 128, generator=gen) + shift)
    same = torch.tensor([bench.kid(feats(10), feats(10)) for _ in range(300)])
    shifted = torch.tensor([bench.kid(feats(10), feats(10, 0.3)) for _ in range(300)])
    stderr = float(same.std()) / 300**0.5
    assert abs(float(same.mean())) < 3 * stderr
    assert float(shifted.mean()) > 10 * stderr and float(shifted.mean()) > 5 * abs(float(same.mean()))
    assert bench.kid(feats(200), feats(200, 0.3)) > 0


# -------------------------------------------------------------------------------------- the attackers
def _readable(n, seed):
    """Noisy images whose 2 attributes are written in them: attribute j brightens or darkens quadrant j
    of channel j. (N,3,32,32), (N,2) in {-1,+1}."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.where(torch.rand(n, 2, generator=gen) < 0.5, 1.0, -1.0)
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    x[:, 0, :16, :16] += 0.6 * a[:, 0, None, None]
    x[:, 1, 16:, 16:] += 0.6 * a[:, 1, None, None]
    return x, a


def test_adaptive_attacker_learns_labels_readable_from_the_images_and_leaves_the_naive_one(bench):
    torch.manual_seed(0)
    naive = bench.AttributeCNN(2).eval()
    before = {k: v.clone() for k, v in naive.state_dict().items()}
    x, a = _readable(256, seed=0)
    x_test, a_test = _readable(128, seed=1)
    chance = float((bench.predict(naive, x_test) == a_test).float().mean())
    adaptive = bench.adaptive_attacker(naive, x, a, epochs=4, seed=0)
    accuracy = float((bench.predict(adaptive, x_test) == a_test).float().mean())
    assert chance < 0.7 and accuracy > 0.9
    assert all(torch.equal(v, naive.state_dict()[k]) for k, v in before.items())  # fine-tuned a copy
    assert bench.embed(adaptive, x_test[:3]).shape == (3, 128)


# ------------------------------------------------------------------------------------------ end to end
SMALL = ["--quick", "--num-images", "8", "--adaptive-images", "16", "--steps", "3", "--attacker-images", "64",
         "--attacker-epochs", "1", "--adaptive-epochs", "1", "--threads", "1"]


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_end_to_end_guided_and_conditional_runs_and_their_combination(bench, models, tmp_path, monkeypatch):
    """On the session's cached tiny models (tests/helpers/export_models.py): a label-free UNet with a noise-conditional
    DP classifier (the guided pipeline), a DP classifier of clean images that checks it (``judge``: a guided edit is
    never checked by its guide), and an attribute-conditional UNet (the conditional backend, no check)."""
    root = models
    bench.main(["--checkpoint", str(root / "unet"), "--classifier", str(root / "guide"), "--levels", "low,max",
                "--checker", str(root / "judge"), "--out", str(tmp_path / "g"), *SMALL])
    inverted, invert = [], bench.PrivateEditor.invert
    monkeypatch.setattr(bench.PrivateEditor, "invert", lambda self, x, *a, **kw: inverted.append(len(x)) or
                        invert(self, x, *a, **kw))
    bench.main(["--checkpoint", str(root / "cond"), "--strengths", "0.7", "--epsilons", "1,inf", "--label", "control",
                "--encodings", "invert,noise,fresh:1,pool2", "--out", str(tmp_path / "c"), *SMALL])
    assert inverted == [16, 8]  # no check: one inversion per image set, shared by both epsilons; noise, fresh: none
    guided, control = _strict_json(tmp_path / "g" / "edit_eval.json"), _strict_json(tmp_path / "c" / "edit_eval.json")
    assert guided["backend"] == "guided" and guided["label"].startswith("guided, DP eps ")
    assert "unchecked" not in guided["label"]
    # issue 30: without --checker a guided run is not checked by its guide: unchecked, and labelled so
    import argparse

    bare = argparse.Namespace(checkpoint=root / "unet", classifier=root / "guide", checker=None, classifier_scale=10.0,
                              steps=3, guidance=2.0, label=None)
    editor, _, info = bench.load_pipeline(bare)
    assert editor.backend == "guided" and not editor.can_check and info["label"].endswith(", unchecked")
    assert "; checker: epsilon" in guided["privacy"]  # the judge's own training privacy is stated
    assert [r["level"] for r in guided["rows"]] == ["low", "max"] and control["label"] == "control"
    assert guided["baseline"]["n"] == 8 and guided["baseline"]["adaptive_images"] == 16
    for r in guided["rows"]:  # checked: every number on the edits that passed
        assert set(r["naive"]) == set(r["adaptive"]) == set(r["bound"]) == {"eyeglasses", "smiling"}
        assert 0 <= r["check"]["refused"] <= r["check"]["redone"] <= 1  # a refused edit was re-done first
        assert r["n"] == round(8 * (1 - r["check"]["refused"])) and r["n_edited"] == 8
        # KID is on the passed edits of the first half of the images (``_kid_disjoint``): none when fewer than
        # two passed there (an independent checker refuses some edits the guide would have passed)
        assert r["n"] >= 2 or r["kid"] is None
    cells = [(r["level"], r["epsilon"], r["strength"], r["encoding"]) for r in control["rows"]]
    assert cells == [(None, e, s, enc) for enc, s in (("invert", 0.7), ("noise", 0.7), ("fresh", 1.0), ("pool2", 0.7))
                     for e in (1.0, "inf")]  # inf: strict JSON
    assert [r["pool"] for r in control["rows"]] == [None] * 6 + [2, 2]
    # pooled: priced as the unpooled noise encoding at its strength (tight: ``test_pooling_...``)
    assert control["rows"][6]["price"] == control["rows"][2]["price"]
    assert control["rows"][6]["ssim"] != control["rows"][2]["ssim"]
    assert [r["encoding"] for r in guided["rows"]] == [bench.LEVELS[n].encoding for n in ("low", "max")]
    for r in control["rows"]:  # no classifier: no check, every edit released
        assert r["check"] is None and r["n"] == 8 and isinstance(r["kid"], float)
    assert control["rows"][1]["bound"] == {"eyeglasses": 1.0, "smiling": 1.0} and control["rows"][1]["flip_rate"] == 0
    _assert_priced_as_the_ledger(bench, guided, load_editor(root / "unet", runtime="torch", classifier=root / "guide",
                                                            checker=root / "judge", steps=3))
    cond = load_editor(root / "cond", runtime="torch", steps=3)
    _assert_priced_as_the_ledger(bench, control, cond)
    a, res = cond.signal_fraction(0.7), cond.resolution  # the noise rows' mu, from the schedule by hand
    assert control["rows"][2]["price"]["pixel_mu"] == pytest.approx(math.sqrt(a / (1 - a)) * 2 * math.sqrt(3 * res**2))
    assert "| noise |" in (tmp_path / "c" / "edit_eval.md").read_text()
    text = (tmp_path / "g" / "edit_eval.md").read_text()
    assert "| low | 4 | 0.40 | invert | unbounded | unbounded | 8 | unbounded |" in text  # two labels at eps 4
    assert "| max | 0 | 1.00 | fresh | 0 | 0 | 0 | 0 |" in text
    for column in ("encoding", "pixel mu", "pixels eps", "labels eps", "composed eps", "naive eyeglasses",
                   "adaptive smiling", "bound eyeglasses", "re-done", "refused", "KID"):
        assert f" {column} |" in text
    assert "synth-" not in (tmp_path / "g" / "edit_eval.json").read_text()  # no per-image ids or labels
    assert (tmp_path / "g" / "edit_eval.png").stat().st_size > 0

    bench.main(["--combine", str(tmp_path / "g" / "edit_eval.json"), str(tmp_path / "c" / "edit_eval.json"),
                "--out", str(tmp_path / "m")])
    merged = (tmp_path / "m" / "edit_eval.md").read_text()
    table = [line for line in merged.split("\n\n")[1].splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == [guided["label"]] * 2 + ["control"] * 8
    assert f"| control | - | 1 | 0.70 | pool2 | {bench._eps(control['rows'][2]['price']['pixel_mu'])} |" in merged
    assert "| control | - | 1 | 0.70 | invert | unbounded | unbounded | 2 | unbounded | 8 | n/a | n/a |" in merged
    noise_inf = control["rows"][3]["price"]  # RR eps inf: the labels are unbounded whatever the pixels cost
    assert f"| control | - | inf | 0.70 | noise | {bench._eps(noise_inf['pixel_mu'])} | " \
           f"{bench._eps(noise_inf['pixels_epsilon'])} | unbounded | unbounded | 8 |" in merged
    assert "| control | - | 1 | 1.00 | fresh | 0 | 0 | 2 | 2 | 8 |" in merged  # not read: the labels' price only
    merged_runs = _strict_json(tmp_path / "m" / "edit_eval.json")["runs"]
    assert [r["label"] for r in merged_runs] == [guided["label"], "control"]
    assert (tmp_path / "m" / "edit_eval.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="labels"):
        bench.main(["--combine", str(tmp_path / "c" / "edit_eval.json"), str(tmp_path / "c" / "edit_eval.json"),
                    "--out", str(tmp_path / "dup")])


def _assert_priced_as_the_ledger(bench, run, editor):
    """Each row's price is what veil.privacy.accounting charges ONE release of its setting with this editor (its
    pixel_mus: every re-do when it checks, as the release path prices them), at the default delta."""
    assert run["rows"]
    for r in run["rows"]:
        eps = bench._num(r["epsilon"])
        encoding = "noise" if r.get("pool") else r["encoding"]  # pooled: the noise price
        mus = editor.pixel_mus(strength=r["strength"], encoding=encoding, check=editor.can_check)
        g = compose([price_release(epsilon=eps, protected=run["protect"], encoding=encoding, pixel_mus=mus)],
                    delta=DEFAULT_RELEASE_DELTA)
        price = r["price"]
        assert price["delta"] == DEFAULT_RELEASE_DELTA and price["encodings_priced"] == len(mus)
        for key, want in (("pixel_mu", g.pixel_mu), ("pixels_epsilon", g.pixels_epsilon),
                          ("labels_epsilon", g.labels_epsilon), ("epsilon", g.epsilon)):
            assert bench._num(price[key]) == pytest.approx(want, rel=1e-12), (r["encoding"], r["strength"], key)
        for p in run["protect"]:
            want = min(1.0, bayes_accuracy_bound(epsilon=g.epsilon, prior=run["baseline"]["priors"][p]) +
                       DEFAULT_RELEASE_DELTA)
            assert price["formal_bound"][p] == pytest.approx(want)
        pixels = {"invert": math.inf, "fresh": 0.0}.get(r["encoding"])
        assert pixels is None or bench._num(price["pixels_epsilon"]) == pixels
        assert (encoding == "noise") == (0 < bench._num(price["pixel_mu"]) < math.inf)


def test_pooling_is_a_projection_whose_noise_price_is_tight(bench):
    """pooled(x, r): idempotent and self-adjoint (an orthogonal projection), so it never lengthens the difference
    of two images and the "noise" encoding's sensitivity 2 sqrt(3 H W) still bounds it; two flat images (all -1,
    all +1) keep that whole difference, so the pooled rows' price (the noise price) is tight, not loose."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.rand(8, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
    for r in (1, 2, 4, 8, 16):
        p = bench.pooled(x, r)
        assert torch.allclose(bench.pooled(p, r), p)  # idempotent
        assert torch.allclose((p * y).sum(), (x * bench.pooled(y, r)).sum())  # self-adjoint
        assert ((p - bench.pooled(y, r)).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) + 1e-12).all()
        assert len(torch.unique(p[0, 0])) <= r * r  # only the r x r block means survive
        flat = torch.ones(1, 3, 16, 16, dtype=torch.float64)
        assert (bench.pooled(flat, r) - bench.pooled(-flat, r)).norm() == pytest.approx(
            image_sensitivity((3, 16, 16)))
    assert torch.equal(bench.pooled(torch.full((1, 3, 4, 4), 5.0), 2), torch.ones(1, 3, 4, 4))  # clipped first
    assert bench.pooled(x, 16).equal(x.clamp(-1, 1))  # r = the size: the image itself
    assert [bench.pool_of(e) for e in ("pool4", "noise", "pool", "pool04", "pool0")] == [4, None, None, None, None]
    with pytest.raises(ValueError, match="divide"):
        bench.pooled(x, 3)


class _PricedEditor:
    """What formal_price reads of an editor: a check whose re-do draws a second encoding (mu 3, then 4)."""

    can_check = True

    def pixel_mus(self, *, strength, encoding, check):
        assert (strength, encoding) == (0.7, "noise")
        return [3.0, 4.0] if check else [3.0]


def test_a_checked_rows_price_counts_every_encoding_the_check_may_draw(bench):
    priors = {"eyeglasses": 0.2, "smiling": 0.5}
    price = bench.formal_price(_PricedEditor(), epsilon=1.0, strength=0.7, encoding="noise", protect=PROTECT,
                               priors=priors)
    g = compose([price_release(epsilon=1.0, protected=PROTECT, encoding="noise", pixel_mus=[3.0, 4.0])])
    assert price["pixel_mu"] == 5.0 and price["pixel_mu_first"] == 3.0 and price["encodings_priced"] == 2
    assert (price["pixels_epsilon"], price["labels_epsilon"], price["epsilon"]) == \
        (g.pixels_epsilon, g.labels_epsilon, g.epsilon)
    assert g.pixels_epsilon > compose([price_release(epsilon=1.0, protected=PROTECT, encoding="noise",
                                                     pixel_mus=[3.0])]).pixels_epsilon  # the re-do is charged
    assert price["formal_bound"]["eyeglasses"] == pytest.approx(
        bayes_accuracy_bound(epsilon=g.epsilon, prior=0.2) + DEFAULT_RELEASE_DELTA)


def test_the_price_columns_and_axis(bench, data):
    original, released = data
    priors = bench.attribute_priors(original, NAMES)
    row = _row(bench, released.clone(), original, released, priors)
    sens = image_sensitivity((3, 32, 32))
    mu = gaussian_mu(signal=0.2, sensitivity=sens)  # ~55: a face that keeps its pose costs thousands
    row["price"] = {"pixel_mu": mu, "pixels_epsilon": 1834.6, "labels_epsilon": 2.0, "epsilon": 1836.2,
                    "formal_bound": {"eyeglasses": 1.0, "smiling": 1.0}}
    table = bench.markdown([_run([row], priors)])
    assert f"| high | 1 | 0.70 | invert | {mu:.3g} | 1835 | 2 | 1836 | {N} |" in table
    assert "in 0 of 2 priced cells" in table
    unpriced = dict(row, price=None)  # a run written before prices: n/a, and the plot of levels
    assert "| invert | n/a | n/a | n/a | n/a |" in bench.markdown([_run([unpriced], priors)])
    assert [bench._eps(v) for v in (0.0, 0.031, 2.0, 55.4, 1836.2, "inf", None)] == \
        ["0", "0.031", "2", "55.4", "1836", "unbounded", "n/a"]
    runs = [{"rows": [{"price": {"epsilon": e}} for e in (0.0, 2.0, 1836.2, "inf")]}]
    x_of, ticks = bench._price_axis(runs)
    assert x_of(0.0) == pytest.approx(0.2) and x_of(math.inf) == pytest.approx(18362) and x_of(2.0) == 2.0
    assert ticks[0] == (x_of(0.0), "0\n(fresh)") and ticks[-1] == (x_of(math.inf), "unbounded\n(invert)")
    assert [t for t, _ in ticks[1:-1]] == [1.0, 10.0, 100.0, 1000.0]  # none within 3x of an edge's label


def test_cells_of_levels_grids_and_encodings(bench):
    p = argparse.ArgumentParser()  # p.error: SystemExit

    def cells(**kw):
        return bench._cells(argparse.Namespace(**{"levels": None, "strengths": None, "epsilons": None,
                                                  "encodings": None, **kw}), p)

    lv = bench.LEVELS
    assert cells(levels="low,max") == [(n, lv[n].epsilon, lv[n].strength, lv[n].encoding) for n in ("low", "max")]
    assert cells(levels="max", encodings="invert,noise") == [("max", 0.0, lv["max"].strength, e)
                                                            for e in ("invert", "noise")]
    assert cells(strengths="0.7", epsilons="1") == [(None, 1.0, 0.7, "invert")]
    assert cells(strengths="0.7,1", epsilons="0", encodings="noise") == [(None, 0.0, 0.7, "noise"),
                                                                         (None, 0.0, 1.0, "noise")]
    assert cells(strengths="0.55,0.7", epsilons="0,1", encodings="noise,fresh:1,invert:0.4") == \
        [(None, e, s, "noise") for s in (0.55, 0.7) for e in (0.0, 1.0)] + \
        [(None, e, 1.0, "fresh") for e in (0.0, 1.0)] + [(None, e, 0.4, "invert") for e in (0.0, 1.0)]
    assert cells(epsilons="2", encodings="fresh:1") == [(None, 2.0, 1.0, "fresh")]
    assert cells(strengths="1", epsilons="0", encodings="noise,pool4") == [(None, 0.0, 1.0, "noise"),
                                                                           (None, 0.0, 1.0, "pool4")]
    for bad in (dict(levels="max", strengths="0.7"), dict(encodings="blur"), dict(levels="max", encodings=","),
                dict(levels="max", encodings="fresh:1"), dict(encodings="noise:0"), dict(encodings="noise:x"),
                dict(encodings="fresh:1.5"), dict(encodings="pool0"), dict(encodings="pool")):
        with pytest.raises(SystemExit):
            cells(**bad)
    other = "invert" if lv["max"].encoding == "noise" else "noise"
    assert bench._cell_name({"level": "max", "encoding": lv["max"].encoding}) == "max"
    assert bench._cell_name({"level": "max", "encoding": other}) == f"max, {other}"
    assert bench._cell_name({"level": "low"}) == "low"  # a row from before encodings: inverted, as low is
    assert bench._cell_name({"level": None, "strength": 0.7, "epsilon": "inf", "encoding": "noise"}) == \
        "s 0.7, eps inf, noise"
    assert sorted(["s 1, eps 0, noise", "max", "low, noise", "low"], key=bench._cell_order) == \
        ["low", "low, noise", "max", "s 1, eps 0, noise"]
