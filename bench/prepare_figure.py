"""docs/prepare_astronaut.png: scikit-image's astronaut photo through `veil prepare`, `veil edit` and the paste-back.

    python bench/prepare_figure.py [--out docs/prepare_astronaut.png]     # about 1 minute on a 2-core CPU

Runs the real commands in a temporary folder (its own VEIL_HOME, so no ledger of yours is touched):
`veil prepare --size 32` with the six synthetic-face attributes from a CSV, `veil edit` with the demo's shipped
models (the public label-free UNet and the DP guide, both trained on procedural synthetic faces only) at level
max protecting smiling, unchecked, then `veil prepare --paste-back`. Panels: the photo with the detected box
and the crop square, the 32 px crop, the released edit, the pasted-back photo. The edit's pixels differ from run
to run: a level-max edit regenerates from fresh noise drawn from the OS (secret, never seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "veil/demo/models"
ATTRIBUTES = ["smiling", "eyeglasses", "hat", "dark_hair", "beard", "pale_skin"]
PANEL = 320


def _run(work: Path) -> tuple[dict, Path, Path, Path]:
    from veil.cli import main

    (work / "photos").mkdir()
    Image.fromarray(data.astronaut()).save(work / "photos/astronaut.png")
    (work / "labels.csv").write_text(f"photo,{','.join(ATTRIBUTES)}\nastronaut.png,1,-1,-1,-1,-1,1\n")
    ds, edits, shared = work / "faces", work / "edits", work / "shared"
    assert main(["prepare", "--photos", str(work / "photos"), "--out", str(ds), "--size", "32",
                 "--csv", str(work / "labels.csv")]) == 0
    assert main(["edit", "--checkpoint", str(MODELS / "public_unet"), "--classifier", str(MODELS / "guide"),
                 "--data", "folder", "--root", str(ds), "--csv", str(ds / "labels.csv"), "--resolution", "32",
                 "--first", "1", "--protect", "smiling", "--level", "max", "--no-check", "--seed", "3",
                 "--out", str(edits)]) == 0
    assert main(["prepare", "--paste-back", "--dataset", str(ds), "--edits", str(edits), "--out", str(shared)]) == 0
    face = json.loads((ds / "private/prepare.json").read_text())["photos"][0]["faces"][0]
    change = json.loads((edits / "revision/manifest.json").read_text())["changes"][0]
    return face, ds / face["id"], edits / "revision" / change["file"], shared / "astronaut.png"


def _panel(image: Image.Image, title: str) -> Image.Image:
    tile = Image.new("RGB", (PANEL, PANEL + 28), "white")
    tile.paste(image.resize((PANEL, PANEL), Image.Resampling.NEAREST if image.width < 100 else
                            Image.Resampling.LANCZOS), (0, 28))
    ImageDraw.Draw(tile).text((6, 8), title, fill="black")
    return tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs/prepare_astronaut.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VEIL_HOME"] = str(Path(tmp) / "veil_home")
        face, crop, edit, pasted = _run(Path(tmp))
        photo = Image.fromarray(data.astronaut())
        draw = ImageDraw.Draw(photo)
        left, top, w, h = face["box"]
        draw.rectangle([left, top, left + w, top + h], outline=(255, 0, 0), width=3)
        sl, st, side = face["square"]
        draw.rectangle([sl, st, sl + side, st + side], outline=(255, 255, 0), width=2)
        panels = [_panel(photo, "photo: box (red), crop square (yellow)"), _panel(Image.open(crop), "crop, 32 px"),
                  _panel(Image.open(edit), "released edit (level max)"), _panel(Image.open(pasted), "pasted back")]
        sheet = Image.new("RGB", (PANEL * 4 + 30, PANEL + 28), "white")
        for k, p in enumerate(panels):
            sheet.paste(p, (k * (PANEL + 10), 0))
        sheet.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
