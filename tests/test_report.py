"""Reports: HTML with its plots inline, rendered by headless Chromium; Markdown and JSON beside it."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import secateurs
from secateurs import run as runner
from secateurs.cli import main
from secateurs.errors import FileProblem
from secateurs.report import build_report, read_run

from .test_recipe import project  # noqa: F401  (the tiny model, its weights, data and pipeline recipe)

CHROMIUM = "/usr/bin/chromium"
UNSTRUCTURED = """
model: {factory: "secateurs_recipe_tiny:build", weights: dense.safetensors}
data: {calibration: calib.safetensors, batch_size: 32}
seed: 1
stages:
  - prune: {sparsity: 0.7, method: magnitude, scope: global}
  - finetune: {epochs: 1}
  - quantize
"""


def _sensitivity(run_dir: Path) -> dict[str, list[list[float]]]:
    """Accuracy of the dense model with one layer at a time magnitude-pruned, per ratio: real curves."""
    from secateurs_recipe_tiny import build
    from secateurs.recover.finetune import evaluate_accuracy
    from safetensors.torch import load_file

    recipe = secateurs.recipe.load_recipe(Path(json.loads((run_dir / "run.json").read_text())["recipe"]))
    dense = build()
    dense.load_state_dict(load_file(recipe.model.weights))
    tensors = load_file(recipe.data.calibration)
    batches = [(tensors["inputs"], tensors["targets"])]
    curves = {}
    for layer in ("conv1", "conv2", "fc1"):
        curves[layer] = []
        for ratio in (0.0, 0.3, 0.6, 0.9):
            model = copy.deepcopy(dense).eval()
            if ratio:
                secateurs.prune(model, "magnitude", ratio, include=[layer])
            curves[layer].append([ratio, evaluate_accuracy(model, batches)])
    return curves


@pytest.fixture(scope="module")
def runs(project, tmp_path_factory, one_thread):  # noqa: F811
    """Two finished runs of different recipes; the second carries sensitivity curves."""
    root = tmp_path_factory.mktemp("report-runs")
    structured = root / "structured"
    assert main(["run", str(project / "recipe.yaml"), "--out", str(structured)]) == 0
    recipe = project / "unstructured.yaml"
    recipe.write_text(UNSTRUCTURED)
    unstructured = runner.run_recipe(recipe, root / "unstructured").out_dir
    metrics = json.loads((unstructured / "metrics.json").read_text())
    metrics["sensitivity"] = _sensitivity(unstructured)
    (unstructured / "metrics.json").write_text(json.dumps(metrics))
    return [structured, unstructured]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


class _Figures(HTMLParser):
    """Counts, per top-level <svg> or <img>, the drawing elements inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict[str, int]] = []
        self.depth = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for key in ("src", "href"):
            if (attributes.get(key) or "").startswith(("http:", "https:", "//", "file:")):
                self.external.append(attributes[key])
        if tag == "svg":
            if self.depth == 0:
                self.figures.append({"kind": "svg", "shapes": 0, "text": 0})
            self.depth += 1
        elif tag == "img" and (attributes.get("src") or "").startswith("data:image/png;base64,"):
            self.figures.append({"kind": "img", "shapes": len(attributes["src"]) // 100, "text": 0})
        elif self.depth and tag in ("path", "use", "rect", "line", "polyline"):
            self.figures[-1]["shapes"] += 1
        elif self.depth and tag == "text":
            self.figures[-1]["text"] += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.depth -= 1


def _figures(html: str) -> _Figures:
    parser = _Figures()
    parser.feed(html)
    return parser


def test_report_files_tables_and_plots(report, runs):
    html = (report / "report.html").read_text()
    figures = _figures(html)
    # accuracy vs MACs and vs bytes; per run widths and sparsity; sensitivity for the second run
    assert len(figures.figures) == 2 + 2 * len(runs) + 1
    assert all(f["shapes"] >= 10 and f["text"] >= 3 for f in figures.figures)
    assert figures.external == [] and "<script" not in html    # self-contained
    data = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["structured", "unstructured"]
    assert [row["label"] for row in data["runs"][1]["rows"]] == ["dense", "0:prune", "1:finetune", "2:quantize"]
    assert data["runs"][1]["sensitivity"]["fc1"][0][0] == 0.0
    markdown = (report / "report.md").read_text()
    assert "| stage | accuracy | params |" in markdown and "2:quantize (int8)" in markdown
    for stem in data["plots"]:
        assert f"(plots/{stem}.svg)" in markdown and (report / "plots" / f"{stem}.svg").stat().st_size > 1000


def test_per_stage_table_reports_latency_and_size_of_every_stage(runs):
    record = read_run(runs[1])
    assert [r.label for r in record.rows] == ["dense", "0:prune", "1:finetune", "2:quantize"]
    assert all(r.measurement["latency_ms"] > 0 and r.measurement["size_bytes"] > 0 for r in record.rows)
    assert record.rows[-1].quantized and record.final["size_bytes"] < record.rows[-2].measurement["dense_size_bytes"]
    assert record.final_layers[2]["name"] == "fc1" and record.final_layers[2]["sparsity"] > 0.5


def test_report_refuses_a_folder_that_is_not_a_run_and_an_output_over_a_run(runs, tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run directory" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileProblem, match="would overwrite input"):
        build_report([runs[0]], runs[0].parent)


def _chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason="Chromium is not installed at /usr/bin/chromium: `make test` installs it with apt-get "
                           "when run as root; otherwise `apt-get install -y chromium`")
def test_report_renders_in_headless_chromium_with_its_plots(report, runs, tmp_path):
    page = (report / "report.html").resolve().as_uri()
    dom = _chromium("--dump-dom", page, profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    figures = _figures(dom.stdout)     # what the browser parsed, not the file
    assert len(figures.figures) == 2 + 2 * len(runs) + 1
    assert all(f["shapes"] >= 10 for f in figures.figures)
    shot = tmp_path / "page.png"
    screenshot = _chromium(f"--screenshot={shot}", "--window-size=1000,1400", page, profile=tmp_path / "profile")
    assert screenshot.returncode == 0 and shot.is_file(), screenshot.stderr[-2000:]
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(str(shot))[..., :3].copy())
    colours = torch.unique((pixels * 255).round().to(torch.int32).reshape(-1, 3), dim=0)
    # a blank or text-only page has a handful of colours; drawn plots (lines, bars, antialiasing) have many
    assert len(colours) > 50
    blue = ((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)).sum()   # matplotlib's first line colour
    assert blue > 500
