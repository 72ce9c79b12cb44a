"""The ``veil`` command line: one command, one module per subcommand (argparse and a thin handler).

    veil train              --config CONFIG.yaml --out DIR [--set key=value ...] [--resume]   (cli/train.py)
    veil sample             --checkpoint DIR --attributes smiling=1 --out grid.png            (cli/sample.py)
    veil edit               --checkpoint DIR --first 8 --protect eyeglasses --out E           (cli/edit.py)
    veil train-classifier   --data source=synthetic --out CLF                                 (cli/train_classifier.py)
    veil unlearn            --model CLF --revision REV --out U                                (cli/unlearn.py)
    veil privacy            show --data source=synthetic,seed=0 | set-budget | publish-revision (cli/privacy.py)

``veil <cmd> --help`` documents every option. Errors of the user's making (bad config, missing
files) print one line naming the option and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys

from veil.errors import VeilError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from veil.cli import (  # argparse only: torch loads in handlers
        edit,
        privacy,
        sample,
        train,
        train_classifier,
        unlearn,
    )

    for command in (train, sample, edit, train_classifier, unlearn, privacy):  # in --help order
        command.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VeilError as exc:
        print(f"veil {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
