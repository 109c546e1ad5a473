"""Reports: HTML from a template with its plots inline, rendered by headless Chromium; Markdown and JSON beside it."""
from __future__ import annotations

import copy
import json
import re
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
from secateurs.report import plots
from secateurs.report.collect import read_folder
from secateurs.report.render import _figures

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
# A folder name a browser would read as markup if it were not escaped.
ODD_NAME = "pruned <b>&"


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
    """Two finished recipe runs (the second with accuracy sensitivity curves) and a `secateurs prune` folder."""
    root = tmp_path_factory.mktemp("report-runs")
    structured = root / "structured"
    assert main(["run", str(project / "recipe.yaml"), "--out", str(structured)]) == 0
    recipe = project / "unstructured.yaml"
    recipe.write_text(UNSTRUCTURED)
    unstructured = runner.run_recipe(recipe, root / "unstructured").out_dir
    metrics = json.loads((unstructured / "metrics.json").read_text())
    metrics["sensitivity"] = _sensitivity(unstructured)
    metrics["sensitivity_metric"] = "accuracy on the calibration data"
    (unstructured / "metrics.json").write_text(json.dumps(metrics))
    pruned = root / ODD_NAME
    assert main(["prune", "--model", "secateurs_recipe_tiny:build", "--weights", str(project / "dense.safetensors"),
                 "--calib", str(project / "calib.safetensors"), "--structured", "--keep", "macs=0.5",
                 "--out", str(pruned)]) == 0
    return [structured, unstructured, pruned]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out


# pareto and latency across runs; widths + sparsity (structured run), sparsity and sensitivity
# (unstructured run), widths (the prune folder)
FIGURES = 2 + 2 + 2 + 1


class _Figures(HTMLParser):
    """Counts, per top-level <svg> or <img>, the drawing elements inside it, and collects its text."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self.depth = 0
        self.external: list[str] = []
        self.in_text = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for key in ("src", "href"):
            if (attributes.get(key) or "").startswith(("http:", "https:", "//", "file:")):
                self.external.append(attributes[key])
        if tag == "svg":
            if self.depth == 0:
                self.figures.append({"kind": "svg", "shapes": 0, "text": 0, "words": ""})
            self.depth += 1
        elif tag == "img" and (attributes.get("src") or "").startswith("data:image/png;base64,"):
            self.figures.append({"kind": "img", "shapes": len(attributes["src"]) // 100, "text": 0, "words": ""})
        elif self.depth and tag in ("path", "use", "rect", "line", "polyline"):
            self.figures[-1]["shapes"] += 1
        elif self.depth and tag == "text":
            self.figures[-1]["text"] += 1
            self.in_text = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self.depth -= 1
        elif tag == "text":
            self.in_text = False

    def handle_data(self, data):
        if self.depth and self.in_text:
            self.figures[-1]["words"] += data + " "


def _figures_of(html: str) -> _Figures:
    parser = _Figures()
    parser.feed(html)
    return parser


def test_report_files_tables_and_plots(report, runs):
    html = (report / "report.html").read_text()
    figures = _figures_of(html)
    assert len(figures.figures) == FIGURES
    assert all(f["shapes"] >= 10 and f["text"] >= 3 for f in figures.figures)
    assert figures.external == [] and "<script" not in html    # self-contained
    data = json.loads((report / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["structured", "unstructured", ODD_NAME]
    assert [row["label"] for row in data["runs"][1]["rows"]] == ["dense", "0:prune", "1:finetune", "2:quantize"]
    assert data["runs"][1]["sensitivity"]["fc1"][0][0] == 0.0
    assert data["plots"] == ["pareto", "latency", "run0_widths", "run0_sparsity", "run1_sparsity",
                             "run1_sensitivity", "run2_widths"]
    markdown = (report / "report.md").read_text()
    assert "| stage | accuracy | params |" in markdown and "2:quantize (int8)" in markdown
    for stem in data["plots"]:
        assert f"(plots/{stem}.svg)" in markdown and (report / "plots" / f"{stem}.svg").stat().st_size > 1000


def test_summary_is_in_percent_and_the_latency_table_has_spreads(report):
    html = (report / "report.html").read_text()
    summary = html[html.index('id="summary"'):html.index('id="pareto"')]
    rows = re.findall(r"<tr>(.*?)</tr>", summary, flags=re.S)[1:]
    assert len(rows) == 3
    for row in rows:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert re.fullmatch(r"\d+\.\d\d% → \d+\.\d\d%", cells[1])      # accuracy dense -> final, in %
        assert all(c.endswith("%") for c in cells[2:6])                 # params, non-zeros, MACs, bytes kept
    latency = html[html.index('id="latency-table"'):html.index('id="latency"')]
    assert "<th>IQR ms</th>" in latency and "<th>speedup</th>" in latency
    # every timed row: a median, a spread and the number of timed blocks
    timed = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", latency, flags=re.S)[1:]]
    assert len(timed) == 8 + 4 + 2 and all(float(r[2]) > 0 and float(r[3]) >= 0 and int(r[4]) >= 1 for r in timed)


def test_budgets_are_judged_on_what_the_pruned_model_measures(report):
    html = (report / "report.html").read_text()
    assert re.search(r"<li>1:prune: budget macs=0.5: \d+\.\d% of the dense macs \([\d,]+ of [\d,]+\): met</li>", html)
    assert re.search(r"<li>0:prune: budget macs=0.5: .*: met</li>", html)
    markdown = (report / "report.md").read_text()
    assert "- 1:prune: budget macs=0.5:" in markdown and "## Run pruned &lt;b&gt;&amp;" in markdown


def test_names_are_escaped(report):
    html = (report / "report.html").read_text()
    assert "pruned <b>&" not in html and "pruned &lt;b&gt;&amp;" in html


def test_sensitivity_curves_name_their_metric(report, runs):
    html = (report / "report.html").read_text()
    sensitivity = html[html.index('id="run1_sensitivity"'):]
    words = _figures_of(sensitivity).figures[0]["words"]
    assert "accuracy on the calibration data" in words and "removed" in words
    assert read_run(runs[0]).sensitivity_metric == "mean cross_entropy loss on the calibration batches"


def test_per_stage_table_reports_latency_and_size_of_every_stage(runs):
    record = read_run(runs[1])
    assert [r.label for r in record.rows] == ["dense", "0:prune", "1:finetune", "2:quantize"]
    assert all(r.measurement["latency_ms"] > 0 and r.measurement["latency_iqr_ms"] >= 0 for r in record.rows)
    assert all(r.measurement["size_bytes"] > 0 for r in record.rows)
    assert record.rows[-1].quantized and record.final["size_bytes"] < record.rows[-2].measurement["dense_size_bytes"]
    assert record.final_layers[2]["name"] == "fc1" and record.final_layers[2]["sparsity"] > 0.5


def test_a_prune_output_folder_is_a_run_with_accuracy(runs):
    (record,) = read_folder(runs[2])
    assert record.kind == "prune" and [r.label for r in record.rows] == ["dense", "0:prune"]
    assert record.dense["accuracy"] is not None and record.final["loss"] > 0
    assert plots.widths_changed(record) and not plots.sparsity_changed(record)


def test_a_prune_hf_folder_is_a_run_with_its_held_out_quality(tmp_path):
    """The metrics.json `secateurs prune --hf` writes (the keys llm.pipeline's records have)."""
    folder = tmp_path / "llama-2of4"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "model": {"path": "llama", "architecture": "LlamaForCausalLM", "kind": "causal-lm"}, "out": str(folder),
        "mode": "unstructured", "saved_as": "transformers", "config": {"method": "wanda", "seed": 0},
        "params": {"before": 1000, "after": 1000}, "nonzeros": {"before": 1000, "after": 550},
        "sparsity": {"pruned_layers": 0.5, "model": 0.45, "layers": {"model.layers.0.mlp.up_proj": 0.5,
                                                                     "model.layers.0.self_attn.q_proj": 0.5}},
        "pruning": {"method": "wanda"}, "eval": {"metric": "perplexity", "file": "held.txt", "before": 20.5,
                                                 "after": 23.25, "details": {}},
        "seconds": {"total": 3.0}, "versions": {}}))
    (record,) = read_folder(folder)
    assert [r.label for r in record.rows] == ["dense", "0:unstructured"]
    assert record.final == {"params": 1000, "nonzeros": 550, "perplexity": 23.25}
    page = build_report([folder], tmp_path / "report").read_text()
    assert 'id="pareto"' in page and 'id="run0_sparsity"' in page and "<th>perplexity</th>" in page
    assert "perplexity (lower is better)" in _figures_of(page).figures[0]["words"]


def test_per_layer_plots_are_the_ones_that_apply_never_empty(runs, tmp_path):
    structured, unstructured = read_run(runs[0]), read_run(runs[1])
    assert plots.widths_changed(structured) and plots.sparsity_changed(structured)
    assert not plots.widths_changed(unstructured) and plots.sparsity_changed(unstructured)
    untouched = read_run(runs[2])
    untouched.final_layers = copy.deepcopy(untouched.dense_layers)
    _, per_run, _ = _figures([untouched])
    assert per_run[0] == []    # nothing changed per layer: no plot at all, and the page says why
    out = build_report([runs[2]], tmp_path / "r")
    assert "0:prune" in out.read_text()


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(1.0, 99.0), (0.5, 98.0), (0.5, 97.0), (0.25, 90.0), (0.6, 98.0)]
    assert plots._pareto_front(points, higher_is_better=True) == {0, 1, 3}
    assert plots._pareto_front([(1.0, 2.0), (0.5, 3.0)], higher_is_better=False) == {0, 1}


def test_report_refuses_a_folder_that_is_not_a_run_and_an_output_over_a_run(runs, tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run directory" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "metrics.json").write_text('{"accuracy": 1}')
    assert main(["report", str(tmp_path / "odd"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a dense measurement" in capsys.readouterr().err
    with pytest.raises(FileProblem, match="would overwrite input"):
        build_report([runs[0]], runs[0].parent)


def test_a_report_can_be_written_again_over_itself(runs, tmp_path):
    build_report([runs[2]], tmp_path / "r")
    page = build_report([runs[1], runs[2]], tmp_path / "r", overwrite=True)
    assert "run1_sparsity" not in page.read_text() and (tmp_path / "r" / "plots" / "run0_sparsity.svg").is_file()
    assert not (tmp_path / "r" / "plots" / "run0_widths.svg").exists()     # the first report's plots are gone


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
    figures = _figures_of(dom.stdout)     # what the browser parsed, not the file
    assert len(figures.figures) == FIGURES
    assert all(f["shapes"] >= 10 for f in figures.figures)
    shot = tmp_path / "page.png"
    screenshot = _chromium(f"--screenshot={shot}", "--window-size=1280,1400", page, profile=tmp_path / "profile")
    assert screenshot.returncode == 0 and shot.is_file(), screenshot.stderr[-2000:]
    from matplotlib.image import imread

    pixels = torch.from_numpy(imread(str(shot))[..., :3].copy())
    colours = torch.unique((pixels * 255).round().to(torch.int32).reshape(-1, 3), dim=0)
    # a blank or text-only page has a handful of colours; drawn plots (points, bars, antialiasing) have many
    assert len(colours) > 50
    blue = ((pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3)).sum()   # matplotlib's first colour
    assert blue > 500


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Chromium is not installed at /usr/bin/chromium")
@pytest.mark.parametrize("width", [1280, 1024])
def test_the_page_fits_a_laptop_screen_and_its_plots_fill_it(report, tmp_path, width):
    """The page's own layout at a laptop's width: nothing wider than the window, every plot at least 80% of it."""
    probe = tmp_path / "probe.html"
    measure = ("<script>var w = [document.documentElement.scrollWidth].concat(Array.from("
               "document.querySelectorAll('figure svg'), s => Math.round(s.getBoundingClientRect().width)));"
               "document.body.setAttribute('data-widths', w.join(','));</script>")
    probe.write_text((report / "report.html").read_text().replace("</body>", measure + "</body>"))
    dom = _chromium("--dump-dom", f"--window-size={width},900", probe.resolve().as_uri(), profile=tmp_path / "p")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page, *svgs = map(int, re.search(r'data-widths="([\d,]+)"', dom.stdout).group(1).split(","))
    assert page <= width and len(svgs) == FIGURES
    assert all(w >= 0.8 * min(width, 78 * 15) for w in svgs), svgs
