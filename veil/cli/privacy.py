"""``veil privacy``: what has been spent on a dataset, its budgets, and a publishable revision (no torch).

    veil privacy show --data folder:photos [--ledger PATH] [--json]    # or synthetic:0, celeba:/data/celeba
    veil privacy show --ledger postgresql://veil@db:5432/veil        # the database `veil serve` replicas share
    veil privacy set-budget 4 --reason "epsilon 4 per person, labels and pixels" --data source=synthetic,seed=0
    veil privacy set-pixels not-protected --reason "labels only: we publish inversions" --data source=synthetic,seed=0
    veil privacy set-level eyeglasses high --reason "chosen on public faces" --data source=synthetic,seed=0
    veil privacy set-training-budget 10 --reason "DP training cap" --data source=celeba,root=/data/celeba
    veil privacy publish-revision --revision edits/revision --out edits/published   # records named r-<16 hex>
    veil privacy reveal-ids --revision edits/published --data edits/revision       # owner: pseudonym -> id

Each dataset has one privacy database, ``$VEIL_HOME/datasets/<dataset>.sqlite`` (VEIL_HOME defaults
to ``~/.veil``; ``--ledger PATH`` names another), holding every release and every DP training run on
it and the budgets (``veil.privacy.ledger``); ``--ledger postgresql://...`` names one on PostgreSQL
(``veil serve --state``). It is owner-only: it holds the randomized-response seeds. ``--data`` locates
the dataset (``veil.data_arg``, as in every command): ``folder:PATH``, ``celeba:PATH``, ``synthetic:SEED``
(or the older ``source=folder,root=PATH`` pairs), or a revision folder (its base dataset). ``show`` reads the account through
``veil.api.privacy_account`` (it creates nothing); the set-* actions create the database if need be.
``publish-revision`` names each record by its pseudonym (``veil.privacy.revision_manifest.pseudonym``, keyed by
the secret in the dataset's database, which must exist); ``reveal-ids`` maps a published revision back.
"""

from __future__ import annotations

import json
from pathlib import Path

from veil.cli import epsilon_or_budget
from veil.data_arg import parse_data_arg  # yaml only
from veil.errors import ConfigError
from veil.privacy.db import is_url, redact
from veil.privacy.ledger import PrivacyLedger, ledger_path_for  # stdlib (psycopg for a URL) only

def parse_data(text: str | None) -> dict:
    """``--data``: the one data spec of every command (``veil.data_arg``: folder:PATH, celeba:PATH,
    synthetic[:SEED], the older source=...,root=... pairs, or a revision folder: its base)."""
    return parse_data_arg(text)


def _target(args) -> tuple[dict, Path | str]:
    """(the --data spec, the database: a SQLite path or a postgresql:// URL)."""
    data = parse_data(args.data)
    if not data and not args.ledger:
        raise ConfigError("--data or --ledger: say which dataset's privacy database (e.g. --data folder:photos or --data synthetic:0)")
    if args.ledger and is_url(args.ledger):
        return data, args.ledger
    return data, Path(args.ledger).expanduser() if args.ledger else ledger_path_for(data)


def _open(args) -> PrivacyLedger:
    """The database ``--data``/``--ledger`` name, created if need be (the set-* actions; ``show`` reads it
    through ``veil.api.privacy_account``, which creates nothing)."""
    data, target = _target(args)
    return PrivacyLedger.for_dataset(data, path=target) if data else PrivacyLedger(target, create=True)


def _eps(x, infinite: str = "unbounded") -> str:
    """An epsilon or a budget for people: None and "inf" (JSON's infinity) read as ``infinite``."""
    return infinite if x in (None, "inf") else f"{x:g}"


def _print_summary(s: dict) -> None:
    dataset = (s["dataset"] or {}).get("slug", "unrecorded")
    print(f"privacy database {s['database']} (dataset {dataset}; owner-only: it holds the release seeds)")
    t = s["training"]
    print(f"training runs ({t['composition']}):")
    for r in t["runs"]:
        counted = "" if r["status"] == "finished" else f" (counts its planned epsilon {_eps(r['counted_epsilon'])})"
        print(f"  #{r['run_id']} {r['kind']} {r['run']}: {'private' if r['private'] else 'NOT private'}, epsilon "
              f"{_eps(r['epsilon'] if r['status'] == 'finished' else r['planned_epsilon'])}, delta {r['delta']}, "
              f"{r['steps'] or 0} steps, {r['status']}{counted}, started {r['started_at']}")
    if not t["runs"]:
        print("  none recorded")
    left = "no training budget" if t["budget"] is None else f"training budget {_eps(t['budget'])}, {_eps(t['left'])} left"
    print(f"  composed: epsilon {_eps(t['epsilon']) if t['runs'] else 0}, delta {t['delta']:g}; {left}")
    g = s["records"]
    pixels = "pixels protected" if g["pixels"] == "protected" else "PIXELS NOT PROTECTED (labels only)"
    print(f"records ({g['composition']}; budget epsilon {_eps(g['budget'], 'unlimited')} per record at delta "
          f"{g['delta']:g}; {pixels}):")
    print(f"  {g['records']} records released; the most spent {_eps(g['max_epsilon'])} (labels "
          f"{_eps(g['max_labels_epsilon'])}, pixels {_eps(g['max_pixels_epsilon'])}), least left "
          f"{_eps(g['least_left'])}, {g['at_budget']} at the budget")
    for name, lv in sorted(g["levels"].items()):
        print(f"  {name} is released at {lv['name']} (epsilon {lv['epsilon']}, strength {lv['strength']}, "
              f"{lv['encoding']}): one level per attribute and dataset")
    for c in g["policy_changes"]:
        print(f"  {c['changed_at']} {c['setting']} {c['old_value']} -> {c['new_value']} by {c['changed_by']}: "
              f"{c['reason']}")
    r = s["releases"]
    print(f"releases ({r['composition']}):")
    refused = f" ({r['refused']} refused by the edit check, charged all the same)" if r["refused"] else ""
    print(f"  {r['releases']} releases of {r['images']} images{refused}; most spent on one (image, attribute) "
          f"{_eps(r['max_spent'])}, least left {_eps(r['least_left'])}")
    for name, a in r["attributes"].items():
        protected = "never protected" if not a["images_protected"] else (
            f"protected on {a['images_protected']} images ({a['protected_releases']} releases, max spent "
            f"{_eps(a['max_spent'])}, {a['at_budget']} at the budget)")
        print(f"  {name}: {protected}; published exactly on {a['images_published_exactly']} images")
    print("budget changes:")
    for c in s["budget_changes"]:
        old = "none" if c["old_value"] is None else _eps(c["old_value"], "unlimited")
        print(f"  {c['changed_at']} {c['budget']} budget {old} -> {_eps(c['new_value'], 'unlimited')} by {c['changed_by']}: "
              f"{c['reason']}")


def _show(args) -> int:
    from veil import api  # no torch

    data, target = _target(args)
    summary = api.privacy_account(data, ledger=args.ledger)
    if summary is None:
        path = redact(target) if is_url(target) else target
        if args.json:
            print(json.dumps({"database": str(path), "exists": False}))
        else:
            print(f"no privacy database at {path}: nothing has been released from or trained on this dataset "
                  f"with veil (or it was recorded elsewhere: pass --ledger)")
        return 0
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
    return 0


def _set_budget(args) -> int:
    with _open(args) as ledger:
        if args.action == "set-budget":
            ledger.set_budget(args.value, reason=args.reason)
            now = ledger.budget
        else:
            ledger.set_training_budget(args.value, reason=args.reason)
            now = ledger.training_budget
        which = "release budget (per record)" if args.action == "set-budget" else "training budget"
        print(f"{ledger.path}: {which} is now {_eps(now, 'unlimited')} "
              f"(recorded: {args.reason})")
    return 0


def _set_pixels(args) -> int:
    with _open(args) as ledger:
        ledger.set_pixel_policy(args.policy, reason=args.reason)
        what = ("priced and limited by the budget" if args.policy == "protected" else
                "NOT protected: the budget limits the labels alone, and every release says so")
        print(f"{ledger.path}: the pixels are now {what} (recorded: {args.reason})")
    return 0


def _set_level(args) -> int:
    from veil.privacy.level_policy import set_level
    from veil.privacy.levels import resolve_level

    level = None if args.level == "none" else resolve_level(args.level)
    with _open(args) as ledger:
        set_level(ledger, args.attribute, level, reason=args.reason)
    what = "unpinned: the next release pins it" if level is None else f"{level.name} for every later release"
    print(f"{ledger.path}: {args.attribute!r} is now {what} (recorded: {args.reason})")
    return 0


def _dataset_ledger(args, base: dict) -> PrivacyLedger:
    """The existing privacy database of a revision's dataset: --ledger, --data, else the revision's base."""
    data = parse_data(args.data) if args.data else base
    if args.ledger:
        target = args.ledger if is_url(args.ledger) else Path(args.ledger).expanduser()
    else:
        target = ledger_path_for(data)
    return PrivacyLedger(target, create=False)


def _publish(args) -> int:
    from veil.data_arg import revision_base
    from veil.privacy.revision_manifest import publish_revision

    base = revision_base(args.revision, check=not (args.ledger or args.data))  # the base locates the database
    with _dataset_ledger(args, base) as ledger:  # the key of the pseudonyms: only in the owner's database
        out = publish_revision(args.revision, args.out, id_key=ledger.pseudonym_key())
    n = len(json.loads((out / "manifest.json").read_text())["changes"])
    print(f"wrote {out}: {n} edited images and their released attributes (no original attributes; records named "
          f"by pseudonym, `veil privacy reveal-ids --revision {out}` maps them back for you); this folder may be "
          f"shared, {args.revision} stays with you")
    return 0


def _reveal(args) -> int:
    from veil.privacy.revision_manifest import load_published, reveal_ids

    manifest = load_published(args.revision)
    with _dataset_ledger(args, dict(manifest.get("base") or {})) as ledger:
        mapping = reveal_ids(manifest, key=ledger.pseudonym_key(), record_ids=ledger.record_ids())
    if args.json:
        print(json.dumps(mapping, indent=1))
    else:
        for published, record in mapping.items():
            print(f"{published}\t{record if record is not None else '(not a record of this dataset)'}")
    return 0


def _locate(p, what: str = "the dataset") -> None:
    p.add_argument("--data", metavar="SPEC", help=f"{what}: folder:PATH | celeba:PATH | synthetic:SEED (or the older "
                                                 "source=...,root=... pairs), or a revision folder; docs/data.md")
    p.add_argument("--ledger", help="the privacy database itself (default $VEIL_HOME/datasets/<dataset>.sqlite), "
                                    "or a postgresql:// URL (the database `veil serve --state` replicas share)")


def add_subcommand(sub) -> None:
    """Register `veil privacy` (show | set-budget | set-training-budget | set-pixels | set-level | publish-revision
    | reveal-ids)."""
    p = sub.add_parser("privacy", help="what has been spent on a dataset (training runs, releases), its budgets",
                       description="The privacy account of a dataset: every DP training run and every release of "
                                   "an edited image recorded in its database, the budgets, and publishing a revision "
                                   "without the original attributes.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="training runs and their composition, release spends, budgets left")
    _locate(show)
    show.add_argument("--json", action="store_true", help="print the account as JSON")
    show.set_defaults(func=_show)
    for name, what in (("set-budget", "the per-record release budget (composed epsilon, labels and pixels)"),
                       ("set-training-budget", "the cap on the composed epsilon of all training runs")):
        q = actions.add_parser(name, help=f"change {what} (recorded with who, when, old, new and why)")
        q.add_argument("value", type=epsilon_or_budget, help="the new budget, >= 0 (inf = unlimited)")
        q.add_argument("--reason", required=True, help="why it changes (recorded with the change)")
        _locate(q)
        q.set_defaults(func=_set_budget)
    px = actions.add_parser("set-pixels", help="say whether the pixels of releases are protected (recorded with "
                                               "who, when, old, new and why)")
    px.add_argument("policy", choices=("protected", "not-protected"),
                    help="protected (default): pixels priced and limited; not-protected: labels only (the only "
                         "way to release DDIM inversions, which have no pixel bound)")
    px.add_argument("--reason", required=True, help="why it changes (recorded with the change)")
    _locate(px)
    px.set_defaults(func=_set_pixels)
    lv = actions.add_parser("set-level", help="change the level a protected attribute is released at, for the whole "
                                              "dataset (recorded with who, when, old, new and why)")
    lv.add_argument("attribute", help="the protected attribute, e.g. eyeglasses")
    lv.add_argument("level", help="low | medium | high | max, or none (the next release pins its own)")
    lv.add_argument("--reason", required=True, help="why it changes (recorded with the change)")
    _locate(lv)
    lv.set_defaults(func=_set_level)
    pub = actions.add_parser("publish-revision", help="a shareable copy of a revision: edited images and released "
                                                      "attributes only")
    pub.add_argument("--revision", required=True, help="the owner's revision folder (veil edit's OUT/revision)")
    pub.add_argument("--out", required=True, help="a new folder for the published revision")
    _locate(pub, "the dataset, when not the revision's own base")
    pub.set_defaults(func=_publish)
    rv = actions.add_parser("reveal-ids", help="owner only: which record each pseudonym of a published revision is")
    rv.add_argument("--revision", required=True, help="a published revision (veil privacy publish-revision's --out, "
                                                      "or the server's /v1/revision unzipped)")
    _locate(rv, "the dataset (a folder dataset: its root, or the owner's revision), when not the revision's base")
    rv.add_argument("--json", action="store_true", help="print {pseudonym: id} as JSON")
    rv.set_defaults(func=_reveal)
