"""`veil serve` arguments: refused before anything loads (exit 2, one line naming the flag); no torch in the server;
the port bound first (a port in use refused before the database is made) and printed as bound (--port 0)."""

import os
import re
import signal
import socket
import subprocess
import sys

import httpx

from veil.cli import main


def test_off_loopback_needs_a_token(exports, capsys, monkeypatch):
    monkeypatch.delenv("VEIL_SERVE_TOKEN", raising=False)
    assert main(["serve", "--export", str(exports / "conditional"), "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0: binding off loopback needs a token" in capsys.readouterr().err


def test_bad_export_and_short_token(exports, tmp_path, capsys):
    assert main(["serve", "--export", str(tmp_path)]) == 2
    assert "veil_export.json" in capsys.readouterr().err
    assert main(["serve", "--export", str(exports / "conditional"), "--token", "short"]) == 2
    assert "--token: use at least 16 characters" in capsys.readouterr().err


def test_the_server_imports_no_torch():
    code = ("import sys; from veil.cli import build_parser; build_parser(); import veil.serve.app, veil.cli.serve; "
            "bad = [m for m in ('torch', 'lightning', 'diffusers', 'opacus') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_port_in_use_is_refused_before_anything_is_made(exports, tmp_path, capsys):
    state = tmp_path / "state" / "ledger.sqlite"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--export", str(exports / "conditional"), "--port", str(port), "--state", str(state)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err  # was 3, after the database was made
    assert len(err) == 1 and f"--port {port}: already in use on 127.0.0.1" in err[0], err
    assert not state.parent.exists()


def test_port_0_prints_the_port_it_bound(exports, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "veil.cli", "serve", "--export", str(exports / "conditional"),
                             "--state", str(tmp_path / "l.sqlite"), "--port", "0", "--threads", "1",
                             "--log-level", "warning"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:  # the server's one line, printed once it is loaded
            if "the page:" in line:
                break
        found = re.search(r"the page: http://127\.0\.0\.1:(\d+)/ \(API: http://127\.0\.0\.1:(\d+)/docs\)", line)
        assert found and found[1] == found[2] and int(found[1]) != 0, line  # was ":0/"
        from veil.serve.launch import wait_ready

        wait_ready(proc, f"http://127.0.0.1:{found[1]}", timeout=60)
        assert httpx.get(f"http://127.0.0.1:{found[1]}/healthz").json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
