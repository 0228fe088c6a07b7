"""Documentation that cannot rot: every relative link and anchor of README.md and docs/ resolves, every
`peftsmooth ...` command of a bash block composes (`--cfg job`, exit 0) unless it carries a
placeholder such as `<run dir>`, README.md stays short, and the site builds with `mkdocs build --strict`."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
PLACEHOLDER = re.compile(r"<[^>]+>|\$|\.\.\.")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    out, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
            continue
        if not in_code:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def anchors(page: Path) -> set[str]:
    """The heading ids mkdocs gives a page (python-markdown's toc slugify, duplicates numbered)."""
    from markdown.extensions.toc import slugify

    seen: dict[str, int] = {}
    ids, in_code = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line.strip()):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6} (.+?)\s*#*$", line)
        if not match:
            continue
        text = re.sub(r"(?<![\w`])[*_]+|[*_]+(?![\w`])|`", "", match.group(1))
        slug = slugify(text, "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}_{count}")
    return ids


def links(page: Path) -> list[str]:
    """The link targets of the page's prose (links inside code are examples, not links)."""
    return LINK.findall(prose(page.read_text()))


def test_anchor_ids_are_mkdocs_ones():
    page = ROOT / "docs" / "models.md"
    assert "certify-cohen-et-als-resnet-110-025-sequentially-next-to-its-published-log" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading in {resolved.name}")
    assert not broken, broken


def bash_commands(page: Path) -> list[str]:
    """The `peftsmooth ...` commands of the page's bash blocks, continuation lines joined."""
    commands, block, in_bash = [], [], False
    for line in page.read_text().splitlines():
        stripped = line.strip()
        if FENCE.match(stripped):
            if in_bash:
                joined = "\n".join(block).replace("\\\n", " ")
                commands += [c.strip() for c in joined.splitlines()]
                block = []
            in_bash = not in_bash and stripped.lstrip("`~").strip() in ("bash", "sh", "shell")
            continue
        if in_bash:
            block.append(line.split(" #")[0] if not stripped.startswith("#") else "")
    return [c for c in commands if c.startswith("peftsmooth ")]


COMMANDS = [(page.name, c) for page in PAGES for c in bash_commands(page)]


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 40 and any(" certify " in c for _, c in COMMANDS)


@pytest.mark.parametrize("page, command", COMMANDS, ids=[f"{p}: {c[:80]}" for p, c in COMMANDS])
def test_every_documented_command_composes(page, command, tmp_path, monkeypatch, capsys, hydra_logging):
    if PLACEHOLDER.search(command):
        pytest.skip("carries a placeholder")
    from hydra.core.global_hydra import GlobalHydra

    from peftsmooth import cli

    argv = shlex.split(command)[1:]
    if "--help" in argv or argv[0] in ("-h", "--help", "--version", "-V"):
        pytest.skip("help")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    try:
        if "-m" in argv or "--multirun" in argv:  # Hydra prints no --cfg of a sweep: compose every job
            from peftsmooth.precheck import validate_cli_args

            rest = cli._rewrite_aliases(argv[0], cli._rewrite_positionals(argv[0], argv[1:]))
            validate_cli_args(argv[0], [*rest, "--cfg", "job"], cli.COMMANDS[argv[0]][0])
        else:
            cli.main([*argv, "--cfg", "job"])
    except SystemExit as exited:
        assert exited.code in (0, None), f"{command}: {capsys.readouterr().err.strip()}"
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "outputs").exists()


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="pip install -e '.[docs]'")
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("certify_sequential") > 2
