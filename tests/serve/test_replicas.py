"""Two real ``veil serve`` replicas on one PostgreSQL ledger: 50 concurrent accepts of the same image split
across them never spend past the budget, and every acknowledged release is recorded exactly once."""

from concurrent.futures import ThreadPoolExecutor

from serve_process import Server

from veil.serve.state import open_state

ACCEPTS, DUPLICATES, BUDGET, EPSILON = 50, 6, 4.0, 1.0  # level "high": epsilon 1, so at most 4 releases of the image


def test_replicas_share_one_ledger(exports, pg_database, tmp_path):
    export = exports / "conditional"
    a = Server(export, pg_database, "--budget", str(BUDGET), log_path=tmp_path / "a.log")
    try:
        b = Server(export, pg_database, log_path=tmp_path / "b.log")  # the stored budget: no --budget needed
        try:
            info = a.client.get("/v1/info").json()
            assert b.client.get("/v1/info").json()["budget"] == BUDGET
            p = info["classifier_attributes"][0]
            attrs = {n: (1 if n == p else -1) for n in info["attribute_names"]}
            # the same picture in every session: the sessions live in the shared database, so a session
            # created on one replica is accepted on the other
            created = [(a if i % 2 else b).session(attrs, [p], "high", seed=7) for i in range(ACCEPTS)]
            sessions = [c["session"] for c in created]
            (image_id,) = {c["image_id"] for c in created}

            # each session accepted once on its replica; the first DUPLICATES also on the other one at the same
            # time (a client retrying through the load balancer): the same answer twice, one release
            sends = [(i, b if i % 2 else a) for i in range(ACCEPTS)] + [(i, a if i % 2 else b) for i in range(DUPLICATES)]

            def send(item):
                i, server = item
                return i, server.accept(sessions[i], f"replica-key-{i:03d}")

            with ThreadPoolExecutor(len(sends)) as pool:
                answers = list(pool.map(send, sends))
        finally:
            b.stop()
    finally:
        a.stop()

    first = {}
    for i, r in answers:
        if i in first:  # a duplicate: the same status, and the same release when there is one
            assert r.status_code == first[i].status_code, (r.text[:200], first[i].text[:200])
            if r.status_code == 200:
                assert r.json()["release_id"] == first[i].json()["release_id"]
        first.setdefault(i, r)
    ok = {i: r.json() for i, r in first.items() if r.status_code == 200}
    shed = [r for r in first.values() if r.status_code != 200]
    assert all(r.status_code == 409 and "budget" in r.json()["error"] for r in shed), \
        {r.status_code: r.text[:200] for r in shed}
    assert len(ok) == int(BUDGET / EPSILON)  # every draw that was recorded, released or refused by the check
    with open_state(pg_database) as store:
        assert store.consistency() == []
        rows = store.releases()
        assert {r["image_id"] for r in rows} == {image_id}
        assert store.spends(image_id) == {p: BUDGET}
        assert sorted(r["release_id"] for r in rows) == sorted(body["release_id"] for body in ok.values())
