"""Every reader of certify.tsv (certify resume, merge, report, import) goes through peftsmooth.certify.tsv with
the same guarantees: our own torn last line is dropped; any other malformed line is one UserError
naming the file and the line (exit 2 through the CLI), and nothing is written. Files only, no model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose

from peftsmooth.certify import results, tsv
from peftsmooth.certify.engine import resume_rows
from peftsmooth.errors import UserError

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
GOOD = "0\t1\t1\t0.25\t1\t0.5\n"
META = {"mode": "cohen", "n0": 100, "n": 1000, "alpha": 0.001, "sigma": 0.5, "seed": 0, "precision": "fp32",
        "dataset": "digits"}


def test_correct_must_agree_with_predict_and_label(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text(HEADER + GOOD + "1\t2\t3\t0.25\t1\t0.5\n")
    with pytest.raises(UserError, match=r"x\.tsv:3: correct=1 but predict=3, label=2"):
        tsv.read_tsv(path)


def test_a_foreign_log_keeps_its_unterminated_last_line(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text(HEADER + GOOD + "1\t2\t2\t0.5\t1\t0:00:01.5")
    assert [r["idx"] for r in tsv.read_tsv(path)] == [0]  # our own file: a torn tail
    assert [r["time"] for r in tsv.read_tsv(path, foreign=True)] == [0.5, 1.5]
    path.write_text(HEADER + GOOD + "1\t2\t2\t0.5")
    with pytest.raises(UserError, match=r"x\.tsv:3: 4 tab-separated fields"):
        tsv.read_tsv(path, foreign=True)


def test_certify_resume_refuses_a_duplicated_idx_and_leaves_the_file(tmp_path):
    results.write_results(tmp_path, [], [0.5], **META)
    path = tmp_path / results.TSV_FILE
    text = HEADER + GOOD + "1\t1\t1\t0.25\t1\t0.5\n" + GOOD + "2\t1"  # idx 0 twice, then a torn tail
    path.write_text(text)
    with pytest.raises(UserError, match=r"certify\.tsv:4: image idx 0 again \(first on line 2\)"):
        resume_rows(tmp_path, META, {0, 1, 2})
    assert path.read_text() == text


def _shard(d: Path, shard: int, body: str) -> Path:
    d.mkdir(parents=True)
    results.write_results(d, [], [0.5], **META, shard=shard, num_shards=2, num_planned=1)
    (d / results.TSV_FILE).write_text(HEADER + body)
    return d


def test_merge_refuses_a_malformed_shard_before_writing(tmp_path):
    from peftsmooth.commands.merge import run_merge

    cert = tmp_path / "cert"
    _shard(cert / "shard0of2", 0, GOOD)
    _shard(cert / "shard1of2", 1, "1\t1\tcat\t0.25\t1\t0.5\n")
    cfg = compose("merge", [f"dirs=[{cert}]", f"out={tmp_path}/merged"], run_dir=tmp_path / "h")
    with pytest.raises(UserError, match=r"shard1of2/certify\.tsv:2: predict='cat'"):
        run_merge(cfg)
    assert not (tmp_path / "merged").exists() and not (cert / results.TSV_FILE).exists()


def test_report_refuses_a_wrong_header_before_writing(tmp_path):
    from peftsmooth.commands.report import run_report

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / results.TSV_FILE).write_text("idx\tlabel\tprediction\tradius\tcorrect\ttime\n" + GOOD)
    cfg = compose("report", [f"dirs=[{tmp_path}]"], run_dir=tmp_path / "h")
    with pytest.raises(UserError, match=r"c/certify\.tsv:1: not a certify.tsv header"):
        run_report(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
