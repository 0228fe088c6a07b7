"""`peftsmooth certify certify=incremental` end to end on tiny digits runs: routes, rows, resume, refusals."""

import json
import subprocess
import sys

import pytest
from conftest import compose
from test_certify import make_run

from peftsmooth.certify import results
from peftsmooth.commands.certify import run_certify
from peftsmooth.errors import UserError

SMALL = ["device=cpu", "certify.batch_size=64", "certify.skip=60", "certify.max=6",
         "certify.radius_grid=[0.0,0.1,0.25,0.5]"]
PARENT = [*SMALL, "certify.n0=16", "certify.n=2000", "certify.alpha=0.001"]
INCREMENTAL = [*SMALL, "certify=incremental", "certify.n0=16", "certify.n_max=4000", "certify.alpha=0.002"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return make_run(base / "parent"), make_run(base / "variant", scale_head=4.4)


@pytest.fixture(scope="module")
def parent_cert(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("parent_cert")
    run_certify(compose("certify", [f"run={runs[0]}", *PARENT], run_dir=out))
    return out


def incremental(run, reference, out, *extra):
    return run_certify(compose("certify", [f"run={run}", *INCREMENTAL, f"certify.reference={reference}", *extra],
                               run_dir=out))


def lines(path):
    return [line.split("\t")[:5] + line.split("\t")[6:] for line in path.read_text().splitlines()]


def test_every_new_certification_stores_its_exact_lower_bound(parent_cert):
    rows = results.read_tsv(parent_cert / "certify.tsv")
    assert all(0 <= row["pA_lower"] <= 1 for row in rows)
    summary = results.read_summary(parent_cert)
    assert summary["alpha_total"] == 0.001
    assert summary["classifier_evaluations"] == summary["samples_drawn"]


def test_identical_variant_routes_and_counts_both_models(runs, parent_cert, tmp_path):
    summary = incremental(runs[0], parent_cert, tmp_path, "certify.fallback=none")
    rows = results.read_tsv(tmp_path / "certify.tsv")
    parent_rows = {r["idx"]: r for r in results.read_tsv(parent_cert / "certify.tsv")}
    assert summary["mode"] == "incremental" and summary["alpha_total"] == 0.002
    assert summary["parent_fingerprint"] == "verified" and summary["routes"]["parent"] > 0
    assert summary["weights_sha256"] == results.read_summary(parent_cert)["weights_sha256"]  # the same f
    assert summary["alpha_parent"] == 0.001 and summary["alpha_disagreement"] == pytest.approx(0.001)
    tested = [r for r in rows if r["route"] == "disagreement"]
    assert tested and all(r["disagreements"] == 0 for r in tested)
    assert summary["measured_disagreement"] == 0.0
    for row in tested:
        assert row["predict"] in (parent_rows[row["idx"]]["predict"], -1)
        assert row["pA_lower"] < parent_rows[row["idx"]]["pA_lower"]
    for row in rows:
        if row["route"] == "parent":  # kept abstentions: no certificate, no bound on f' (pA_lower 0)
            assert parent_rows[row["idx"]]["predict"] == -1 and row["samples"] == 0 and row["pA_lower"] == 0.0
    assert summary["classifier_evaluations"] == sum(r["samples"] for r in rows)
    assert summary["routes"] == {k: sum(r["route"] == k for r in rows) for k in summary["routes"]}


def test_rows_do_not_depend_on_batch_or_pool_size_and_resume_after_a_kill(runs, parent_cert, tmp_path):
    incremental(runs[1], parent_cert, tmp_path / "a")
    incremental(runs[1], parent_cert, tmp_path / "b", "certify.batch_size=23", "certify.pool_size=2")
    a, b = tmp_path / "a" / "certify.tsv", tmp_path / "b" / "certify.tsv"
    assert sorted(lines(a)) == sorted(lines(b))
    text = a.read_text().splitlines(keepends=True)
    a.write_text("".join(text[:3]) + text[3][:4])  # killed while writing the third row
    resumed = incremental(runs[1], parent_cert, tmp_path / "a")
    assert sorted(lines(a)) == sorted(lines(b)) and resumed["complete"]
    assert set(resumed["routes"]) <= {"parent", "disagreement", "sequential"}


def test_older_parent_without_pA_lower_is_recovered_from_the_radius(runs, parent_cert, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    rows = results.read_tsv(parent_cert / "certify.tsv")
    results.write_tsv(old / "certify.tsv", [{k: v for k, v in r.items() if k != "pA_lower"} for r in rows])
    summary = json.loads((parent_cert / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "weights_sha256"}))
    assert incremental(runs[0], old, tmp_path / "out", "certify.fallback=none")["parent_fingerprint"] == "unverified"
    new = {r["idx"]: r for r in results.read_tsv(tmp_path / "out" / "certify.tsv")}
    exact = {r["idx"]: r for r in rows}
    for idx, row in new.items():
        if row["route"] == "disagreement":
            assert row["pA_lower"] <= exact[idx]["pA_lower"]


@pytest.mark.parametrize("change, match", [
    ("sigma=0.5", "sigma"), ("certify.alpha=0.001", "certify.alpha"), ("certify.fallback=maybe", "certify.fallback"),
    ("certify.start=1", "no row for images"),
])
def test_refusals_before_any_work(runs, parent_cert, tmp_path, change, match):
    with pytest.raises(UserError, match=match):
        incremental(runs[1], parent_cert, tmp_path / "out", change)
    assert not (tmp_path / "out" / "certify.tsv").exists()


def test_refuses_a_parent_whose_run_cannot_be_loaded(runs, parent_cert, tmp_path):
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "certify.tsv").write_text((parent_cert / "certify.tsv").read_text())
    summary = json.loads((parent_cert / "summary.json").read_text()) | {"run": str(tmp_path / "gone")}
    (orphan / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="cannot be loaded"):
        incremental(runs[1], orphan, tmp_path / "out")


def test_refuses_a_parent_whose_labels_differ_from_this_dataset(runs, parent_cert, tmp_path):
    """Same idx, another image: a parent row whose label is not this dataset's label at that idx."""
    other = tmp_path / "other"
    other.mkdir()
    rows = results.read_tsv(parent_cert / "certify.tsv")
    rows[2] = rows[2] | {"label": (rows[2]["label"] + 1) % 10}
    results.write_tsv(other / "certify.tsv", rows)
    (other / "summary.json").write_text((parent_cert / "summary.json").read_text())
    with pytest.raises(UserError, match=f"other labels for images \\[{rows[2]['idx']}\\]"):
        incremental(runs[1], other, tmp_path / "out")
    assert not (tmp_path / "out" / "certify.tsv").exists()


def test_refuses_a_parent_run_that_now_holds_other_weights(runs, parent_cert, tmp_path):
    """The parent certificate is about the weights it certified: a run directory that holds other ones
    (here: another run's, as after training resumed in place) cannot serve as its f."""
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "certify.tsv").write_text((parent_cert / "certify.tsv").read_text())
    summary = json.loads((parent_cert / "summary.json").read_text()) | {"run": str(runs[1])}
    (moved / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="other weights"):
        incremental(runs[1], moved, tmp_path / "out")
    assert not (tmp_path / "out" / "certify.tsv").exists()
    done = subprocess.run([sys.executable, "-m", "peftsmooth", "certify", f"run={runs[1]}", *INCREMENTAL,
                           f"certify.reference={moved}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "other weights" in done.stderr and not list(runs[1].glob("certify/incremental*"))


def test_parent_f_runs_at_its_own_precision_under_a_bf16_variant(runs, parent_cert, tmp_path):
    summary = incremental(runs[1], parent_cert, tmp_path / "bf16", "certify.precision=bf16")
    assert summary["precision"] == "bf16" and summary["parent_precision"] == "fp32" and summary["complete"]
    assert summary["parent_merged_adapters"] == [] and summary["parent_fingerprint"] == "verified"


def test_cli_refusal_is_one_line_and_exit_2(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftsmooth", "certify", f"run={runs[1]}", *INCREMENTAL,
                           f"certify.reference={tmp_path / 'nothing'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "certify.reference" in done.stderr
    assert not list(runs[1].glob("certify/incremental*"))


def test_report_shows_the_mode_parent_routes_and_alpha_total(runs, parent_cert, tmp_path):
    from peftsmooth.report.render import to_csv
    from peftsmooth.report.table import build_report

    incremental(runs[0], parent_cert, tmp_path / "inc")
    report = build_report([tmp_path / "inc"])
    row = report.rows[0]
    assert row["mode"] == "incremental" and row["alpha_total"] == 0.002 and row["parent"] == str(parent_cert)
    assert "incremental from" in row["status"] and "routes:" in row["status"]
    assert "alpha_total" in to_csv(report).splitlines()[0]


def test_quantize_and_combine_name_the_incremental_command(runs, parent_cert, tmp_path):
    import shutil

    from peftsmooth.certify.reference import incremental_command

    assert "certify=incremental certify.reference=<a certify" in incremental_command(tmp_path / "v", runs[1])
    shutil.copytree(parent_cert, runs[1] / "certify" / "cohen_sigma0.25_n2000")
    command = incremental_command(runs[1], runs[1])
    assert command == (f"peftsmooth certify run={runs[1]} certify=incremental certify.reference="
                       f"{runs[1] / 'certify' / 'cohen_sigma0.25_n2000'} certify.n_max=2000 certify.skip=60 certify.max=6")
    printed = run_certify(compose("certify", [*command.split()[2:], "device=cpu", "certify.batch_size=64",
                                              "certify.n0=16"], run_dir=tmp_path / "as_printed"))
    assert printed["complete"] and printed["mode"] == "incremental"  # it runs as printed


def test_a_sequential_parent_works_and_a_predict_one_is_refused(runs, tmp_path):
    seq = [*SMALL, "certify=sequential", "certify.n0=16", "certify.n_max=2000", "certify.alpha=0.001"]
    run_certify(compose("certify", [f"run={runs[0]}", *seq], run_dir=tmp_path / "seq"))
    summary = incremental(runs[1], tmp_path / "seq", tmp_path / "inc")
    assert summary["parent_mode"] == "sequential" and summary["complete"]
    run_certify(compose("certify", [f"run={runs[0]}", *SMALL, "certify=predict", "certify.n=64"],
                        run_dir=tmp_path / "pred"))
    with pytest.raises(UserError, match="certify.mode=predict"):
        incremental(runs[1], tmp_path / "pred", tmp_path / "out")
