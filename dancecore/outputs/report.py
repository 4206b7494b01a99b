"""``dancecore report OUTPUT_DIR``: one self-contained HTML page about a run.

The page is built from what every run writes (``metrics.jsonl``, ``samples/iter-*.png`` and the
newest checkpoint's ``state.json`` for the config) and needs nothing else to be read: charts are
inline SVG, sample grids are base64 PNGs, there is no external URL, font or script. It shows the
reward (mean with a +/- one std band, and each reward separately), clip fraction, gradient norm,
loss, ratio, seconds per iteration, health counters, and the sample grids over time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dancecore.errors import ReportError
from dancecore.outputs.charts import Series, format_number, is_finite, line_chart

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
MAX_GRIDS = 24  # sample grids embedded at most (evenly spaced, first and last always kept)
MAX_GRID_WIDTH = 960  # pixels; larger grids are downscaled before embedding


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN where there is none)."""
    out, recent = [], []
    for v in values:
        if is_finite(v):
            recent.append(v)
        recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ------------------------------------------------------------------------------------ reading


def load_records(output_dir: Path) -> list[dict[str, Any]]:
    """The metrics records of a run, skipping a torn last line."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{output_dir} has no metrics.jsonl: is it the output_dir of a dancecore run?")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and "iteration" in record:
            records.append(record)
    if not records:
        raise ReportError(f"{path} holds no iteration yet")
    return sorted(records, key=lambda r: r["iteration"])


def sample_grids(output_dir: Path) -> list[tuple[int, Path]]:
    """``samples/iter-NNNNNN.png`` files by iteration."""
    found = []
    for path in (output_dir / "samples").glob("iter-*.png"):
        match = re.fullmatch(r"iter-(\d+)\.png", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_config(output_dir: Path) -> dict[str, Any] | None:
    """The run config saved with the newest committed checkpoint, if any."""
    states = sorted((output_dir / "checkpoints").glob("*/state.json"))
    for path in reversed(states):
        try:
            config = json.loads(path.read_text(encoding="utf-8")).get("config")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(config, dict):
            return config
    return None


def png_data_uri(path: Path, max_width: int = MAX_GRID_WIDTH) -> tuple[str, int]:
    """A PNG as a data: URI, downscaled to ``max_width`` if wider, and the width to show it at
    (small grids of tiny models are enlarged, pixelated, up to 4x)."""
    from PIL import Image

    with Image.open(path) as source:
        image = source.convert("RGB")
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    shown = image.width * max(1, min(4, 640 // max(1, image.width)))
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), shown


def _evenly(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


# ------------------------------------------------------------------------------------ the page


def _column(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) if is_finite(r.get(key)) else math.nan for r in records]


_PHASE_ORDER = ("encode", "rollout", "decode", "reward", "update")


def _phase_keys(records: list[dict[str, Any]]) -> list[str]:
    """The ``time/<phase>_s`` keys present, in the order an iteration runs its phases."""
    keys = {k for r in records for k in r if k.startswith("time/") and k.endswith("_s")}
    rank = {f"time/{p}_s": i for i, p in enumerate(_PHASE_ORDER)}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), k))


def _phase_name(key: str) -> str:
    """``time/rollout_s`` -> ``rollout``."""
    return key.removeprefix("time/").removesuffix("_s")


def _summary(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    rewards = [v for v in _column(records, "reward_mean") if math.isfinite(v)]
    seconds = [v for v in _column(records, "seconds") if math.isfinite(v)]
    tail = rewards[-max(1, len(rewards) // 10) :] if rewards else []
    last = records[-1]
    rows = [("iterations", f"{len(records)} (last: {last['iteration']})")]
    if rewards:
        rows += [
            ("reward, first iteration", format_number(rewards[0])),
            (f"reward, mean of last {len(tail)}", format_number(sum(tail) / len(tail))),
            ("reward, best iteration", format_number(max(rewards))),
        ]
    if seconds:
        rows += [("time", f"{sum(seconds):.1f} s, {sum(seconds) / len(seconds):.3g} s per iteration")]
        shares = []
        for key in _phase_keys(records):
            spent = [v for v in _column(records, key) if math.isfinite(v)]
            shares.append(f"{_phase_name(key)} {100 * sum(spent) / sum(seconds):.0f}%")
        if shares:
            rows.append(("time by phase", ", ".join(shares)))
    for key in ("skipped_updates", "reward_failures"):
        if is_finite(last.get(key)):
            rows.append((key.replace("_", " "), f"{last[key]:g}"))
    return rows


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1320px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px} table.summary td{padding:2px 14px 2px 0;font-size:14px}
.charts{display:flex;flex-wrap:wrap;gap:12px} svg.chart{background:#fff;border:1px solid #e3e3e3;border-radius:4px}
svg .title{font-size:13px;font-weight:600} svg .tick{font-size:10px;fill:#555} svg .label{font-size:11px;fill:#444}
svg .legend{font-size:10px;fill:#333} svg .grid{stroke:#eee} svg .axis{stroke:#999} svg .band{fill:#1f77b4;opacity:.15}
svg .empty{font-size:12px;fill:#999} p.alarm{color:#b00;font-weight:600} figure{margin:0 0 14px} figcaption{font-size:13px;color:#444;margin-bottom:4px}
figure img{image-rendering:pixelated;border:1px solid #ddd;max-width:100%;height:auto}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto;max-height:420px}
"""

_SELF_CHECK = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) loaded++; }
  document.documentElement.setAttribute("data-images-loaded", loaded + "/" + images.length);
  document.documentElement.setAttribute("data-charts", String(document.querySelectorAll("svg.chart").length));
});
"""


def load_eval_history(output_dir: Path) -> list[dict[str, Any]]:
    """The run's periodic held-out evaluations (``eval/history.jsonl``), empty without ``eval:``."""
    path = output_dir / "eval" / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _eval_section(output_dir: Path, its: list[float], mean: list[float], history: list[dict[str, Any]]) -> list[str]:
    """The chart of training reward against the gold (held-out) metrics, alarms, and the eval grids."""
    if not history:
        return []
    esc = html.escape
    gold = sorted({k for h in history for k in h if k.startswith("eval/") and k.count("/") == 1})
    xs = [float(h["iteration"]) for h in history]
    series = [Series("training reward", its, mean, PALETTE[0])] + [
        Series(
            f"held-out {k.removeprefix('eval/')}",
            xs,
            [h.get(k, math.nan) for h in history],
            PALETTE[(i + 3) % len(PALETTE)],
        )
        for i, k in enumerate(gold)
    ]
    parts = [
        "<h2>Held-out evaluation</h2>",
        line_chart("Training reward and held-out (gold) metrics", series, y_label="score"),
    ]
    parts += [f'<p class="alarm">{esc(h["alarm"])}</p>' for h in history if h.get("alarm")]
    for h in _evenly(history, MAX_GRIDS):
        grid = output_dir / "eval" / f"iter-{h['iteration']:06d}" / "grid.png"
        if grid.is_file():
            uri, display_width = png_data_uri(grid)
            label = f"held-out samples after {h['iteration']} iterations"
            parts.append(
                f'<figure><figcaption>{label}</figcaption><img alt="{label}" width="{display_width}" src="{uri}"></figure>'
            )
    return parts


def render(output_dir: Path) -> str:
    """The report page for ``output_dir`` as an HTML string."""
    records = load_records(output_dir)
    its = [float(r["iteration"]) for r in records]
    mean, std = _column(records, "reward_mean"), _column(records, "reward_std")
    band = (its, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)])
    reward_series = [Series("reward (weighted sum)", its, mean, PALETTE[0])]
    if len(records) >= 20:
        window = max(2, len(records) // 20)
        reward_series.append(Series(f"rolling mean ({window})", its, rolling_mean(mean, window), PALETTE[3]))
    per_reward = sorted({k for r in records for k in r if k.startswith("reward/")})
    phases = _phase_keys(records)
    charts = [
        line_chart("Reward: mean over samples, +/- one std", reward_series, band=band, y_label="reward"),
        line_chart(
            "Each reward (mean over samples)",
            [
                Series(k.removeprefix("reward/"), its, _column(records, k), PALETTE[(i + 1) % len(PALETTE)])
                for i, k in enumerate(per_reward)
            ],
            y_label="reward",
        ),
        line_chart(
            "Clip fraction",
            [Series("clip fraction", its, _column(records, "clip_fraction"), PALETTE[1])],
            y_label="fraction",
        ),
        line_chart(
            "Gradient norm (before clipping)",
            [Series("grad norm", its, _column(records, "grad_norm"), PALETTE[2])],
            y_label="norm",
        ),
        line_chart("Policy loss", [Series("loss", its, _column(records, "loss"), PALETTE[4])], y_label="loss"),
        line_chart(
            "Mean ratio (new / old probability)",
            [Series("ratio", its, _column(records, "ratio_mean"), PALETTE[5])],
            y_label="ratio",
        ),
        line_chart(
            "Seconds per iteration",
            [Series("total", its, _column(records, "seconds"), PALETTE[8])]
            + [
                Series(_phase_name(key), its, _column(records, key), PALETTE[i % len(PALETTE)])
                for i, key in enumerate(phases)
            ],
            y_label="s",
        ),
        line_chart(
            "Health counters",
            [
                Series(label, its, _column(records, key), PALETTE[j])
                for j, (key, label) in enumerate(
                    [
                        ("zero_advantage_groups", "zero-advantage groups"),
                        ("dropped_groups", "dropped groups"),
                        ("skipped_updates", "skipped updates (total)"),
                        ("reward_failures", "reward failures (total)"),
                    ]
                )
                if any(key in r for r in records)
            ],
            y_label="count",
        ),
    ]
    esc = html.escape
    grids = sample_grids(output_dir)
    shown = _evenly(grids, MAX_GRIDS)
    figures = []
    for it, path in shown:
        uri, display_width = png_data_uri(path)
        figures.append(
            f"<figure><figcaption>iteration {it}</figcaption>"
            f'<img alt="samples at iteration {it}" width="{display_width}" src="{uri}"></figure>'
        )
    videos = len(list((output_dir / "samples").glob("*.mp4")))
    notes = []
    if len(shown) < len(grids):
        notes.append(f"{len(shown)} of {len(grids)} sample grids shown, evenly spaced.")
    if videos:
        notes.append(f"{videos} video clip(s) in {esc(str(output_dir / 'samples'))} (not embedded).")
    config = newest_config(output_dir)
    summary_rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _summary(records))
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>dancecore report: {esc(output_dir.name)}</title>",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<style>{_STYLE}</style>",
            f"<script>{_SELF_CHECK}</script>",
            "</head><body>",
            f"<h1>dancecore run: {esc(output_dir.name)}</h1>",
            f'<div class="meta">{esc(str(output_dir.resolve()))} &middot; report written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</div>',
            f'<h2>Summary</h2><table class="summary">{summary_rows}</table>',
            '<h2>Curves</h2><div class="charts">' + "".join(charts) + "</div>",
            *_eval_section(output_dir, its, mean, load_eval_history(output_dir)),
            "<h2>Samples over time</h2>",
            "".join(f'<p class="meta">{n}</p>' for n in notes) or "",
            "".join(figures) if figures else '<p class="meta">no sample grid in samples/</p>',
            *(
                ["<h2>Config</h2><pre>" + esc(json.dumps(config, indent=2, sort_keys=True)) + "</pre>"]
                if config
                else []
            ),
            "</body></html>",
        ]
    )


def write_report(output_dir: Path, destination: Path | None = None) -> Path:
    """Write the report of ``output_dir`` (default: ``<output_dir>/report.html``); returns its path."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ReportError(f"no such directory: {output_dir}")
    page = render(output_dir)
    destination = Path(destination) if destination is not None else output_dir / "report.html"
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(destination)
    return destination
