"""Throughput and latency of ``veil serve`` under closed-loop load: micro-batching against one preview at a
time, in the same run.

    python bench/serve.py                                   # 32 and 64, 1/4/16/64 clients, 20 s each
    python bench/serve.py --resolutions 32 --clients 1,16 --seconds 10
    python bench/serve.py --export path/to/export --clients 1,4 --seconds 2    # any export, no model making

For each resolution, the conditional export of ``bench/export.py``'s one-step models (the UNet of
``configs/synthetic32.yaml``, classifier-free guidance, no classifier; made once into ``--work`` with the
same layout as ``bench/export.py``, so the two scripts share them) is served twice by the real server
(``python -m veil.cli serve`` as a subprocess on loopback, ``--budget inf``, a fresh SQLite state): once
micro-batched, once with ``--no-batching`` (the baseline: one preview at a time). Both servers are up at
once and each client count runs on one, then the other, so a gain compares neighbouring half-minutes, not
the two ends of a run on a machine whose other load drifts. Each server gets one edit session per client
(POST /v1/sessions: a random PNG, all attributes known, the first one protected, level medium). Then, for
each client count, that many closed-loop clients run for ``--seconds`` after a ``--warmup``: each POSTs
/v1/sessions/{session}/previews with {"n": --candidates}, reads the event stream to its ``done`` event,
and sends the next one at once. Latency = request sent to ``done`` read. A 503 is "shed" (counted apart,
not an error; that client waits the Retry-After before its next request); any other status, an ``error``
event or a broken stream is an error. ``--max-queue`` defaults here to 32 (the server's own default is 64),
between 16 and 64 clients, so that 64 clients overload the server.

A preview request at level medium = strength 0.55 with fresh secret noise (no inversion): the denoising
steps of the UNet from t0 down (``--steps 5``, the default here: a 5-step DDIM grid, 4 steps at strength
0.55; the export's own 10-step grid would be 7), a streamed preview image every 2 steps, then the final
candidate as a PNG. On this 2-core CPU, idle, with 2 ORT threads, ONNX Runtime alone spends ~45 ms on one
such preview at 32x32 and ~270 ms at 64x64 (~65 ms per UNet step at batch 1: no grid that still edits puts
64x64 in the 50-200 ms range); the whole request is ~50 and ~180 ms. Under others' load both double or
triple. Micro-batching pays only where a batch amortizes per-call overhead, and this UNet is compute-bound
on CPU already at batch 1: per row, ORT spends 45 / 37 / 37 ms at batch 1 / 8 / 32 (32x32) and 270 / 230
ms at batch 1 / 8 (64x64), so expect gains of ~1.2x here, not 3x; the 3x goal needs an accelerator (or a
model small enough for overhead to dominate).

Prints a markdown table (req/s, p50 / p99 ms of the admitted requests, shed, errors, the batched/unbatched
throughput gain, p99/p50; from the server's /metrics the mean rows and milliseconds per ONNX Runtime batch
and the share of the window its one worker thread was busy; the CPU cores the client and the server used
(the client must stay well below a core, or it, not the server, is what is measured) and req/s per server
core, which others' load on the machine moves less than req/s) and writes it to ``--out``/serve.md, the raw
numbers (every latency too) to serve.json and each server's log next to them. Ratios, not absolute times:
these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from veil.serve.launch import ServerNotReady, free_port, wait_ready

sys.path.insert(0, str(Path(__file__).parent))
import export as export_bench  # noqa: E402  (bench/ is not a package)

MODES = ("batched", "unbatched")


def conditional_export(work: Path, resolution: int) -> Path:
    """The conditional export of ``export_bench.models`` (same folders), made without its guided models."""
    d = work / f"r{resolution}"
    out = d / "export_conditional"
    if not (out / "veil_export.json").exists():
        if not (d / "cond" / "model").exists():
            data = ["--set", "data.num_images=300", "--set", f"data.resolution={resolution}",
                    "--set", "trainer.max_steps=1", "--set", "dp.enabled=false"]
            export_bench._veil("train", "--config", str(export_bench.CONFIGS / "synthetic32.yaml"), *data,
                               "--set", "dp.target_epsilon=null", "--out", str(d / "cond"))
        export_bench._veil("export", "--checkpoint", str(d / "cond"), "--steps", "10", "--out", str(out))
    return out


# ------------------------------------------------------------------------------------------ the server
def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Server:
    """``veil serve`` on a free loopback port, killed by ``close()``."""

    def __init__(self, export: Path, *, batched: bool, args, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = tempfile.TemporaryDirectory(prefix="veil-bench-serve-")
        cmd = [sys.executable, "-m", "veil.cli", "serve", "--export", str(export),
               "--state", str(Path(self.state_dir.name) / "state.sqlite"), "--port", str(self.port),
               "--budget", "inf", "--threads", str(args.threads), "--max-queue", str(args.max_queue),
               "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
        cmd += [] if batched else ["--no-batching"]
        cmd += ["--steps", str(args.steps)] if args.steps else []
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        try:
            wait_ready(self.proc, self.url, timeout=timeout)
        except ServerNotReady as e:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"bench/serve.py: {e} (log {self.log_path}):\n{tail}") from None

    def cpu_seconds(self) -> float | None:
        return _cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()
        self.state_dir.cleanup()


def _png(seed: int, side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_sessions(url: str, count: int, resolution: int) -> tuple[list[str], dict]:
    """``count`` edit sessions (level medium, first attribute protected) and the server's /v1/info."""
    with httpx.Client(base_url=url, timeout=60) as c:
        info = c.get("/v1/info").raise_for_status().json()
        names = info["attribute_names"]
        sessions = []
        for i in range(count):
            rng = np.random.default_rng(i)
            attrs = {n: int(v) for n, v in zip(names, rng.choice([-1, 1], len(names)))}
            r = c.post("/v1/sessions", files={"image": ("face.png", _png(i, resolution), "image/png")},
                       data={"attributes": json.dumps(attrs), "protected": json.dumps(names[:1]), "level": "medium"})
            if r.status_code != 201:
                raise SystemExit(f"bench/serve.py: POST /v1/sessions answered {r.status_code}: {r.text[:500]}")
            sessions.append(r.json()["session"])
    return sessions, info


async def batch_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's veil_batch_rows (candidates per ONNX Runtime batch) and veil_batch_seconds sums and counts."""
    text = (await client.get("/metrics")).raise_for_status().text
    keys = ("veil_batch_rows_sum", "veil_batch_rows_count", "veil_batch_seconds_sum")
    got = dict.fromkeys(keys, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in keys:
            got[name] = float(value)
    return got


# ------------------------------------------------------------------------------------------ the clients
async def _preview(client: httpx.AsyncClient, session: str, body: dict) -> tuple[str, float | None, str | None]:
    """One preview to ``done``: (outcome "ok" | "shed" | "error", Retry-After seconds for a shed, error text)."""
    async with client.stream("POST", f"/v1/sessions/{session}/previews", json=body) as r:
        if r.status_code == 503:
            await r.aread()
            return "shed", float(r.headers.get("Retry-After", 1)), None
        if r.status_code != 200:
            return "error", None, f"{r.status_code}: {(await r.aread())[:200]!r}"
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event == "done":
                    return "ok", None, None
            elif line.startswith("data: ") and event == "error":
                return "error", None, f"error event: {line[6:200]}"
        return "error", None, "the stream ended before its done event"


async def _client(client, session: str, body: dict, *, window: tuple[float, float], log: dict) -> None:
    """Closed loop until the window ends; requests done inside the window are recorded."""
    start, end = window
    while (now := time.perf_counter()) < end:
        try:
            outcome, retry_after, error = await _preview(client, session, body)
        except httpx.HTTPError as e:
            outcome, retry_after, error = "error", None, f"{type(e).__name__}: {e}"
        done = time.perf_counter()
        if start <= done <= end:
            if outcome == "ok":
                log["latency_ms"].append((done - now) * 1000)
            elif outcome == "shed":
                log["shed"] += 1
            else:
                log["errors"] += 1
                if len(log["error_samples"]) < 5:
                    log["error_samples"].append(error)
        if outcome == "shed":  # do not spin on a full queue: wait what the server asked (until the window ends)
            await asyncio.sleep(max(0.0, min(retry_after, end - time.perf_counter())))
        elif outcome == "error":
            await asyncio.sleep(0.1)


async def closed_loop(url: str, sessions: list[str], body: dict, *, seconds: float, warmup: float, marks) -> dict:
    """len(sessions) closed-loop clients for warmup + seconds; the latencies, sheds, errors of the window, and
    ``await marks(client)`` (counters) at its start and end."""
    log = {"latency_ms": [], "shed": 0, "errors": 0, "error_samples": []}
    limits = httpx.Limits(max_connections=len(sessions) + 8, max_keepalive_connections=len(sessions) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0)) as client:
        t0 = time.perf_counter()
        window = (t0 + warmup, t0 + warmup + seconds)
        tasks = [asyncio.create_task(_client(client, s, body, window=window, log=log)) for s in sessions]
        await asyncio.sleep(warmup)
        log["at_start"] = await marks(client)
        await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
        log["at_end"] = await marks(client)
        await asyncio.gather(*tasks)
    return log


def measure(server: Server, sessions: list[str], *, mode: str, resolution: int, args) -> dict:
    """One (resolution, mode, clients) cell: req/s, percentiles, sheds, errors, batch rows, CPU."""
    body = {"n": args.candidates}

    async def marks(client):
        return {"t": time.perf_counter(), "client_cpu": time.process_time(), "server_cpu": server.cpu_seconds(),
                **await batch_counters(client)}

    log = asyncio.run(closed_loop(server.url, sessions, body, seconds=args.seconds, warmup=args.warmup, marks=marks))
    a, b = log.pop("at_start"), log.pop("at_end")
    wall = b["t"] - a["t"]
    lat = log["latency_ms"]
    rows_sum, rows_count = (b[k] - a[k] for k in ("veil_batch_rows_sum", "veil_batch_rows_count"))
    server_cpu = None if a["server_cpu"] is None else (b["server_cpu"] - a["server_cpu"]) / wall
    return {"resolution": resolution, "clients": len(sessions), "mode": mode, "seconds": args.seconds,
            "admitted": len(lat), "rps": len(lat) / args.seconds,
            "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan"),
            "shed": log["shed"], "errors": log["errors"], "error_samples": log["error_samples"],
            "mean_batch_rows": rows_sum / rows_count if rows_count else None,
            "mean_batch_ms": 1000 * (b["veil_batch_seconds_sum"] - a["veil_batch_seconds_sum"]) / rows_count
            if rows_count else None,
            "worker_busy": (b["veil_batch_seconds_sum"] - a["veil_batch_seconds_sum"]) / wall,
            "client_cores": (b["client_cpu"] - a["client_cpu"]) / wall, "server_cores": server_cpu,
            "latency_ms": [round(x, 2) for x in lat]}


def run_export(export: Path, *, resolution: int | None, args, out: Path) -> list[dict]:
    """Both modes on one export, every client count. Both servers run at once (an idle one costs nothing) so
    that each batched cell is measured right next to its unbatched baseline: on a shared machine the load of
    others drifts, and the gain should not be a comparison of two different minutes."""
    servers, rows = {}, []
    try:
        for mode in MODES:
            servers[mode] = Server(export, batched=mode == "batched", args=args,
                                   log_path=out / f"server_{resolution or 'export'}_{mode}.log")
        sessions = {}
        for mode, server in servers.items():
            server.wait_ready()
            sessions[mode], info = make_sessions(server.url, max(args.clients), resolution or 64)
        for clients in args.clients:
            for mode, server in servers.items():
                row = measure(server, sessions[mode][:clients], mode=mode, resolution=info["resolution"], args=args)
                row["steps"] = info["steps"]
                rows.append(row)
                print(table([row], header=False), end="", flush=True)
    finally:
        for server in servers.values():
            server.close()
    return rows


# ------------------------------------------------------------------------------------------ the table
def _f(x, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def table(rows: list[dict], *, header: bool = True) -> str:
    """Markdown; a batched row's gain is its req/s over the unbatched row's at the same resolution and clients."""
    base = {(r["resolution"], r["clients"]): r["rps"] for r in rows if r["mode"] == "unbatched"}
    lines = ["| resolution | clients | mode | req/s | p50 ms | p99 ms | admitted | shed (503) | errors | gain | "
             "p99/p50 | mean batch rows | ms per batch | worker busy | client cores | server cores | "
             "req per server core-s |", "|" + "---|" * 17] if header else []
    for r in rows:
        unb = base.get((r["resolution"], r["clients"]))
        gain = f"{r['rps'] / unb:.2f}x" if r["mode"] == "batched" and unb else "-"
        ratio = _f(r["p99_ms"] / r["p50_ms"] if r["admitted"] else None, ".2f")
        per_core = _f(r["rps"] / r["server_cores"] if r["server_cores"] else None, ".1f")  # robust to others' load
        lines.append(f"| {r['resolution']} | {r['clients']} | {r['mode']} | {r['rps']:.1f} | {_f(r['p50_ms'], '.0f')} | "
                     f"{_f(r['p99_ms'], '.0f')} | {r['admitted']} | {r['shed']} | {r['errors']} | {gain} | {ratio} | "
                     f"{_f(r['mean_batch_rows'], '.1f')} | {_f(r['mean_batch_ms'], '.0f')} | "
                     f"{_f(r['worker_busy'], '.2f')} | {_f(r['client_cores'], '.2f')} | "
                     f"{_f(r['server_cores'], '.2f')} | {per_core} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="32,64", help="export resolutions (ignored with --export)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrent closed-loop clients, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load before each cell")
    p.add_argument("--candidates", type=int, default=1, help="candidates per preview (the request's n)")
    p.add_argument("--steps", type=int, default=5,
                   help="DDIM steps of a full edit (veil serve --steps; default 5: 4 at level medium; 0 = the export's)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the server")
    p.add_argument("--max-queue", type=int, default=32, help="server's waiting requests before 503 (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server's batch gathering time (its default: 5)")
    p.add_argument("--export", default=None, help="serve this export instead of making the one-step models")
    p.add_argument("--work", default="bench/out/export/work", help="where the models and exports go (bench/export.py's)")
    p.add_argument("--out", default="runs/bench_serve", help="folder for serve.md, serve.json and the server logs")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    if min(args.clients) < 1 or args.seconds <= 0 or args.warmup < 0 or not 1 <= args.candidates <= 16 \
            or args.steps < 0 or args.threads < 1 or args.max_queue < 1 or not 0 <= args.max_wait_ms <= 1000:
        p.error("--clients must be >= 1, --seconds > 0, --warmup >= 0, --candidates in [1, 16], --steps >= 0, "
                "--threads >= 1, --max-queue >= 1, --max-wait-ms in [0, 1000]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.export:
        rows = run_export(Path(args.export), resolution=None, args=args, out=out)
    else:
        rows = []
        for res in [int(r) for r in args.resolutions.split(",")]:
            rows += run_export(conditional_export(Path(args.work), res), resolution=res, args=args, out=out)
    rows.sort(key=lambda r: (r["resolution"], r["clients"], r["mode"]))
    took = time.perf_counter() - started
    text = (f"preview = n {args.candidates} at level medium on a {rows[0]['steps']}-step grid; {args.seconds:g} s per cell "
            f"after {args.warmup:g} s warm-up; server: {args.threads} ORT threads, "
            f"--max-queue {args.max_queue}, --max-wait-ms {args.max_wait_ms:g}; "
            f"{os.cpu_count()} cores; {'' if args.export else 'conditional export, '}took {took:.0f} s\n\n" + table(rows))
    (out / "serve.md").write_text(text)
    (out / "serve.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "took_s": took,
                                                "rows": rows}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` still runs the finally that stops the servers
    main()
