"""bench/serve.py end to end on the tiny conditional export: both modes (micro-batched and --no-batching) at 1
and 4 closed-loop clients against the real ``veil serve`` subprocess, and the table's gain column."""

import json

import pytest
from bench_helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("serve")


def test_serve_bench_measures_both_modes_without_errors(bench, exports, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench.main(["--export", str(exports / "conditional"), "--clients", "1,4", "--seconds", "2", "--warmup", "0.5",
                "--threads", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "serve.json").read_text())["rows"]
    assert sorted((r["mode"], r["clients"]) for r in rows) == [("batched", 1), ("batched", 4), ("unbatched", 1),
                                                               ("unbatched", 4)]
    for r in rows:
        assert r["rps"] > 0 and r["admitted"] == len(r["latency_ms"]) > 0, r
        assert r["errors"] == 0 and r["shed"] == 0, r["error_samples"]  # 4 clients never fill a queue of 32
        assert r["p99_ms"] >= r["p50_ms"] > 0
        assert r["resolution"] == 32
    unbatched = [r for r in rows if r["mode"] == "unbatched"]
    assert all(r["mean_batch_rows"] == 1.0 for r in unbatched)  # --no-batching: one request per ORT batch
    table = (tmp_path / "serve.md").read_text()
    assert table in capsys.readouterr().out  # printed as written
    batched4 = next(r for r in rows if r["mode"] == "batched" and r["clients"] == 4)
    gain = batched4["rps"] / next(r["rps"] for r in unbatched if r["clients"] == 4)
    assert f"| 4 | batched | {batched4['rps']:.1f} |" in table and f"{gain:.2f}x" in table


def test_gain_is_batched_over_unbatched_at_the_same_cell(bench):
    row = dict(resolution=32, p50_ms=10.0, p99_ms=20.0, admitted=5, shed=0, errors=0, mean_batch_rows=1.0,
               mean_batch_ms=50.0, worker_busy=0.5, client_cores=0.1, server_cores=1.0)
    rows = [{**row, "clients": 4, "mode": "unbatched", "rps": 10.0}, {**row, "clients": 4, "mode": "batched", "rps": 35.0},
            {**row, "clients": 16, "mode": "unbatched", "rps": 20.0}, {**row, "clients": 16, "mode": "batched", "rps": 30.0},
            {**row, "resolution": 64, "clients": 4, "mode": "batched", "rps": 7.0, "admitted": 0}]
    lines = bench.table(rows).splitlines()[2:]
    assert "| 3.50x | 2.00 |" in lines[1] and "| 1.50x |" in lines[3]
    assert "| - |" in lines[0] and "| - | n/a |" in lines[4]  # no baseline at 64; nothing admitted: no ratio


def test_a_server_that_does_not_start_stops_the_bench_with_its_log(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"veil serve exited with [1-9]\d* before it was ready \(log .*server_export_batched\.log\)"):
        bench.main(["--export", str(tmp_path / "no_such_export"), "--clients", "1", "--seconds", "1",
                    "--out", str(tmp_path / "out")])
