"""What a command shows on the terminal: progress on stderr, and no third-party noise.

    with console.command("export"):                      # veil.cli.main, once around each command
        with console.stage("tracing the denoise step"):  # a job, around each step that can take long
            ...
        for item in console.bar(items, desc="sampling"):  # a tqdm bar, on a terminal only

Progress. ``stage`` prints ``veil CMD: LABEL ...`` when it starts; a heartbeat line follows after every
``HEARTBEAT_SECONDS`` without output (``veil CMD: LABEL ... 20 s``; outside any stage ``working ... 20 s``),
on stderr, terminal or not (a line every 10 s is cheap), so no command is silent for long and stdout keeps
only what tests and scripts parse. ``bar`` is a tqdm bar on stderr when stderr is a terminal, and the
plain iterable otherwise. Outside ``command`` (library use, tests calling a job) both are silent.

Noise. Inside ``command``, log records and warnings of other packages (Lightning's "GPU available" /
"TPU available" lines and its "Tip" advertising, the ONNX exporter's "torchvision is not installed",
deprecation warnings, Opacus' RDP order warning, ...) do not reach the terminal: they go to the command's
log file, ``$VEIL_HOME/logs/veil-CMD-<time>-<pid>.log``, written only when there is something to keep.
veil's own log records and warnings stay on stderr; ``VEIL_DEBUG=1`` shows everything as before. This is
the one place where third-party output is silenced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["command", "stage", "bar", "say", "HEARTBEAT_SECONDS"]

HEARTBEAT_SECONDS = 10.0
_VEIL_DIR = str(Path(__file__).resolve().parent)


class _Command:
    """The running command: its name, its open stages, the captured third-party output."""

    def __init__(self, name: str, every: float):
        self.name, self.every = name, every
        self.stages: list[tuple[str, float]] = []  # (label, start), innermost last
        self.captured: list[str] = []
        self.lock = threading.Lock()
        self.started = self.last_line = time.monotonic()
        self.log_path: Path | None = None

    def say(self, text: str) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0":
            return  # a DDP rank other than 0 re-runs the command: rank 0 alone reports
        with self.lock:
            print(f"veil {self.name}: {text}", file=sys.stderr, flush=True)
            self.last_line = time.monotonic()

    def beat(self, stop: threading.Event) -> None:
        """The heartbeat thread: a line when nothing was printed for ``every`` seconds (the innermost stage's
        label, or "working" outside any stage: a command no job marks up still shows it is alive)."""
        while not stop.wait(min(1.0, self.every / 4)):
            with self.lock:
                quiet_for = time.monotonic() - self.last_line
                label, start = self.stages[-1] if self.stages else ("working", self.started)
            if quiet_for >= self.every:
                self.say(f"{label} ... {time.monotonic() - start:.0f} s")


_current: _Command | None = None


def say(text: str) -> None:
    """One progress line on stderr (``veil CMD: text``) under ``command``; nothing otherwise."""
    if _current is not None:
        _current.say(text)


@contextlib.contextmanager
def stage(label: str):
    """A step that can take long: announced, then a heartbeat every ``HEARTBEAT_SECONDS`` while it runs."""
    cmd = _current
    if cmd is None:
        yield
        return
    cmd.say(f"{label} ...")
    with cmd.lock:
        cmd.stages.append((label, time.monotonic()))
    try:
        yield
    finally:
        with cmd.lock:
            cmd.stages.pop()


def bar(iterable, *, desc: str, total: int | None = None):
    """``iterable`` with a tqdm bar on stderr when it is a terminal (under ``command``); as is otherwise."""
    if _current is None or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"veil {_current.name}: {desc}", total=total, file=sys.stderr, leave=False)


@contextlib.contextmanager
def command(name: str, *, every: float = HEARTBEAT_SECONDS, capture: bool | None = None):
    """Run a command with progress on and third-party output captured (``capture``: default unless VEIL_DEBUG)."""
    global _current
    if capture is None:
        capture = os.environ.get("VEIL_DEBUG", "") in ("", "0")
    previous, cmd = _current, _Command(name, every)
    stop = threading.Event()
    beat = threading.Thread(target=cmd.beat, args=(stop,), name="veil-heartbeat", daemon=True)
    _current = cmd
    beat.start()
    try:
        with _captured(cmd) if capture else contextlib.nullcontext():
            yield cmd
    finally:
        stop.set()
        beat.join()
        _current = previous
        _write_log(cmd)


# ------------------------------------------------------------------ third-party output -> the log file
class _Keep(logging.Handler):
    """Keeps every record of another package as a formatted line; passes veil's own on to stderr."""

    def __init__(self, cmd: _Command):
        super().__init__(logging.NOTSET)
        self.cmd = cmd
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.own = logging.StreamHandler(sys.stderr)
        self.own.setLevel(logging.WARNING)  # what Python's last-resort handler showed of veil's loggers

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "veil" or record.name.startswith("veil."):
            if record.levelno >= self.own.level:
                self.own.handle(record)
            return
        with contextlib.suppress(Exception):
            self.cmd.captured.append(self.format(record))


def _to_terminal(logger: logging.Logger, handler: logging.Handler) -> bool:
    """A plain stream handler (the terminal; not a file) on another package's logger (``import lightning`` adds
    one; the stream it holds may be an earlier ``sys.stderr``) or on the root (Opacus calls ``basicConfig``)."""
    return not logger.name.startswith("veil") and type(handler) is logging.StreamHandler


@contextlib.contextmanager
def _captured(cmd: _Command):
    """Other packages' log records and warnings go to ``cmd.captured`` for the command's duration."""
    root, keep = logging.getLogger(), _Keep(cmd)
    moved = []  # (logger, handler, propagate): taken off for the command, put back after it

    def take_off(logger, handler):
        moved.append((logger, handler, logger.propagate))
        logger.propagate = True  # its records reach the root, where _Keep keeps them (and only _Keep shows)

    for logger in [root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]:
        for h in [h for h in logger.handlers if _to_terminal(logger, h)]:
            logger.removeHandler(h)
            take_off(logger, h)
    add_handler = logging.Logger.addHandler

    def deferred_add(logger, handler):  # packages imported during the command (``import lightning`` adds one)
        take_off(logger, handler) if _to_terminal(logger, handler) else add_handler(logger, handler)

    logging.Logger.addHandler = deferred_add
    root.addHandler(keep)
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_VEIL_DIR) or getattr(category, "__module__", "").startswith("veil"):
            show(message, category, filename, lineno, file, line)  # veil's own warnings stay visible
        else:
            cmd.captured.append(f"warning {category.__name__} {filename}:{lineno}: {message}")

    try:
        with warnings.catch_warnings():
            warnings.showwarning = showwarning
            yield
    finally:
        logging.Logger.addHandler = add_handler
        root.removeHandler(keep)
        for logger, h, propagate in moved:
            logger.addHandler(h)
            logger.propagate = propagate


def _write_log(cmd: _Command) -> None:
    if not cmd.captured:
        return
    from veil.privacy.ledger import veil_home

    path = veil_home() / "logs" / f"veil-{cmd.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"veil {cmd.name}: messages of other packages (not shown on the terminal)\n")
            f.writelines(line + "\n" for line in cmd.captured)
        cmd.log_path = path
