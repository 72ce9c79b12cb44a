"""The report's "Private edits" stage: what each record's releases prove, and what an attacker measurably reads.

    edits_rows(stage)          # [(what, value)] for the summary table
    edits_html(stage, out_dir) # the HTML section (report.py's helpers: escaped, plots embedded)
    claims(row)                # (labels, pixels): what a level proves per channel, in words

Read from the "edits" stage of report.json (``veil.demo.stages.stage_edits``): the level the owner chose for
the whole dataset on public faces and why, the ledger's composed guarantee per record (``guarantee``:
"records", "max", "delta", "pixel_policy"), the per-level attacker on public edits (``attacker``: accuracy,
"ci95", "bound" for "prior_test", "prior_train", "within_bound", the level's price) and the same attacker on
the accepted releases (``attacker_on_releases``). Proven and measured are kept apart: the labels' odds bound
and the pixels' price are proofs; the attacker is a measurement, with its 95% (Wilson) interval.
"""

from __future__ import annotations

import math
from pathlib import Path

from veil.demo.report import _bars, _e, _figure, _fmt, _image, _int, _kv, _num, _pct, _table

__all__ = ["edits_rows", "edits_html", "claims"]


def _attack(a: dict) -> str:
    """ "81.0% [70.1%, 89.2%] (88.0%)": accuracy, its 95% interval, the Bayes bound for the test set's prior."""
    ci = a.get("ci95") if isinstance(a.get("ci95"), (list, tuple)) and len(a.get("ci95")) == 2 else None
    interval = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
    return f"{_pct(a.get('accuracy'))}{interval} ({_pct(a.get('bound'))})"


def claims(row: dict) -> tuple[str, str]:
    """What a level proves, per channel: (labels, pixels), from its epsilon, encoding and price."""
    eps = _num(row.get("epsilon"))
    if eps is None:
        labels = "n/a"
    elif eps == 0:
        labels = "proven: epsilon 0, the released value is a fair coin: it says nothing of the original"
    elif math.isinf(eps):
        labels = "none: the value is published exactly"
    else:
        labels = (f"proven: {eps:g}-LDP, posterior odds of the original value <= e^{eps:g} "
                  f"({math.exp(eps):.3g}) x prior odds")
    encoding = row.get("encoding")
    guarantee = row.get("guarantee") or {}
    if encoding == "fresh":
        pixels = "proven: 0 (the image is not read: a face is drawn afresh)"
    elif encoding == "invert":
        pixels = ("no bound (DDIM inversion keeps the face): released only where the dataset says its pixels are "
                  "not protected")
    elif encoding == "noise":
        pixels = (f"proven: a Gaussian mechanism, epsilon {_fmt(guarantee.get('pixels_epsilon'))} at delta "
                  f"{_fmt(guarantee.get('delta'))} per release")
    else:
        pixels = "n/a"
    return labels, pixels


def edits_rows(s: dict) -> list[tuple[str, str]]:
    """The (what, value) key numbers of the edits stage."""
    g = s.get("guarantee") or {}
    top = g.get("max") or {}
    rows = [
        ("level (one for all images, chosen on public faces)", _fmt(s.get("level"))),
        ("releases / refused", f"{_int(s.get('releases'))} / {_int(s.get('refused'))}"),
        ("record epsilon, max (labels / pixels)",
         f"{_fmt(top.get('epsilon'))} ({_fmt(top.get('labels_epsilon'))} / {_fmt(top.get('pixels_epsilon'))}) "
         f"at delta {_fmt(g.get('delta'))}"),
    ]
    for a in s.get("attacker") or []:
        rows.append((f"attacker at {a.get('level', '?')}, public edits [95%] (bound)", _attack(a)))
    on = s.get("attacker_on_releases") or {}
    rows.append(("attacker on the accepted releases [95%] (bound)", _attack(on)))
    return rows + [("edits follow the released values", _pct((s.get("utility") or {}).get("follows")))]


def _records_html(g: dict) -> str:
    top = g.get("max") or {}
    summary = _kv([("epsilon, max over records (labels and pixels composed)", _fmt(top.get("epsilon"))),
                   ("labels alone / pixels alone, max", f"{_fmt(top.get('labels_epsilon'))} / "
                                                        f"{_fmt(top.get('pixels_epsilon'))}"),
                   ("delta (per record)", _fmt(g.get("delta"))), ("pixel policy", _fmt(g.get("pixel_policy"))),
                   ("pixels protected in every record", _fmt(top.get("pixels_protected"))),
                   ("most releases of one record", _int(top.get("releases")))])
    rows = [[r.get("id"), r.get("outcome"), _fmt(r.get("epsilon")), _fmt(r.get("delta")), _fmt(r.get("labels_epsilon")),
             _fmt(r.get("pixels_epsilon")), _fmt(r.get("pixels_protected")), _int(r.get("releases"))]
            for r in g.get("records") or []]
    table = _table(["record", "outcome", "epsilon", "delta", "labels epsilon", "pixels epsilon", "pixels protected",
                    "releases"], rows)
    return ("<p>Each record's guarantee, read from the dataset's ledger: every release of it (refused ones too), "
            "labels and pixels composed by the PLD accountant. Whatever a recipient holds of one person is "
            "(epsilon, delta)-DP with these numbers.</p>" + summary + table)


def _levels_html(s: dict) -> str:
    attacker = s.get("attacker") or []
    groups = [str(a.get("level", "?")) for a in attacker]
    plot = _bars("Adaptive attacker on public edits vs the Bayes bound", groups,
                 {"attacker accuracy": [a.get("accuracy") for a in attacker],
                  "Bayes bound (test prior)": [a.get("bound") for a in attacker]},
                 ylabel="accuracy on the original value", label=_pct, ylim=(0.0, 1.15),
                 errors={"attacker accuracy": [a.get("ci95") for a in attacker]})
    rows = []
    for a in attacker:
        labels, pixels = claims(a)
        g = a.get("guarantee") or {}
        rows.append([a.get("level"), _fmt(a.get("epsilon")), a.get("encoding"), labels, pixels,
                     _fmt(g.get("epsilon")), "refused: " + str(a["refused"]) if a.get("refused") else "allowed",
                     _attack(a), f"{_pct(a.get('prior_train'))} / {_pct(a.get('prior_test'))}", _int(a.get("n")),
                     _fmt(a.get("within_bound"))])
    table = _table(["level", "labels epsilon", "encoding", "labels: proven", "pixels: proven",
                    "one release: record epsilon", "ledger", "measured: attacker [95%] (bound)",
                    "prior train / test", "n", "not above bound"], rows)
    choice = s.get("level_choice") or {}
    return (f"<p>Chosen before any release, from public data only: <strong>{_e(s.get('level', 'n/a'))}</strong>. "
            f"{_e(choice.get('why', ''))}.</p>"
            + _figure(plot, "Accuracy of an adaptive attacker (trained on half of the edits of public faces, "
                      "measured on the other half, split with equal priors) at guessing the original protected "
                      "value, with its 95% interval, against the Bayes bound the labels' epsilon allows for the "
                      "measured half's prior.", "(no attacker numbers)") + table)


def edits_html(s: dict, out_dir: Path) -> str:
    facts = _kv([
        ("images", _int(s.get("images"))), ("protected", ", ".join(map(str, s.get("protected") or [])) or "n/a"),
        ("level, for every image", _fmt(s.get("level"))),
        ("releases", _int(s.get("releases"))), ("refused (the check; charged)", _int(s.get("refused"))),
        ("withheld by the ledger", _int(s.get("withheld"))),
        ("releases in the ledger", _int(s.get("ledger_releases"))),
    ])
    on = s.get("attacker_on_releases") or {}
    attack = _kv([("data", _fmt(on.get("data"))), ("level", _fmt(on.get("level"))),
                  ("attacker accuracy [95% interval] (Bayes bound)", _attack(on)), ("n", _int(on.get("n"))),
                  ("prior of the originals", _pct(on.get("prior_test"))),
                  ("not above the bound", _fmt(on.get("within_bound")))])
    u = s.get("utility") or {}
    utility = _kv([("edits show the released values", _pct(u.get("follows"))),
                   ("unprotected attributes kept", _pct(u.get("unprotected_kept"))),
                   ("SSIM to the original", _fmt(u.get("ssim")))])
    return (facts + "<h3>What is proven, per record</h3>" + _records_html(s.get("guarantee") or {})
            + "<h3>How the owner chose the level</h3>" + _levels_html(s)
            + "<h3>What an attacker reads off the accepted releases (measured)</h3>"
            + "<p>The adaptive attacker of the chosen level on the published edits of the private images, scored "
              "against their original values (which the demo knows), with the bound for those originals' prior.</p>"
            + attack + "<h3>Utility</h3>" + utility
            + _image(out_dir, s.get("grid"), "Originals and their released edits."))
