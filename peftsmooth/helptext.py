"""`peftsmooth COMMAND --help`: the groups and keys of the config the command composes, each with its
default and what it means.

What a key means is written once, as the comment beside it (or the comment lines just above it) in its
YAML file under conf/; the help reads those comments, so the docs' config files and `--help` say the
same thing. A key of a group choice without its own comment takes the comment of the same key in a
sibling choice (`certify.n` of predict.yaml is explained in cohen.yaml). The help composes the
config with the overrides given, so `peftsmooth certify certify=sequential --help` shows that choice.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>'[^']*'|\"[^\"]*\"|[A-Za-z_][\w-]*):(?:\s|$)(?P<rest>.*)$")


def _split_comment(text: str) -> tuple[str, str | None]:
    """`value  # comment` -> (value, comment); a '#' inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), None


def _header(lines: list[str]) -> tuple[str, int]:
    """The first paragraph of the file's leading comment block (up to a blank comment line or an
    example command), and the index of the line after the block."""
    paragraph, i, ended = [], 0, False
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].strip().lstrip("#").strip()
        ended = ended or (bool(paragraph) and (not text or text.startswith("peftsmooth ")))
        if text and not ended and not text.startswith("@package"):
            paragraph.append(text)
        i += 1
    return " ".join(paragraph), i


def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """(the file's description, {dotted key: its description}) read from one YAML file's comments."""
    lines = path.read_text().splitlines()
    header, start = _header(lines)
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    last: tuple[str, int] | None = None  # (key, column of its inline comment): for continuation lines
    for line in lines[start:]:
        stripped = line.strip()
        column = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if last is not None and column >= last[1] - 2:
                found[last[0]] = f"{found[last[0]]} {text}".strip()
            else:
                above, last = [*above, text], None
            continue
        match = KEY_LINE.match(line)
        if not match:  # a blank line or a list item ends a comment block
            above, last = [], None
            continue
        while stack and stack[-1][0] >= column:
            stack.pop()
        stack.append((column, match["key"].strip("'\"")))
        dotted = ".".join(key for _, key in stack)
        _value, comment = _split_comment(match["rest"])
        text = comment if comment else " ".join(t for t in above if t)
        if text:
            found[dotted] = text
        last = (dotted, line.index("#", len(line) - len(match["rest"]))) if comment else None
        above = []
    return header, found


def group_descriptions(group: str, choice: str) -> dict[str, str]:
    """{key inside the group: description}: the chosen file's comments, then its siblings' for keys it
    leaves unexplained."""
    from peftsmooth.config import conf_dir

    folder = conf_dir() / group
    chosen = folder / f"{choice}.yaml"
    own = yaml_comments(chosen)[1] if chosen.is_file() else {}
    keys = set(_keys(chosen)) if chosen.is_file() else set()
    siblings = [(p, _keys(p), yaml_comments(p)[1]) for p in sorted(folder.glob("*.yaml")) if p != chosen]
    # the closest sibling first: most keys in common, then the most explained
    siblings.sort(key=lambda s: (-len(keys & set(s[1])), -len(s[2])))
    merged = dict(own)
    for _path, _k, texts in siblings:
        for key, text in texts.items():
            merged.setdefault(key, text)
    return merged


def _keys(path: Path) -> list[str]:
    """The top-level keys of a YAML file (its shape, for choosing the closest sibling)."""
    return [m["key"] for m in map(KEY_LINE.match, path.read_text().splitlines()) if m and not m["indent"]]


def choice_description(group: str, choice: str) -> str:
    from peftsmooth.config import conf_dir

    path = conf_dir() / group / f"{choice}.yaml"
    return yaml_comments(path)[0] if path.is_file() else ""


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain nested dict (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        out = []
        for key, value in node.items():
            out += leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, node)]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def compose_for_help(command: str, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """(the task config as a plain dict, unresolved; {group: choice}) of `peftsmooth COMMAND overrides`."""
    plain, choices = _composed(command, tuple(overrides))
    return copy.deepcopy(plain), dict(choices)


@functools.lru_cache(maxsize=256)
def _composed(command: str, overrides: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from peftsmooth.config import conf_dir
    from peftsmooth.precheck import _compose

    was = GlobalHydra.instance().is_initialized()
    if was:
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = _compose(command, list(overrides))
    choices = {g: str(c) for g, c in cfg.hydra.runtime.choices.items() if not g.startswith("hydra") and c is not None}
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return plain, choices


def help_entries(command: str, overrides: list[str]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """({group: choice}, [(key, default, description)]) for every leaf key of the composed config."""
    from peftsmooth.config import conf_dir, config_name

    plain, choices = compose_for_help(command, overrides)
    own = yaml_comments(conf_dir() / f"{config_name(command)}.yaml")[1]
    per_group = {g: group_descriptions(g, c) for g, c in choices.items()}
    entries = []
    for key, value in leaves(plain):
        group, _, inner = key.partition(".")
        text = own.get(key) or (per_group[group].get(inner, "") if group in per_group else "")
        entries.append((key, _show(value), text))
    return choices, entries


def _get(plain: dict, key: str) -> Any:
    node: Any = plain
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def needs(plain: dict) -> list[str]:
    """What the composed defaults need beyond this machine (network, GPU), each with the offline way."""
    lines = []
    model = plain.get("model") if isinstance(plain.get("model"), dict) else {}
    if model.get("pretrained") and model.get("source") in ("timm", "hf", "torchvision") and not model.get("weights"):
        lines.append(f"network: model.pretrained=true downloads {model.get('name')}'s weights (hub cache first); "
                     "offline: model.weights=/path/to/file.safetensors, or a model without download (model=vit_tiny)")
    dataset = plain.get("dataset") if isinstance(plain.get("dataset"), dict) else {}
    if dataset.get("download"):
        lines.append(f"network: dataset.download=true fetches {dataset.get('name')} when it is not under dataset.root; "
                     "offline: put the files there (dataset.download=false), or dataset=digits (shipped)")
    denoiser = plain.get("denoiser") if isinstance(plain.get("denoiser"), dict) else {}
    if "Diffusion" in str(denoiser.get("_target_", "")):
        lines.append(f"network: denoiser.pretrained={denoiser.get('pretrained')} is a hub id; "
                     "offline: a local save_pretrained directory")
    if _get(plain, "peft.coordinator.encoder.name") == "timm" and _get(plain, "peft.coordinator.encoder.pretrained"):
        lines.append("network: peft.coordinator.encoder.pretrained=true downloads the encoder; "
                     "offline: peft.coordinator.encoder.weights=/path/file.safetensors")
    gpu = [k for k, v in leaves(plain) if k.endswith("precision") and v == "fp16"]
    if gpu:
        lines.append(f"GPU: {', '.join(gpu)}=fp16 needs one; on a CPU: fp32 or bf16")
    elif "device" in plain:
        lines.append("GPU: not needed (device=auto takes a GPU when there is one; on a CPU keep n and epochs small)")
    if not lines:
        lines.append("nothing beyond this machine: no network, no GPU")
    if plain.get("run", "absent") is None and "model" in plain:
        lines.append("with run=<dir>, the model and dataset come from the run's run.json instead")
    return lines


def render_help(command: str, overrides: list[str], title: str) -> str:
    """The whole text of `peftsmooth COMMAND [overrides] --help`."""
    choices, entries = help_entries(command, overrides)
    plain, _ = compose_for_help(command, overrides)
    groups = "[GROUP=CHOICE ...] " if choices else ""
    out = [title, f"usage: peftsmooth {command} {groups}[KEY=VALUE ...] [-m] [--cfg job] [--hydra-help]", ""]
    if choices:
        from peftsmooth.config import group_choices

        out.append(f"Config groups (GROUP=CHOICE; `peftsmooth {command} GROUP=CHOICE --help` shows that choice's keys):")
        for group, choice in sorted(choices.items()):
            out.append(f"  {group}={choice}  {choice_description(group, choice)}")
            out.append(f"      choices: {', '.join(group_choices(group))}")
        out.append("")
    out.append("Options (KEY=VALUE; the default, then what it means):")
    rows = [(f"{key}={default if len(default) <= 40 else default[:37] + '...'}", text) for key, default, text in entries]
    width = min(max(len(r) for r, _ in rows), 44)
    out += [f"  {row:<{width}}  {text}" for row, text in rows]
    out += ["", "Needs (of these defaults):"] + [f"  {line}" for line in needs(plain)]
    return "\n".join(out) + "\n"
