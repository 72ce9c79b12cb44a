"""Tests of the demo's report: the offline report.html, the summary rows and the terminal table.

Run: OMP_NUM_THREADS=1 pytest tests/veil/demo/test_report.py
"""

from __future__ import annotations

import base64
import copy
import html
import re
import struct
import zlib

import pytest

from veil.errors import DataError
from veil.demo.report import (
    STAGES,
    summary_rows,
    summary_table,
    write_html,
)


def _tiny_png() -> bytes:
    """A valid 2x2 grey PNG, written by hand so the test needs no imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80\x80" for _ in range(2))  # filter byte + 2 grey pixels per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _report() -> dict:
    cmd = "veil train --config synthetic32 --out runs/x"
    return {
        "format": "veil-demo-report/1", "created": "2026-12-02T21:00:00+00:00", "quick": False, "seconds": 812.3,
        "machine": "2-core CPU, no GPU",
        "stages": {
            "models": {"seconds": 12.0, "proves": "Models proves: DP training is accounted.", "shipped": True,
                       "models": [
                           {"name": "public_unet", "role": "label-free denoiser", "data": "synthetic faces, seed 1 (public)",
                            "private": False, "epsilon": None, "delta": None, "params": 1100000, "source": "shipped", "command": cmd},
                           {"name": "guide", "role": "DP noise-conditional classifier", "data": "synthetic faces, seed 0 (private)",
                            "private": True, "epsilon": 9.99, "delta": 1e-6, "params": 200000, "source": "shipped", "command": cmd},
                           {"name": "published", "role": "classifier the owner published", "data": "synthetic faces, seed 0",
                            "private": False, "epsilon": "inf", "delta": None, "params": 150000, "source": "trained", "command": cmd}],
                       "dataset_account": {"epsilon": "inf", "delta": 1e-6, "runs": 3, "note": "One run was not private."}},
            "edits": {"seconds": 200.0, "proves": "Edits proves: the attacker stays near the bound.", "images": 3,
                      "protected": ["eyeglasses"], "level": "high",
                      "level_choice": {"level": "high", "passed": True, "why": "high is the least private level"},
                      "releases": 2, "refused": 1, "withheld": 0, "accepted_levels": ["high"],
                      "guarantee": {"delta": 1e-6, "pixel_policy": "protected",
                                    "max": {"epsilon": 1.0, "labels_epsilon": 1.0, "pixels_epsilon": 0.0,
                                            "pixels_protected": True, "releases": 1},
                                    "records": [{"id": f"synth-0-00000{i}", "outcome": o, "epsilon": 1.0,
                                                 "delta": 1e-6, "labels_epsilon": 1.0, "pixels_epsilon": 0.0,
                                                 "pixel_mu": 0.0, "pixels_protected": True, "releases": 1}
                                                for i, o in enumerate(["released", "released", "refused (the check)"])]},
                      "attacker": [{"level": "low", "epsilon": 4.0, "encoding": "invert", "accuracy": 0.98,
                                    "ci95": [0.89, 1.0], "bound": 0.98, "prior_test": 0.5, "prior_train": 0.5,
                                    "n": 48, "within_bound": True, "refused": "its pixels have no bound",
                                    "guarantee": {"epsilon": "inf", "delta": 1e-6, "pixels_epsilon": "inf"}},
                                   {"level": "medium", "epsilon": 2.0, "encoding": "fresh", "accuracy": 0.81,
                                    "ci95": [0.68, 0.9], "bound": 0.88, "prior_test": 0.5, "prior_train": 0.52,
                                    "n": 48, "within_bound": True, "refused": None,
                                    "guarantee": {"epsilon": 2.0, "delta": 1e-6, "pixels_epsilon": 0.0}},
                                   {"level": "high", "epsilon": 1.0, "encoding": "fresh", "accuracy": 0.7,
                                    "ci95": [0.56, 0.81], "bound": 0.73, "prior_test": 0.5, "n": 48},
                                   {"level": "max", "epsilon": 0.0, "encoding": "fresh", "accuracy": 0.52,
                                    "ci95": [0.38, 0.65], "bound": 0.5, "prior_test": 0.5, "n": 48}],
                      "attacker_on_releases": {"level": "high", "data": "accepted releases of the private images",
                                               "accuracy": 0.5, "ci95": [0.09, 0.91], "bound": 0.73, "n": 2,
                                               "prior_test": 0.5, "within_bound": True},
                      "utility": {"follows": 0.85, "unprotected_kept": 0.97, "ssim": 0.6},
                      "ledger_releases": 3, "grid": "edits/grid.png"},
            "unlearning": {"seconds": 60.0, "proves": "Unlearning proves: the update matches retraining.", "changed": 30,
                           "method": "second order, head", "update_seconds": 0.02, "retrain_seconds": 3.5, "speedup": 175.0,
                           "test_accuracy": {"original": 0.95, "updated": 0.95, "retrained": 0.95},
                           "feature_probe": {"original": 0.282, "updated": 0.27, "retrained": 0.218},
                           "feature_probe_ci95": {"original": [0.201, 0.379], "updated": [0.19, 0.36],
                                                  "retrained": [0.15, 0.3]},
                           "feature_probe_samples": 110,
                           "remembered": {"original": 0.6, "updated": 0.3, "retrained": 0.25}},
            "export": {"seconds": 90.0, "proves": "Export proves: ONNX Runtime matches PyTorch.", "parity_max_abs_error": 8.6e-6,
                       "tolerance": 0.002, "latency_ms": {"ort_p50": 120.0, "torch_p50": 200.0}, "speedup": 1.67,
                       "provider": "CPUExecutionProvider"},
            "serve": {"seconds": 20.0, "proves": "Serve proves: one session over HTTP ends in a release.", "ok": True,
                      "decision": "accepted", "release_id": 33, "preview_events": 7,
                      "command": "veil serve --export runs/demo/export"},
        },
    }


@pytest.fixture()
def demo_dir(tmp_path):
    (tmp_path / "edits").mkdir()
    (tmp_path / "edits" / "grid.png").write_bytes(_tiny_png())
    return tmp_path


def test_full_report_is_self_contained_and_complete(demo_dir):
    report = _report()
    path = write_html(report, demo_dir)
    assert path == demo_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    for name in STAGES:
        assert report["stages"][name]["proves"] in page
    # the grid itself, byte for byte, and the three plots (attacker, unlearning, latency)
    assert "data:image/png;base64," + base64.b64encode(_tiny_png()).decode("ascii") in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 4  # the grid + three plots
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert "∞" in page  # the published model's and the account's epsilon
    assert "Missing stages" not in page and "is missing" not in page
    assert "veil serve --export runs/demo/export" in page
    assert "What is protected and what is not" in page


def test_summary_rows_give_each_stage_its_key_numbers():
    rows = summary_rows(_report())
    assert all(isinstance(r, tuple) and len(r) == 3 and all(isinstance(c, str) for c in r) for r in rows)
    by_stage = {name: {what: value for stage, what, value in rows if stage == name} for name in STAGES}
    assert by_stage["models"]["guide epsilon"] == "9.99"
    assert by_stage["models"]["published epsilon"] == "∞"
    assert by_stage["models"]["public_unet epsilon"] == "n/a"
    assert by_stage["edits"]["releases / refused"] == "2 / 1"
    assert by_stage["edits"]["level (one for all images, chosen on public faces)"] == "high"
    assert by_stage["edits"]["attacker at medium, public edits [95%] (bound)"] == "81.0% [68.0%, 90.0%] (88.0%)"
    assert by_stage["edits"]["attacker on the accepted releases [95%] (bound)"] == "50.0% [9.0%, 91.0%] (73.0%)"
    assert by_stage["edits"]["record epsilon, max (labels / pixels)"] == "1 (1 / 0) at delta 1e-06"
    assert by_stage["unlearning"]["update speed-up over retraining"] == "175×"
    assert by_stage["unlearning"]["feature probe: original / updated / retrained"] == (
        "28.2% [20.1%, 37.9%] / 27.0% [19.0%, 36.0%] / 21.8% [15.0%, 30.0%] (n=110)")
    assert not any("remembered" in what for what in by_stage["unlearning"])  # 0% for all three: not shown
    assert by_stage["export"]["ORT speed-up"] == "1.67×"
    assert by_stage["export"]["p50 latency ORT / PyTorch"] == "120.0 ms / 200.0 ms"
    assert by_stage["serve"]["decision / release id"] == "accepted / 33"
    assert ("demo", "total time", "13 min 32 s") in rows


def test_summary_table_is_fixed_width_plain_text():
    text = summary_table(_report())
    lines = text.splitlines()
    assert len(lines) == len(summary_rows(_report())) + 2  # header and rule
    assert "\x1b" not in text
    what, value = lines[0].index("what"), lines[0].index("value")
    for line in lines[2:]:  # every row's second and third cells start under their headers
        assert line[what - 2:what] == "  " and line[what] != " "
        assert line[value - 2:value] == "  " and line[value] != " "
    assert "guide epsilon" in text and "9.99" in text


def test_interrupted_demo_renders_and_names_missing_stages(demo_dir):
    report = _report()
    del report["stages"]["serve"], report["stages"]["export"]
    page = write_html(report, demo_dir).read_text(encoding="utf-8")
    assert "Missing stages (the demo was interrupted): export, serve." in page
    assert 'Stage "export" is missing' in page and 'Stage "serve" is missing' in page
    assert report["stages"]["unlearning"]["proves"] in page
    rows = summary_rows(report)
    assert ("serve", "status", "missing (the demo stopped before it)") in rows
    assert not any(stage == "export" and what != "status" for stage, what, _ in rows)


def test_none_values_render_as_na_and_missing_image_is_noted(demo_dir):
    report = copy.deepcopy(_report())
    export = report["stages"]["export"]
    export.update(parity_max_abs_error=None, speedup=None, latency_ms={"ort_p50": None, "torch_p50": None})
    report["stages"]["edits"]["guarantee"]["max"].update(epsilon="inf", pixels_epsilon=None)
    report["stages"]["edits"]["attacker_on_releases"] = {"n": 0, "accuracy": None, "ci95": [0.0, 1.0], "bound": None}
    report["stages"]["edits"]["grid"] = "edits/nowhere.png"
    rows = {(s, w): v for s, w, v in summary_rows(report)}
    assert rows[("export", "ORT speed-up")] == "n/a"
    assert rows[("export", "p50 latency ORT / PyTorch")] == "n/a / n/a"
    assert rows[("edits", "record epsilon, max (labels / pixels)")] == "∞ (1 / n/a) at delta 1e-06"
    assert rows[("edits", "attacker on the accepted releases [95%] (bound)")] == "n/a [0.0%, 100.0%] (n/a)"
    page = write_html(report, demo_dir).read_text(encoding="utf-8")
    assert "<td>ORT vs PyTorch max abs error (tol)</td><td>n/a (0.002)</td>" in page
    assert "(no latencies)" in page  # an all-None plot is replaced by a note
    assert "(image missing: edits/nowhere.png)" in page


def test_strings_from_the_report_are_escaped(demo_dir):
    report = _report()
    evil = "<script>alert('x')</script>"
    report["stages"]["edits"]["proves"] = evil
    report["stages"]["models"]["models"][0]["name"] = evil
    report["stages"]["serve"]["command"] = "veil serve </code><script>1</script>"
    page = write_html(report, demo_dir).read_text(encoding="utf-8")
    assert "<script" not in page
    assert html.escape(evil) in page
    assert "veil serve &lt;/code&gt;&lt;script&gt;1&lt;/script&gt;" in page


def test_image_outside_the_demo_folder_is_not_embedded(tmp_path):
    (tmp_path / "secret.png").write_bytes(_tiny_png())
    demo = tmp_path / "demo"
    demo.mkdir()
    report = _report()
    report["stages"]["edits"]["grid"] = "../secret.png"
    page = write_html(report, demo).read_text(encoding="utf-8")
    assert "(image missing: ../secret.png)" in page
    assert base64.b64encode(_tiny_png()).decode("ascii") not in page


def test_not_a_report_is_refused(tmp_path):
    with pytest.raises(DataError, match="report.json"):
        write_html(["not", "a", "report"], tmp_path)
    with pytest.raises(DataError):
        summary_rows({"stages": "models"})



def test_edits_section_shows_each_records_guarantee_the_claims_per_channel_and_the_attack_on_releases(demo_dir):
    page = write_html(_report(), demo_dir).read_text(encoding="utf-8")
    # per record, the ledger's composed (epsilon, delta), labels and pixels, and the maximum over records
    for i in range(3):
        assert f"<td>synth-0-00000{i}</td>" in page
    assert "<td>epsilon, max over records (labels and pixels composed)</td><td class=\"num\">1</td>" in page
    assert "<td>pixels protected in every record</td><td>yes</td>" in page
    # what is proven per channel, and what is only measured
    assert "proven: 2-LDP, posterior odds of the original value &lt;= e^2" in page
    assert "proven: 0 (the image is not read" in page
    assert "no bound (DDIM inversion keeps the face)" in page
    assert "proven: epsilon 0, the released value is a fair coin" in page
    assert "refused: its pixels have no bound" in page
    assert "measured: attacker [95%] (bound)" in page
    # the owner's one level and why; the attack on the accepted releases with its interval
    assert "<strong>high</strong>" in page and "high is the least private level" in page
    assert "What an attacker reads off the accepted releases (measured)" in page
    assert "50.0% [9.0%, 91.0%] (73.0%)" in page
