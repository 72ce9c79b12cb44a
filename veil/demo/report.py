"""The end of `veil demo`: the summary table it prints and the offline `report.html` it writes.

Both read the `report.json` dict the demo pipeline writes (format "veil-demo-report/1"):

    rows = summary_rows(report)         # [(stage, what, value)], the key numbers, formatted
    print(summary_table(report))        # the same as a fixed-width text table
    path = write_html(report, out_dir)  # out_dir / "report.html"

The HTML is one self-contained file: CSS in the head, images and matplotlib plots embedded as
base64 PNG data URLs, no JavaScript, nothing fetched from elsewhere, so it opens offline. Numbers
may be None ("n/a") or the string "inf" (strict JSON has no infinity; shown as "∞"); every string
from the report is escaped; an absent stage (an interrupted demo) is named as missing.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veil.errors import DataError

STAGES = ("models", "edits", "unlearning", "export", "serve")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: .2rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figcaption { font-size: 13px; color: #555; }
img { max-width: 100%; height: auto; } .meta, .missing { color: #666; } .missing { font-style: italic; }
pre { background: #f6f6f6; padding: .6rem; overflow-x: auto; }
"""
_INTRO = (
    "veil lets the owner of a face-image dataset share it, and publish models trained on it, without "
    "giving away the attributes they choose to protect. Each protected attribute of an image is "
    "rewritten by randomized response at a privacy level the owner picks, and the image is regenerated "
    "to show the released values by diffusion models trained with differential privacy (DP-SGD); "
    "a classifier already trained on the originals is then updated to the edited data by unlearning "
    "instead of retraining, the edit sampler is exported to ONNX Runtime, and the edit sessions are "
    "served over HTTP. This demo ran each of these on the embedded synthetic faces."
)


# ---------------------------------------------------------------------------------------------
# Numbers: None, "inf" and non-finite floats never crash a formatter.


def _num(value: Any) -> float | None:
    """A float (math.inf for "inf"), or None for None, NaN, booleans and anything non-numeric."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "+inf", "infinity"):
            return math.inf
        if value.strip().lower() in ("-inf", "-infinity"):
            return -math.inf
        return None
    if isinstance(value, (int, float)) and not math.isnan(value):
        return float(value)
    return None


def _fmt(value: Any, spec: str = "{:.3g}") -> str:
    """`value` formatted with `spec`; "∞" for infinity, "n/a" for None/NaN, yes/no for booleans."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    x = _num(value)
    if x is None:
        return "n/a" if value is None or not isinstance(value, str) else value
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return spec.format(x)


def _pct(value: Any) -> str:
    return _fmt(value, "{:.1%}")


def _secs(value: Any) -> str:
    x = _num(value)
    if x is None or math.isinf(x) or x < 60:
        return _fmt(value, "{:.1f} s")
    whole = round(x)  # rounded once, so 59.6 s is "1 min 00 s", not "0 min 60 s"
    return f"{whole // 60} min {whole % 60:02d} s"


def _times(value: Any) -> str:
    return _fmt(value, "{:.3g}×")


def _ms(value: Any) -> str:
    return _fmt(value, "{:.1f} ms")


def _int(value: Any) -> str:
    return _fmt(value, "{:,.0f}")


def _stage(report: dict, name: str) -> dict | None:
    stage = report.get("stages", {}).get(name)
    return stage if isinstance(stage, dict) else None


def _check(report: Any) -> dict:
    """The report, checked to be the report.json dict (a boundary: it comes from a file)."""
    if not isinstance(report, dict) or not isinstance(report.get("stages", {}), dict):
        raise DataError(
            "the demo report must be the dict in report.json with a 'stages' dict; "
            "load it with json.load(open(DIR / 'report.json'))"
        )
    return report


def missing_stages(report: dict) -> list[str]:
    """The stages absent from the report, in pipeline order (an interrupted demo)."""
    return [name for name in STAGES if _stage(_check(report), name) is None]


# ---------------------------------------------------------------------------------------------
# The summary: one row per key number.


def _stage_rows(name: str, s: dict) -> list[tuple[str, str]]:
    """The (what, value) key numbers of one stage."""
    if name == "models":
        rows = [(f"{m.get('name', '?')} epsilon", _fmt(m.get("epsilon"))) for m in s.get("models") or []]
        account = s.get("dataset_account") or {}
        return rows + [("private data, all runs: epsilon", _fmt(account.get("epsilon")))]
    if name == "edits":
        from veil.demo.report_edits import edits_rows

        return edits_rows(s)
    if name == "unlearning":
        acc = s.get("test_accuracy") or {}
        return [
            ("update speed-up over retraining", _times(s.get("speedup"))),
            ("test accuracy updated / retrained", f"{_pct(acc.get('updated'))} / {_pct(acc.get('retrained'))}"),
            ("feature probe: original / updated / retrained",
             " / ".join(_probe(s, k) for k in _UNLEARNING_MODELS) + f" (n={_int(s.get('feature_probe_samples'))})"),
        ]
    if name == "export":
        lat = s.get("latency_ms") or {}
        return [
            ("ORT vs PyTorch max abs error (tol)", f"{_fmt(s.get('parity_max_abs_error'), '{:.2g}')} ({_fmt(s.get('tolerance'), '{:.2g}')})"),
            ("p50 latency ORT / PyTorch", f"{_ms(lat.get('ort_p50'))} / {_ms(lat.get('torch_p50'))}"),
            ("ORT speed-up", _times(s.get("speedup"))),
        ]
    return [
        ("session over HTTP", "ok" if s.get("ok") is True else "failed" if s.get("ok") is False else "n/a"),
        ("decision / release id", f"{_fmt(s.get('decision'))} / {_fmt(s.get('release_id'), '{:.0f}')}"),
    ]


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(stage, what, value) for the key numbers of each stage, formatted; a missing stage is one row."""
    report = _check(report)
    rows = [("demo", "total time", _secs(report.get("seconds")))]
    for name in STAGES:
        stage = _stage(report, name)
        if stage is None:
            rows.append((name, "status", "missing (the demo stopped before it)"))
            continue
        rows += [(name, what, value) for what, value in _stage_rows(name, stage)]
    return rows


def summary_table(report: dict) -> str:
    """summary_rows as a fixed-width text table for the terminal (plain text, no colours)."""
    rows = [("stage", "what", "value")] + summary_rows(report)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML pieces. Every string that came from the report goes through _e.


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A small table; a cell that starts with a digit, "n/a" or "∞" is right-aligned as a number."""
    def cell(text: str) -> str:
        numeric = text[:1].isdigit() or text[:1] in "-∞" or text == "n/a"
        return f'<td class="num">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>"
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(str(c)) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(pairs: list[tuple[str, str]]) -> str:
    return _table(["", "value"], [list(p) for p in pairs])


def _figure(data_url: str | None, caption: str, note: str = "") -> str:
    img = f'<img src="{data_url}" alt="{_e(caption)}">' if data_url else f'<p class="missing">{_e(note)}</p>'
    return f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>"


def _image(out_dir: Path, name: Any, caption: str) -> str:
    """An image file of the demo folder, embedded; a short note if it is missing (or outside it)."""
    path = (out_dir / str(name)).resolve() if name else None
    if path is None or not path.is_relative_to(out_dir.resolve()) or not path.is_file():
        return _figure(None, caption, f"(image missing: {name})")
    mime = _MIME.get(path.suffix.lower(), "image/png")
    return _figure(f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii"), caption)


def _bars(title: str, groups: list[str], series: dict[str, list[Any]], *, ylabel: str,
          label: Callable[[Any], str], ylim: tuple[float, float] | None = None,
          errors: dict[str, list[Any]] | None = None) -> str | None:
    """Grouped bars (one colour per series) as a PNG data URL; None values draw as "n/a" at 0. ``errors``:
    per series, an interval [low, high] per bar (drawn as an error bar; None or malformed: none)."""
    if not groups or all(_num(v) is None for values in series.values() for v in values):
        return None
    # A bare Figure, not pyplot: no global state, no display; savefig renders PNG with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        heights = [_num(v) if _num(v) is not None and math.isfinite(_num(v)) else 0.0 for v in values]
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        yerr = _yerr(heights, (errors or {}).get(name))
        bars = ax.bar(xs, heights, width, label=name, yerr=yerr, capsize=3 if yerr is not None else 0)
        ax.bar_label(bars, labels=[label(v) for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    if ylim:
        ax.set_ylim(*ylim)
    else:
        ax.margins(y=0.15)
    if len(series) > 1:
        fig.legend(fontsize=8, loc="outside lower center", ncols=len(series))  # below: never over a bar
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _yerr(heights: list[float], intervals: list[Any] | None) -> list[list[float]] | None:
    """[[below...], [above...]] of each bar's interval around its height (0 where it has none)."""
    if not intervals:
        return None
    below, above = [], []
    for h, iv in zip(heights, list(intervals) + [None] * len(heights)):
        lo, hi = (_num(iv[0]), _num(iv[1])) if isinstance(iv, (list, tuple)) and len(iv) == 2 else (None, None)
        ok = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi) and lo <= h <= hi
        below.append(h - lo if ok else 0.0)
        above.append(hi - h if ok else 0.0)
    return [below, above]


# ---------------------------------------------------------------------------------------------
# One section per stage.


def _models_html(s: dict, out_dir: Path) -> str:
    rows = [[m.get("name"), m.get("role"), m.get("data"), _fmt(bool(m.get("private"))),
             _fmt(m.get("epsilon")), _fmt(m.get("delta")), _int(m.get("params")), m.get("source")]
            for m in s.get("models") or []]
    table = _table(["model", "role", "trained on", "private data", "epsilon", "delta", "parameters", "source"], rows)
    commands = "".join(f"<li>{_e(m.get('name'))}: <code>{_e(m.get('command'))}</code></li>"
                       for m in s.get("models") or [] if m.get("command"))
    a = s.get("dataset_account") or {}
    account = _kv([("epsilon over all runs on the private data", _fmt(a.get("epsilon"))),
                   ("delta", _fmt(a.get("delta"))), ("runs", _int(a.get("runs")))])
    shipped = "shipped with veil (not retrained)" if s.get("shipped") else "trained in this run"
    return (f"<p>Models: {_e(shipped)}.</p>{table}"
            + (f"<p>How each was trained:</p><ul>{commands}</ul>" if commands else "")
            + f"<h3>The private dataset's account</h3>{account}<p>{_e(a.get('note', ''))}</p>")


def _edits_html(s: dict, out_dir: Path) -> str:
    from veil.demo.report_edits import edits_html  # (it imports this module's helpers)

    return edits_html(s, out_dir)


_UNLEARNING_MODELS = ("original", "updated", "retrained")


def _probe_ci(s: dict, model: str) -> list | None:
    """The unlearning stage's Wilson 95% interval [lo, hi] of ``model``'s feature probe, or None."""
    ci = (s.get("feature_probe_ci95") or {}).get(model)
    return ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else None


def _probe(s: dict, model: str) -> str:
    """ "28.2% [20.1%, 37.9%]": ``model``'s feature probe of the original value and its 95% interval."""
    ci = _probe_ci(s, model)
    return _pct((s.get("feature_probe") or {}).get(model)) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _unlearning_html(s: dict, out_dir: Path) -> str:
    acc, probe = s.get("test_accuracy") or {}, s.get("feature_probe") or {}
    models = list(_UNLEARNING_MODELS)
    plot = _bars("Unlearning: accuracy and what the features still hold", models,
                 {"test accuracy": [acc.get(k) for k in models], "feature probe": [probe.get(k) for k in models]},
                 ylabel="accuracy", label=_pct, ylim=(0.0, 1.1),
                 errors={"feature probe": [_probe_ci(s, k) for k in models]})
    n = _int(s.get("feature_probe_samples"))
    caption = (f"Test accuracy, and the feature probe: a linear probe of each flipped protected attribute, fit on "
               f"the model's penultimate features of the test images, read on the {n} flipped (changed sample, "
               f"attribute) entries of the {_int(s.get('changed'))} changed samples: how often it says the original "
               f"value (lower is better; the retrained model never saw it), with its Wilson 95% interval. The "
               f"update took {_secs(s.get('update_seconds'))}, retraining {_secs(s.get('retrain_seconds'))}: "
               f"{_times(s.get('speedup'))} faster.")
    facts = _kv([("changed samples", _int(s.get("changed"))), ("method", _fmt(s.get("method"))),
                 ("update", _secs(s.get("update_seconds"))), ("retraining", _secs(s.get("retrain_seconds"))),
                 ("speed-up", _times(s.get("speedup"))), ("feature probe read on (n)", n)])
    table = _table(["model", "test accuracy", "feature probe [95%]"],
                   [[k, _pct(acc.get(k)), _probe(s, k)] for k in models])
    return facts + _figure(plot, caption, "(no accuracies recorded)") + table


def _export_html(s: dict, out_dir: Path) -> str:
    lat = s.get("latency_ms") or {}
    plot = _bars("Median latency (p50)", ["ONNX Runtime", "PyTorch"],
                 {"p50": [lat.get("ort_p50"), lat.get("torch_p50")]}, ylabel="ms", label=_ms)
    facts = _kv([("max abs error, ONNX Runtime vs PyTorch", _fmt(s.get("parity_max_abs_error"), "{:.2g}")),
                 ("tolerance", _fmt(s.get("tolerance"), "{:.2g}")), ("provider", _fmt(s.get("provider"))),
                 ("p50 ONNX Runtime", _ms(lat.get("ort_p50"))), ("p50 PyTorch", _ms(lat.get("torch_p50"))),
                 ("speed-up", _times(s.get("speedup")))])
    return facts + _figure(plot, f"Median latency; ONNX Runtime is {_times(s.get('speedup'))} as fast.", "(no latencies)")


def _serve_html(s: dict, out_dir: Path) -> str:
    ok = "ok" if s.get("ok") is True else "failed" if s.get("ok") is False else "n/a"
    return _kv([("session over HTTP", ok), ("decision", _fmt(s.get("decision"))),
                ("release id", _fmt(s.get("release_id"), "{:.0f}")), ("preview events streamed", _int(s.get("preview_events")))])


_SECTIONS = {"models": ("Models and their privacy", _models_html), "edits": ("Private edits", _edits_html),
             "unlearning": ("Unlearning", _unlearning_html), "export": ("ONNX export", _export_html),
             "serve": ("Serving", _serve_html)}


def _section(name: str, stage: dict | None, out_dir: Path) -> str:
    title, body = _SECTIONS[name]
    if stage is None:
        return f'<h2 id="{name}">{_e(title)}</h2><p class="missing">Stage "{name}" is missing: the demo stopped before it.</p>'
    return (f'<h2 id="{name}">{_e(title)}</h2><p><strong>{_e(stage.get("proves", ""))}</strong> '
            f'<span class="meta">({_e(_secs(stage.get("seconds")))})</span></p>' + body(stage, out_dir))


# the serve stage's next steps (veil.demo.stages.next_commands), each a command valid as printed
_NEXT_STEPS = (("command", "To open the interactive page yourself"),
               ("serve_command", "Or serve the export on the demo's ledger by hand (upload faces)"),
               ("account_command", "The demo's privacy account"))


def write_html(report: dict, out_dir: str | Path) -> Path:
    """Write out_dir / "report.html" (self-contained, readable offline) and return its path."""
    report, out_dir = _check(report), Path(out_dir)
    missing = missing_stages(report)
    meta = (f"Created {_e(report.get('created', 'n/a'))} on {_e(report.get('machine', 'n/a'))}; "
            f"took {_e(_secs(report.get('seconds')))}" + ("; quick run" if report.get("quick") else "")
            + f"; format {_e(report.get('format', 'n/a'))}.")
    gone = (f'<p class="missing">Missing stages (the demo was interrupted): {_e(", ".join(missing))}.</p>'
            if missing else "")
    summary = _table(["stage", "what", "value"], [list(r) for r in summary_rows(report)])
    sections = "".join(_section(name, _stage(report, name), out_dir) for name in STAGES)
    serve = _stage(report, "serve") or {}
    steps = [(what, serve.get(key)) for key, what in _NEXT_STEPS if serve.get(key)]
    command = "".join(f"<p>{_e(what)}:</p><pre><code>{_e(cmd)}</code></pre>" for what, cmd in steps)
    closing = ("<h2>What is protected and what is not</h2><p>In short: the models' weights are DP with "
               "respect to one training image; every release is priced in both channels a recipient gets, the "
               "labels (randomized response: epsilon-local DP for the protected values) and the pixels (0 when "
               "the image is not read, a Gaussian mechanism for a noise encoding, no bound for DDIM inversion, "
               "which a dataset whose pixels are protected refuses), and every record's releases are composed "
               "into one (epsilon, delta) that the dataset's budget limits (the table per record above). The "
               "attacker numbers are measurements, with their 95% intervals, not proofs; unlearning is not a "
               "privacy guarantee. The full list, and where each guarantee stops, is in README.md, section "
               "\"What is protected and what is not\".</p>" + command)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>veil demo report</title><style>{_CSS}</style></head><body>"
            f'<h1>veil demo report</h1><p class="meta">{meta}</p><p>{_e(_INTRO)}</p>{gone}'
            f"<h2>Summary</h2>{summary}{sections}{closing}</body></html>\n")
    path = out_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
