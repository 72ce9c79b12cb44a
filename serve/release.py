"""What ``accept`` does on the server, and the publishable revision (``veil.serve.app``'s two longer handlers).

``accept_release``: replay a stored answer for a seen idempotency key, refuse a closed session; then one
``veil.privacy.release.release`` (the release function the edit job and edit sessions use too), on a worker
thread: a release the ledger would refuse is refused before any compute, the released attributes are drawn
from the OS's randomness, the checked edit runs on the batcher's worker, and the release, its answer and
the session's decision are recorded in one transaction (``StateStore.accept_with``'s hook), which replays
instead if another request with the same key committed first. A refused edit (the checker did not read its
released values) is recorded and charged, and answered with ``decision: "refused"``, ``refusal`` (a sentence
with the checker's readings, ``refusal_words``) and ``check`` (the readings as JSON).

``revision_zip``: the latest accepted release of each image as ``publish_revision`` writes it (edited images
and released attributes only, each record named by its pseudonym under the dataset's key), zipped.
"""

from __future__ import annotations

import io
import re
import tempfile
import zipfile
from pathlib import Path

from anyio import from_thread
from starlette.concurrency import run_in_threadpool

from veil.errors import EditRefused, PrivacyError
from veil.privacy.accounting import price_release
from veil.privacy.levels import PrivacyLevel
from veil.privacy.release import Edited, Released, release
from veil.privacy.revision_manifest import RevisionChange, publish_revision, write_revision
from veil.serve.errors import ApiError
from veil.serve.images import data_url, from_png, png_bytes
from veil.serve.schemas import IDEMPOTENCY_KEY, FeedbackResponse
from veil.serve.state import SessionRow, StateStore

__all__ = ["accept_release", "level_of", "refusal_words", "revision_zip"]


def level_of(row: SessionRow) -> PrivacyLevel:
    d = row.level
    return PrivacyLevel(d["name"], float(d["epsilon"]), float(d["strength"]), d["encoding"])



def refusal_words(check: dict, threshold: float) -> str:
    """A refused edit in words: ``check`` is ``CheckedEdits.row`` (attempts, and per protected attribute the
    probability the edit showed its released value), ``threshold`` what each needed."""
    readings = ", ".join(f"{name} {p:.0%}" for name, p in check["shown"].items())
    return (f"the edit did not show its released values clearly enough after {check['attempts']} "
            f"attempt{'s' if check['attempts'] != 1 else ''} (the checker read {readings}; each needs "
            f"{threshold:.0%}), so it is not published; the draw is charged all the same")


async def accept_release(ctx, token: str, row: SessionRow, key: str | None) -> dict:
    """One fresh release: idempotent by ``key``, checked before compute and again inside the write."""
    store, editor = ctx.store, ctx.editor
    if key is None or not re.fullmatch(IDEMPOTENCY_KEY[1:-1], key):
        raise ApiError(422, "idempotency_key: accept needs one (8-128 of A-Z a-z 0-9 _ . : -), in the body or the "
                            "Idempotency-Key header; reuse it when you retry", "idempotency_key")
    replay = await run_in_threadpool(store.replay, token, key)
    if replay is not None:
        return {**replay, "replayed": True}
    if row.decision is not None:
        raise ApiError(409, f"session: closed ({row.decision}); start a new one", "session")
    if not row.protected:
        raise ApiError(422, "protected: choose the attributes to protect (preview first)", "protected")
    lv = level_of(row)
    x = from_png(row.image_png)
    check = {"check": True} if editor.can_check else {}
    mus = editor.pixel_mus(strength=lv.strength, encoding=lv.encoding, check=bool(check))
    price = price_release(epsilon=lv.epsilon, protected=row.protected, encoding=lv.encoding, pixel_mus=mus)
    cost = {**{p: lv.epsilon for p in row.protected}, "price": price.to_json(),
            "pixels_protected": store.ledger.pixel_policy == "protected"}

    refused = {}  # the checker's readings of a refused edit, for the answer

    def edit(targets: list[dict]) -> list[Edited]:  # on release()'s worker thread; the model on the batcher's
        try:
            image = from_thread.run(ctx.batcher.run_exclusive, lambda: editor(
                [x], originals=[row.attributes], targets=targets, strength=lv.strength, protected=row.protected,
                encoding=lv.encoding, **check)[0])
        except EditRefused as e:
            if e.checked is None:
                raise
            refused.update(e.checked.row(0), threshold=float(e.checked.threshold))
            raise EditRefused(refusal_words(refused, refused["threshold"]), e.checked) from None
        return [Edited(png_bytes(image))]

    def respond(done: Released) -> dict:
        record, png = done.record, done.image
        refusal = None if done.refusal is None else done.refusal[:500]
        published = None if png is None else {
            "release_id": record.release_id, "image_id": row.image_id, "image": data_url(png),
            "released_attributes": record.released_attributes, "protected": row.protected, "epsilon": lv.epsilon,
            "level": lv.to_json(), "cost": cost, "checked": bool(check), "released_at": record.released_at}
        return FeedbackResponse(action="accept", decision="accepted" if png is not None else "refused",
                                level=lv.to_json(), release_id=record.release_id, release=published, refusal=refusal,
                                check=dict(refused) if png is None and refused else None,
                                suggestion=None if png is not None else "start a new session to try again, at a "
                                                                        "further cost").model_dump()

    def run(hook):  # seed=None: the draw comes from the OS
        return release(store.ledger, image_ids=[row.image_id], attributes=[row.attributes], protected=row.protected,
                       level=lv, edit=edit, seed=None, models=editor.costs, hook=hook,
                       pixel_mus=mus)

    try:
        result = await run_in_threadpool(store.accept_with, token, key=key, respond=respond, run=run)
    except PrivacyError:
        replay = await run_in_threadpool(store.replay, token, key)  # the same key, committed by another replica
        if replay is not None:
            return {**replay, "replayed": True}
        raise
    if not result.replayed:
        ctx.metrics.releases.labels(result.record.outcome).inc()
    return {**result.response, "replayed": result.replayed}


def revision_zip(editor, store: StateStore, data_spec: dict) -> bytes:
    """The publishable revision (``publish_revision``: no original attributes, no seeds, pseudonymous ids), latest
    release per image."""
    latest = {}
    for item in store.revision_items():
        latest[item["image_id"]] = item
    changes = [RevisionChange(id=i["image_id"], original_attributes=i["original_attributes"],
                              released_attributes=i["released_attributes"], protected=i["protected"],
                              epsilon=i["epsilon"], strength=i["strength"]) for i in latest.values()]
    images = {i["image_id"]: from_png(i["image_png"]) for i in latest.values()}
    base = {k: v for k, v in data_spec.items() if k in ("source", "attributes", "num_images", "seed")}
    base["resolution"] = editor.resolution
    with tempfile.TemporaryDirectory(prefix="veil-revision-") as tmp:
        owner = write_revision(Path(tmp) / "owner", base_spec=base, attribute_names=editor.attribute_names,
                               changes=changes, images=images)
        out = publish_revision(owner, Path(tmp) / "published",  # records by pseudonym: the key stays in the db
                               id_key=store.ledger.pseudonym_key())
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(out).as_posix())
        return buf.getvalue()
