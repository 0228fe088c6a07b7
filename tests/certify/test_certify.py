"""`peftsmooth certify` / `merge` end to end on a tiny ViT and digits: files, resume, shards, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, compose

from peftsmooth.adapt.peft_tuners import merge_exact
from peftsmooth.certify import results
from peftsmooth.commands.certify import run_certify
from peftsmooth.commands.merge import run_merge
from peftsmooth.errors import UserError
from peftsmooth.models import build_classifier, count_parameters, save_state_dict_file
from peftsmooth.runs import to_plain, write_run_info

SMALL = ["device=cpu", "certify.n0=8", "certify.n=64", "certify.alpha=0.01", "certify.batch_size=32",
         "certify.skip=50", "certify.max=6", "certify.radius_grid=[0.0,0.1,0.25,0.5]"]
SCHEMA = {"acr", "certified_accuracy", "radius_grid", "clean_accuracy", "abstain_rate", "n0", "n", "alpha", "sigma",
          "num_images", "samples_per_second", "device", "precision", "mode", "run", "method", "model_name",
          "dataset", "trainable_params", "elapsed_seconds", "complete"}


def make_run(run_dir: Path, sigma=0.25, scale_head=4.0) -> Path:
    """A run directory as `train` writes it: a (random, tiny) full backbone checkpoint + run.json."""
    cfg = compose("certify", TINY)
    torch.manual_seed(0)
    clf = build_classifier(cfg.model, 10, [1, 8, 8])
    with torch.no_grad():  # a more decisive random head: varied radii instead of all-abstain rows
        clf.backbone.head.weight.mul_(scale_head)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict_file(clf.backbone.state_dict(), run_dir / "model.safetensors")
    model = to_plain(cfg.model) | {"checkpoint": str(run_dir / "model.safetensors")}
    trainable, total = count_parameters(clf)
    write_run_info(run_dir, command="train", method="full", model=model, model_name="vit_tiny",
                   dataset=to_plain(cfg.dataset), num_classes=10, image_size=[1, 8, 8], input_size=16, sigma=sigma,
                   adapt={"_target_": "peftsmooth.adapt.NoAdaptation"}, front=None, base=None,
                   trainable_params=trainable, total_params=total, files=["model.safetensors"], finished=True)
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("train") / "run")


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """One uninterrupted certification: (its dir, its summary)."""
    out = tmp_path_factory.mktemp("ref")
    return out, run_certify(compose("certify", [f"run={run_dir}", *SMALL], run_dir=out))


def rows_without_time(path):
    return [line.split("\t")[:5] for line in Path(path).read_text().splitlines()]


def test_outputs_follow_the_schema(reference):
    out, summary = reference
    lines = (out / "certify.tsv").read_text().splitlines()
    # Cohen's six columns first, then the forward passes spent per image (n0 + n for CERTIFY) and the
    # exact lower bound on pA behind each radius
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\tpA_lower" and len(lines) == 1 + 6
    assert {line.split("\t")[6] for line in lines[1:]} == {str(8 + 64)}
    assert SCHEMA <= set(summary) and summary["complete"] and summary["num_images"] == 6
    assert summary == json.loads((out / "summary.json").read_text())
    assert (summary["n0"], summary["n"], summary["alpha"], summary["sigma"]) == (8, 64, 0.01, 0.25)
    assert summary["method"] == "full" and summary["precision"] == "fp32" and summary["merged_adapters"] == []
    assert list(summary["certified_accuracy"]) == ["0.0", "0.1", "0.25", "0.5"]
    assert (out / "curve.png").stat().st_size > 0
    curve = pd.read_csv(out / "curve.csv")
    assert list(curve.columns) == ["radius", "certified_accuracy"] and curve.radius.iloc[0] == 0
    idx = [int(line.split("\t")[0]) for line in lines[1:]]
    assert idx == list(range(0, 300, 50))


def test_summary_counts_forward_passes_fill_and_wall_time(reference):
    """forward_calls, samples_drawn, batch_fill and wall_seconds: 6 images x (8 + 64) samples in batches
    of 32, packed across images (one image at a time would take 6 x (1 + 2) = 18 passes)."""
    _, summary = reference
    assert summary["samples_drawn"] == 6 * (8 + 64) == summary["total_samples"]
    assert summary["batch_capacity"] == 32 * summary["forward_calls"]
    assert summary["forward_calls"] <= -(-6 * 72 // 32) + 1 < 18
    assert summary["batch_fill"] == pytest.approx(summary["samples_drawn"] / summary["batch_capacity"])
    assert 0.9 < summary["batch_fill"] <= 1 and summary["wall_seconds"] > 0


def test_merged_shards_sum_their_forward_passes(run_dir, tmp_path):
    base = tmp_path / "cert"
    parts = [run_certify(compose("certify", [f"run={run_dir}", *SMALL, f"certify.shard={i}", "certify.num_shards=2"],
                                 run_dir=base / f"shard{i}of2")) for i in range(2)]
    merged = run_merge(compose("merge", [f"dirs=[{base}]"], run_dir=tmp_path / "merge"))
    for key in ("forward_calls", "samples_drawn", "batch_capacity"):
        assert merged[key] == sum(p[key] for p in parts)
    assert merged["batch_fill"] == pytest.approx(merged["samples_drawn"] / merged["batch_capacity"])


def test_cohen_analysis_of_the_tsv_gives_the_summary(reference):
    """Cohen's analyze.py: certified accuracy at r = mean(correct & radius >= r); ACR = mean(correct * radius)."""
    out, summary = reference
    df = pd.read_csv(out / "certify.tsv", delimiter="\t")
    assert set(df["correct"]) <= {0, 1}
    assert ((df["predict"] == df["label"]) == (df["correct"] == 1)).all()
    assert (df.loc[df["predict"] == -1, "correct"] == 0).all()
    for r, value in summary["certified_accuracy"].items():
        assert value == pytest.approx((df["correct"].astype(bool) & (df["radius"] >= float(r))).mean())
    assert summary["acr"] == pytest.approx((df["correct"] * df["radius"]).mean())
    assert summary["clean_accuracy"] == pytest.approx(df["correct"].mean())
    assert summary["abstain_rate"] == pytest.approx((df["predict"] == -1).mean())
    assert (df["radius"] > 0).any(), "the tiny model should certify some images"


def test_resume_after_a_kill_gives_identical_rows(run_dir, reference, tmp_path):
    out, summary = reference
    run_certify(compose("certify", [f"run={run_dir}", *SMALL], run_dir=tmp_path))
    tsv = tmp_path / "certify.tsv"
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:4]) + lines[4][:5])  # killed while writing the 4th row
    resumed = run_certify(compose("certify", [f"run={run_dir}", *SMALL], run_dir=tmp_path))
    assert rows_without_time(tsv) == rows_without_time(out / "certify.tsv")
    for key in ("acr", "certified_accuracy", "clean_accuracy", "abstain_rate", "num_images", "complete"):
        assert resumed[key] == summary[key]


def test_resume_refuses_other_settings(run_dir, tmp_path):
    run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2"], run_dir=tmp_path))
    with pytest.raises(UserError, match="n=64"):
        run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2", "certify.n=65"], run_dir=tmp_path))


def test_resume_and_merge_refuse_rows_of_other_weights(run_dir, tmp_path):
    """A certification whose classifier changed since (training resumed in the run, say) never mixes rows
    of two classifiers: resume and merge compare summary.json's weights_sha256."""
    import json

    first = run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2"], run_dir=tmp_path / "a"))
    assert len(first["weights_sha256"]) == 64
    for directory in (tmp_path / "a", tmp_path / "b"):
        if directory.name == "b":
            run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2", "certify.shard=1",
                                            "certify.num_shards=2"], run_dir=directory))
        summary = json.loads((directory / "summary.json").read_text())
        summary["weights_sha256"] = "0" * 64  # as if certified from other weights
        (directory / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="other weights"):
        run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2"], run_dir=tmp_path / "a"))
    part = run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2", "certify.shard=0",
                                           "certify.num_shards=2"], run_dir=tmp_path / "c"))
    assert part["weights_sha256"] == first["weights_sha256"]
    with pytest.raises(UserError, match="weights_sha256"):
        run_merge(compose("merge", [f"dirs=[{tmp_path / 'c'},{tmp_path / 'b'}]"], run_dir=tmp_path / "merged"))


def test_shards_merge_into_the_single_run(run_dir, reference, tmp_path):
    out, summary = reference
    base = tmp_path / "cert"
    for i in range(3):
        part = run_certify(compose("certify", [f"run={run_dir}", *SMALL, f"certify.shard={i}", "certify.num_shards=3"],
                                   run_dir=base / f"shard{i}of3"))
        assert part["shard"] == i and part["num_shards"] == 3 and part["complete"]
    merged = run_merge(compose("merge", [f"dirs=[{base}]"], run_dir=tmp_path / "merge"))
    assert rows_without_time(base / "certify.tsv") == rows_without_time(out / "certify.tsv")
    for key in ("acr", "certified_accuracy", "clean_accuracy", "abstain_rate", "num_images", "complete", "n", "sigma"):
        assert merged[key] == summary[key]
    assert "shard" not in merged and merged["merged_shards"] == 3
    assert not (tmp_path / "merge").exists()  # nothing but Hydra's files: removed


def test_merge_refuses_mismatched_shards(run_dir, tmp_path):
    a = tmp_path / "a" / "shard0of2"
    b = tmp_path / "b" / "shard1of2"
    run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.shard=0", "certify.num_shards=2", "certify.max=2"], run_dir=a))
    run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.shard=1", "certify.num_shards=2", "certify.max=2",
                                    "certify.alpha=0.05"], run_dir=b))
    with pytest.raises(UserError, match="alpha"):
        run_merge(compose("merge", [f"dirs=[{a},{b}]"], run_dir=tmp_path / "m"))


def test_predict_mode_reports_smoothed_accuracy(run_dir, tmp_path):
    summary = run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify=predict", "certify.n=64"], run_dir=tmp_path))
    assert summary["mode"] == "predict" and summary["acr"] is None and summary["num_images"] == 6
    df = pd.read_csv(tmp_path / "certify.tsv", delimiter="\t")
    assert (df["radius"] == 0).all() and summary["clean_accuracy"] == pytest.approx(df["correct"].mean())
    assert (df["samples"] == 64).all()  # PREDICT spends n forward passes per image, no selection
    assert not (tmp_path / "curve.png").exists()


def test_off_the_shelf_model_without_a_run(tmp_path):
    summary = run_certify(compose("certify", [*TINY, *SMALL, "sigma=0.5", "certify.max=2", "certify.precision=bf16",
                                               "certify.batch_size=auto"],
                                  run_dir=tmp_path))
    assert summary["method"] == "none" and summary["run"] is None and summary["model_name"] == "vit_tiny"
    assert summary["precision"] == "bf16" and summary["sigma"] == 0.5 and summary["num_images"] == 2
    assert summary["batch_size"] == 256  # auto on the CPU


@pytest.mark.parametrize("override,match", [
    ("certify.n0=0", "certify.n0"), ("certify.n=0", "certify.n="), ("certify.alpha=0", "certify.alpha"),
    ("certify.alpha=1.5", "certify.alpha"), ("sigma=0", "sigma"), ("sigma=-0.5", "sigma"),
    ("certify.batch_size=0", "certify.batch_size"), ("certify.shard=2", "certify.shard"),
    ("certify.precision=fp8", "certify.precision"), ("dataset=cifar100", "num_classes"), ("run=NOTARUN", "not a run"),
])
def test_bad_input_is_a_user_error_before_sampling(run_dir, tmp_path, override, match):
    override = override.replace("NOTARUN", str(tmp_path))
    with pytest.raises(UserError, match=match):
        run_certify(compose("certify", [f"run={run_dir}", *SMALL, override], run_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / "certify.tsv").exists()


def test_model_needs_sigma(tmp_path):
    with pytest.raises(UserError, match="sigma"):
        run_certify(compose("certify", [*TINY, *SMALL], run_dir=tmp_path))


def test_cli_bad_input_is_one_line_and_exit_2(run_dir):
    done = subprocess.run([sys.executable, "-m", "peftsmooth", "certify", f"run={run_dir}", *SMALL, "certify.alpha=2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "certify.alpha" in done.stderr
    assert not list(run_dir.glob("certify/*/certify.tsv"))


def test_lora_adapters_are_merged_exactly():
    from peft import LoraConfig, get_peft_model

    cfg = compose("certify", TINY)
    clf = build_classifier(cfg.model, 10, [1, 8, 8]).eval()
    model = get_peft_model(clf, LoraConfig(r=4, target_modules=["qkv", "fc1"], init_lora_weights=False)).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        merged, methods = merge_exact(model)
        after = merged(x)
    assert methods == ["LORA"] and not hasattr(merged, "peft_config")
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_merge_into_the_single_run(run_dir, reference, tmp_path):
    out, summary = reference
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "peftsmooth", "certify", f"run={run_dir}", *SMALL, f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows_without_time(tmp_path / "certify.tsv") == rows_without_time(out / "certify.tsv")
    merged = json.loads((tmp_path / "summary.json").read_text())
    assert merged["acr"] == summary["acr"] and merged["merged_shards"] == 2 and merged["complete"]
    assert (tmp_path / "shard0of2" / "certify.tsv").is_file() and (tmp_path / "shard1of2" / "certify.tsv").is_file()


def test_resume_may_extend_the_selection(run_dir, reference, tmp_path):
    out, summary = reference
    run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=2"], run_dir=tmp_path))
    extended = run_certify(compose("certify", [f"run={run_dir}", *SMALL], run_dir=tmp_path))
    assert rows_without_time(tmp_path / "certify.tsv") == rows_without_time(out / "certify.tsv")
    assert extended["acr"] == summary["acr"] and extended["complete"]
    with pytest.raises(UserError, match="selection"):
        run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=1"], run_dir=tmp_path))


def test_certify_dir_is_deterministic_for_runs(run_dir):
    from peftsmooth.commands.certify import certify_dir

    args = dict(resume=None, run=str(run_dir), mode="cohen", sigma=None, n=64, model="vit", dataset="digits",
                stamp="T", shard=0, num_shards=1)
    assert certify_dir(**args) == str(run_dir / "certify" / "cohen_sigma0.25_n64")  # the run's sigma
    assert certify_dir(**(args | dict(sigma=0.5, shard=1, num_shards=2))) == str(
        run_dir / "certify" / "cohen_sigma0.5_n64" / "shard1of2")
    assert certify_dir(**(args | dict(resume="/some/dir"))) == "/some/dir"
    assert certify_dir(**(args | dict(run=None))).endswith("outputs/certify/cohen_vit_digits/T")


def test_resume_needs_a_certify_tsv(run_dir, tmp_path):
    with pytest.raises(UserError, match="certify.resume"):
        run_certify(compose("certify", [f"run={run_dir}", *SMALL, f"certify.resume={tmp_path}"], run_dir=tmp_path))


def test_resumed_sessions_add_their_forward_passes(run_dir, tmp_path):
    first = run_certify(compose("certify", [f"run={run_dir}", *SMALL, "certify.max=3"], run_dir=tmp_path / "c"))
    second = run_certify(compose("certify", [f"run={run_dir}", *SMALL], run_dir=tmp_path / "c"))
    assert first["samples_drawn"] == 3 * 72 and second["samples_drawn"] == 6 * 72
    assert second["forward_calls"] > first["forward_calls"]
    assert second["wall_seconds"] >= first["wall_seconds"]
