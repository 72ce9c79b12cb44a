"""``veil serve``: private preview edits over HTTP on a ``veil export`` (argparse and a thin handler; no torch).

    veil serve --export exports/dp32                         # http://127.0.0.1:8000, state in the dataset's ledger
    veil serve --export X --state postgresql://veil@db/veil --host 0.0.0.0 --token "$VEIL_SERVE_TOKEN"   # a replica

The app is ``veil.serve.app``; its state store ``veil.serve.state``. Binding anywhere but loopback needs a
token (``--token`` or $VEIL_SERVE_TOKEN): every route but /healthz and the page's own files then asks for it.
The port is bound first (a port in use: exit 2, before the export is loaded or the database created), and the
port actually bound is printed (``--port 0``: any free port).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys

from veil.cli import epsilon_or_budget, nonneg_float, positive_int
from veil.errors import ConfigError


def add_subcommand(sub) -> None:
    p = sub.add_parser("serve", help="serve private preview edits over HTTP (ONNX Runtime, micro-batched)",
                       description="Load a `veil export` once and serve edit sessions over HTTP: upload an image, "
                                   "preview candidates streamed as they refine, move the level, accept a release "
                                   "(budget-checked in the dataset's ledger). OpenAPI at /docs.")
    p.add_argument("--export", required=True, help="a `veil export` folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; others need --token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--state", default=None,
                   help="where sessions and releases live: a SQLite file (default: the export's dataset ledger, "
                        "~/.veil/datasets/<dataset>.sqlite) or postgresql://user@host/db (replicas sharing one ledger)")
    p.add_argument("--budget", type=epsilon_or_budget, default=None,
                   help="per-record release budget (composed epsilon of labels and pixels) when the database is new (default 8; inf = unlimited)")
    p.add_argument("--token", default=None, help="server token (default $VEIL_SERVE_TOKEN); required off loopback")
    p.add_argument("--dataset", default=None, help="a folder of the owner's images with labels.csv (the layout of "
                                                    "--data folder:PATH, docs/data.md): the page offers them to pick")
    p.add_argument("--dataset-csv", default=None, help="the dataset's CSV when it is not DATASET/labels.csv")
    p.add_argument("--no-batching", action="store_true", help="one preview at a time (the benchmark's baseline)")
    p.add_argument("--max-wait-ms", type=nonneg_float, default=5.0, help="how long to gather a batch (default 5 ms)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--preview-every", type=positive_int, default=2, help="stream a preview every N steps (default 2)")
    p.add_argument("--steps", type=positive_int, default=None, help="DDIM steps of a full edit (default: the export's)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime threads (default: $OMP_NUM_THREADS if set, else all cores)")
    p.add_argument("--providers", choices=("auto", "cpu", "cuda"), default="auto", help="ONNX Runtime providers")
    p.add_argument("--max-upload-bytes", type=positive_int, default=8 << 20, help="largest upload (default 8 MiB)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.set_defaults(func=_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (uvicorn serves on it later); ConfigError naming --port/--host if not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"{host}: not an address this machine can bind ({e.strerror})", option="--host") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a listening port stays refused
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"{port}: already in use on {host}; stop what listens there or choose another port "
                              f"(--port 0: any free one)", option="--port") from None
        raise ConfigError(f"{host}:{port}: cannot bind ({e.strerror})", option="--host/--port") from None
    sock.set_inheritable(True)
    return sock


def _serve(args) -> int:
    from veil.export.runtime import read_export_meta
    from veil.serve.app import ServeSettings
    from veil.serve.images import ImageLimits

    token = args.token or os.environ.get("VEIL_SERVE_TOKEN") or None
    if not _is_loopback(args.host) and token is None:
        raise ConfigError(f"--host {args.host}: binding off loopback needs a token (--token or $VEIL_SERVE_TOKEN), "
                          f"so that nobody else on the network can use the server")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"{args.port}: must be in [0, 65535]", option="--port")
    meta = read_export_meta(args.export)
    settings = ServeSettings(token=token, limits=ImageLimits(max_bytes=args.max_upload_bytes),
                             batching=not args.no_batching, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             preview_every=args.preview_every)
    sock = _bind(args.host, args.port)  # before anything is loaded or created
    try:
        return _run(args, settings=settings, meta=meta, sock=sock)
    finally:
        sock.close()


def _run(args, *, settings, meta: dict, sock: socket.socket) -> int:
    import uvicorn

    from veil.editing.load import load_editor
    from veil.privacy.ledger import ledger_path_for
    from veil.serve.app import create_app
    from veil.serve.dataset import FolderDataset
    from veil.serve.state import open_state

    data_spec = meta.get("data_spec") or {}
    state = args.state
    if state is None:
        if not data_spec:
            raise ConfigError(f": the export {args.export} names no dataset; give --state FILE.sqlite or a "
                              f"postgresql:// URL", option="--state")
        state = str(ledger_path_for(data_spec))
    editor = load_editor(args.export, runtime="ort", steps=args.steps, providers=args.providers,
                         threads=args.threads)
    dataset = None
    if args.dataset is not None:
        dataset = FolderDataset(args.dataset, attribute_names=editor.attribute_names, resolution=editor.resolution,
                                csv_path=args.dataset_csv)
    store = open_state(state, budget=args.budget)
    try:
        app = create_app(editor=editor, store=store, settings=settings, data_spec=data_spec, dataset=dataset)
        if dataset is not None and dataset.left_out:  # named by content: not the data's, not offered (names: log)
            print(f"--dataset {args.dataset}: {len(dataset.left_out)} of {dataset.listed} images are not the export's "
                  f"data (by content) and are not offered; upload them instead, they are then matched by their "
                  f"fingerprint", file=sys.stderr, flush=True)
        host, port = args.host, sock.getsockname()[1]  # the port bound: --port 0 picks one
        where = f"[{host}]" if ":" in host else host
        print(f"veil serve: {editor.backend} export {args.export} on {editor.provider}, state {store.backend} "
              f"({store.where}), batching {'on' if settings.batching else 'off'}"
              f"{f', {len(dataset)} dataset images' if dataset else ''}; the page: http://{where}:{port}/ "
              f"(API: http://{where}:{port}/docs)", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()
    return 0
