"""The real ``veil serve``: an edit to release over HTTP, SIGKILL in the middle of a burst of accepts, a restart,
and every acknowledged release there exactly once in a database that passes its integrity check."""

import threading
import time

import httpx
from serve_helpers import read_sse
from serve_process import Server

from veil.serve.state import open_state

BURST = 24


def test_release_survives_sigkill_mid_burst(exports, tmp_path):
    export, db = exports / "conditional", tmp_path / "ledger.sqlite"
    server = Server(export, db, "--budget", "inf", log_path=tmp_path / "serve1.log")
    try:
        info = server.client.get("/v1/info").json()
        p = info["classifier_attributes"][0]
        attrs = {n: (1 if n == p else -1) for n in info["attribute_names"]}

        # 1. one edit, end to end: session, streamed preview, more private, accept
        s = server.session(attrs, [p], "medium", seed=100)
        events = read_sse(server.client.post(f"/v1/sessions/{s['session']}/previews", json={"n": 2}).text)
        assert [e for e, _ in events].count("candidate") == 2 and events[-1][0] == "done"
        more = server.client.post(f"/v1/sessions/{s['session']}/feedback", json={"action": "more_private"}).json()
        assert more["level"]["name"] == "high"
        first = server.accept(s["session"], "first-release")
        assert first.status_code == 200 and first.json()["decision"] in ("accepted", "refused")

        # 2. a burst of accepts, one session each, killed part-way
        sessions = [server.session(attrs, [p], "high", seed=i)["session"] for i in range(BURST)]
        acked, lock = {}, threading.Lock()

        def send(i):
            try:
                r = server.accept(sessions[i], f"burst-{i:04d}")
            except httpx.HTTPError:
                return  # the server died under this request: not acknowledged
            if r.status_code == 200:
                with lock:
                    acked[i] = r.json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()
        for t in threads:
            t.join(60)
        seen = dict(acked)
        assert 3 <= len(seen) < BURST, f"{len(seen)} of {BURST} acknowledged: the kill did not land mid-burst"
    finally:
        server.kill()

    # 3. restart on the same database and retry every accept with its own key
    server = Server(export, db, log_path=tmp_path / "serve2.log")
    try:
        retried = {i: server.accept(sessions[i], f"burst-{i:04d}") for i in range(BURST)}
    finally:
        server.stop()
    for i, body in seen.items():
        again = retried[i].json()
        assert again["replayed"] is True and again["decision"] == body["decision"]
        assert again["release"] == body["release"]  # the same release, not a second one
    assert all(r.status_code == 200 for r in retried.values())

    with open_state(str(db)) as store:
        assert store.consistency() == []  # includes SQLite's integrity_check
        rows = store.releases()
        ids = [r["release_id"] for r in rows]
        assert len(ids) == len(set(ids)) == BURST + 1  # one per session: none lost, none twice
        for body in seen.values():
            assert ids.count(body["release_id"]) == 1
        assert store.count_releases()["released"] + store.count_releases()["refused"] == BURST + 1
