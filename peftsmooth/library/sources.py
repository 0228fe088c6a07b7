"""The runs a combination starts from: read, and checked to share one base classifier and one method family.

Everything here reads only run.json, adapter_config.json and the base weight files (their SHA-256),
so `peftsmooth combine` refuses before a model is built or anything is written. A run is one of
three kinds:
  lora     a peft LoRA run: every combination (peft's add_weighted_adapter) and the ensemble
  peft     another peft tuner (LoHa, LoKr, IA3, OFT, ...): the ensemble only (peft mixes LoRA weights only)
  weights  our own modules (prompts, bottleneck adapters, linear probe) and full fine-tuning:
           linear combinations of the parameters
Runs with a front stage (denoisers, black-box coordinators), without an adapter, or with backbone
buffers (BatchNorm statistics, which adapters sharing one backbone cannot each have) are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from peftsmooth.errors import UserError, require
from peftsmooth.runs import RunInfo, read_json, read_run_info

LORA, PEFT, WEIGHTS = "lora", "peft", "weights"
PEFT_CONFIG = "adapter_config.json"
FILE_KEYS = ("checkpoint", "weights")  # model config keys naming weight files, compared by content


@dataclass(frozen=True)
class Source:
    """One run to combine: where it is, its run.json, its adaptation, its kind and (peft) adapter config."""

    path: Path
    info: RunInfo
    adaptation: object
    kind: str
    peft: dict | None = None

    @property
    def family(self) -> str:
        """The method family that must match: the adaptation class (and peft's config class)."""
        adapt = dict(self.info.adapt or {})
        return " ".join(str(adapt.get(k)) for k in ("_target_", "config_class") if adapt.get(k))

    @property
    def method(self) -> str:
        """The method's plain name (a combined run's label without its brackets)."""
        return str(self.info.method or "custom").split("[")[0]


def kind_of(adaptation) -> str | None:
    """lora / peft / weights (see the module docstring), None for what combine cannot mix."""
    from peftsmooth.adapt.baselines import FullFineTuning
    from peftsmooth.adapt.common import ModuleAdaptation
    from peftsmooth.adapt.peft_tuners import PeftTuner

    if isinstance(adaptation, PeftTuner):
        return LORA if adaptation.config_class.__name__ == "LoraConfig" else PEFT
    if isinstance(adaptation, (ModuleAdaptation, FullFineTuning)):
        return WEIGHTS
    return None


def read_source(run) -> Source:
    """A finished run with an adapter combine can mix (a UserError naming the run otherwise)."""
    from peftsmooth.adapt.common import BUFFERS_FILE

    path = Path(str(run)).expanduser().resolve()
    info = read_run_info(path, "runs")
    require(info.finished is not False, f"run={run} is not finished (run.json has finished=false)")
    require(not info.front, f"run={run} has a front stage ({(info.front or {}).get('_target_')}); combine mixes "
                            f"adapters on one backbone, not denoisers or coordinators")
    adaptation = info.adaptation()
    kind = kind_of(adaptation)
    require(kind is not None, f"run={run} (method={info.method}) has no adapter that combine can mix "
                              f"(peft tuners, prompts, bottleneck adapters, linear probe, full fine-tuning)")
    require(BUFFERS_FILE not in (info.files or []),
            f"run={run} keeps backbone buffers ({BUFFERS_FILE}, e.g. BatchNorm statistics) that adapters on "
            f"one shared backbone cannot each have")
    peft = None
    if kind != WEIGHTS:
        require((path / PEFT_CONFIG).is_file(), f"run={run} has no {PEFT_CONFIG} (was the training finished?)")
        peft = read_json(path / PEFT_CONFIG)
    return Source(path, info, adaptation, kind, peft)


def check_same_base(sources: list[Source]) -> None:
    """One base classifier: the same dataset, classes, image size, model config and base weights."""
    first = sources[0]
    for other in sources[1:]:
        for key, get in (("dataset", lambda i: (i.dataset or {}).get("name")), ("num_classes", lambda i: i.num_classes),
                         ("image_size", lambda i: list(i.image_size))):
            if get(first.info) != get(other.info):
                raise _differ(key, first, get(first.info), other, get(other.info))
        shape = {k: v for k, v in first.info.model.items() if k not in FILE_KEYS}
        other_shape = {k: v for k, v in other.info.model.items() if k not in FILE_KEYS}
        key, a, b = first_difference(shape, other_shape, "model")
        if key:
            raise _differ(key, first, a, other, b)
        for key in FILE_KEYS:
            a, b = first.info.model.get(key), other.info.model.get(key)
            if _file_digest(a) != _file_digest(b):
                raise UserError(f"the runs start from different base weights: run={first.path} has model.{key}={a} "
                                f"(sha256 {_short(a)}), run={other.path} has {b} (sha256 {_short(b)})")


def check_same_family(sources: list[Source]) -> None:
    """One method family; our own modules with the same options (their parameters must line up)."""
    first = sources[0]
    for other in sources[1:]:
        if first.family != other.family:
            raise UserError(f"the runs differ in method family: run={first.path} is {first.method} ({first.family}), "
                            f"run={other.path} is {other.method} ({other.family})")
        if first.kind == WEIGHTS:
            strip = lambda adapt: {k: v for k, v in adapt.items() if k != "name"}  # noqa: E731
            key, a, b = first_difference(strip(first.info.adapt), strip(other.info.adapt), "peft")
            if key:
                raise _differ(key, first, a, other, b)
        else:
            for key in ("peft_type", "modules_to_save"):
                if first.peft.get(key) != other.peft.get(key):
                    raise _differ(f"adapter {key}", first, first.peft.get(key), other, other.peft.get(key))


def first_difference(a, b, prefix: str) -> tuple[str | None, object, object]:
    """The first dotted key where two nested configs differ, with both values (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
            if found[0]:
                return found
        return None, None, None
    return (None, None, None) if a == b else (prefix, a, b)


def _differ(key: str, first: Source, a, other: Source, b) -> UserError:
    return UserError(f"the runs differ in {key}: run={first.path} has {a}, run={other.path} has {b}; "
                     f"combine needs runs of one base classifier and method")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path) -> str | None:
    """SHA-256 of a weight file (cached by path, size and mtime), None for no file."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    require(p.is_file(), f"model weights {path} not found (a run's base weights must still be there)")
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _short(path) -> str:
    digest = _file_digest(path)
    return digest[:12] if digest else "none"
