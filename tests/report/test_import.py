"""`peftsmooth import`: Cohen-format logs of other tools as certifications `report` lists like its own.

Files only (tiny hand-written logs in the formats Cohen et al.'s certify.py writes), no model time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from peftsmooth import cli
from peftsmooth.certify import results
from peftsmooth.commands.import_logs import run_import
from peftsmooth.errors import UserError
from peftsmooth.report import import_logs
from peftsmooth.report.render import build_report, curve_groups

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
# rows as Cohen's certify.py prints them: radius with 3 digits, time a datetime.timedelta
COHEN_ROWS = ["0\t3\t3\t0.531\t1\t0:00:13.736080", "20\t8\t-1\t0.0\t0\t0:00:13.9",
              "40\t5\t5\t1.2\t1\t0:01:02", "60\t1\t2\t0.31\t0\t0:00:13.5"]


def log_file(path: Path, rows=COHEN_ROWS, header=HEADER, end="\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n".join(rows) + end)
    return path


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch):
    """curve.png is drawn by the code certify uses (tested there); here an empty file keeps tests fast."""
    monkeypatch.setattr(results, "plot_curve", lambda rows, path, **_: Path(path).write_bytes(b""))


def do_import(tmp_path: Path, files, *overrides) -> dict:
    """`peftsmooth import FILES... OVERRIDES...` as the command runs it (Hydra's config, run_import)."""
    cfg = compose("import", [f"files=[{','.join(str(f) for f in files)}]", *overrides], run_dir=tmp_path / "h")
    return run_import(cfg)


def import_to(out: Path, files, **options) -> dict:
    """The same import through the library (no Hydra composition: faster)."""
    imported = import_logs.prepare(files, **{"method": "cohen", "sigma": 0.25, **options})
    return results.read_summary(out) if import_logs.already_there(out, imported) else import_logs.write(out, imported)


def test_a_cohen_log_with_timedelta_times(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = log_file(tmp_path / "logs" / "noise_0.25" / "sigma_0.25")  # Cohen's names: no extension
    out = do_import(tmp_path, [source], "method=cohen", "sigma=0.25", "model_name=resnet110",
                    "dataset_name=cifar10")
    d = tmp_path / "imports" / "cifar10_resnet110_cohen_sigma0.25"
    assert Path(out["out"]).resolve() == d
    assert (d / "certify.tsv").read_text().splitlines() == [
        HEADER.strip(), "0\t3\t3\t0.531000\t1\t13.7361", "20\t8\t-1\t0.000000\t0\t13.9000",
        "40\t5\t5\t1.200000\t1\t62.0000", "60\t1\t2\t0.310000\t0\t13.5000"]
    summary = json.loads((d / "summary.json").read_text())
    assert (summary["method"], summary["sigma"], summary["model_name"], summary["dataset"]) == \
        ("cohen", 0.25, "resnet110", "cifar10")
    assert summary["num_images"] == 4 and summary["acr"] == pytest.approx((0.531 + 1.2) / 4)
    assert summary["certified_accuracy"]["0.5"] == 0.5 and summary["certified_accuracy"]["1.0"] == 0.25
    src, = summary[results.IMPORTED_FROM]
    assert src["path"] == str(source.resolve()) and src["rows"] == 4 and len(src["sha256"]) == 64
    assert (d / "curve.png").is_file() and not list((tmp_path / "imports").glob(".*"))  # no temporary left
    assert not (tmp_path / "h").exists()  # Hydra's own directory of an import is removed


def test_seconds_extra_columns_and_an_unterminated_last_line(tmp_path):
    rows = ["0\t3\t3\t0.531\t1\t13.74\tx", "1\t4\t4\t0.25\t1\t12\ty"]
    source = log_file(tmp_path / "smoothadv.txt", rows, header=HEADER.strip() + "\tnote\n", end="")
    import_to(tmp_path / "sa", [source], method="smoothadv", sigma=0.5)
    back = results.read_tsv(tmp_path / "sa" / "certify.tsv")
    assert [(r["idx"], r["time"]) for r in back] == [(0, 13.74), (1, 12.0)]  # a foreign log's last line is a row


def test_several_logs_are_parts_of_one_certification(tmp_path):
    a = log_file(tmp_path / "part0", COHEN_ROWS[:2])
    b = log_file(tmp_path / "part1", COHEN_ROWS[2:])
    summary = import_to(tmp_path / "one", [b, a])
    assert summary["num_images"] == 4 and len(summary[results.IMPORTED_FROM]) == 2
    c = log_file(tmp_path / "again", ["40\t5\t5\t1.2\t1\t0:01:02"])
    with pytest.raises(UserError, match=r"again:2: image idx 40 again \(first in .*part1:2\)"):
        import_to(tmp_path / "two", [a, b, c])
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize("rows, needle", [
    # diffusion-denoised-smoothing's reference logs: `correct` holds a running total
    (["0\t3\t3\t0.5\t1\t1.0", "1\t4\t4\t0.5\t2\t1.0"], r"dds\.tsv:3: correct='2' is not 0 or 1"),
    (["0\t3\t3\t0.5\t1\t1.0", "1\t4\t2\t0.5\t1\t1.0"], r"dds\.tsv:3: correct=1 but predict=2, label=4"),
    (["0\t3\t-1\t0.0\t1\t1.0"], r"dds\.tsv:2: correct=1 but predict=-1, label=3"),
])
def test_a_correct_column_that_disagrees_is_refused(tmp_path, rows, needle):
    source = log_file(tmp_path / "dds.tsv", rows)
    with pytest.raises(UserError, match=needle):
        import_to(tmp_path / "imports" / "dds", [source], method="dds", sigma=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dds.tsv"]  # nothing written


@pytest.mark.parametrize("files, overrides, needle", [
    ([], ["method=m", "sigma=0.5"], "files: give the Cohen-format logs"),
    (["{tmp}/missing"], ["method=m", "sigma=0.5"], "missing is not a file"),
    (["{tmp}/log"], ["sigma=0.5"], "method: give the label"),
    (["{tmp}/log"], ["method=m"], "sigma: give the noise level"),
    (["{tmp}/empty"], ["method=m", "sigma=0.5"], "empty: no rows to import"),
    (["{tmp}/log"], ["method=m", "sigma=0.5", "out={tmp}/log"], "already exists and holds something else"),
    (["{tmp}/log"], ["method=m", "sigma=inf"], "sigma: give the noise level"),
])
def test_bad_input(tmp_path, files, overrides, needle):
    log_file(tmp_path / "log")
    (tmp_path / "empty").write_text(HEADER)
    cfg = compose("import", [f"files=[{','.join(files)}]".replace("{tmp}", str(tmp_path)),
                             *[o.replace("{tmp}", str(tmp_path)) for o in overrides]], run_dir=tmp_path / "h")
    with pytest.raises(UserError, match=needle):
        run_import(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "log"]


def test_importing_again_changes_nothing_and_another_import_is_refused(tmp_path):
    source = log_file(tmp_path / "sigma_0.25")
    out = tmp_path / "imp"
    import_to(out, [source])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    import_to(out, [source])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(UserError, match="already exists"):
        import_to(out, [source], sigma=0.5)


def test_report_lists_imports_like_its_own(tmp_path):
    for sigma, rows in ((0.25, COHEN_ROWS), (0.5, ["0\t3\t3\t0.9\t1\t0:00:14", "20\t8\t8\t0.2\t1\t0:00:14"])):
        source = log_file(tmp_path / "logs" / f"sigma_{sigma}", rows)
        import_to(tmp_path / "imports" / f"s{sigma}", [source], sigma=sigma, model="resnet110", dataset="cifar10")
    report = build_report([tmp_path / "imports"], [0.25, 0.5, 1.0])
    assert [(r["method"], r["model"], r["dataset"], r["sigma"], r["status"]) for r in report.rows] == [
        ("cohen", "resnet110", "cifar10", 0.25, "imported"), ("cohen", "resnet110", "cifar10", 0.5, "imported")]
    assert [r["cert@0.5"] for r in report.rows] == [0.5, 0.5] and report.rows[0]["acr"] == pytest.approx(1.731 / 4)
    assert [r["mode"] for r in report.rows] == ["imported", "imported"]
    curves = curve_groups(report, [0.0, 0.5, 1.0])
    label = "cohen (resnet110), imported"
    assert list(curves) == [label] and [s for _, s, _ in curves[label]] == [0.25, 0.5]


def test_the_cli_takes_model_and_dataset_as_plain_keys():
    """conf/model/ and conf/dataset/ are config groups: `import model=resnet110` reaches run_import as
    model_name (the summary.json key), not as a choice Hydra would look up."""
    assert cli._rewrite_aliases("import", ["model=resnet110", "dataset=cifar10", "out=x", "--cfg"]) == [
        "model_name=resnet110", "dataset_name=cifar10", "out=x", "--cfg"]
    assert cli._rewrite_aliases("certify", ["model=vit"]) == ["model=vit"]
