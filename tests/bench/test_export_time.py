"""bench/export_time.py on the session's tiny conditional export, its classifier graph only (the table's every
column, in seconds rather than a minute): translated with an empty cache and with the cache off, then filled
from the template, the same bytes as the translation."""

import json
import os

import pytest
from bench_helpers import load_bench

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_table_compares_translated_and_cached_graphs_in_one_run(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VEIL_EXPORT_CACHE", str(tmp_path / "never"))  # the bench sets its own, then restores this
    bench = load_bench("export_time")
    rows = bench.main(["--checkpoint", str(models / "cond"), "--classifier", str(models / "guide"),
                       "--classifier-scale", "0", "--graphs", "classifier", "--threads", "1",
                       "--out", str(tmp_path / "out")])
    [row] = rows
    assert (row["first translation"], row["off translation"], row["cached translation"]) == \
        ("translated", "translated", "cached")
    assert row["same bytes"] is True and row["off / cached"] == pytest.approx(row["off"] / row["cached"])
    assert min(row["first"], row["off"], row["cached"]) > 0
    printed = capsys.readouterr().out
    assert "| classifier |" in printed and "| all |" in printed
    assert json.loads((tmp_path / "out" / "export_time.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert not (tmp_path / "never").exists()  # the cache it used was its own (a temporary folder)
    assert os.environ["VEIL_EXPORT_CACHE"] == str(tmp_path / "never")
