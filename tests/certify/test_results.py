"""results.py and tsv.py on files only: the one TSV parser, the samples column, summaries, shard names, merging."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from peftsmooth.certify import results, tsv
from peftsmooth.errors import UserError

COHEN_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
META = {"mode": "cohen", "n0": 100, "n": 1000, "alpha": 0.001, "sigma": 0.5, "seed": 0, "precision": "fp32",
        "dataset": "digits"}


def row(idx, label=3, predict=3, radius=0.5, time=1.25, samples=None) -> dict:
    out = {"idx": idx, "label": label, "predict": predict, "radius": radius, "correct": int(predict == label),
           "time": time}
    if samples is not None:
        out["samples"] = samples
    return out


def write_rows(path: Path, rows) -> Path:
    with results.TsvWriter(path) as writer:
        for r in rows:
            writer.write_row(r)
    return path


# --- the parser -------------------------------------------------------------------------------

def test_reads_cohens_own_file_with_timedelta_times(tmp_path):
    """Cohen's certify.py prints radius with 3 digits and time as a datetime.timedelta."""
    path = tmp_path / "cohen.tsv"
    path.write_text(COHEN_HEADER + "0\t3\t3\t0.823\t1\t0:00:13.736080\n1\t8\t-1\t0.0\t0\t0:01:02\n"
                    "2\t5\t5\t1.2\t1\t1 day, 2:03:04.500000\n")
    rows = results.read_tsv(path)
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"idx": 0, "label": 3, "predict": 3, "radius": 0.823, "correct": 1, "time": 13.73608}
    assert rows[1]["time"] == 62.0 and rows[1]["predict"] == -1
    assert rows[2]["time"] == pytest.approx(86400 + 2 * 3600 + 3 * 60 + 4.5)


def test_extra_columns_are_accepted(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\tnote\n0\t1\t1\t0.25\t1\t0.5\t1280\tfoo\n")
    assert results.read_tsv(path) == [{"idx": 0, "label": 1, "predict": 1, "radius": 0.25, "correct": 1,
                                       "time": 0.5, "samples": 1280}]


@pytest.mark.parametrize("tail", ["3\t3\t3\t0.1", "3\t3\t3\t0.1\t1\t0.5", "3"])
def test_a_torn_last_line_is_dropped(tmp_path, tail):
    path = tmp_path / "x.tsv"
    path.write_text(COHEN_HEADER + "0\t1\t1\t0.25\t1\t0.5\n" + tail)  # no newline: killed mid-write
    assert [r["idx"] for r in results.read_tsv(path)] == [0]


@pytest.mark.parametrize("text", ["", "idx\tlabel\tpre"])
def test_a_file_without_a_complete_header_has_no_rows(tmp_path, text):
    path = tmp_path / "x.tsv"
    path.write_text(text)
    assert results.read_tsv(path) == [] and tsv.read_columns(path) is None
    assert results.read_tsv(tmp_path / "missing.tsv") == []


@pytest.mark.parametrize("lines, needle", [
    (["idx\tlabel\tpredict\tradius\tcorrect\n"], r"x\.tsv:1: not a certify.tsv header"),
    (["idx label predict radius correct time\n"], r"x\.tsv:1: not a certify.tsv header"),
    ([COHEN_HEADER, "0\t1\t1\t0.25\t1\t0.5\n", "1\t1\tcat\t0.25\t1\t0.5\n"], r"x\.tsv:3: predict='cat'"),
    ([COHEN_HEADER, "0\t1\t1\t0.25\t1\n", "1\t1\t1\t0.25\t1\t0.5\n"], r"x\.tsv:2: 5 tab-separated fields"),
    ([COHEN_HEADER, "0\t1\t1\t0.25\t1\t0.5\n", "0\t1\t1\t0.3\t1\t0.5\n"], r"x\.tsv:3: image idx 0 again \(first on line 2\)"),
    ([COHEN_HEADER, "0\t1\t1\t0.25\t2\t0.5\n"], r"x\.tsv:2: correct='2' is not 0 or 1"),
    ([COHEN_HEADER, "0\t1\t1\t-0.25\t1\t0.5\n"], r"x\.tsv:2: radius='-0.25'"),
    ([COHEN_HEADER, "0\t1\t1\tnan\t1\t0.5\n"], r"x\.tsv:2: radius='nan'"),
    ([COHEN_HEADER, "0\t1\t1\t0.25\t1\t0:0:1\n"], r"x\.tsv:2: time='0:0:1'"),
    ([COHEN_HEADER, "\n", "0\t1\t1\t0.25\t1\t0.5\n"], r"x\.tsv:2: 1 tab-separated fields"),
    (["idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\n", "0\t1\t1\t0.25\t1\t0.5\t-3\n"], r"x\.tsv:2: samples='-3'"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, lines, needle):
    path = tmp_path / "x.tsv"
    path.write_text("".join(lines))
    with pytest.raises(UserError, match=needle):
        results.read_tsv(path)


def test_a_malformed_file_stops_certify_resume_and_merge(tmp_path):
    """Certify resume opens the file with TsvWriter; merge and report read it with read_tsv."""
    path = tmp_path / "certify.tsv"
    path.write_text("id\tlabel\n0\t1\n")
    with pytest.raises(UserError, match="certify.tsv:1"):
        results.TsvWriter(path)


# --- the samples column -------------------------------------------------------------------------

def test_samples_column_follows_cohens_six(tmp_path):
    rows = [row(0, samples=1100), row(1, predict=-1, radius=0.0, samples=1100), row(2, predict=4, samples=1100)]
    path = write_rows(tmp_path / "certify.tsv", rows)
    lines = path.read_text().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples"
    assert lines[1] == "0\t3\t3\t0.500000\t1\t1.2500\t1100"
    plain = write_rows(tmp_path / "plain.tsv", [{k: v for k, v in r.items() if k != "samples"} for r in rows])
    assert [line.rsplit("\t", 1)[0] for line in lines] == plain.read_text().splitlines()  # Cohen's columns unchanged
    df = pd.read_csv(path, sep="\t")  # Cohen's analysis reads the columns by name
    assert list(df.columns[:6]) == list(results.HEADER) and list(df["samples"]) == [1100] * 3
    assert (df["correct"] * df["radius"]).mean() == pytest.approx(results.summarize(results.read_tsv(path), [0.0])["acr"])


def test_summary_counts_samples_per_image(tmp_path):
    rows = [row(i, samples=s) for i, s in enumerate([228, 356, 612, 1124, 100100])]
    path = write_rows(tmp_path / "certify.tsv", rows)
    summary = results.summarize(results.read_tsv(path), [0.25], **(META | {"mode": "sequential"}))
    assert summary["total_samples"] == 102420 and summary["mean_samples"] == 102420 / 5
    assert summary["samples_quantiles"] == {"p10": pytest.approx(279.2), "p50": 612.0,
                                            "p90": pytest.approx(60509.6), "max": 100100}
    assert summary["samples_per_second"] == pytest.approx(102420 / (5 * 1.25))
    assert summary["acr"] == 0.5  # a mode other than predict certifies radii


def test_rows_without_samples_cost_their_modes_fixed_n():
    rows = [row(0), row(1)]
    cohen = results.summarize(rows, [0.5], **META)
    assert (cohen["total_samples"], cohen["mean_samples"]) == (2 * 1100, 1100)
    assert cohen["samples_quantiles"] == {"p10": 1100, "p50": 1100, "p90": 1100, "max": 1100}
    assert cohen["samples_per_second"] == 2 * 1100 / 2.5  # as before the samples column existed
    predict = results.summarize(rows, [0.5], **(META | {"mode": "predict"}))
    assert predict["total_samples"] == 2000 and predict["acr"] is None and predict["certified_accuracy"] == {}
    unknown = results.summarize(rows, [0.5], **(META | {"mode": "sequential"}))
    assert unknown["mean_samples"] is None and unknown["samples_per_second"] is None
    empty = results.summarize([], [0.5], **META)
    assert empty["total_samples"] is None and empty["num_images"] == 0


def test_resuming_a_six_column_file_keeps_six_columns(tmp_path):
    """A certification begun before the samples column existed: appended rows keep its columns, and a
    row torn by the kill is cut first."""
    path = tmp_path / "certify.tsv"
    path.write_text(COHEN_HEADER + "0\t3\t3\t0.500000\t1\t1.2500\n1\t3\t3\t0.5")
    write_rows(path, [row(1, samples=1100), row(2, samples=1100)])
    lines = path.read_text().splitlines()
    assert lines[0] + "\n" == COHEN_HEADER and len(lines) == 4 and all(len(x.split("\t")) == 6 for x in lines)
    rows = results.read_tsv(path)
    assert [r["idx"] for r in rows] == [0, 1, 2] and "samples" not in rows[0]
    assert results.summarize(rows, [0.5], **META)["total_samples"] == 3 * 1100


def test_a_samples_file_needs_samples_in_every_row(tmp_path):
    path = write_rows(tmp_path / "certify.tsv", [row(0, samples=10)])
    with results.TsvWriter(path) as writer, pytest.raises(ValueError, match="samples"):
        writer.write(1, 3, 3, 0.5, 1.0)


def test_writer_with_no_rows_leaves_cohens_header(tmp_path):
    path = write_rows(tmp_path / "certify.tsv", [])
    assert path.read_text() == COHEN_HEADER and results.read_tsv(path) == []


def test_old_write_signature_writes_cohens_six_columns(tmp_path):
    path = tmp_path / "certify.tsv"
    with results.TsvWriter(path) as writer:
        writer.write(7, 2, 2, 0.12345678, 0.5)
        writer.write(8, 2, 1, 0.9, 0.5)
    assert path.read_text() == COHEN_HEADER + "7\t2\t2\t0.123456\t1\t0.5000\n8\t2\t1\t0.900000\t0\t0.5000\n"


# --- curves, keys, files --------------------------------------------------------------------------

def test_curve_is_certified_accuracy_at_each_radius():
    rows = [dict(row(i, radius=r), correct=int(c)) for i, (r, c) in enumerate([(0.6, 1), (0.0, 0), (0.9, 0), (0.25, 1)])]
    radii = [0.0, 0.25, 0.3, 0.6, 0.61, 0.1]  # any order
    assert results.curve(rows, radii) == [results.certified_accuracy(rows, r) for r in radii] == [
        0.5, 0.5, 0.25, 0.25, 0.0, 0.5]
    assert results.certified_accuracy([], 0.0) == 0.0
    assert (results.radius_key(1), results.radius_column(1.0), results.radius_column(0.25)) == ("1.0", "cert@1", "cert@0.25")


def test_write_results_leaves_no_temporary_files(tmp_path):
    rows = [dict(row(i, samples=1100), correct=1) for i in range(3)]
    summary = results.write_results(tmp_path, rows, [0.25, 0.5], **META, num_planned=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.csv", "curve.png", "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary and summary["complete"]
    assert summary["mean_samples"] == 1100


# --- shards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, parsed", [("shard1of4", (1, 4)), ("shard0of2", (0, 2)), ("shard2of2", None),
                                          ("x_shard1of4", None), ("shard1", None), ("shard_1_of_4", None)])
def test_shard_directory_names(name, parsed):
    assert results.parse_shard_dir_name(name) == parsed
    if parsed:
        assert results.shard_dir_name(*parsed) == name


def make_shard(base: Path, shard: int, num_shards: int, rows, **extra) -> Path:
    d = base / results.shard_dir_name(shard, num_shards)
    d.mkdir(parents=True)
    write_rows(d / results.TSV_FILE, rows)
    meta = META | {"shard": shard, "num_shards": num_shards, "num_planned": len(rows)} | extra
    results.write_results(d, results.read_tsv(d / results.TSV_FILE), [0.5], **meta)
    return d


def test_merge_keeps_the_samples_column(tmp_path):
    make_shard(tmp_path, 0, 2, [row(0, samples=228), row(2, samples=1124)])
    make_shard(tmp_path, 1, 2, [row(1, samples=356), row(3, samples=612)])
    (tmp_path / "shard_extra").mkdir()  # not a shard directory name: not a shard
    summary = results.write_merged(tmp_path, results.find_shards([tmp_path]))
    merged = results.read_tsv(tmp_path / results.TSV_FILE)
    assert [r["samples"] for r in merged] == [228, 356, 1124, 612]
    assert summary["total_samples"] == 2320 and summary["complete"] and summary["merged_shards"] == 2
    assert "shard" not in summary and len(summary["merged_from"]) == 2


def test_merge_of_old_and_new_shards_drops_a_partial_samples_column(tmp_path):
    old = make_shard(tmp_path, 0, 2, [row(0)])
    make_shard(tmp_path, 1, 2, [row(1, samples=1100)])
    assert tsv.read_columns(old / results.TSV_FILE) == results.HEADER
    summary = results.write_merged(tmp_path, results.find_shards([tmp_path]))
    assert tsv.read_columns(tmp_path / results.TSV_FILE) == results.HEADER
    assert summary["total_samples"] == 2200  # the six-column shard costs its fixed n0 + n


def test_merge_refuses_shards_of_different_certifications(tmp_path):
    make_shard(tmp_path, 0, 2, [row(0)])
    make_shard(tmp_path, 1, 2, [row(1)], seed=1)
    with pytest.raises(UserError, match="seed=1"):
        results.merge_shards(results.find_shards([tmp_path]))
