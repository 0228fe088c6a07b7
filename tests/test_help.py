"""`peftsmooth COMMAND --help` explains every option: each key of each config the command composes
(every choice of every group it uses) is listed with its default and a description read from the
YAML comments in conf/, and only that command's groups are shown."""

from __future__ import annotations

import pytest

from peftsmooth.cli import COMMANDS, main
from peftsmooth.config import group_choices
from peftsmooth.helptext import help_entries, leaves, render_help, yaml_comments


def compositions():
    """(command, overrides) for the command's defaults and for each choice of each group it uses."""
    out = []
    for command in COMMANDS:
        choices, _ = help_entries(command, [])
        out.append((command, []))
        out += [(command, [f"{group}={choice}"]) for group in choices for choice in group_choices(group)]
    return out


CASES = compositions()


@pytest.mark.parametrize("command, overrides", CASES, ids=[f"{c} {' '.join(o)}" for c, o in CASES])
def test_every_key_is_in_the_help_with_a_description(command, overrides):
    from peftsmooth.helptext import compose_for_help

    plain, _ = compose_for_help(command, overrides)
    _, entries = help_entries(command, overrides)
    described = {key: text for key, _default, text in entries}
    assert set(described) == {key for key, _ in leaves(plain)}
    assert not [key for key, text in described.items() if not text.strip()], "keys without a comment in conf/"
    text = render_help(command, overrides, "title")
    assert all(f"  {key}=" in text for key in described)


def test_the_help_shows_the_groups_of_its_command_only():
    groups = {command: set(help_entries(command, [])[0]) for command in COMMANDS}
    assert groups["train"] == {"dataset", "model", "peft"}
    assert groups["certify"] == {"dataset", "model", "certify"}
    assert groups["denoise-baseline"] == {"dataset", "model", "denoiser"}
    assert not groups["report"] and not groups["import"]


def test_the_help_says_what_needs_network_and_the_offline_way(capsys):
    main(["certify", "--help"])
    text = capsys.readouterr().out
    assert "network: model.pretrained=true" in text and "model.weights=" in text and "dataset=digits" in text
    assert "n_max" not in text
    main(["certify", "certify=sequential", "model=vit_tiny", "dataset=digits", "--help"])
    text = capsys.readouterr().out
    assert "certify.n_max=100000" in text and "network:" not in text


def test_comments_above_a_key_and_continuation_lines_are_read(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("# the file\n# more of it\n\nplain: 1\n# explained above\n# on two lines\nabove: 2\n"
                    "inline: 'a # b'   # beside it\n                   # and continued\nnested:\n  key: 3  # inner\n")
    header, found = yaml_comments(path)
    assert header == "the file more of it"
    assert found == {"above": "explained above on two lines", "inline": "beside it and continued", "nested.key": "inner"}
