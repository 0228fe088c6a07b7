"""The field's published results inside the package, and `report published=...` beside our own runs.

Files only: the data file, synthetic certifications (test_report's helpers), no model time.
"""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import GRID, make_cert, make_run, rows_for

from peftsmooth.errors import UserError
from peftsmooth.report import published
from peftsmooth.report.leaderboard import leaderboard_markdown
from peftsmooth.report.render import build_report, to_csv, to_markdown

ROOT = Path(__file__).resolve().parents[2]
SHARED_NAME = "published_cifar10_imagenet.csv"
# ../shared beside the checkout (or beside its worktree folder); absent on a clean clone (CI)
SHARED_CANDIDATES = [ROOT.parent / "shared" / SHARED_NAME, ROOT.parent.parent / "shared" / SHARED_NAME]
# sha256 of the recomputed rows in the shared file's own columns (canonical CSV, "\n" line ends): holds the
# numbers where the shared file is absent
RECOMPUTED_SHA256 = "b14cf85cbea7d396a2fe23d14a7c6c45601031dc13e607ca69e1df73f4f62837"
CAT_RS_05 = {0.25: "56.8", 0.5: "50.5", 0.75: "44.6", 1.0: "38.5"}  # CAT-RS, sigma = 0.5, CIFAR-10


def recomputed_in_shared_columns() -> list[list[str]]:
    """The data file's `recomputed from log` rows, without the provenance column, header first."""
    text = published.data_text()
    rows = list(csv.reader(io.StringIO(text)))
    where = rows[0].index(published.PROVENANCE)
    keep = [rows[0]] + [r for r in rows[1:] if r[where] == published.RECOMPUTED]
    return [r[:where] + r[where + 1:] for r in keep]


def canonical(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def test_recomputed_rows_are_the_pinned_numbers():
    rows = recomputed_in_shared_columns()
    assert len(rows) == 1 + 27
    assert hashlib.sha256(canonical(rows).encode()).hexdigest() == RECOMPUTED_SHA256


def test_recomputed_rows_equal_the_shared_file_when_it_is_there():
    shared = next((p for p in SHARED_CANDIDATES if p.is_file()), None)
    if shared is None:
        pytest.skip("../shared is not beside this checkout (a clean clone): the pinned sha256 holds the numbers")
    with open(shared, newline="") as f:
        expected = [row for row in csv.reader(f)]
    assert recomputed_in_shared_columns() == expected


def test_every_row_says_where_it_comes_from():
    rows = published.load()
    assert {r.provenance for r in rows} <= {published.RECOMPUTED, published.REPORTED}
    for row in rows:
        if row.provenance == published.RECOMPUTED:
            assert row.source.split()[0] in ("locuslab/smoothing", "alinlab/smoothing-catrs"), row
        else:  # a reported row names the table and the page of its paper
            assert "Table" in row.source and "page" in row.source and row.paper, row
    assert {r.dataset for r in rows} == {"cifar10", "imagenet"}


def test_the_package_ships_the_data_file():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert published.DATA_FILE in data["peftsmooth.report"]


@pytest.fixture
def ours(tmp_path):
    run = make_run(tmp_path / "outputs", "lora_run", sigma=0.5)
    make_cert(run, run / "certify" / "cohen_sigma0.5_n1000", rows_for(1, 20))
    return tmp_path / "outputs"


def report_with(root, tmp_path, *overrides):
    from conftest import compose

    from peftsmooth.commands.report import run_report

    cfg = compose("report", [f"dirs=[{root}]", f"out={tmp_path / 'rep'}", *overrides], run_dir=tmp_path / "h")
    return run_report(cfg)


def test_published_cifar10_shows_cat_rs_at_sigma_half(ours, tmp_path, caplog):
    result = report_with(ours, tmp_path, "published=cifar10", "published_methods=[CAT-RS,MACER]",
                         "published_sigmas=[0.5]")
    assert "beside runs on digits" in caplog.text  # our rows are digits: no like-for-like comparison
    shown = [r for r in result["rows"] if r.get("published")]
    assert sorted(r["method"] for r in shown) == ["CAT-RS", "MACER"] and {r["sigma"] for r in shown} == {0.5}
    cat = next(r for r in shown if r["method"] == "CAT-RS")
    assert {r: f"{100 * cat[f'cert@{r:g}']:.1f}" for r in GRID} == CAT_RS_05
    assert (cat["mode"], cat["n"], cat["alpha"], cat["num_images"]) == ("cohen", 100000, 0.001, 10000)
    md = (tmp_path / "rep" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| CAT-RS (published) |"))
    assert " | ".join(CAT_RS_05.values()) in line and "| 0.5 | cohen | 100,000 | 0.001 | 10,000 |" in line
    tex = (tmp_path / "rep" / "report.tex").read_text()
    tex_line = next(x for x in tex.splitlines() if x.startswith(r"CAT-RS$^\dagger$"))
    assert all(v in tex_line for v in CAT_RS_05.values())
    parsed = {r["method"]: r for r in csv.DictReader(io.StringIO((tmp_path / "rep" / "report.csv").read_text()))}
    assert float(parsed["CAT-RS"]["cert@0.5"]) == pytest.approx(0.5051)
    assert parsed["CAT-RS"]["source"] == "alinlab/smoothing-catrs data/cifar10/noise_0.5/cat-rs/noise_0.5.tsv"


def test_a_radius_the_source_lacks_stays_blank(ours, tmp_path):
    """The report's grid has 0.3 and 0.25; ImageNet's published grid has 0.5 but not 0.25: blank, not a guess."""
    report = build_report([ours], [0.25, 0.3, 0.5])
    rows = published.select(published.load(), "imagenet", sigmas=[0.5])
    report.rows += [published.table_row(r, report.radius_grid) for r in rows]
    row = report.rows[-1]
    assert row["cert@0.25"] is None and row["cert@0.3"] is None and row["cert@0.5"] == pytest.approx(0.458)
    line = next(x for x in to_markdown(report).splitlines() if x.startswith("| Gaussian (published)"))
    assert "| 57.2 |  |  | 45.8 | 0.733 |" in line
    parsed = list(csv.DictReader(io.StringIO(to_csv(report))))[-1]
    assert parsed["cert@0.25"] == "" and parsed["cert@0.3"] == ""


def test_published_curves_are_dashed_groups_with_their_sigmas(ours, tmp_path):
    from peftsmooth.report.plot import plot_report

    report = build_report([ours], GRID)
    report.published = published.select(published.load(), "cifar10", methods=["cat-rs"])
    labels = plot_report(report, [tmp_path / "p.png"])
    assert labels == ["lora (vit_tiny), cohen, n=1000, alpha=0.001; best over sigma in {0.5}",
                      "CAT-RS (ResNet-110, 10,000 images), cohen, n=100000, alpha=0.001, published; "
                      "best over sigma in {0.25, 0.5, 1}"]


def test_published_list_prints_every_row(tmp_path, capsys):
    result = report_with(tmp_path, tmp_path, "published=list", "dirs=[]")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(result["published"]) == 27 and not (tmp_path / "rep").exists()
    assert any(x.startswith("cifar10 | CAT-RS | ResNet-110 | sigma=0.5 |") and "0.5:50.5" in x for x in lines)


@pytest.mark.parametrize("overrides, needle", [
    (["published=mnist"], "published=mnist is not allowed (choose from: cifar10, imagenet, list)"),
    (["published=cifar10", "published_methods=[DDS]"], "published_methods=DDS is not allowed (choose from: CAT-RS,"),
    (["published=imagenet", "published_sigmas=[0.12]"], "published_sigmas=0.12 is not allowed (choose from: 0.25, 0.5, 1)"),
    (["published_methods=[MACER]"], "give published=cifar10|imagenet"),
    (["formats=[md,docx]"], "formats=docx is not allowed (choose from: csv, md, pdf, png, tex)"),
    (["formats=[]"], "formats is empty"),
])
def test_bad_published_or_format_is_refused_before_work(ours, tmp_path, overrides, needle):
    with pytest.raises(UserError) as err:
        report_with(ours, tmp_path, *overrides)
    assert needle in str(err.value)
    assert not (tmp_path / "rep").exists()


def test_bad_input_from_the_cli_is_one_line_and_exit_2(ours, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftsmooth", "report", str(ours), "published=cifar10",
                           "published_sigmas=[0.3]", f"out={tmp_path}/rep", f"hydra.run.dir={tmp_path}/h"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == ("peftsmooth report: error: published_sigmas=0.3 is not allowed "
                    "(choose from: 0.12, 0.25, 0.5, 1)")
    assert not (tmp_path / "h").exists() and not (tmp_path / "rep").exists()


def test_the_leaderboard_page_is_the_data_file():
    page = ROOT / "docs" / "published.md"
    assert page.read_text() == leaderboard_markdown(), "run: python scripts/published_leaderboard.py"


def test_the_leaderboard_takes_the_best_over_sigma_per_method():
    text = leaderboard_markdown()
    cat = next(x for x in text.splitlines() if x.startswith("| CAT-RS |"))
    cells = [c.strip() for c in cat.strip("|").split("|")]
    assert cells[:4] == ["CAT-RS", "ResNet-110", "10,000", "0.25, 0.5, 1"]
    assert cells[4:9] == ["76.3 (0.25)", "68.1 (0.25)", "**58.8 (0.25)**", "**48.2 (0.25)**", "**38.5 (0.5)**"]
    assert "`alinlab/smoothing-catrs data/cifar10/noise_0.5/cat-rs/noise_0.5.tsv`" in text
