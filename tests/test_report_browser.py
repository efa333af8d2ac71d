"""report.html and ablation.html opened in headless Chromium as a reader would: at 1400 px and at a
phone's 400 px every image loads, no console error, the page does not overflow sideways, a screenshot
is written; and every figure's plotting area is a reasonable part of its image (not a sliver)."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caphuman_bench.report.figures import AXES_FACE
from caphuman_bench.stages.report import aggregate_run, aggregate_runs, find_runs, write_ablation, write_html
from tests.browser import Browser, chromium_path
from tests.report_helpers import make_run, smoke_like_values

# CAPHUMAN_BENCH_SCREENSHOTS=DIR keeps the whole pages' screenshots there, to be looked at.
SCREENSHOTS = Path(os.environ["CAPHUMAN_BENCH_SCREENSHOTS"]) if os.environ.get("CAPHUMAN_BENCH_SCREENSHOTS") else None

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="chromium is not installed and could not be (.ci/run runs apt-get install -y chromium)")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = tmp_path_factory.mktemp("pages")
    runs = root / "runs"
    make_run(runs, "caphuman (smoke)", smoke_like_values(12, 1), seed=1)
    make_run(runs, "ip_adapter_controlnet with a long label (smoke)", smoke_like_values(12, 2), seed=2)
    make_run(runs, "reference (smoke)", {"id_sim_dlib": np.full(12, 0.99), "face_detection": np.ones(12)})
    for k in range(19):  # 22 methods, as many as the cards: the page must still read
        make_run(runs, f"method_{k:02d} (smoke)", smoke_like_values(12, 10 + k), seed=10 + k)
    found = find_runs([runs])
    report = write_html(aggregate_runs(found), found, root / "report")
    variants, variant_runs = [], []
    for tau in (0, 300, 600):
        for use_local in (True, False):
            run = make_run(root / "ablation_runs", f"caphuman[tau={tau},local={use_local}] (smoke)",
                           {"id_sim_dlib": np.linspace(0.5, 0.9, 12) - tau / 3000 - 0.1 * (not use_local)},
                           params={"tau": tau, "use_global": True, "use_local": use_local}, seed=tau + use_local)
            variants.append(aggregate_run(run))
            variant_runs.append(run)
    ablation = write_ablation(variants, root / "ablation", variant_runs)
    return {"report": report, "ablation": ablation}


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def plot_fraction(png: bytes) -> tuple[float, float]:
    """(area, width) of the bounding box of the axes' face colour, as fractions of the image."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    face = np.array([int(AXES_FACE[i:i + 2], 16) for i in (1, 3, 5)])
    ys, xs = np.nonzero((pixels == face).all(axis=2))
    assert len(xs), "no plotting area found"
    h, w = pixels.shape[:2]
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return box_w * box_h / (w * h), box_w / w


@pytest.mark.parametrize("name", ["report", "ablation"])
@pytest.mark.parametrize("width", [1400, 400])
def test_page_in_chromium(pages, browser, name, width, tmp_path):
    page = browser.open(pages[name], width, mobile=width < 600)
    images = page.images()
    assert images and all(i["naturalWidth"] > 0 for i in images), [i["alt"] for i in images if not i["naturalWidth"]]
    assert page.errors() == []
    assert page.page_width() <= width  # wide tables scroll inside their box, the page does not
    shot = page.screenshot(SCREENSHOTS / f"{name}-{width}.png" if SCREENSHOTS else tmp_path / f"{name}-{width}.png",
                           height=None if SCREENSHOTS else 2400)
    assert Image.open(shot).size[0] == width


@pytest.mark.parametrize("name", ["report", "ablation"])
def test_every_figure_gives_its_plot_a_real_share_of_the_image(pages, name):
    html = pages[name].read_text()
    figures = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(figures) >= (6 if name == "report" else 2)
    for data in figures:
        area, width = plot_fraction(base64.b64decode(data))
        assert area > 0.3 and width > 0.45, (area, width)


def test_leaderboard_sorts_by_a_clicked_column_without_network(pages, browser):
    """Ranked by ID similarity at first; a click on another metric's title sorts by it (best first
    in its direction), a second click reverses; unscored rows stay last."""
    page = browser.open(pages["report"], 1400)
    heads = "document.querySelectorAll('table.board thead tr:nth-child(2) th')"
    names = "Array.from(document.querySelectorAll('table.board tbody tr')).map(r => r.cells[0].dataset.sort)"
    values = ("Array.from(document.querySelectorAll('table.board tbody tr')).map(r => r.cells[{}].dataset.sort)"
              ".filter(v => v !== '').map(Number)")
    titles = page.evaluate(f"Array.from({heads}).map(h => h.title)")
    dlib, facenet = titles.index("id_sim_dlib"), titles.index("id_sim_facenet")
    ranked = page.evaluate(values.format(facenet))
    assert len(ranked) == 21 and ranked == sorted(ranked, reverse=True)  # the reference run has no FaceNet score
    page.evaluate(f"{heads}[{dlib}].click()")
    first = page.evaluate(values.format(dlib))
    assert first == sorted(first, reverse=True) and page.evaluate(names)[0] == "reference (smoke)"  # 0.99
    page.evaluate(f"{heads}[{dlib}].click()")
    assert page.evaluate(values.format(dlib)) == sorted(first)
    page.evaluate(f"{heads}[{facenet}].click()")
    assert page.evaluate(names)[-1] == "reference (smoke)"  # unscored last
    assert page.errors() == []
