"""`peftsmooth report` over synthetic run directories written to the schemas certify and train write.

The runs here are files only (run.json, certify.tsv, summary.json), so these tests take no model
time; the end-to-end multirun -> certify -> report test lives in test_sweeps.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftsmooth.certify import results
from peftsmooth.certify.results import certified_accuracy, curve, read_tsv
from peftsmooth.errors import UserError
from peftsmooth.report.render import build_report, curve_groups, envelope, to_csv, to_markdown

GRID = [0.25, 0.5, 0.75, 1.0]


def make_run(root: Path, name: str, method="lora", sigma=0.5, model="vit_tiny", finished=True,
             trainable=1234, total=50000) -> Path:
    run = root / name
    run.mkdir(parents=True)
    info = {"format": 1, "command": "train", "method": method, "model": {"name": "vit_tiny_patch16_224"},
            "model_name": model, "dataset": {"name": "digits"}, "num_classes": 10, "image_size": [1, 8, 8],
            "sigma": sigma, "adapt": None, "front": None, "base": None, "trainable_params": trainable,
            "total_params": total, "files": [], "argv": "peftsmooth train", "finished": finished}
    (run / "run.json").write_text(json.dumps(info))
    return run


def rows_for(seed: int, count: int, start: int = 0, step: int = 1) -> list[dict]:
    """Deterministic fake certification rows: some abstains, some wrong, radii in [0, 1.2]."""
    rows = []
    for k in range(count):
        idx = start + k * step
        h = (idx * 7919 + seed * 104729) % 1000
        label = idx % 10
        if h < 100:
            predict, radius = -1, 0.0
        elif h < 250:
            predict, radius = (label + 1) % 10, float(f"{h / 800:.3g}")
        else:
            predict, radius = label, float(f"{(h - 250) / 625:.3g}")  # as the TSV prints it
        rows.append({"idx": idx, "label": label, "predict": predict, "radius": radius,
                     "correct": int(predict == label), "time": 0.5 + (h % 7) / 10})
    return rows


def write_tsv(path: Path, rows, torn=False):
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for r in rows:
        t = f"{r['time']:.3f}"
        lines.append(f"{r['idx']}\t{r['label']}\t{r['predict']}\t{r['radius']:.3g}\t{r['correct']}\t{t}")
    text = "\n".join(lines) + "\n"
    if torn:
        text += "99\t3\t3\t0.1"  # a half-written last line of a killed run
    path.write_text(text)


def make_cert(run: Path | None, where: Path, rows, sigma=0.5, method="lora", complete=True,
              summary=True, shard=None, num_shards=None, mode="cohen", extra=None, **tsv_kw) -> Path:
    where.mkdir(parents=True)
    write_tsv(where / "certify.tsv", rows, **tsv_kw)
    if summary:
        n = len(rows)
        s = {"acr": sum(r["radius"] * r["correct"] for r in rows) / n,
             "certified_accuracy": {f"{g:g}": certified_accuracy(rows, g) for g in GRID},
             "radius_grid": GRID, "clean_accuracy": sum(r["correct"] for r in rows) / n,
             "abstain_rate": sum(r["predict"] == -1 for r in rows) / n, "n0": 100, "n": 1000,
             "alpha": 0.001, "sigma": sigma, "num_images": n, "samples_per_second": 1000.0,
             "device": "cpu", "precision": "fp32", "mode": mode, "run": str(run) if run else None,
             "method": method, "model_name": "vit_tiny", "dataset": "digits", "trainable_params": 1234,
             "elapsed_seconds": sum(float(f"{r['time']:.3f}") for r in rows), "complete": complete,
             "num_planned": n if complete else n + 5}
        if shard is not None:
            s.update(shard=shard, num_shards=num_shards)
        s.update(extra or {})
        (where / "summary.json").write_text(json.dumps(s))
    return where


def test_tsv_reading_skips_a_torn_last_line(tmp_path):
    rows = rows_for(1, 5)
    write_tsv(tmp_path / "a.tsv", rows, torn=True)
    back = read_tsv(tmp_path / "a.tsv")
    assert [r["idx"] for r in back] == [0, 1, 2, 3, 4]  # torn last line of a killed run dropped
    assert back[2]["time"] == pytest.approx(rows[2]["time"], abs=1e-3)


def test_started_certification_without_rows(tmp_path):
    run = make_run(tmp_path, "r")
    make_cert(run, run / "certify" / "cohen_sigma0.5_n1000", [], summary=False)
    row, = build_report([tmp_path], GRID).rows
    assert row["status"] == "partial: 0 images" and row["acr"] is None and row["smoothed_accuracy"] is None


def test_metrics_follow_cohen_analysis():
    rows = [{"idx": 0, "label": 1, "predict": 1, "radius": 0.6, "correct": 1, "time": 1.0},
            {"idx": 1, "label": 2, "predict": -1, "radius": 0.0, "correct": 0, "time": 1.0},
            {"idx": 2, "label": 3, "predict": 4, "radius": 0.9, "correct": 0, "time": 1.0},
            {"idx": 3, "label": 5, "predict": 5, "radius": 0.25, "correct": 1, "time": 1.0}]
    assert certified_accuracy(rows, 0.0) == 0.5
    assert certified_accuracy(rows, 0.25) == 0.5   # radius >= r counts
    assert certified_accuracy(rows, 0.5) == 0.25   # a wrong prediction never counts, whatever its radius
    assert curve(rows, [0.0, 0.25, 0.3, 0.6, 0.61]) == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert envelope([[0.5, 0.2, 0.0], [0.4, 0.3, 0.1]]) == [0.5, 0.3, 0.1]


@pytest.fixture
def sweep(tmp_path):
    """A sigma sweep of LoRA runs, a full fine-tuning run, an unfinished certification, a sharded one,
    a run with no certification yet and an unfinished training run."""
    root = tmp_path / "outputs"
    runs = {}
    for i, sigma in enumerate([0.25, 0.5, 1.0]):
        run = make_run(root / "multirun" / "train" / "t0", f"lora_vit_tiny_digits_sigma{sigma}", sigma=sigma)
        make_cert(run, run / "certify" / f"cohen_sigma{sigma}_n1000", rows_for(i, 40), sigma=sigma)
        runs[("lora", sigma)] = run
    full = make_run(root / "train", "full_vit_tiny_digits_sigma0.5", method="full", trainable=50000)
    make_cert(full, full / "certify" / "cohen_sigma0.5_n1000", rows_for(7, 30), method="full",
              summary=False, torn=True)                                     # killed mid-way: no summary
    shard_run = make_run(root / "train", "linear_vit_tiny_digits_sigma0.5", method="linear", trainable=330)
    for s in range(2):  # shard s certifies images s, s+2, s+4, ...
        make_cert(shard_run, shard_run / "certify" / "cohen_sigma0.5_n1000" / f"shard{s}of2",
                  rows_for(3, 15, start=s, step=2), method="linear", shard=s, num_shards=2)
    make_run(root / "train", "ia3_vit_tiny_digits_sigma0.5", method="ia3")     # not certified yet
    make_run(root / "train", "oft_vit_tiny_digits_sigma0.5", method="oft", finished=False)
    return root, runs


def by_method(rows):
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def test_report_table_equals_summaries(sweep):
    root, runs = sweep
    report = build_report([root], GRID)
    rows = by_method(report.rows)
    assert sorted(rows) == ["full", "ia3", "linear", "lora", "oft"]
    lora = sorted(rows["lora"], key=lambda r: r["sigma"])
    assert [r["sigma"] for r in lora] == [0.25, 0.5, 1.0]
    for row, sigma in zip(lora, [0.25, 0.5, 1.0]):
        summary = json.loads((runs[("lora", sigma)] / "certify" / f"cohen_sigma{sigma}_n1000" / "summary.json").read_text())
        assert row["acr"] == summary["acr"]
        assert row["smoothed_accuracy"] == summary["clean_accuracy"]
        for g in GRID:
            assert row[f"cert@{g:g}"] == summary["certified_accuracy"][f"{g:g}"]
        assert row["trainable_params"] == 1234 and row["cert_time_s"] == summary["elapsed_seconds"]
        assert row["status"] == "complete" and row["model"] == "vit_tiny"


def test_report_marks_partial_and_uncertified_runs(sweep):
    root, _ = sweep
    rows = by_method(build_report([root], GRID).rows)
    full, = rows["full"]
    expected = rows_for(7, 30)
    assert full["status"] == "partial: 30 images"
    assert full["num_images"] == 30
    assert full["acr"] == pytest.approx(sum(r["radius"] * r["correct"] for r in expected) / 30, abs=1e-3)
    assert full["cert_time_s"] == pytest.approx(sum(r["time"] for r in expected), abs=1e-3)
    ia3, = rows["ia3"]
    assert ia3["status"] == "not certified" and ia3["acr"] is None and ia3["trainable_params"] == 1234
    oft, = rows["oft"]
    assert oft["status"] == "training unfinished; not certified"


def test_report_merges_shards_like_one_run(sweep, tmp_path):
    root, _ = sweep
    linear, = by_method(build_report([root], GRID).rows)["linear"]
    whole = rows_for(3, 30)   # what one unsharded run over images 0..29 would give
    single = make_cert(None, tmp_path / "single", whole, method="linear")
    ref, = build_report([single], GRID).rows
    assert linear["status"] == "merged 2 shards" and linear["num_images"] == 30
    for key in ["smoothed_accuracy", "acr", *[f"cert@{g:g}" for g in GRID]]:
        assert linear[key] == pytest.approx(ref[key], abs=1e-12), key
    shards = sorted((root / "train" / "linear_vit_tiny_digits_sigma0.5" / "certify").glob("*/shard*/summary.json"))
    elapsed = [json.loads(p.read_text())["elapsed_seconds"] for p in shards]
    assert len(elapsed) == 2 and linear["cert_time_s"] == pytest.approx(sum(elapsed))  # the shards' seconds, summed


def test_report_missing_shard_is_partial(tmp_path):
    run = make_run(tmp_path, "r", method="linear")
    make_cert(run, run / "certify" / "cohen_sigma0.5_n1000_shard1of3", rows_for(3, 5, start=1, step=3),
              shard=1, num_shards=3)
    row, = build_report([tmp_path], GRID).rows
    assert row["status"] == "partial: shards 1/3, 5 images"


def test_report_prefers_merged_result_over_its_shards(tmp_path):
    run = make_run(tmp_path, "r", method="linear")
    merged = run / "certify" / "cohen_sigma0.5_n1000"
    shards = [merged / f"shard{s}of2" for s in range(2)]
    for s in range(2):
        make_cert(run, shards[s], rows_for(3, 3, start=s, step=2), shard=s, num_shards=2)
    results.write_merged(merged, shards)  # as `peftsmooth merge` writes it
    row, = build_report([tmp_path], GRID).rows
    assert row["status"] == "complete (merged 2 shards)" and row["certification"] == str(merged.resolve())


def test_off_the_shelf_certification_and_predict_mode(tmp_path):
    make_cert(None, tmp_path / "certify" / "cohen_vit_digits" / "2024", rows_for(2, 10), method="none")
    make_cert(None, tmp_path / "certify" / "predict_vit_digits" / "2024", rows_for(2, 10), method="none",
              mode="predict")
    rows = build_report([tmp_path], GRID).rows
    assert len(rows) == 2 and all(r["run"] is None and r["method"] == "none" for r in rows)
    predict = next(r for r in rows if r["mode"] == "predict")
    assert predict["acr"] is None and predict["cert@0.5"] is None and predict["smoothed_accuracy"] is not None


def test_radius_grid_outside_summary_grid_uses_tsv(sweep, tmp_path):
    root, runs = sweep
    rows = build_report([runs[("lora", 0.5)]], [0.1, 0.5]).rows
    row, = rows
    expected = read_tsv(runs[("lora", 0.5)] / "certify" / "cohen_sigma0.5_n1000" / "certify.tsv")
    assert row["cert@0.1"] == certified_accuracy(expected, 0.1)
    assert "cert@0.25" not in row


def test_envelope_is_best_over_sigma(sweep):
    root, _ = sweep
    report = build_report([root], GRID)
    radii = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    lora = curve_groups(report, radii)["lora (vit_tiny), cohen, n=1000, alpha=0.001"]
    assert len(lora) == 3
    env = envelope([v for _, _, v in lora])
    for k in range(len(radii)):
        assert env[k] == max(v[k] for _, _, v in lora)


def test_markdown_and_csv(sweep):
    root, _ = sweep
    report = build_report([root], GRID)
    md = to_markdown(report)
    header = md.splitlines()[0]
    for col in ["method", "model", "sigma", "mode", "n", "alpha", "images", "trainable params", "smoothed acc",
                "cert@0.25", "cert@1", "ACR", "cert time", "status"]:
        assert col in header
    assert sum(line.startswith("| ") for line in md.splitlines()) == len(report.rows) + 1  # header + rows
    parsed = list(csv.DictReader(to_csv(report).splitlines()))
    assert len(parsed) == len(report.rows)
    first = next(p for p in parsed if p["method"] == "lora" and p["sigma"] == "0.25")
    ref = next(r for r in report.rows if r["method"] == "lora" and r["sigma"] == 0.25)
    assert float(first["acr"]) == pytest.approx(ref["acr"])


def test_report_command_writes_files(sweep, tmp_path):
    from conftest import compose

    from peftsmooth.commands.report import run_report

    root, _ = sweep
    out = tmp_path / "rep"
    cfg = compose("report", [f"dirs=[{root}]", f"out={out}", "radius_grid=[0.5,1.0]"], run_dir=tmp_path / "hydra")
    result = run_report(cfg)
    assert {Path(p).name for p in result["files"].values()} == {f"report.{f}" for f in ("md", "csv", "tex", "png", "pdf")}
    assert (out / "report.png").stat().st_size > 1000 and (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert "cert@0.5" in (out / "report.md").read_text()
    assert len(result["rows"]) == 7


@pytest.mark.parametrize("overrides, needle", [
    ([], "dirs is empty"),
    (["dirs=[/nonexistent/dir]"], "is not a directory"),
    (["dirs=[{tmp}]", "radius_grid=[-1]"], "radius_grid"),
    (["dirs=[{tmp}]", "radius_grid=[]"], "radius_grid"),
    (["dirs=[{tmp}]"], "no runs found"),
])
def test_report_bad_input(tmp_path, overrides, needle):
    from conftest import compose

    from peftsmooth.commands.report import run_report

    cfg = compose("report", [o.replace("{tmp}", str(tmp_path)) for o in overrides], run_dir=tmp_path / "h")
    with pytest.raises(UserError, match=needle):
        run_report(cfg)
    assert not (tmp_path / "report.md").exists()


def test_report_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftsmooth", "report", str(tmp_path / "missing"),
                           f"hydra.run.dir={tmp_path}/h"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftsmooth report: error: dirs:"), proc.stderr
    assert not (tmp_path / "h").exists()  # the run dir of a command that did nothing is removed


def test_run_certified_at_another_sigma_is_labelled(tmp_path):
    base = make_run(tmp_path, "full_vit_tiny_digits_sigma0", method="full", sigma=0)
    make_cert(base, base / "certify" / "cohen_sigma0.5_n1000", rows_for(1, 8), method="full", sigma=0.5)
    row, = build_report([tmp_path], GRID).rows
    assert row["method"] == "full (trained sigma=0)" and row["sigma"] == 0.5


def test_a_copied_summary_without_its_tsv_is_not_a_second_certification(tmp_path):
    """The demo copies its LoRA summary.json to the demo folder: report must not count it twice."""
    import shutil

    run = make_run(tmp_path, "r")
    cert = make_cert(run, run / "certify" / "cohen_sigma0.5_n1000", rows_for(3, 6))
    shutil.copy(Path(cert) / "summary.json", tmp_path / "summary.json")
    assert len(build_report([tmp_path], GRID).rows) == 1


def test_report_numbers_come_from_the_rows_not_the_summary(tmp_path):
    """summary.json gives only metadata: a summary whose numbers disagree with its rows is not believed."""
    run = make_run(tmp_path, "r")
    rows = rows_for(5, 12)
    cert = make_cert(run, run / "certify" / "cohen_sigma0.5_n1000", rows,
                     extra={"acr": 9.0, "clean_accuracy": 0.0, "certified_accuracy": {"0.5": 1.0}, "num_images": 99})
    row, = build_report([tmp_path], GRID).rows
    expected = results.summarize(read_tsv(cert / "certify.tsv"), GRID, mode="cohen", n0=100, n=1000)
    assert row["acr"] == expected["acr"] and row["smoothed_accuracy"] == expected["clean_accuracy"]
    assert row["cert@0.5"] == expected["certified_accuracy"]["0.5"] and row["num_images"] == 12
    assert row["samples_per_image"] == 1100  # a six-column TSV: CERTIFY's fixed n0 + n


def test_report_shows_samples_per_image(tmp_path):
    run = make_run(tmp_path, "r")
    where = make_cert(run, run / "certify" / "sequential_sigma0.5_n1000", rows_for(2, 4), mode="sequential")
    lines = (where / "certify.tsv").read_text().splitlines()
    samples = [228, 356, 612, 1124]
    text = "\n".join([lines[0] + "\tsamples"] + [f"{line}\t{s}" for line, s in zip(lines[1:], samples)]) + "\n"
    (where / "certify.tsv").write_text(text)
    report = build_report([tmp_path], GRID)
    row, = report.rows
    assert row["samples_per_image"] == sum(samples) / 4 and row["acr"] is not None
    md = to_markdown(report)
    assert "samples/img" in md.splitlines()[0] and "| 580 |" in md
    parsed, = csv.DictReader(to_csv(report).splitlines())
    assert float(parsed["samples_per_image"]) == 580


def test_report_refuses_shards_of_different_certifications(tmp_path):
    run = make_run(tmp_path, "r", method="linear")
    base = run / "certify" / "cohen_sigma0.5_n1000"
    make_cert(run, base / "shard0of2", rows_for(3, 3, start=0, step=2), shard=0, num_shards=2)
    make_cert(run, base / "shard1of2", rows_for(3, 3, start=1, step=2), shard=1, num_shards=2, extra={"alpha": 0.01})
    with pytest.raises(UserError, match="alpha=0.01"):
        build_report([tmp_path], GRID)


@pytest.fixture
def two_modes(tmp_path):
    """One run certified twice: CERTIFY at n=1000 and sequential CERTIFY with n_max=1000."""
    run = make_run(tmp_path, "lora_vit_tiny_digits_sigma0.25", sigma=0.25)
    make_cert(run, run / "certify" / "cohen_sigma0.25_n1000", rows_for(1, 12), sigma=0.25)
    make_cert(run, run / "certify" / "sequential_sigma0.25_n1000", rows_for(2, 12), sigma=0.25, mode="sequential",
              extra={"n_max": 1000, "n": 1000, "alpha": 0.001})
    return tmp_path


def test_two_modes_give_two_distinguishable_rows_and_two_envelopes(two_modes, tmp_path):
    from peftsmooth.report.plot import plot_report

    report = build_report([two_modes], GRID)
    assert [(r["mode"], r["n"], r["alpha"], r["num_images"]) for r in report.rows] == [
        ("cohen", 1000, 0.001, 12), ("sequential", 1000, 0.001, 12)]
    md = to_markdown(report).splitlines()
    assert "| method | model | sigma | mode | n | alpha | images |" in md[0]
    assert [line.split(" | ")[3] for line in md[2:4]] == ["cohen", "sequential"]
    groups = curve_groups(report, [0.0, 0.5])
    assert sorted(groups) == ["lora (vit_tiny), cohen, n=1000, alpha=0.001",
                              "lora (vit_tiny), sequential, n=1000, alpha=0.001"]
    assert all(len(members) == 1 for members in groups.values())
    labels = plot_report(report, [tmp_path / "r.png", tmp_path / "r.pdf"])
    assert labels == [f"{g}; best over sigma in {{0.25}}" for g in sorted(groups)]
    assert (tmp_path / "r.pdf").read_bytes()[:5] == b"%PDF-"
    parsed = list(csv.DictReader(to_csv(report).splitlines()))
    assert [(p["mode"], p["n"], p["alpha"], p["num_images"]) for p in parsed] == [
        ("cohen", "1000", "0.001", "12"), ("sequential", "1000", "0.001", "12")]


def test_the_footnote_names_every_column(two_modes):
    from peftsmooth.report.render import FOOTNOTE, display_table

    header, _ = display_table(build_report([two_modes], GRID))
    named = {"cert@0.25": "cert@r", "cert@0.5": "cert@r", "cert@0.75": "cert@r", "cert@1": "cert@r",
             "method": None, "model": None, "sigma": None, "status": None}
    for column in header:
        if named.get(column, column):
            assert f"{named.get(column, column)}:" in FOOTNOTE, column
    assert "clean acc" not in FOOTNOTE and "smoothed acc: certified accuracy at r = 0" in FOOTNOTE


def test_a_mode_not_known_today_and_alpha_total_are_shown(tmp_path):
    """Later modes (e.g. incremental certification) bring their own mode string and a total alpha."""
    run = make_run(tmp_path, "r", sigma=0.5)
    make_cert(run, run / "certify" / "incremental", rows_for(4, 6), mode="incremental",
              extra={"alpha": 0.001, "alpha_total": 0.002})
    row, = build_report([tmp_path], GRID).rows
    assert (row["mode"], row["alpha"]) == ("incremental", 0.002)
    assert "| incremental | 1,000 | 0.002 | 6 |" in to_markdown(build_report([tmp_path], GRID))


def test_latex_table_is_booktabs_one_row_per_certification_best_in_bold(two_modes):
    from peftsmooth.report.latex import to_latex

    make_run(two_modes, "ia3_not_certified", method="ia3")  # a run without numbers: not a LaTeX row
    report = build_report([two_modes], GRID)
    tex = to_latex(report)
    lines = tex.splitlines()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert lines.count(rule) == 1, rule
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert len(body) == 2 and body[0].startswith("lora & vit\\_tiny & 0.25 & cohen & 1{,}000 & 0.001 & 12 & ")
    assert r"\caption{" in tex and "$n = 1{,}000$" in tex and r"$\alpha = 0.001$" in tex and "12 test images" in tex
    cells = [line.rstrip(" \\").split(" & ")[7:] for line in body]  # cert. acc. at the grid, then ACR
    certified = [r for r in report.rows if r["certification"]]
    for k, key in enumerate([*(f"cert@{g:g}" for g in GRID), "acr"]):
        values = [row[key] for row in certified]
        for cell, value in zip((c[k] for c in cells), values):
            assert cell.startswith(r"\textbf{") == (value == max(values)), (key, cell)
    assert f"{100 * certified[0]['cert@0.25']:.1f}" in body[0]


def test_report_formats_option_writes_only_those(two_modes, tmp_path):
    from conftest import compose

    from peftsmooth.commands.report import run_report

    out = tmp_path / "only"
    cfg = compose("report", [f"dirs=[{two_modes}]", f"out={out}", "formats=[tex,pdf]"], run_dir=tmp_path / "h")
    run_report(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["report.pdf", "report.tex"]
