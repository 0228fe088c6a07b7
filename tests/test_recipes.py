"""Every recipe of the documentation has, beside its GPU form, a CPU form (a bash block whose first
line is `# CPU form`: the same commands on a tiny model, digits and small n); this file runs each CPU
form end to end, command by command, as written."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from test_docs import PAGES, bash_blocks, block_commands


def cpu_forms() -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """(page, its commands with their variables) of every bash block whose first line is `# CPU form`:
    the CPU version of a recipe, on tiny models and small n."""
    forms = []
    for page in PAGES:
        for block in bash_blocks(page, keep_comments=True):
            if block and block[0].startswith("# CPU form"):
                forms.append((page.name, block_commands(block[1:])))
    return forms


CPU_FORMS = cpu_forms()


def test_the_recipes_have_cpu_forms():
    assert {"training.md", "baselines.md", "cluster.md"} <= {page for page, _ in CPU_FORMS}
    assert all(commands for _, commands in CPU_FORMS)


@pytest.mark.slow
@pytest.mark.parametrize("page, commands", CPU_FORMS, ids=[p for p, _ in CPU_FORMS])
def test_a_recipes_cpu_form_runs_end_to_end(page, commands, tmp_path, monkeypatch, hydra_logging):
    """The commands of a recipe's CPU form, in order, in one working directory, as written; the report
    at the end lists the certification."""
    from hydra.core.global_hydra import GlobalHydra

    from peftsmooth import cli
    from peftsmooth.certify import results
    from peftsmooth.train import watch as train_watch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_watch, "plot_training", lambda history, path: None)  # plots: tested elsewhere
    monkeypatch.setattr(results, "plot_curve", lambda rows, path, **_: Path(path).write_bytes(b""))
    for command, variables in commands:
        for name in sorted(variables, key=len, reverse=True):
            command = re.sub(r"\$" + name + r"\b", lambda _m, v=variables[name]: v, command)
        monkeypatch.setattr(sys, "argv", ["peftsmooth"])
        try:
            cli.main(shlex.split(command)[1:])
        except SystemExit as exited:
            assert exited.code in (0, None), command
        finally:
            GlobalHydra.instance().clear()
    certified = list((tmp_path / "recipe").rglob("certify.tsv"))
    report = (tmp_path / "recipe" / "report.csv").read_text().splitlines()
    assert 1 + 4 in [len(tsv.read_text().splitlines()) for tsv in certified]  # header, 4 images (merged)
    assert len(report) >= 2, report
