"""`peftsmooth COMMAND [hydra overrides...]`: dispatch to the command's own Hydra app.

Hydra has no subcommands, so the dispatcher pops the command name from `sys.argv` and calls that
command's `@hydra.main` function (each with its own primary config in `conf/`). Before handing over
it checks config-group choices and (for single runs) composes the config once, so that a typo is
one clear line and exit code 2 instead of Hydra's multi-line report.
"""

from __future__ import annotations

import importlib
import sys

from peftsmooth import __version__
from peftsmooth.errors import UserError, die

# command -> (module, one-line description). Each module defines `main` (the Hydra app).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("peftsmooth.commands.train", "adapt a pretrained classifier to Gaussian noise (PEFT / linear / full)"),
    "certify": ("peftsmooth.commands.certify", "certify a classifier by randomized smoothing (Cohen et al. 2019)"),
    "denoise-baseline": ("peftsmooth.commands.denoise_baseline", "denoised smoothing: a denoiser in front of a frozen classifier"),
    "report": ("peftsmooth.commands.report", "gather runs into one comparison table and plot"),
    "merge": ("peftsmooth.commands.merge", "merge certify shards into one certify.tsv and summary.json"),
    "import": ("peftsmooth.commands.import_logs", "Cohen-format logs of other tools as certifications report lists"),
    "quantize": ("peftsmooth.commands.quantize", "a trained adapter stored at 8/4/2/1 bits, as a run certify certifies"),
    "combine": ("peftsmooth.commands.combine", "mix the adapters of runs of one base classifier into a new run (or an ensemble)"),
    "demo": ("peftsmooth.commands.demo", "embedded end-to-end demo on scikit-learn digits (CPU, no download)"),
}

# command -> its page of the documentation site (docs/<page>.md; mkdocs.yml)
DOCS_PAGES = {"train": "training", "certify": "certification", "denoise-baseline": "baselines", "report": "cluster",
              "merge": "cluster", "import": "reproducing", "quantize": "library", "combine": "library",
              "demo": "getting-started"}

# Commands whose bare (non key=value) arguments are collected into a list-valued key.
POSITIONAL_KEY = {"report": "dirs", "merge": "dirs", "import": "files", "combine": "runs"}
# Keys a command takes under the name of a config group it does not use (Hydra would read `model=`
# as a choice of conf/model/): `peftsmooth import model=resnet110` -> `model_name=resnet110`.
KEY_ALIASES = {"import": {"model": "model_name", "dataset": "dataset_name"}}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        f"peftsmooth {__version__} — PEFTSmoothing and randomized-smoothing certification",
        "",
        "usage: peftsmooth COMMAND [hydra overrides...] [--help] [--cfg job] [-m]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`peftsmooth COMMAND --help` shows the command's config groups and options, each with its default",
              "and what it means, and what of the defaults needs network or a GPU."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    """What `peftsmooth COMMAND --help` prints above Hydra's groups and options."""
    page = DOCS_PAGES[command]
    return (f"peftsmooth {command}: {COMMANDS[command][1]}\n"
            f"Documentation: docs/{page}.md (the site: `mkdocs serve`, then http://127.0.0.1:8000/{page}/)\n")


def quiet_third_party() -> None:
    """Inside a command, the libraries' own progress bars (huggingface_hub downloads, transformers'
    "Loading weights") stay off; ours (rich, on a terminal) stays. HF_HUB_DISABLE_PROGRESS_BARS=0 in
    the environment turns theirs back on."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "huggingface_hub" in sys.modules:  # read the variable at import: switch off what was imported already
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _print_help(command: str, overrides: list[str]) -> None:
    """The command's purpose, then its groups and keys (composed with `overrides`) with what each means."""
    from peftsmooth.helptext import render_help
    from peftsmooth.precheck import validate_cli_args

    try:
        validate_cli_args(command, [*overrides, "--cfg", "job"], COMMANDS[command][0])  # bad choices, bad keys
        print(render_help(command, [o for o in overrides if "=" in o and not o.startswith("-")],
                          command_help(command)), end="")
    except UserError as err:
        die(command, str(err))


def _rewrite_aliases(command: str, args: list[str]) -> list[str]:
    """`model=X` -> `model_name=X` for the commands of KEY_ALIASES (options and other keys unchanged)."""
    aliases = KEY_ALIASES.get(command, {})
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        out.append(f"{aliases[key]}={value}" if eq and key in aliases else arg)
    return out


def _rewrite_positionals(command: str, args: list[str]) -> list[str]:
    """`peftsmooth report outputs/ other/` -> `dirs=['outputs/','other/']`."""
    key = POSITIONAL_KEY.get(command)
    if key is None:
        return args
    flags_with_value = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                        "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
    out, bare, skip, at = [], [], False, None
    for arg in args:
        if skip:
            out.append(arg)
            skip = False
        elif arg.startswith("-"):
            out.append(arg)
            skip = arg in flags_with_value
        elif "=" in arg:
            out.append(arg)
        else:
            at = len(out) if at is None else at
            bare.append(arg)
    if bare:  # where the first bare argument stood, among the overrides (argparse wants them together)
        quoted = ",".join("'" + a.replace("\\", "\\\\").replace("'", "\\'") + "'" for a in bare)
        out.insert(at, f"{key}=[{quoted}]")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        die("", f"unknown command {command!r} (choose from: {', '.join(COMMANDS)})")
    rest = _rewrite_aliases(command, _rewrite_positionals(command, rest))
    if "--help" in rest or "-h" in rest:
        _print_help(command, [a for a in rest if a not in ("--help", "-h")])
        return
    from peftsmooth.precheck import validate_cli_args

    try:
        validate_cli_args(command, rest, COMMANDS[command][0])
    except UserError as err:
        die(command, str(err))
    quiet_third_party()
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"peftsmooth {command}", *rest]
    module.main()
