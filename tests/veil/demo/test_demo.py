"""`veil demo --quick`: every stage runs, the report's numbers are sane, the ledger agrees, a rerun resumes, and
every command the demo prints (stdout, stderr, report.json, report.html, COMMAND files) is valid as printed.

The quick demo runs once per source state (``quick_demo``, cached on disk); both tests read its folder and what it
printed."""

import contextlib
import html as html_lib
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from html import escape
from pathlib import Path

import httpx
import pytest
from disk_cache import cached_dir

from veil.cli import build_parser, main
from veil.jobs.config import resolve_config
from veil.privacy.bounds import bayes_accuracy_bound
from veil.privacy.ledger import PrivacyLedger
from veil.serve.launch import ServerNotReady, free_port, wait_ready


@pytest.fixture(scope="module")
def quick_demo():
    """(out, stdout, stderr) of one `veil demo --quick --out OUT`, run once per source state (``disk_cache``: any
    change to the package's sources runs it again; the tests' own writes, a resume and the faces of --serve,
    leave its state as it was)."""
    folder = cached_dir("quick-demo", _run_quick_demo, check_unchanged=False)
    printed = json.loads((folder / "printed.json").read_text())
    return folder / "demo", printed["stdout"], printed["stderr"]


def _run_quick_demo(folder: Path) -> None:
    out = folder / "demo"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VEIL_HOME", str(folder / "unused_home"))  # the demo sets its own; restored afterwards
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["demo", "--quick", "--out", str(out)])
    assert code == 0, stderr.getvalue()[-3000:]
    (folder / "printed.json").write_text(json.dumps({"stdout": stdout.getvalue(), "stderr": stderr.getvalue()}))


def test_quick_demo_end_to_end(quick_demo, capsys, monkeypatch):
    out, printed_out, printed_err = quick_demo
    monkeypatch.setenv("VEIL_HOME", str(out / "veil_home"))  # the rerun below sets it too: undone after the test
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "veil-demo-report/1" and report["quick"] is True
    stages = report["stages"]
    assert list(stages) == ["models", "edits", "unlearning", "export", "serve"]

    models = {m["name"]: m for m in stages["models"]["models"]}
    guide = models["guide"]
    assert guide["private"] is True and math.isfinite(guide["epsilon"]) and guide["epsilon"] > 0
    checker = models["checker"]  # issue 30: the edits are checked by their own classifier, never by the guide
    assert checker["private"] is True and math.isfinite(checker["epsilon"]) and checker["epsilon"] > 0
    assert models["published"]["epsilon"] == "inf" and stages["models"]["dataset_account"]["epsilon"] == "inf"
    assert all(m["command"].startswith("veil train") and m["params"] > 0 for m in models.values())

    edits = stages["edits"]
    assert edits["images"] == 3 and edits["releases"] + edits["refused"] + edits["withheld"] == edits["images"]
    # one level for the whole dataset, chosen on public faces before any release; never "low" (inversion: the
    # demo's dataset keeps its pixels protected)
    assert edits["level"] in ("medium", "high", "max") and edits["level_choice"]["level"] == edits["level"]
    assert edits["accepted_levels"] == ([edits["level"]] if edits["releases"] else [])
    for row in edits["attacker"]:  # public edits: the Bayes bound of the measured half's prior, a 95% interval
        assert row["bound"] == round(bayes_accuracy_bound(epsilon=row["epsilon"], prior=row["prior_test"]), 4)
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] and "public" in row["data"]
        assert abs(row["prior_train"] - row["prior_test"]) <= 1 / row["n"] + 1e-9
    assert edits["attacker"][0]["refused"] and "pixel policy" in edits["attacker"][0]["refused"]  # low
    on = edits["attacker_on_releases"]  # the attack on what was really published
    assert on["n"] == edits["releases"]
    if on["n"]:
        assert on["level"] == edits["level"] and on["ci95"][0] <= on["accuracy"] <= on["ci95"][1]
        assert on["bound"] == round(bayes_accuracy_bound(epsilon=on["epsilon"], prior=on["prior_test"]), 4)
    # the ledger in the demo's own home agrees with the report: every draw recorded once, and the serve stage's
    with PrivacyLedger.for_dataset({"source": "synthetic", "seed": 0}, path=out / "veil_home" / "datasets" /
                                   "synthetic-seed0.sqlite") as ledger:
        assert edits["ledger_releases"] == edits["releases"] + edits["refused"]
        assert len(ledger.releases()) == edits["ledger_releases"] + 1  # + the HTTP session's release
        private_runs = [r for r in ledger.training_runs() if r["kind"] == "classifier" and r["private"]]
        assert len(private_runs) == 2  # the guide and the checker: both in the dataset's account
        records = edits["guarantee"]["records"]
        assert len(records) == edits["images"]
        for record in records:  # per record, the ledger's composed guarantee (labels and pixels)
            assert {k: v for k, v in record.items() if k not in ("id", "outcome")} == \
                ledger.guarantee(record["id"]).to_json()
            assert {r.level for r in ledger.releases(record["id"])} <= {edits["level"]}
        assert edits["guarantee"]["max"]["epsilon"] == max(r["epsilon"] for r in records)
        assert edits["guarantee"]["max"]["pixels_epsilon"] == 0  # fresh: the image is not read

    unlearning = stages["unlearning"]
    if edits["releases"]:
        assert unlearning["changed"] == edits["releases"] and unlearning["speedup"] > 1
        for v in unlearning["test_accuracy"].values():
            assert 0 <= v <= 1

    export = stages["export"]
    assert export["parity_max_abs_error"] < export["tolerance"]
    assert export["latency_ms"]["ort_p50"] > 0 and export["latency_ms"]["torch_p50"] > 0

    serve = stages["serve"]
    assert serve["ok"] is True and serve["retry_replayed"] is True and serve["preview_events"] >= 3

    html = (out / "report.html").read_text()
    assert all(escape(s["proves"]) in html for s in stages.values()) and "data:image/png;base64," in html
    assert "update speed-up over retraining" in printed_err and "--serve" in printed_out

    # a second run resumes: every stage is reused, the numbers are the same; the process is left as it was (the
    # caller's VEIL_HOME, Lightning's log levels: a later `veil train` in it still logs "GPU available")
    monkeypatch.setenv("VEIL_HOME", str(out / "callers_home"))
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning",
                                                    "torch.onnx._internal.exporter._registration")]
    for logger in loggers:
        monkeypatch.setattr(logger, "level", logging.INFO)  # as `import lightning` sets its own
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "done earlier" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["stages"] == stages
    assert os.environ["VEIL_HOME"] == str(out / "callers_home") and not (out / "callers_home").exists()
    assert [logger.level for logger in loggers] == [logging.INFO] * 4


# ------------------------------------------------------------------ every printed command is valid as printed
SHIPPED_MODELS = Path(__file__).resolve().parents[3] / "veil" / "demo" / "models"
PATH_OPTIONS = ("export", "checkpoint", "classifier", "checker", "dataset", "state", "ledger", "model", "revision")


def _subcommands() -> list[str]:
    return sorted(build_parser()._subparsers._group_actions[0].choices)


def _in_text(text: str) -> list[str]:
    """`veil SUBCOMMAND ...` up to the end of its line (not "veil demo: progress" lines, not "veil_home")."""
    pattern = r"(?<![\w/.-])veil (?:" + "|".join(map(re.escape, _subcommands())) + r")(?=[ \t]|$)[^\n]*"
    return re.findall(pattern, text, flags=re.MULTILINE)


def _in_json(value) -> list[str]:
    if isinstance(value, dict):
        return [c for v in value.values() for c in _in_json(v)]
    if isinstance(value, list):
        return [c for v in value for c in _in_json(v)]
    return [value] if isinstance(value, str) and value.startswith("veil ") else []


def _in_html(page: str) -> list[str]:
    codes = [html_lib.unescape(c) for c in re.findall(r"<code>(.*?)</code>", page, flags=re.DOTALL)]
    return [c for c in codes if c.startswith("veil ")]


def _parsed(command: str) -> list:
    """Each `veil ...` of ``command`` (shell words, `&&` between commands, `# comment` ignored), parsed by veil's own
    parser, with every file or folder it reads checked to exist and every config name resolved."""
    words, parts = shlex.split(command, comments=True), [[]]
    for word in words:
        parts.append([]) if word == "&&" else parts[-1].append(word)
    parsed = []
    for part in parts:
        assert part[:1] == ["veil"], f"not a veil command: {command!r}"
        try:
            ns = build_parser().parse_args(part[1:])
        except SystemExit:
            pytest.fail(f"veil's parser refuses a printed command: {command!r}")
        for name in PATH_OPTIONS:
            value = getattr(ns, name, None)
            if value and not str(value).startswith("postgresql://"):
                assert Path(value).exists(), f"{command!r}: --{name} {value} does not exist"
        if getattr(ns, "config", None):  # a shipped config's name (or a file)
            resolve_config(ns.config, kind="classifier" if ns.command == "train-classifier" else "train")
        parsed.append((part, ns))
    return parsed


@contextlib.contextmanager
def _running(words: list[str], log_path: Path):
    """``words`` (a `veil ...` command that starts a server) as a subprocess in its own process group on a free
    port; yields the URL once /healthz answers, then Ctrl-C's the group (the demo's server child too)."""
    port = free_port()
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "veil.cli", *words[1:], "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", timeout=240)
        except ServerNotReady as e:
            pytest.fail(f"{' '.join(words)}: {e}; its output: {Path(log_path).read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_every_command_the_demo_prints_is_valid_as_printed(quick_demo, monkeypatch, capsys):
    """Printed next steps once failed: `veil demo --out D --serve` (refused on a quick demo) and `veil serve
    --dataset D/serve/faces` (a folder nothing made). Now each one parses, names only things that exist, and
    the cheap ones run: the account, the server by hand, and the page on the demo's faces (`veil demo --serve`)."""
    out, printed_out, printed_err = quick_demo
    report = json.loads((out / "report.json").read_text())
    found = {"report.json": _in_json(report), "report.html": _in_html((out / "report.html").read_text()),
             "COMMAND files": [p.read_text() for p in (*SHIPPED_MODELS.glob("*/COMMAND"), *out.rglob("COMMAND"),
                                                        *out.rglob("SHIPPED"))],
             "stderr": _in_text(printed_err), "stdout": _in_text(printed_out)}
    assert found["stdout"] and found["report.json"] and found["report.html"] and found["COMMAND files"], found
    commands = list(dict.fromkeys(c.strip() for cs in found.values() for c in cs))  # stdout's last
    parsed = {c: _parsed(c) for c in commands}
    kinds = {tuple(p[0][:3]) for ps in parsed.values() for p in ps}
    assert ("veil", "privacy", "show") in kinds and ("veil", "serve", "--export") in kinds, kinds

    monkeypatch.setenv("VEIL_HOME", str(out / "unused_home"))  # the printed commands name the demo's ledger themselves
    runs = [(c, words, ns) for c, parts in parsed.items() for words, ns in parts]
    for command, words, ns in sorted(runs, key=lambda r: r[2].command == "demo"):  # the demo's page last
        if ns.command == "privacy":  # seconds: the demo's account, as printed
            capsys.readouterr()
            assert main(words[1:]) == 0, command
            assert "synthetic" in capsys.readouterr().out
        elif ns.command == "serve":  # the server by hand, on the demo's export and ledger
            with _running(words, out.parent / f"{ns.command}.log") as url:
                assert httpx.get(url + "/v1/info", timeout=30).status_code == 200
        elif ns.command == "demo":  # resumes the finished demo (every stage reused), then serves its page
            assert ns.serve and ns.quick == report["quick"]
            with _running(words, out.parent / f"{ns.command}.log") as url:
                assert httpx.get(url + "/v1/info", timeout=30).status_code == 200
            # the faces to upload (not --dataset: veil serve cannot check a folder against synthetic data)
            assert list((out / "serve" / "faces").glob("*.png"))
    assert not (out / "unused_home" / "datasets").exists()  # nothing printed spends outside the demo's account
    assert report["stages"]["serve"]["command"] in found["stdout"], found["stdout"]  # the CLI prints the report's
