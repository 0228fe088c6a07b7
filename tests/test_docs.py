"""Documentation that cannot rot: every relative link and anchor of README.md and docs/ resolves, every
`peftsmooth ...` command of a bash block composes and passes its command's checks (placeholders such
as `<run dir>` and `$B` point at real directories made on a tiny model; only GPU / network commands
may be exempt, each named with its reason), README.md stays short, and the site builds with
`mkdocs build --strict`."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from peftsmooth.errors import UserError

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


def bash_blocks(page: Path, keep_comments: bool = False) -> list[list[str]]:
    """The lines of the page's bash blocks, one list per block, continuation lines joined, comments cut
    (whole comment lines kept with `keep_comments`)."""
    blocks, block, in_bash = [], [], False
    for line in page.read_text().splitlines():
        stripped = line.strip()
        if FENCE.match(stripped):
            if in_bash:
                joined = "\n".join(block).replace("\\\n", " ")
                blocks.append([c.strip() for c in joined.splitlines() if c.strip()])
                block = []
            in_bash = not in_bash and stripped.lstrip("`~").strip() in ("bash", "sh", "shell")
            continue
        if in_bash:
            block.append(line.split(" #")[0] if not stripped.startswith("#") else (stripped if keep_comments else ""))
    return blocks


def block_commands(block: list[str]) -> list[tuple[str, dict[str, str]]]:
    """The `peftsmooth ...` commands of one bash block (also inside `for ...; do ...; done`), each with
    the shell variables the block sets before it (a loop's variable: its first value)."""
    commands, variables = [], {}
    for line in block:
        for part in re.split(r";\s*", line):
            part = part.strip()
            loop = re.match(r"^for (\w+) in (\S+)", part)
            assign = re.match(r"^([A-Za-z_]\w*)=(\"[^\"]*\"|\S+)$", part)
            if loop:
                variables[loop[1]] = loop[2]
            elif assign:
                variables[assign[1]] = " ".join(assign[2].strip('"').split())
            elif part.startswith("do peftsmooth ") or part.startswith("peftsmooth "):
                commands.append((part.removeprefix("do ").strip(), dict(variables)))
    return commands


def bash_commands(page: Path) -> list[tuple[str, dict[str, str]]]:
    """The `peftsmooth ...` commands of the page's bash blocks, with their blocks' variables."""
    return [command for block in bash_blocks(page) for command in block_commands(block)]


COMMANDS = [(page.name, c, v) for page in PAGES for c, v in bash_commands(page)]


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 100 and any(" certify " in c for _, c, _ in COMMANDS)


# Documented commands that are not checked here, each with why: they need a GPU or the network.
EXEMPT: dict[str, str] = {}


@pytest.fixture(scope="session")
def made(tmp_path_factory):
    """Real directories for the docs' placeholders, made on a tiny model on digits: a clean base run,
    two LoRA runs from it, a certification (and one in two shards), a denoiser run, an imported log
    and a combined adapter."""
    from conftest import TINY, compose

    from peftsmooth.certify import results
    from peftsmooth.commands.certify import run_certify
    from peftsmooth.commands.combine import run_combine
    from peftsmooth.commands.denoise_baseline import run_denoise_baseline
    from peftsmooth.commands.import_logs import run_import
    from peftsmooth.commands.train import run_train
    from peftsmooth.train import watch as train_watch

    root = tmp_path_factory.mktemp("documented")
    tiny = [*TINY, "model.kwargs.depth=1", "model.kwargs.embed_dim=16"]
    quick = ["train.epochs=1", "train.batch_size=32", "train.max_steps_per_epoch=1", "train.max_eval=8",
             "train.num_workers=0", "train.warmup_epochs=0"]
    with pytest.MonkeyPatch.context() as patch:  # the plots are tested with their commands
        patch.setattr(train_watch, "plot_training", lambda history, path: None)
        patch.setattr(results, "plot_curve", lambda rows, path, **_: Path(path).write_bytes(b""))
        run_train(compose("train", [*tiny, *quick, "peft=full", "sigma=0"], run_dir=root / "base"))
        for name, sigma in (("lora", 0.25), ("lora2", 0.5)):
            run_train(compose("train", [*tiny, *quick, "peft=lora", f"sigma={sigma}", f"base={root / 'base'}"],
                              run_dir=root / name))
        cert = root / "certification"
        small = [f"run={root / 'lora'}", "device=cpu", "certify.n0=4", "certify.n=8", "certify.max=2", "certify.skip=50"]
        run_certify(compose("certify", small, run_dir=cert))
        for shard in (0, 1):  # a sharded certification, for merge
            run_certify(compose("certify", [*small, f"certify.shard={shard}", "certify.num_shards=2"],
                                run_dir=root / "sharded" / f"shard{shard}of2"))
        run_denoise_baseline(compose("denoise-baseline", [
            *tiny, *quick, f"base={root / 'base'}", "sigma=0.25", "denoiser=dncnn", "denoiser.arch.depth=2",
            "denoiser.arch.channels=4", "denoiser.epochs=1"], run_dir=root / "denoiser"))
        run_import(compose("import", [f"files=[{cert / results.TSV_FILE}]", "method=cohen", "sigma=0.25",
                                      f"out={root / 'imported'}"], run_dir=root / "h_import"))
        run_combine(compose("combine", [f"runs=[{root / 'lora'},{root / 'lora2'}]", "combination=linear",
                                        f"out={root / 'combined'}"], run_dir=root / "h_combine"))
    _user_files(root / "files")
    return root


def _user_files(root: Path) -> None:
    """What the docs' commands read from the user's disk: a checkpoint file, a local transformers
    model, an image folder."""
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root.mkdir()
    torch.save({"epoch": 1, "arch": "cifar_resnet20", "state_dict": {}}, root / "checkpoint.pth.tar")
    hf = root / "hf_model"
    ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=16)).save_pretrained(hf)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(hf)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / "folder" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "folder" / split / name / "0.png")


RUN_KEYS = ("run", "base", "denoiser.init", "resume", "runs", "certify.reference")
# Keys and positional arguments that name the user's files: what stands for them when they are not there
FILE_KEYS = {"model.checkpoint": "base/model.safetensors", "model.weights": "base/model.safetensors",
             "dataset.root": "files/folder", "model.name": "files/hf_model"}


def _fixture_for(key: str, value: str, made: Path, sweep: bool) -> str:
    """The made directory a documented run-directory value stands for."""
    if key == "runs":
        count = max(1, value.count(",") + 1)
        return "[" + ",".join(str(made / n) for n in ["lora", "lora2", "combined"][:count]) + "]"
    if key == "denoiser.init" or "denoise" in value or "dncnn" in value or "ddpm" in value:
        return str(made / "denoiser")
    if key == "base":
        return str(made / "base")
    if key == "certify.reference":  # a certification of the parent run (made/lora's)
        return str(made / "certification")
    return ",".join(str(made / n) for n in ["lora", "lora2"][: value.count(",") + 1 if sweep else 1])


def _user_file(key: str, value: str, made: Path) -> str | None:
    """The made file for a path of the user's (`model.checkpoint=/path/...`) that is not here, or None."""
    if key not in FILE_KEYS or Path(value).exists() or not ("/" in value or value.endswith((".pth", ".tar"))):
        return None
    if value.endswith((".pth", ".pth.tar", ".tar")):
        return str(made / "files" / "checkpoint.pth.tar")
    return str(made / FILE_KEYS[key])


def on_made_data(argv: list[str]) -> list[str]:
    """A train / denoise-baseline command that starts from a made run takes the made run's dataset
    (digits: the base run's checks compare datasets); other commands are left as they are."""
    made_run = any(a.partition("=")[0] in ("base", "denoiser.init") and "documented" in a for a in argv)
    if argv[0] not in ("train", "denoise-baseline") or not made_run:
        return argv
    return [a for a in argv if not a.startswith("dataset=")] + ["dataset=digits"]


def resolve(command: str, variables: dict[str, str], made: Path) -> list[str]:
    """The documented command with its shell variables expanded and its placeholders (`<run dir>`,
    `$B`, `...`, `<a | b>`) replaced by the made directories and first choices: its argv."""
    text = re.sub(r"<[^<>|]+>", lambda m: m[0].replace(" ", "_"), re.sub(r"\$\([^)]*\)", "x", command))
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace("${" + name + "}", variables[name])
        text = re.sub(r"\$" + name + r"\b", lambda _m, v=variables[name]: v, text)
    text = re.sub(r"<([^<>|]+?)\s*\|[^<>]*>", r"\1", text).replace(" ... ", " ")
    text = re.sub(r"\[([\w.]+=[^\]\s]*)\]", r"\1", text)
    argv: list[str] = []
    words = shlex.split(text)[1:]
    sweep = "-m" in words or "--multirun" in words
    positional = {"report": made, "merge": made / "sharded", "combine": made / "lora",
                  "import": made / "certification" / "certify.tsv"}
    for arg in words:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") in RUN_KEYS and not Path(value).exists():
            arg = f"{key}={_fixture_for(key.lstrip('+'), value, made, sweep)}"
        elif eq and _user_file(key, value, made):
            arg = f"{key}={_user_file(key, value, made)}"
        elif not eq and argv and not arg.startswith("-") and argv[0] in positional and not Path(arg).exists():
            arg = str(positional[argv[0]])  # the directories to gather, the runs to mix, the logs to import
        elif eq and PLACEHOLDER.search(value) and (key.startswith("hydra.") or key == "out"):
            arg = f"{key}={re.sub(r'[<>$ ]', '_', value)}"
        argv.append(arg)
    return argv


CHECKED: list[str] = []


def _write_user_module(arg: str, where: Path) -> str:
    """The user's own module of a `model.factory=<module or file.py>:<function>` argument, written in
    `where` (the working directory, as the docs say; a documented absolute path is moved there)."""
    module, _, function = arg.partition("=")[2].partition(":")
    path = where / (Path(module).name if module.endswith(".py") else f"{module}.py")
    path.write_text(f"import torch.nn as nn\n\ndef {function}(num_classes):\n"
                    f"    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    return f"model.factory={path}:{function}" if module.endswith(".py") else arg


@pytest.mark.parametrize("page, command, variables", COMMANDS, ids=[f"{p}: {c[:80]}" for p, c, _ in COMMANDS])
def test_every_documented_command_composes(page, command, variables, made, tmp_path, monkeypatch, capsys,
                                          hydra_logging):
    """Composed (`--cfg job`) and held to its command's checks (no model, data or network), with the
    placeholders pointing at real directories; only EXEMPT commands (GPU, network) are left out."""
    from hydra.core.global_hydra import GlobalHydra

    from peftsmooth import cli
    from peftsmooth.precheck import validate_cli_args

    if command in EXEMPT:
        pytest.skip(EXEMPT[command])
    monkeypatch.chdir(tmp_path)  # relative paths of the docs are looked for here
    monkeypatch.setattr(sys, "argv", ["peftsmooth"])
    argv = on_made_data(resolve(command, variables, made))
    if "--help" in argv or argv[0] in ("-h", "--help", "--version", "-V"):
        pytest.skip("help")
    unresolved = [a for a in argv if PLACEHOLDER.search(a)]
    assert not unresolved, f"{command}: placeholders left: {unresolved}"
    argv = [_write_user_module(a, tmp_path) if a.startswith("model.factory=") else a for a in argv]
    rest = cli._rewrite_aliases(argv[0], cli._rewrite_positionals(argv[0], argv[1:]))
    try:  # every job's config composed (one, or each of a sweep's) and held to the command's checks
        validate_cli_args(argv[0], rest, cli.COMMANDS[argv[0]][0])
    except SystemExit as exited:
        assert exited.code in (0, None), f"{command}: {capsys.readouterr().err.strip()}"
    except UserError as err:
        pytest.fail(f"{' '.join(argv)}: {err}")
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "outputs").exists()
    CHECKED.append(command)


def test_zz_count_of_checked_commands(record_property):
    """The count of documented commands composed and checked, printed at the end of the run (conftest's
    terminal summary; this file's tests run in order, in one process)."""
    line = (f"documented commands composed and checked: {len(CHECKED)} of {len(COMMANDS)} "
            f"({len(EXEMPT)} exempt: {', '.join(EXEMPT) or 'none'})")
    record_property("summary", line)
    assert CHECKED and set(CHECKED) <= {c for _, c, _ in COMMANDS} - set(EXEMPT)


def test_output_files_lists_the_columns_of_a_real_certify_tsv(made):
    """docs/output-files.md's certify.tsv columns, in both places it lists them, are a real file's header."""
    header = (made / "certification" / "certify.tsv").read_text().splitlines()[0].split("\t")
    text = (ROOT / "docs" / "output-files.md").read_text()
    listed = re.findall(r"`(idx  label[A-Za-z_ ]+)`", text)
    assert len(listed) == 2 and all(cols.split() == header for cols in listed), (listed, header)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="pip install -e '.[docs]'")
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("certify_sequential") > 2
