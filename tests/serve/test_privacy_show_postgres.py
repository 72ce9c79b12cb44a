"""`veil privacy show --ledger postgresql://...` reads the releases that `veil serve` replicas made: both
write the dataset's ledger through veil.privacy.db, so the command line and the servers see one account."""

import json

from serve_process import Server

from veil.cli import main
from veil.privacy.ledger import PrivacyLedger


def test_privacy_show_reads_what_the_replicas_released(exports, pg_database, tmp_path, capsys):
    export = exports / "conditional"
    a = Server(export, pg_database, "--budget", "4", log_path=tmp_path / "a.log")
    try:
        b = Server(export, pg_database, log_path=tmp_path / "b.log")
        try:
            info = a.client.get("/v1/info").json()
            p = info["classifier_attributes"][0]
            attrs = {n: (1 if n == p else -1) for n in info["attribute_names"]}
            bodies = []
            for i, (made, accepted) in enumerate([(a, b), (b, a), (a, a)]):  # sessions are shared by the replicas
                session = made.session(attrs, [p], "high", seed=20 + i)["session"]
                r = accepted.accept(session, f"show-key-{i:03d}")
                assert r.status_code == 200, r.text
                bodies.append(r.json())
        finally:
            b.stop()
    finally:
        a.stop()

    assert main(["privacy", "show", "--ledger", pg_database, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    releases = summary["releases"]
    assert releases["releases"] == 3 and releases["images"] == 3 and releases["budget"] == 4.0
    assert releases["refused"] == sum(body["decision"] == "refused" for body in bodies)
    assert releases["attributes"][p]["protected_releases"] == 3 and releases["max_spent"] == 1.0
    assert summary["database"] == pg_database and "seed" not in json.dumps(summary)
    with PrivacyLedger(pg_database, create=False) as ledger:
        assert sorted(r.release_id for r in ledger.releases()) == sorted(body["release_id"] for body in bodies)

    assert main(["privacy", "show", "--ledger", pg_database]) == 0
    out = capsys.readouterr().out
    assert f"privacy database {pg_database}" in out and "3 releases of 3 images" in out
    assert f"{p}: protected on 3 images" in out
