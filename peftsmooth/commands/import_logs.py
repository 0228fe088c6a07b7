"""`peftsmooth import TSV... method=<label> sigma=<s> [model=<name>] [dataset=<name>] [out=<dir>]`.

    peftsmooth import logs/cohen/noise_0.25/test/sigma_0.25 method=cohen sigma=0.25 model=resnet110 dataset=cifar10
    peftsmooth report imports/ outputs/    # the published rows beside ours, marked `imported`

Turns Cohen-format certification logs of other tools (any file name) into one certification
directory that `report` reads like its own (peftsmooth.report.import_logs). Every log is read and checked
before anything is written; out defaults to imports/<dataset>_<model>_<method>_sigma<s>/. An existing
out is refused unless it holds exactly this import (then nothing changes).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from peftsmooth.certify import results
from peftsmooth.config import hydra_app, output_dir
from peftsmooth.errors import require
from peftsmooth.report import import_logs

log = logging.getLogger(__name__)


def _options(cfg) -> dict:
    """method, sigma, model, dataset, checked before any file is read."""
    method = cfg.get("method")
    require(method is not None and str(method).strip() != "",
            "method: give the label the imported rows carry in the report, e.g. method=cohen")
    sigma = cfg.get("sigma")
    require(sigma is not None and math.isfinite(float(sigma)),
            "sigma: give the noise level the logs were certified at, e.g. sigma=0.25")
    model, dataset = cfg.get("model_name"), cfg.get("dataset_name")
    return {"method": str(method), "sigma": float(sigma), "model": None if model is None else str(model),
            "dataset": None if dataset is None else str(dataset)}


def check_import(cfg) -> tuple[list[str], Path, import_logs.Imported]:
    """The options and every log read and checked (nothing is written): the files, out and the import."""
    files = [str(f) for f in (cfg.get("files") or [])]
    require(bool(files), "files: give the Cohen-format logs to import, e.g. "
                         "`peftsmooth import sigma_0.25 method=cohen sigma=0.25`")
    options = _options(cfg)
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else import_logs.default_out(**options)
    return files, out, import_logs.prepare(files, **options)


def run_import(cfg) -> dict:
    files, out, imported = check_import(cfg)
    if import_logs.already_there(out, imported):
        log.info("%s already holds this import (%d images); nothing changed", out, len(imported.rows))
        summary = results.read_summary(out)
    else:
        summary = import_logs.write(out, imported)
        log.info("imported %d images from %d file(s) -> %s", summary["num_images"], len(files), out)
    from peftsmooth.config import _remove_if_unstarted

    _remove_if_unstarted(output_dir())
    return {"out": str(out), "summary": summary}


main = hydra_app("import", run_import, check=check_import)
