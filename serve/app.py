"""``veil serve``'s ASGI app (FastAPI): private preview edits over HTTP, on an ONNX Runtime export; no torch.

    app = create_app(editor=OrtEditor(export), store=open_state(url), settings=ServeSettings(token=None))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes (all JSON but the page, the docs, the preview stream, the revision and the metrics):

    GET  /                                  the owner's page (serve/static/: HTML, CSS, one JS module)
    GET  /docs, /openapi.json               the API's documentation: Swagger UI served by the server itself
                                            (veil.serve.docs), the OpenAPI schema with every error response
    GET  /healthz                           liveness and what runs where
    GET  /metrics                           Prometheus text format
    GET  /v1/info                           attributes, levels, limits, budget, whether there is a dataset
    GET  /v1/dataset                        the owner's images to pick from (--dataset), a page at a time
    POST /v1/sessions                       multipart: image (PNG/JPEG) or dataset_image, attributes (JSON,
                                            optional: else the dataset's labels or the classifier's guesses),
                                            protected (JSON list), level -> the capability
    GET  /v1/sessions/{session}             state: level, decision, budget spent and left, release history
    PATCH /v1/sessions/{session}            corrected attributes, protected attributes, level
    POST /v1/sessions/{session}/previews    candidates as server-sent events: the predicted clean image every few
                                            steps, then each final candidate with its released attributes
    POST /v1/sessions/{session}/feedback    more_private | less_private | accept | reject; accept carries an
                                            idempotency key and answers with the release
    GET  /v1/revision                       the publishable revision (zip): edited images and released attributes,
                                            each record named by its pseudonym (veil privacy reveal-ids maps back)

Load once, then per request: decode and validate, predict (on the batcher's worker thread), encode.
A session id is its capability: 256 random bits, stored hashed; whoever holds it can see that one
session's image and nothing else. With a server token (needed off loopback) every route but /healthz and the
page's own files (/, /static/*: the page asks for the token) needs it (``veil.serve.auth``). Every answer carries
a Content-Security-Policy that allows only the server's own scripts and styles. Errors are ``{"error": message,
"field": name-or-null}`` (``ErrorBody``, declared per route in the schema) with a 4xx status (503 + Retry-After
when overloaded); an unexpected failure is a bare 500 with no traceback, logged.
Privacy is the session's (veil.privacy.session): previews spend nothing and go to the owner only; accept
releases a fresh draw, checked by the classifier when the export has one, budget-checked and recorded in
one transaction with its idempotency key (veil.serve.state).
"""

from __future__ import annotations

import logging
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from veil import __version__
from veil.errors import ConfigError, VeilError
from veil.privacy.identity import fingerprint
from veil.privacy.levels import LEVELS, less_private, more_private, resolve_level
from veil.privacy.mechanism import outcome_probability, privatize
from veil.serve.auth import token_dependencies
from veil.serve.batcher import MicroBatcher, PreviewJob
from veil.serve.dataset import FolderDataset, check_export_data
from veil.serve.docs import install_docs
from veil.serve.release import accept_release, level_of, revision_zip
from veil.serve.errors import ApiError, BodyLimit, JsonGuardRoute, error_responses, install_error_handlers, loads_json, \
    sse
from veil.serve.images import ImageLimits, data_url, decode_upload_photo, from_png, image_id_for, install_bomb_guard, \
    png_bytes, to_model_input, upload_warnings
from veil.serve.metrics import CONTENT_TYPE, MetricsMiddleware, ServeMetrics
from veil.serve.schemas import FeedbackRequest, FeedbackResponse, LevelName, PreviewRequest, SessionState, \
    SessionUpdate
from veil.serve.state import SessionRow, StateStore

__all__ = ["create_app", "ServeSettings", "LEVEL_HELP"]

log = logging.getLogger("veil.serve")

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

LEVEL_HELP = {  # what is proven, per channel (veil.privacy.accounting); the page shows it beside each level
    "low": "labels: epsilon 4, the attribute is released as it is 98% of the time; pixels: NOT protected (the face "
           "is kept by DDIM inversion), offered only where the owner said so for the whole dataset",
    "medium": "labels: epsilon 2, about one protected attribute in eight is flipped; pixels: proven 0, the face is "
              "drawn afresh (your image is not read)",
    "high": "labels: epsilon 1, one in four flipped; pixels: proven 0, the face is drawn afresh",
    "max": "labels: a fair coin (epsilon 0); pixels: proven 0, the face is drawn afresh (your image is not read)",
}


@dataclass(frozen=True)
class ServeSettings:
    """The knobs of one server (the CLI's flags)."""

    token: str | None = None  # required on every route but /healthz when set
    limits: ImageLimits = field(default_factory=ImageLimits)
    batching: bool = True
    max_wait_ms: float = 5.0
    max_queue: int = 64
    preview_every: int = 2
    default_level: str = "medium"

    def __post_init__(self):
        if self.default_level not in LEVELS:
            raise ConfigError(f"{self.default_level!r}: choose one of {list(LEVELS)}", option="--level")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 16):
            raise ConfigError(": use at least 16 characters (e.g. `python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'`)", option="--token")


@dataclass
class _Ctx:
    editor: object
    store: StateStore
    settings: ServeSettings
    metrics: ServeMetrics
    batcher: MicroBatcher


def _ctx(request: Request) -> _Ctx:
    return request.app.state.ctx


def open_session(request: Request, session: str = PathParam(..., min_length=8, max_length=128,
                                                            description="the capability create returned")):
    """(token, SessionRow); 404 for an unknown or malformed capability (a sync dependency: runs off the loop)."""
    return session, _ctx(request).store.session(session)


def _state(ctx: _Ctx, row: SessionRow, *, token: str | None = None, image: bool = False) -> dict:
    budget, spent = ctx.store.budget, ctx.store.spends(row.image_id)
    left = {p: (None if budget is None else round(budget - spent.get(p, 0.0), 12)) for p in row.protected}
    return {"session": token, "image_id": row.image_id, "attributes": row.attributes, "guesses": row.guesses,
            "protected": row.protected, "level": row.level, "decision": row.decision, "release_id": row.release_id,
            "budget": budget, "spent": spent, "left": left, "history": ctx.store.releases(row.image_id),
            "image": data_url(row.image_png) if image else None}


def _check_protected(editor, protected, attributes: dict, *, field_name: str = "protected") -> list[str]:
    twice = sorted({p for p in protected if protected.count(p) > 1})
    if twice:  # as `veil edit --protect` refuses them
        raise ApiError(422, f"{field_name}: {', '.join(twice)} listed twice; name each attribute once", field_name)
    protected = list(protected)
    try:
        editor.protected_mask(protected)
    except ConfigError as e:
        raise ApiError(422, e.phrase(field_name) if e.option else str(e), field_name) from None
    unknown = [p for p in protected if attributes.get(p) not in (-1, 1)]
    if unknown:
        raise ApiError(422, f"{field_name}: {unknown} have no known value (-1 or 1) for this image; set them in "
                            f"the session's attributes first", field_name)
    return protected


def _parse_json_field(text: str | None, name: str, kind: type):
    if text is None or text == "":
        return None
    try:
        value = loads_json(text, name)
    except ValueError as e:
        raise ApiError(422, f"{name}: not valid JSON ({e})", name) from None
    if not isinstance(value, kind):
        raise ApiError(422, f"{name}: expected a JSON {kind.__name__}", name)
    return value


def _attributes(editor, given: dict | None, base: dict[str, int]) -> dict[str, int]:
    """``base`` with the owner's ``given`` values over it; 422 naming ``attributes`` for a bad name or value."""
    given = given or {}
    unknown = sorted(set(given) - set(editor.attribute_names))
    if unknown:
        raise ApiError(422, f"attributes: {unknown} are not attributes of the model ({editor.attribute_names})",
                       "attributes")
    bad = {k: v for k, v in given.items() if isinstance(v, bool) or v not in (-1, 0, 1)}
    if bad:
        raise ApiError(422, f"attributes: values must be -1, 1 or 0 (unknown), got {bad}", "attributes")
    return {**base, **{k: int(v) for k, v in given.items()}}


def _security_headers(app) -> None:
    """Every answer: a CSP allowing only the server's own scripts and styles (images also as data: URLs, which
    the API returns), no framing, no sniffing, no referrer (session capabilities live in URLs)."""
    headers = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]

    class SecurityHeaders:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            async def with_headers(message):
                if message["type"] == "http.response.start":
                    message["headers"] = list(message.get("headers", [])) + headers
                await send(message)

            await self.inner(scope, receive, with_headers if scope["type"] == "http" else send)

    app.add_middleware(SecurityHeaders)


def create_app(*, editor, store: StateStore, settings: ServeSettings | None = None, data_spec: dict | None = None,
               dataset: FolderDataset | None = None) -> FastAPI:
    """The app over a loaded ``OrtEditor`` and an open state store (see the module docstring); ``dataset``: the
    owner's images to pick from (``--dataset``), refused unless it is the export's data (``data_spec``; None: an
    in-process caller vouches for it, and its CSV ids are the records); each item is then named by the data file
    with the same content, and one that is no data file's is not offered (``FolderDataset.identify_by_content``)."""
    if dataset is not None and data_spec is not None:
        left_out = dataset.identify_by_content(check_export_data(dataset.folder, data_spec), data_spec)
        if left_out:  # the names go to the server's log only; veil serve prints the count
            log.warning("--dataset %s: not the export's data by content, not offered: %s", dataset.folder,
                        ", ".join(left_out))
    settings = settings or ServeSettings()
    install_bomb_guard(settings.limits)
    metrics = ServeMetrics()
    batcher = MicroBatcher(editor, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                           batching=settings.batching, preview_every=settings.preview_every,
                           observe=metrics.observe_batch)
    metrics.queue_depth.set_function(lambda: batcher.depth)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="veil serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,  # veil.serve.docs serves them (the assets itself; the token applies)
                  description="Private preview edits of face images: previews spend nothing, an accepted edit is "
                              "released through randomized response and charged to the dataset's ledger.")
    app.router.route_class = JsonGuardRoute  # JSON nested too deep: a 422, not FastAPI's 400
    app.state.ctx = ctx = _Ctx(editor, store, settings, metrics, batcher)
    install_error_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_bytes + (64 << 10))
    _security_headers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    tokens = token_dependencies(settings.token)
    auth = tokens["api"]
    install_docs(app, auth=tokens["docs"])

    def errors(*codes: int) -> dict:  # the schema's error responses: 401 only where a token is set, 500 anywhere
        return error_responses(*codes, *((401,) if settings.token else ()), 500)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["ops"], responses=error_responses(500))
    def health():
        return {"status": "ok", "version": __version__, "state": store.backend, "queue_depth": batcher.depth,
                "backend": editor.backend, "provider": editor.provider, "batching": settings.batching}

    @app.get("/metrics", tags=["ops"], dependencies=auth, response_class=Response, responses=errors())
    def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/info", tags=["edit"], dependencies=auth, responses=errors())
    def info():
        return {"attribute_names": editor.attribute_names, "classifier": editor.can_check,
                "classifier_attributes": editor.classifier_attribute_names, "resolution": editor.resolution,
                "steps": editor.num_steps, "budget": store.budget, "model_privacy": editor.model_privacy,
                "levels": [{**lv.to_json(), "keep_probability": round(lv.keep_probability, 4),
                            "explanation": LEVEL_HELP[name]} for name, lv in LEVELS.items()],
                "default_level": settings.default_level, "max_upload_bytes": settings.limits.max_bytes,
                "max_side": settings.limits.max_side, "max_pixels": settings.limits.max_pixels,
                "dataset": {"available": dataset is not None, "count": 0 if dataset is None else len(dataset)}}

    @app.get("/v1/dataset", tags=["edit"], dependencies=auth, responses=errors(422))
    def dataset_items(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=64)):
        """The owner's images to pick from (``--dataset``), at the model's resolution."""
        if dataset is None:
            return {"available": False, "count": 0, "items": []}
        ids = dataset.ids[offset:offset + limit]
        return {"available": True, "count": len(dataset),
                "items": [{"id": i, "image": data_url(dataset.image_png(i))} for i in ids]}

    @app.post("/v1/sessions", tags=["edit"], dependencies=auth, status_code=201, response_model=SessionState,
              responses=errors(400, 413, 415, 422, 503))
    async def create_session(image: UploadFile | None = File(None, description="PNG or JPEG"),
                             dataset_image: str | None = Form(None, description="instead of image: an id from "
                                                                                 "/v1/dataset"),
                             attributes: str | None = Form(None, description='JSON object, e.g. {"smiling": 1}'),
                             protected: str | None = Form(None, description='JSON list, e.g. ["smiling"]'),
                             level: LevelName | None = Form(None)):
        if (image is None) == (dataset_image is None):
            raise ApiError(422, "image: send an image file, or dataset_image (an id from /v1/dataset), not both",
                           "image")
        notes: list[str] = []  # the answer's "warnings": an enlarged or multi-frame upload is edited, and said so
        if image is not None:
            data = await image.read(settings.limits.max_bytes + 1)
            photo = await run_in_threadpool(decode_upload_photo, data, limits=settings.limits)
            pixels, notes = photo.pixels, upload_warnings(photo, resolution=editor.resolution)
            png, image_id, known = png_bytes(to_model_input(pixels, resolution=editor.resolution)), \
                image_id_for(pixels), {}
        else:
            if dataset is None or dataset_image not in dataset.ids:
                raise ApiError(422, f"dataset_image: {dataset_image!r} is not an image of the server's dataset"
                                    + ("" if dataset else " (it was started without --dataset)"), "dataset_image")
            png, image_id = await run_in_threadpool(dataset.image_png, dataset_image), dataset_image
            known = {k: v for k, v in dataset.attributes(dataset_image).items() if v in (-1, 1)}  # the owner's labels
        x = from_png(png)  # what every replica will edit: the stored, quantized image
        if dataset is not None:  # once per server: the dataset's fingerprints, so that uploads find its records
            await run_in_threadpool(store.register_dataset, dataset.ids, dataset.fingerprint)
        # an upload is the record it near-duplicates (a dataset image, an earlier upload), its budget with it
        face = fingerprint(x) if image is not None else None
        guesses = (await batcher.run_exclusive(lambda: editor.propose(x[None])))[0] if editor.can_check else None
        given = _parse_json_field(attributes, "attributes", dict)
        if given is None and guesses is None and not known:
            raise ApiError(422, "attributes: required, since this export has no classifier to guess them "
                                '(e.g. {"smiling": 1, "eyeglasses": -1})', "attributes")
        base = {n: (guesses[n]["value"] if guesses else 0) for n in editor.attribute_names}
        attrs = _attributes(editor, given, {**base, **known})
        chosen = _parse_json_field(protected, "protected", list) or []
        if not all(isinstance(p, str) for p in chosen):
            raise ApiError(422, "protected: expected a JSON list of attribute names", "protected")
        chosen = _check_protected(editor, chosen, attrs) if chosen else []
        lv = LEVELS[level or settings.default_level]
        token = await run_in_threadpool(store.create_session, image_id=image_id, image_png=png, attributes=attrs,
                                        guesses=guesses, protected=chosen, level=lv.to_json(), fingerprint=face)
        row = await run_in_threadpool(store.session, token)
        return {**await run_in_threadpool(_state, ctx, row, token=token, image=True), "warnings": notes}

    @app.get("/v1/sessions/{session}", tags=["edit"], dependencies=auth, response_model=SessionState,
             responses=errors(404, 422))
    def session_state(s=Depends(open_session)):
        return _state(ctx, s[1])

    @app.patch("/v1/sessions/{session}", tags=["edit"], dependencies=auth, response_model=SessionState,
               responses=errors(400, 404, 409, 413, 422))
    def update_session(body: SessionUpdate, s=Depends(open_session)):
        """Correct attribute values, choose the protected attributes or the level (an open session only)."""
        token, row = s
        if row.decision is not None:
            raise ApiError(409, f"session: closed ({row.decision}); start a new one", "session")
        attrs = _attributes(editor, body.attributes, row.attributes) if body.attributes is not None else None
        chosen = body.protected if body.protected is not None else row.protected
        chosen = _check_protected(editor, chosen, attrs or row.attributes) if chosen else []
        row = store.update_session(token, attributes=attrs, protected=chosen,
                                   level=None if body.level is None else LEVELS[body.level].to_json())
        return _state(ctx, row)

    @app.post("/v1/sessions/{session}/previews", tags=["edit"], dependencies=auth,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: start, preview (every few steps), candidate (each final "
                                              "edit), done; or error"}, **errors(400, 404, 409, 413, 422, 503)})
    async def preview(body: PreviewRequest, s=Depends(open_session)):
        token, row = s
        if row.decision is not None:
            raise ApiError(409, f"session: closed ({row.decision}); start a new one", "session")
        try:
            lv = resolve_level(body.level or (row.level["name"] if row.level["name"] in LEVELS else None),
                               epsilon=body.epsilon, strength=body.strength, encoding=body.encoding)
            editor.timesteps(lv.strength)  # a strength that walks no DDIM step (1e-300) is refused here
        except ConfigError as e:
            raise ApiError(422, str(e), "level") from None
        protected = _check_protected(editor, body.protected if body.protected is not None else row.protected,
                                     row.attributes)
        if not protected:
            raise ApiError(422, "protected: name at least one attribute to protect", "protected")
        row = await run_in_threadpool(store.update_session, token, level=lv.to_json(), protected=protected)
        rng = random.SystemRandom()  # preview draws: the OS's randomness, never stored
        targets = [privatize(row.attributes, protected=protected, epsilon=lv.epsilon, rng=rng) for _ in range(body.n)]
        job = batcher.submit_preview(PreviewJob(
            image=from_png(row.image_png), original=editor.attribute_vector(row.attributes),
            targets=np.stack([editor.attribute_vector(t) for t in targets]), strength=lv.strength,
            encoding=lv.encoding, protected=tuple(n for n in editor.attribute_names if n in protected)))

        async def events():
            try:
                yield sse("start", {"n": body.n, "level": lv.to_json(), "protected": protected,
                                    "steps": len(editor.timesteps(lv.strength))})
                async for event in job.events():
                    if event[0] == "step":
                        yield sse("preview", {"step": event[1], "steps": event[2], "images": event[3]})
                        continue
                    for i, (t, im) in enumerate(zip(targets, event[1])):
                        p = outcome_probability(row.attributes, t, protected=protected, epsilon=lv.epsilon)
                        yield sse("candidate", {"index": i, "image": data_url(png_bytes(im)), "released_attributes": t,
                                                "probability": round(p, 6)})
                yield sse("done", {"n": body.n})
            except VeilError as e:
                yield sse("error", {"error": str(e), "field": None})
            except Exception:  # noqa: BLE001 - the stream has started: say so in it, log the rest
                log.exception("preview failed")
                yield sse("error", {"error": "internal error: the preview failed (logged on the server)", "field": None})
            finally:
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/v1/sessions/{session}/feedback", tags=["edit"], dependencies=auth, response_model=FeedbackResponse,
              responses=errors(400, 404, 409, 413, 422, 503))
    async def feedback(body: FeedbackRequest, s=Depends(open_session),
                       idempotency_key: str | None = Header(None, description="accept: same as the body's field")):
        token, row = s
        if body.action == "accept":
            return await accept_release(ctx, token, row, body.idempotency_key or idempotency_key)
        if row.decision is not None:
            raise ApiError(409, f"session: closed ({row.decision}); start a new one", "session")
        lv = level_of(row)
        new = {"more_private": more_private, "less_private": less_private}.get(body.action, lambda x: x)(lv)
        decision = "rejected" if body.action == "reject" else None
        await run_in_threadpool(store.feedback, token, action=body.action, level=new.to_json(), decision=decision)
        hint = None if decision else (f"preview at {new.name}" if new != lv else
                                      f"already at the {'most' if body.action == 'more_private' else 'least'} private level")
        return FeedbackResponse(action=body.action, decision=decision, level=new.to_json(), suggestion=hint)

    @app.get("/v1/revision", tags=["edit"], dependencies=auth, response_class=Response,
             responses={200: {"content": {"application/zip": {}}}, **errors()})
    def revision():
        """The publishable revision: edited images, released attributes, records named by pseudonym (r-<16 hex>)."""
        return Response(revision_zip(editor, store, data_spec or {}), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="veil-revision.zip"'})

    return app
