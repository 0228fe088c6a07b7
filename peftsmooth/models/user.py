"""`model=python model.factory=<module>:<function>`: the user's own nn.Module.

The function receives `num_classes` and returns an nn.Module on preprocessed images (logits out).
`<module>` is a dotted module name importable from the working directory or the Python path, or a
`.py` file. Preprocessing: `model.mean`, `model.std` and `model.input_size`, or `model.normalize=false`
when the module normalizes itself (it then receives [0,1] images resized to `model.input_size`). The
head, for the adaptation methods, is the module's last nn.Linear.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

import torch.nn as nn

from peftsmooth.errors import UserError
from peftsmooth.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Source, check_files, describe, square


@functools.lru_cache(maxsize=None)
def _load_file(path: Path):
    """A module from a .py file, executed once per process (the checks and the build share it, as
    `import` shares a dotted module)."""
    spec = importlib.util.spec_from_file_location(f"peftsmooth_user_{path.stem}", path)
    if spec is None or not path.is_file():
        raise ImportError(f"no file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_from(module_name: str, places: list[str | None]):
    """Import a dotted module with `places` in front of the Python path for the import only: a user's
    folder must not stay on the path, where a later import would find its stale modules."""
    added = [p for p in places if p and p not in sys.path and not (p == str(Path.cwd()) and "" in sys.path)]
    sys.path[:0] = added
    try:
        importlib.invalidate_caches()  # a module file may have come or gone since the last import
        return importlib.import_module(module_name)
    finally:
        for place in added:
            if place in sys.path:
                sys.path.remove(place)


def factory(spec: str, root: str | None = None) -> Callable[[int], nn.Module]:
    """The function named by `<module>:<function>` (a UserError when it cannot be imported); a dotted
    module is looked for in `root` (where a run found it, `model.factory_path`), the working
    directory and the Python path."""
    module_name, sep, function = str(spec).partition(":")
    if not sep or not module_name or not function:
        raise UserError(f"model.factory={spec} must read <module>:<function> (e.g. mynets:build)")
    try:
        if module_name.endswith(".py"):
            module = _load_file(Path(module_name).expanduser().resolve())
        else:
            module = _import_from(module_name, [root, str(Path.cwd())])
    except Exception as err:  # noqa: BLE001 - any failure to import the user's module is theirs to fix
        raise UserError(f"model.factory={spec}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"model.factory={spec}: {module_name} has no function {function}")
    return fn


class PythonSource(Source):
    name = "python"

    def check(self, model_cfg) -> None:
        check_files(model_cfg)
        factory(model_cfg.get("factory"), model_cfg.get("factory_path"))
        channels = self.input_channels(model_cfg)
        if model_cfg.get("normalize", True):
            for key in ("mean", "std"):
                values = model_cfg.get(key)
                if values is None or len(values) not in (1, channels) or not all(isinstance(v, (int, float)) for v in values):
                    raise UserError(f"model.{key}={values} must be 1 or model.in_chans={channels} numbers (or "
                                    f"model.normalize=false when the module normalizes itself)")
            if any(float(s) <= 0 for s in model_cfg.std):
                raise UserError(f"model.std={list(model_cfg.std)} must be > 0")
        size = model_cfg.get("input_size")
        if not (isinstance(size, int) and size >= 1):
            raise UserError(f"model.input_size={size} must be an integer >= 1 (the module's input side)")

    def create(self, model_cfg, num_classes: int, weights: bool = True) -> nn.Module:
        spec = str(model_cfg.factory)
        try:
            module = factory(spec, model_cfg.get("factory_path"))(num_classes)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's function failed
            raise UserError(f"model.factory={spec} failed ({type(err).__name__}: {err})") from None
        if not isinstance(module, nn.Module):
            raise UserError(f"model.factory={spec} returned a {type(module).__name__}, not an nn.Module")
        describe(module, spec, None)
        return module

    def preprocess(self, backbone: nn.Module, model_cfg) -> Preprocess:
        size, channels = square(model_cfg.input_size), self.input_channels(model_cfg)
        if not model_cfg.get("normalize", True):
            return Preprocess(size, (0.0,) * channels, (1.0,) * channels, channels)
        mean, std = model_cfg.get("mean") or IMAGENET_MEAN, model_cfg.get("std") or IMAGENET_STD
        return Preprocess(size, per_channel(mean, channels), per_channel(std, channels), channels)

    def make_portable(self, model_cfg) -> None:
        """A `.py` factory by its absolute path; a dotted one with the directory it was imported from."""
        module_name, _, function = str(model_cfg.factory).partition(":")
        if module_name.endswith(".py"):
            model_cfg.factory = f"{Path(module_name).expanduser().resolve()}:{function}"
            return
        file = getattr(sys.modules.get(module_name), "__file__", None)
        if file:
            depth = module_name.count(".") + (Path(file).name == "__init__.py")
            model_cfg.factory_path = str(Path(file).resolve().parents[depth])

    def input_channels(self, model_cfg) -> int:
        channels = model_cfg.get("in_chans") or 3
        if not (isinstance(channels, int) and channels >= 1):
            raise UserError(f"model.in_chans={channels} must be an integer >= 1 (the module's input channels)")
        return channels

    def label(self, model_cfg) -> str:
        return str(model_cfg.get("factory")).rpartition(":")[2]


def per_channel(values, channels: int) -> tuple[float, ...]:
    """One value per channel (a single value is repeated)."""
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values
