"""The ``veil`` command line: one command, one module per subcommand (argparse and a thin handler).

    veil train              --config CONFIG.yaml --out DIR [--set key=value ...] [--resume]   (cli/train.py)
    veil sample             --checkpoint DIR --attributes smiling=1 --out grid.png            (cli/sample.py)
    veil edit               --checkpoint DIR --first 8 --protect eyeglasses --out E           (cli/edit.py)
    veil export             --checkpoint DIR [--classifier CLF] --out X                       (cli/export.py)
    veil train-classifier   --data folder:PHOTOS --out CLF                                    (cli/train_classifier.py)
    veil unlearn            --model CLF --revision REV --out U                                (cli/unlearn.py)
    veil privacy            show --data synthetic:0 | set-budget | set-pixels | set-level | publish-revision (cli/privacy.py)
    veil demo               [--out DIR] [--quick] [--fresh] [--serve]                        (cli/demo.py)
    veil serve              --export X [--host 127.0.0.1] [--port 8000] [--state URL]        (cli/serve.py)
    veil prepare            --photos DIR --out DATASET | --paste-back --dataset D --edits E --out P (cli/prepare.py)

Progress lines and heartbeats go to stderr; other packages' log lines and warnings go to
``$VEIL_HOME/logs/veil-<command>-<time>-<pid>.log`` instead of the terminal (``veil.console``).

Every command names its data with ``--data SPEC`` (``veil.data_arg``): folder:PATH[,csv=FILE], celeba:PATH,
synthetic[:SEED], or a revision folder (docs/data.md). ``veil <cmd> --help`` documents every option. How ``main`` ends:

- 0: done; 2: the user's input is wrong (argparse, or a ``VeilError``: one line naming the option);
- 2 also when a command needs the ``train`` extra (torch, Lightning, ...) on a base install: one line
  saying ``pip install 'veil[train]'``; ``veil serve`` and ``veil privacy`` need none of it;
- 130: interrupted (Ctrl-C), one line, no traceback;
- 1: anything else, a bug: one line saying what failed and where its traceback was logged
  (``$VEIL_HOME/logs/veil-<time>-<pid>.log``); ``VEIL_DEBUG=1`` prints the traceback instead.

The argument types below (``positive_int``, ``nonneg_float``, ...) refuse NaN, infinities and
out-of-range numbers while parsing, so a bad number is an argparse error (exit 2) naming its flag,
before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

from veil.errors import VeilError

# The import names of the `train` extra (pyproject.toml): a command that needs one on a base install (the
# torch-free server and ledger: `pip install veil`) exits 2 with one line saying to install veil[train].
TRAIN_MODULES = frozenset({"torch", "lightning", "diffusers", "opacus", "triton", "safetensors", "onnx",
                           "onnxscript", "matplotlib", "einops", "einconv", "linear_operator", "opt_einsum",
                           "skimage"})
DESCRIPTION = "veil: private attribute editing of face datasets, with DP training and feature unlearning."
EPILOG = """\
workflow:
  veil demo                           the whole loop on the embedded faces, ending in runs/demo/report.html
  veil train --config synthetic32 --out runs/dp32
                                      DP diffusion model on a dataset (prints epsilon)
  veil sample --checkpoint runs/dp32 --attributes smiling=1 --out grid.png
                                      look at what it draws
  veil edit --checkpoint runs/dp32 --classifier runs/clf --classifier-scale 0 --first 8 --protect eyeglasses --out edits
                                      private edits of the dataset's images, checked: a revision
  veil export --checkpoint runs/dp32 --classifier runs/clf --classifier-scale 0 --out exports/dp32
                                      the editor on ONNX Runtime (veil edit --runtime ort, the server)
  veil serve --export exports/dp32    preview, adjust and accept private edits over HTTP (OpenAPI at /docs)
  veil privacy show --data synthetic:0
                                      everything spent on that dataset, and what is left
  veil train-classifier ... / veil unlearn --model runs/clf --revision edits/revision --out runs/unl
                                      update a classifier trained on the originals to the revision

'veil COMMAND --help' documents every option. Exit status: 0 done, 2 bad input (one line naming
it), 130 interrupted, 1 internal error (the traceback is logged; VEIL_DEBUG=1 prints it).
"""


# ------------------------------------------------------------------ argument types (exit 2 naming the flag)
def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    return _number(text, float)


def _at_least(kind: type, low: float, *, strict: bool = False, doc: str):
    """An argument type: a finite ``kind`` >= ``low`` (> ``low`` when ``strict``)."""
    sign = ">" if strict else ">="

    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {sign} {low}, got {text!r}")
        return value

    check.__doc__ = doc
    return check


nonneg_float = _at_least(float, 0, doc="A finite float >= 0.")
positive_float = _at_least(float, 0, strict=True, doc="A finite float > 0.")
nonneg_int = _at_least(int, 0, doc="A whole number >= 0 (seeds).")
positive_int = _at_least(int, 1, doc="A whole number >= 1 (counts, steps, iterations).")


def epsilon_or_budget(text: str) -> float:
    """A number >= 0 or inf: an epsilon (0 = fair coin, inf = keep every value) or a budget (inf = unlimited)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or inf, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 or inf, got {text!r}")
    return value


# ------------------------------------------------------------------ the parser and main
class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage dump): ``veil CMD: error: ... (see veil CMD --help)``,
    exit status 2. Subcommand parsers inherit it (``add_subparsers`` uses the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="veil", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from veil.cli import (  # argparse only: torch loads in handlers
        demo,
        edit,
        export,
        prepare,
        privacy,
        sample,
        serve,
        train,
        train_classifier,
        unlearn,
    )

    for command in (demo, prepare, train, sample, edit, export, serve, train_classifier, unlearn, privacy):  # --help order
        command.add_subcommand(sub)
    return parser


def log_internal_error(command: str, argv: list[str]) -> Path | None:
    """Write the traceback being handled to ``$VEIL_HOME/logs/veil-<time>-<pid>.log``; its path (None if unwritable)."""
    from veil.privacy.ledger import veil_home

    path = veil_home() / "logs" / f"veil-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"veil {command}: arguments {argv!r}\n{traceback.format_exc()}")
    except OSError:
        return None
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad arguments: one line, SystemExit(2)
    try:
        if args.command == "serve":  # a server: uvicorn's access log is its output
            return args.func(args)
        from veil import console

        with console.command(args.command):  # progress on stderr; other packages' noise to the log file
            return args.func(args)
    except VeilError as exc:
        print(f"veil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"veil {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place internal errors are reported
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").partition(".")[0] in TRAIN_MODULES:
            print(f"veil {args.command}: error: this command needs the training dependencies ({exc.name} is not "
                  f"installed): pip install 'veil[train]'", file=sys.stderr)
            return 2
        if os.environ.get("VEIL_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
            return 1
        log = log_internal_error(args.command, sys.argv[1:] if argv is None else list(argv))
        where = f"traceback in {log}" if log else "the traceback could not be logged"
        print(f"veil {args.command}: internal error: {type(exc).__name__}: {_first_line(exc)} ({where}; "
              f"rerun with VEIL_DEBUG=1 to print it; please report it)", file=sys.stderr)
        return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else "(no message)"


if __name__ == "__main__":
    sys.exit(main())
