"""`veil serve` arguments: refused before anything loads (exit 2, one line naming the flag); no torch in the server."""

import subprocess
import sys

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
