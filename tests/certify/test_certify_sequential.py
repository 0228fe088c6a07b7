"""`peftsmooth certify certify=sequential` end to end: rows, samples, resume after a kill, shards, bad input."""

from pathlib import Path

import pytest
from conftest import compose
from test_certify import rows_without_time, run_dir  # noqa: F401 (run_dir: the tiny run fixture)

from peftsmooth.commands.certify import run_certify
from peftsmooth.commands.merge import run_merge
from peftsmooth.errors import UserError

SEQ = ["device=cpu", "certify=sequential", "certify.n0=8", "certify.n_max=600", "certify.alpha=0.01",
       "certify.batch_size=64", "certify.skip=50", "certify.max=6", "certify.radius_grid=[0.0,0.1,0.25,0.5]"]


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    return out, run_certify(compose("certify", [f"run={run_dir}", *SEQ], run_dir=out))


def samples_column(path: Path) -> list[int]:
    return [int(line.split("\t")[6]) for line in path.read_text().splitlines()[1:]]


def test_sequential_rows_stop_early_and_record_the_rule(reference):
    out, summary = reference
    assert summary["mode"] == "sequential" and summary["n"] == 600 and summary["num_images"] == 6
    assert summary["stop"] == "radii" and summary["radii"] == [0.1, 0.25, 0.5]  # the grid's positive radii
    samples = samples_column(out / "certify.tsv")
    assert all(8 + 128 <= s <= 8 + 600 for s in samples) and min(samples) < 8 + 600
    assert summary["total_samples"] == sum(samples)
    assert summary["mean_samples"] == pytest.approx(sum(samples) / 6)


def test_sequential_resume_after_a_kill_gives_identical_rows(run_dir, reference, tmp_path):
    out, _ = reference
    run_certify(compose("certify", [f"run={run_dir}", *SEQ, "certify.max=3"], run_dir=tmp_path))
    tsv = tmp_path / "certify.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:3]) + lines[3][:4])  # killed while writing the 3rd row
    run_certify(compose("certify", [f"run={run_dir}", *SEQ], run_dir=tmp_path))  # and resumed with a larger max
    assert rows_without_time(tsv) == rows_without_time(out / "certify.tsv")
    assert samples_column(tsv) == samples_column(out / "certify.tsv")


def test_sequential_shards_merge_into_the_single_run(run_dir, reference, tmp_path):
    out, summary = reference
    base = tmp_path / "cert"
    for i in range(2):
        run_certify(compose("certify", [f"run={run_dir}", *SEQ, f"certify.shard={i}", "certify.num_shards=2",
                                        "certify.pack=false"], run_dir=base / f"shard{i}of2"))
    merged = run_merge(compose("merge", [f"dirs=[{base}]"], run_dir=tmp_path / "merge"))
    assert rows_without_time(base / "certify.tsv") == rows_without_time(out / "certify.tsv")
    assert merged["total_samples"] == summary["total_samples"] and merged["acr"] == summary["acr"]


def test_resume_refuses_another_stopping_rule(run_dir, tmp_path):
    run_certify(compose("certify", [f"run={run_dir}", *SEQ, "certify.max=1"], run_dir=tmp_path))
    with pytest.raises(UserError, match="stop=radii, this run has stop=radius"):
        run_certify(compose("certify", [f"run={run_dir}", *SEQ, "certify.max=1", "certify.stop=radius"],
                            run_dir=tmp_path))


@pytest.mark.parametrize("override,match", [
    ("certify.n_max=0", "certify.n_max=0"), ("certify.n_max=1.5", "certify.n_max"),
    ("certify.stop=never", "certify.stop=never is not allowed"), ("certify.radii=[0.5,-1]", "certify.radii"),
    ("certify.radii=[]", "certify.radii"), ("certify.n=100", "certify.n=100 must equal certify.n_max"),
    ("certify.max_radius_loss=-0.1", None), ("certify.max_radius_loss=null", None), ("certify.n0=0", "certify.n0"),
])
def test_bad_sequential_input_is_a_user_error_before_sampling(run_dir, tmp_path, override, match):
    overrides = [f"run={run_dir}", *SEQ, override]
    if match is None:  # a stop rule without (a valid) parameter
        overrides.append("certify.stop=radius")
        match = "certify.max_radius_loss"
    with pytest.raises(UserError, match=match):
        run_certify(compose("certify", overrides, run_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / "certify.tsv").exists()



def test_the_benchmark_reads_samples_and_time_from_certify_dirs(run_dir, reference):
    from test_sequential import load_bench

    bench = load_bench()
    out, summary = reference
    outcomes = bench.certified_outcomes(out)
    assert outcomes.samples.tolist() == samples_column(out / "certify.tsv") and outcomes.seconds > 0
    table = bench.compare({"cohen": outcomes, "again": outcomes}, grid=(0.0, 0.25), radii=(0.25,))
    assert table["again"]["fewer_samples"] == 1.0 and table["again"]["less_time"] == 1.0
    assert table["cohen"]["acr"] == pytest.approx(summary["acr"])
    commands = bench.certify_commands(run_dir, 0.25, 1000, 8, 0.01, (0.25, 0.5), 0.04, out, ["certify.max=2"])
    assert [c[-1] for c in commands.values()] == [f"hydra.run.dir={out}/{name}" for name in
                                                  ("cohen", "sequential_radii", "sequential_radius")]
    assert "certify.radii=[0.25,0.5]" in commands["sequential stop=radii"]
