"""``dancecore report``: a self-contained HTML page, checked by parsing and in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dancecore.cli import main
from dancecore.outputs.charts import Series, line_chart, nice_ticks
from dancecore.outputs.report import ReportError, render, write_report

ROOT = Path(__file__).resolve().parent.parent
CHART_COUNT = 8  # charts every report draws


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three iterations of the tiny-FLUX smoke recipe, a sample grid after each."""
    pytest.importorskip("dancecore_flux")
    from dancecore.config.schema import load_run
    from dancecore.training.trainer import Trainer

    out = tmp_path_factory.mktemp("run") / "tiny"
    run = load_run(
        ROOT / "configs" / "smoke.yaml",
        [
            f"output_dir={out}",
            "train.iterations=3",
            "train.sample_every=1",
            "train.prompts_per_iteration=1",
            "optimizer.group_size=4",
            "sampler.num_steps=4",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    assert Trainer(run).train(log=lambda message: None) == "finished"
    return out


def test_report_has_every_chart_and_grid_and_no_external_resource(tiny_run: Path) -> None:
    page = write_report(tiny_run).read_text()
    assert page.count('<svg class="chart"') == CHART_COUNT
    grids = sorted((tiny_run / "samples").glob("iter-*.png"))
    assert len(grids) == 3
    assert page.count('src="data:image/png;base64,') == len(grids)
    for title in ("Reward: mean over samples", "Each reward", "Clip fraction", "Gradient norm", "Samples over time"):
        assert title in page
    # Where the time goes: each phase of the iteration has its line and its share in the summary.
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for phase in ("encode", "rollout", "decode", "reward", "update"):
        assert all(record[f"time/{phase}_s"] > 0 for record in records), phase
        assert f">{phase}</text>" in page, phase
    shares = re.search(r"<td>time by phase</td><td>([^<]*)</td>", page)
    assert shares and [p.split()[0] for p in shares.group(1).split(", ")] == [
        "encode",
        "rollout",
        "decode",
        "reward",
        "update",
    ]
    # Self-contained: every src/href is a data: URI or a fragment; no url(...) and no absolute URL.
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all(ref.startswith(("data:", "#")) for ref in references), references
    assert not re.search(r"url\(|https?://|//cdn|@import", page)


def test_cli_report_writes_the_page_and_rejects_a_non_run(tiny_run: Path, tmp_path: Path, capsys) -> None:
    destination = tmp_path / "elsewhere" / "page.html"
    assert main(["report", str(tiny_run), "-o", str(destination)]) == 0
    assert destination.is_file() and "report written to" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_report_tolerates_nan_torn_lines_and_missing_keys(tmp_path: Path) -> None:
    records = [
        {"iteration": 0, "reward_mean": 0.1, "reward_std": 0.01, "loss": float("nan"), "seconds": 1.0},
        {"iteration": 1, "reward_mean": float("nan"), "reward_std": 0.0, "reward/hps": 0.2},
        {"iteration": 2, "reward_mean": 0.3, "reward_std": 0.02, "clip_fraction": 0.5},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 3, "rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    page = render(tmp_path)
    assert page.count('<svg class="chart"') == CHART_COUNT
    assert "no sample grid" in page
    assert "NaN" not in page and "nan," not in page


def test_report_without_records_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no iteration"):
        render(tmp_path)


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    ticks = nice_ticks(0.013, 0.981)
    assert ticks[0] <= 0.013 and ticks[-1] >= 0.981
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1 and steps.pop() in (0.1, 0.2, 0.25, 0.5)
    assert nice_ticks(2.0, 2.0)[0] < 2.0 < nice_ticks(2.0, 2.0)[-1]


def test_line_chart_breaks_lines_at_nan() -> None:
    svg = line_chart("t", [Series("a", [0, 1, 2, 3, 4], [1.0, 2.0, math.nan, 3.0, 4.0], "#000")])
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 4


# ------------------------------------------------------------------------------ headless Chromium


def _chromium() -> str | None:
    for name in (os.environ.get("DANCECORE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _open_in_chromium(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Load ``page`` headless; return the DOM after load and the page's console messages."""
    browser = _chromium()
    assert browser is not None
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_opens_in_headless_chromium_without_errors(tiny_run: Path, tmp_path: Path) -> None:
    # The check itself must see errors: a page with a script error and a broken image fails it.
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<html><body><script>missingFunction();</script><img src="data:image/png;base64,AAAA">'
        '<script>window.addEventListener("load",function(){var i=document.images[0];'
        'document.documentElement.setAttribute("data-images-loaded",(i.naturalWidth>0?1:0)+"/1")});</script>'
        "</body></html>"
    )
    dom, console = _open_in_chromium(broken, tmp_path / "profile-broken")
    assert any("missingFunction" in line for line in console), console
    assert 'data-images-loaded="0/1"' in dom

    page = write_report(tiny_run)
    dom, console = _open_in_chromium(page, tmp_path / "profile")
    assert console == []
    grids = len(list((tiny_run / "samples").glob("iter-*.png")))
    assert f'data-images-loaded="{grids}/{grids}"' in dom
    assert f'data-charts="{CHART_COUNT}"' in dom


def test_report_shows_held_out_evaluation_and_alarms(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "with-eval"
    shutil.copytree(tiny_run, run)
    history = [
        {"iteration": 0, "eval/gold": 0.5},
        {"iteration": 3, "eval/gold": 0.3, "alarm": "over-optimisation alarm: gold fell"},
    ]
    (run / "eval").mkdir()
    (run / "eval" / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    grid = next((run / "samples").glob("iter-*.png"))
    for h in history:
        (run / "eval" / f"iter-{h['iteration']:06d}").mkdir()
        shutil.copy(grid, run / "eval" / f"iter-{h['iteration']:06d}" / "grid.png")
    page = render(run)
    assert page.count('<svg class="chart"') == CHART_COUNT + 1
    assert "Training reward and held-out (gold) metrics" in page and "held-out gold" in page
    assert '<p class="alarm">over-optimisation alarm: gold fell</p>' in page
    assert "held-out samples after 0 iterations" in page and "held-out samples after 3 iterations" in page
    assert "Held-out evaluation" not in render(tiny_run)  # runs without eval: no section
