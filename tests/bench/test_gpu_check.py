"""bench/gpu_check.py --smoke end to end on the CPU (the same code paths as on a GPU, tiny: Triton under the
interpreter, the CPU ONNX Runtime provider), so the script a lent GPU runs cannot rot: every part present and
ok, every ok row's measurements finite and positive, every reference check run and passed. And a failing part
is recorded with its reason while the script goes on."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
MEASURED = {  # what an ok row of each part must carry, finite and > 0
    "tests": ["collected"], "dp": ["seconds"], "kernels": ["seconds", "gbps", "copy_gbps", "copy_fraction"],
    "edit": ["p50_ms", "p90_ms"], "serve": ["rps", "p50_ms", "p99_ms"],
}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_smoke_runs_every_part_and_checks_it(models, exports, tmp_path):
    out = tmp_path / "out"
    result = _run("--smoke", "--out", str(out), "--work", str(tmp_path / "work"),
                  "--checkpoint", str(models / "cond"), "--export", str(exports / "conditional"), cwd=ROOT)
    report = json.loads((out / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["env", "models", "tests", "dp", "kernels", "edit", "serve"]
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part["reason"])
        assert part["rows"], name
        for row in part["rows"]:
            assert row["status"] in ("ok", "skipped"), (name, row)
            if row["status"] == "ok" and row.get("kind") != "largest":
                for key in MEASURED.get(name, []):
                    value = row[key]
                    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, row)
            else:
                assert row.get("reason") or row.get("kind") == "largest", (name, row)

    # the reference checks ran (one per mode, kernel, edit runtime, server) and passed within their tolerance
    checks = {name: part["checks"] for name, part in parts.items()}
    assert len(checks["dp"]) == 2 and len(checks["kernels"]) == 3 and len(checks["serve"]) == 2
    assert sum("ORT" in c["name"] for c in checks["edit"]) == 2  # one per cell (batch 1 and 2)
    assert any("torch.compile" in c["name"] for c in checks["edit"])
    for c in [c for part_checks in checks.values() for c in part_checks]:
        assert c["passed"], c
        assert c["value"] is None or (math.isfinite(c["value"]) and c["value"] < c["tolerance"]), c

    # what each part found
    assert parts["tests"]["rows"][0]["collected"] > 0 and parts["tests"]["rows"][0]["failed"] == 0
    dp = [r for r in parts["dp"]["rows"] if r.get("kind") != "largest"]
    assert {(r["mode"], r["k"]) for r in dp} == {(m, k) for m in ("nonprivate", "opacus", "opacus-ghost", "ghost")
                                                 for k in (1, 2)}
    largest = [r for r in parts["dp"]["rows"] if r.get("kind") == "largest"]
    assert [(r["mode"], r["largest"], r["stop"]) for r in largest] == [
        (m, 8, "cap 8") for m in ("nonprivate", "opacus", "opacus-ghost", "ghost")]  # 2, 4, 8 tried: all fit
    assert {r["kernel"] for r in parts["kernels"]["rows"]} == {"clip-and-noise stage", "noise + AdamW update",
                                                               "conv ghost norm"}
    edit = {(r["runtime"], r["batch"]): r for r in parts["edit"]["rows"]}
    assert {runtime for runtime, _ in edit} == {"eager", "ort io-binding", "ort cuda-graph", "torch.compile"}
    assert all(edit[("ort cuda-graph", b)]["reason"] == "needs CUDA" for b in (1, 2))
    assert all(edit[("ort io-binding", b)]["provider"] == "CPUExecutionProvider" for b in (1, 2))
    assert {(r["mode"], r["clients"]) for r in parts["serve"]["rows"]} == {
        (m, c) for m in ("batched", "unbatched") for c in (1, 2)}

    # the markdown: written, printed, the summary table last
    text = (out / "gpu_check.md").read_text()
    assert text in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("| serve | ok |")
    assert "faster than opacus-ghost" in text and "## summary" in text
    assert (out / "gpu_check.log").stat().st_size > 0


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path):
    """Parts forked from the forkserver (the default): one fails on bad input, one is killed at its budget."""
    out = tmp_path / "out"
    missing = tmp_path / "no_such_export"
    result = _run("--smoke", "--parts", "tests,edit,serve", "--budget", "tests=0.2", "--out", str(out),
                  "--checkpoint", str(missing), "--export", str(missing),
                  cwd=tmp_path)  # from another folder: paths are the script's own
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["env", "models", "tests", "edit", "serve"]
    assert parts["env"]["status"] == "ok" and parts["env"]["info"]["triton_interpret"] == "1"
    # the tests part runs pytest for at least 5 s whatever its budget: killed at 0.2 s with its pytest
    assert parts["tests"]["status"] == "failed" and "over its budget of 0 s" in parts["tests"]["reason"]
    assert parts["tests"]["seconds"] < 5
    assert parts["models"]["status"] == "failed" and "no_such_export" in parts["models"]["reason"]
    assert parts["edit"]["status"] == "failed" and "no models" in parts["edit"]["reason"]
    assert parts["serve"]["status"] == "failed" and "no export" in parts["serve"]["reason"]
    assert "| edit | failed |" in result.stdout


def test_fresh_processes_run_a_part_and_kill_one_past_its_budget(tmp_path):
    """``--fresh-processes``: each part a new interpreter (the fallback should a fork ever be unsafe)."""
    import argparse

    from bench_helpers import load_bench

    gpu_check = load_bench("gpu_check")
    args = argparse.Namespace(smoke=True, fresh_processes=True, work=str(tmp_path / "work"), checkpoint=None,
                              export=None)
    args.children = gpu_check._children(args)
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] == "1"  # this process unchanged
    (tmp_path / "state").mkdir()
    with open(tmp_path / "log", "a") as log:
        ok = gpu_check._run_part(args, "env", 300, tmp_path / "state", log)
        killed = gpu_check._run_part(args, "env", 0.2, tmp_path / "state", log, unit=1)
    assert ok["status"] == "ok" and ok["info"]["triton_interpret"] == "1" and ok["info"]["torch"]
    assert killed["status"] == "failed" and "over its budget" in killed["reason"] and killed["seconds"] < 60
    assert "===== env 1 (budget 0 s)" in (tmp_path / "log").read_text()
