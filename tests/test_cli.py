"""The CLI as a user runs it: dispatch, Hydra help and --cfg, config composition, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose

from peftsmooth.config import conf_dir, group_choices

GROUPS = {
    "train": ["dataset", "model", "peft"],
    "certify": ["dataset", "model", "certify"],
    "denoise-baseline": ["dataset", "model", "denoiser"],
}


def peftsmooth(*args, cwd):
    """Run the installed CLI the way a user does, from an arbitrary working directory."""
    return subprocess.run([sys.executable, "-m", "peftsmooth", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)


def test_help_lists_commands(tmp_path):
    out = peftsmooth("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("train", "certify", "denoise-baseline", "report", "demo"):
        assert command in out.stdout


def test_unknown_command_is_one_line_exit_2(tmp_path):
    out = peftsmooth("trian", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "choose from" in out.stderr
    assert out.stderr.startswith("peftsmooth: error: unknown command 'trian'")  # no stray space before the colon


def test_train_help_shows_its_config_groups_and_only_those(tmp_path):
    out = peftsmooth("train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in ("dataset", "model", "peft"):
        assert f"  {group}=" in out.stdout
    assert "certify" not in out.stdout and "denoiser" not in out.stdout
    assert "peftsmooth train GROUP=CHOICE --help" in out.stdout


def test_command_help_shows_its_purpose_and_documentation_page_first(tmp_path):
    out = peftsmooth("certify", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[:2]
    assert first[0] == "peftsmooth certify: certify a classifier by randomized smoothing (Cohen et al. 2019)"
    assert first[1].startswith("Documentation: docs/certification.md")
    assert out.stdout.index("Documentation:") < out.stdout.index("Config groups")
    from peftsmooth.cli import COMMANDS, DOCS_PAGES

    docs = Path(__file__).resolve().parents[1] / "docs"
    assert set(DOCS_PAGES) == set(COMMANDS) and all((docs / f"{p}.md").is_file() for p in DOCS_PAGES.values())


def test_cfg_job_prints_composed_config_from_any_directory(tmp_path):
    out = peftsmooth("train", "--cfg", "job", "model=vit", "sigma=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "vit_base_patch16_224.augreg_in21k" in out.stdout
    assert "sigma: 0.5" in out.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg writes nothing


def test_configs_live_in_the_package_config_folder():
    assert (conf_dir() / "train.yaml").is_file()
    assert Path(conf_dir()).name == "conf"


@pytest.mark.parametrize(
    "command,group,choice",
    [(c, g, v) for c, groups in GROUPS.items() for g in groups for v in group_choices(g)],
)
def test_every_group_choice_composes(command, group, choice):
    cfg = compose(command, [f"{group}={choice}"])
    assert cfg[group] is not None
    assert "sigma" in cfg


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "model=nope"], "model=nope is not allowed (choose from:"),
        (["train", "dataset=mnist"], "dataset=mnist is not allowed"),
        (["train", "-m", "model=vit,nope"], "model=nope is not allowed"),
        (["train", "sigma=-0.5", "dataset=digits", "peft=none", "model=vit_tiny", "device=cpu"], "sigma=-0.5 must be >= 0"),
        (["train", "no_such_key=1"], "no_such_key"),
        (["train", "dataset=cifar10", "dataset.root=/nonexistent/cifar", "dataset.download=false",
          "model=vit_tiny", "peft=none", "device=cpu"], "/nonexistent/cifar"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    out = peftsmooth(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # no run directory is left looking like a finished one
    assert not list(tmp_path.glob("outputs/**/run.json"))
    leftover = [p for p in tmp_path.glob("outputs/*/*/*") if p.name != ".hydra" and p.suffix != ".log"]
    assert not leftover, leftover


def test_third_party_progress_bars_are_off_inside_commands(monkeypatch):
    """transformers' "Loading weights" bar and the hub's download bars are silenced; ours is rich's."""
    import huggingface_hub
    import transformers

    from peftsmooth.cli import quiet_third_party

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was_hub, was_tf = huggingface_hub.utils.are_progress_bars_disabled(), transformers.utils.logging.is_progress_bar_enabled()
    try:
        quiet_third_party()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        if not was_hub:
            huggingface_hub.utils.enable_progress_bars()
        if was_tf:
            transformers.utils.logging.enable_progress_bar()


def test_data_workers_fit_the_cores(monkeypatch):
    from peftsmooth.train.settings import TrainSettings, data_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert data_workers("auto") == 1 and data_workers(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert data_workers("auto") == 4
    assert TrainSettings.from_cfg({"num_workers": "auto"}).num_workers == "auto"
