"""``veil prepare``: photos (a group photo, a snapshot) into the folder dataset, and edits pasted back.

    veil prepare --photos holiday/ --out faces --size 64 --attributes smiling,eyeglasses
    veil prepare --photos a.jpg b.png --out faces --csv photo_labels.csv     # photo,face,<attributes>
    veil train-classifier --config classifier32_small --data folder:faces --out guide ...   # docs/data.md
    veil edit ... --data folder:faces --out edits                  # folder:PATH reads PATH/labels.csv
    veil prepare --paste-back --dataset faces --edits edits --out shared    # the photos with the edits in

argparse only at import time; the job (veil.jobs.prepare, scikit-image's face detector) loads in the handler.
"""

from __future__ import annotations

from veil.cli import nonneg_float, positive_int


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_subcommand(sub) -> None:
    p = sub.add_parser("prepare", help="detect and crop the faces of photos into a dataset folder; paste edits back",
                       description="Detect the frontal faces of photos (scikit-image's LBP cascade), crop each "
                                   "into the folder dataset (random file names, labels.csv; the photo and box of "
                                   "each face only in the owner-only DATASET/private/prepare.json); or, with "
                                   "--paste-back, blend released edits back into copies of the photos. "
                                   "docs/prepare.md.")
    p.add_argument("--photos", nargs="+", metavar="PATH", help="photos: files and/or folders of image files")
    p.add_argument("--out", required=True, help="prepare: the new dataset folder (crops, labels.csv, private/); "
                                                "--paste-back: the folder for the pasted-back photos (PNG)")
    p.add_argument("--size", type=int, choices=(32, 64), default=64, help="crop size in pixels: the model's "
                                                                          "resolution (default 64)")
    p.add_argument("--margin", type=nonneg_float, default=0.5,
                   help="room around the face box on each side, in box sides: the crop is (1 + 2 MARGIN) box "
                        "sides wide (default 0.5; the paste-back's feather needs about 0.3 or more)")
    p.add_argument("--min-face", type=positive_int, default=32,
                   help="skip faces whose box is smaller than this many pixels (counted; default 32)")
    p.add_argument("--csv", help="labels per photo: a CSV with columns photo (file name), face (0, 1, ... left to "
                                 "right; empty: every face) and one per attribute (-1/1, 0/1 or empty)")
    p.add_argument("--attributes", type=_names, help="comma-separated attribute columns for labels.csv, left empty "
                                                     "for you to fill in (instead of --csv)")
    back = p.add_argument_group("paste-back")
    back.add_argument("--paste-back", action="store_true", help="blend released edits back into the photos")
    back.add_argument("--dataset", help="the folder `veil prepare --out` wrote")
    back.add_argument("--edits", help="the --out folder of `veil edit` (its revision/) or a revision folder")
    p.set_defaults(func=_prepare)


def _prepare(args) -> int:
    from veil.errors import ConfigError

    if args.paste_back:
        given = [flag for flag, value in (("--photos", args.photos), ("--csv", args.csv),
                                          ("--attributes", args.attributes)) if value]
        if given:
            raise ConfigError(": not with --paste-back (the photos are those the dataset was prepared from)",
                              option=given[0])
        for flag, value in (("--dataset", args.dataset), ("--edits", args.edits)):
            if not value:
                raise ConfigError(": required with --paste-back", option=flag)
        from veil.jobs.prepare import paste_back_lines, run_paste_back

        print("\n".join(paste_back_lines(run_paste_back(dataset=args.dataset, edits=args.edits, out=args.out))))
        return 0
    if not args.photos:
        raise ConfigError(": required (or --paste-back)", option="--photos")
    for flag, value in (("--dataset", args.dataset), ("--edits", args.edits)):
        if value:
            raise ConfigError(": only with --paste-back", option=flag)
    from veil.jobs.prepare import prepare_lines, run_prepare

    summary = run_prepare(photos=args.photos, out=args.out, size=args.size, margin=args.margin,
                          min_face=args.min_face, csv_path=args.csv, attributes=args.attributes)
    print("\n".join(prepare_lines(summary)))
    print(f"next: fill in {args.out}/labels.csv, then name this dataset --data folder:{args.out} in every command "
          f"(veil train-classifier, veil edit, veil privacy; README \"Your own photos\")")
    return 0
