"""`peftsmooth combine`: runs of one base classifier mixed into a new run that certify and report treat like any other.

    combination   kinds      what the new run holds
    linear        lora       one run: its adapter at strength w (weights=[w]; 0 = the base, 1 = the run,
                             negative subtracts); several: peft's linear combination of the A and B
                             matrices (sum of sqrt(w_i s_i) A_i, the same for B; not sum_i w_i B_i A_i)
                  weights    the linear combination of the parameters (peftsmooth.library.arithmetic)
    svd           lora       the SVD of sum_i w_i s_i B_i A_i truncated to svd_rank (default the largest rank)
    cat           lora       the A and B matrices stacked: exactly sum_i w_i s_i B_i A_i, rank sum r_i
    ties, dare_linear, dare_ties  lora  peft's TIES / DARE merges of the A and B matrices (density=)
    ensemble      lora, peft the mean of the adapters' softmax on the shared backbone (library.ensemble)

Heads (LoRA's modules_to_save) combine linearly around the base's head with the same weights, for
every weight-arithmetic combination. `plan` checks everything before work (the CLI runs it before
Hydra starts); `write_run` builds the run in a hidden temporary directory beside `out`, loads it back
(the proof that `certify` can, and the parameter count) and renames it into place.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.library import sources as src
from peftsmooth.runs import INIT_FILE

COMBINATIONS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "ensemble")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")  # peft mixes A and B entry by entry
DENSITY = ("ties", "dare_linear", "dare_ties")
SIGN = ("ties", "dare_ties")
OUT_DIR = Path("outputs") / "combine"


@dataclass
class Plan:
    """What `combine` will do, every check passed."""

    sources: list
    weights: list[float]
    combination: str
    out: Path
    seed: int = 0
    options: dict = field(default_factory=dict)  # add_weighted_adapter's svd_rank / density / majority_sign_method


def plan(cfg) -> Plan:
    """Every check of `combine` (run.json, adapter configs, base weight hashes; no model is built)."""
    combination = str(cfg.get("combination") or "linear")
    if combination not in COMBINATIONS:
        raise choice_error("combination", combination, COMBINATIONS)
    runs = cfg.get("runs") or []
    runs = [runs] if isinstance(runs, str) else [str(r) for r in runs]
    require(bool(runs), "runs=[]: give the runs to combine, e.g. runs=[<run A>,<run B>] weights=[0.5,0.5]")
    weights = _weights(cfg.get("weights"), len(runs), combination)
    sources = [src.read_source(r) for r in runs]
    src.check_same_base(sources)
    src.check_same_family(sources)
    options = _options(cfg, combination, len(runs))
    check_mixable(sources, combination, options)
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else default_out(sources, weights, combination)
    require(not out.exists() or (out.is_dir() and not any(out.iterdir())),
            f"out={out} already exists; give another out= or remove it")
    seed = cfg.get("seed")
    return Plan(sources, weights, combination, out, int(seed if seed is not None else 0), options)


def _weights(given, count: int, combination: str) -> list[float]:
    """One finite number per run (default: equal weights 1/k); positive for an ensemble."""
    if given is None:
        return [1.0 / count] * count
    values = [given] if isinstance(given, (int, float)) else list(given)
    for w in values:
        require(not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(w),
                f"weights={values}: {w!r} is not a finite number")
    require(len(values) == count, f"weights={values} has {len(values)} values for {count} runs (one weight per run)")
    if combination == "ensemble":
        require(all(w > 0 for w in values), f"weights={values} must be > 0 for combination=ensemble (mixture weights)")
    return [float(w) for w in values]


def _options(cfg, combination: str, count: int) -> dict:
    """add_weighted_adapter's options that this combination uses; the others must be left unset."""
    if count == 1:
        require(combination == "linear", f"combination={combination} mixes several runs; one run is rescaled "
                                         f"by its weight with combination=linear (e.g. weights=[0.5])")
    options = {}
    svd_rank, density, sign = cfg.get("svd_rank"), cfg.get("density"), cfg.get("majority_sign_method") or "total"
    if svd_rank is not None:
        require(combination == "svd", f"svd_rank={svd_rank} is for combination=svd only")
        require(isinstance(svd_rank, int) and not isinstance(svd_rank, bool) and svd_rank > 0,
                f"svd_rank={svd_rank} must be a positive integer (the combined adapter's rank)")
        options["svd_rank"] = int(svd_rank)
    if combination in DENSITY:
        require(density is not None, f"combination={combination} needs density= (the fraction of each adapter's "
                                      f"values kept, 0 < density <= 1), e.g. density=0.5")
        require(isinstance(density, (int, float)) and not isinstance(density, bool) and 0 < density <= 1,
                f"density={density} must be a number in (0, 1] (the fraction of each adapter's values kept)")
        options["density"] = float(density)
    else:
        require(density is None, f"density={density} is for combination={'|'.join(DENSITY)} only")
    if combination in SIGN:
        if sign not in ("total", "frequency"):
            raise choice_error("majority_sign_method", sign, ("total", "frequency"))
        options["majority_sign_method"] = sign
    return options


def check_mixable(sources: list, combination: str, options: dict) -> None:
    """What the runs' kind allows: our modules mix linearly, other peft tuners only as an ensemble,
    LoRA every combination but with equal ranks where peft mixes A and B entry by entry."""
    kind, method = sources[0].kind, sources[0].method
    if combination == "ensemble":
        require(kind != src.WEIGHTS, f"combination=ensemble holds peft adapters on one shared backbone; "
                                     f"{method} runs combine with combination=linear")
        return
    require(kind != src.PEFT, f"combination={combination} mixes LoRA weights (peft's add_weighted_adapter); "
                              f"{method} runs combine with combination=ensemble")
    if kind == src.WEIGHTS:
        require(combination == "linear", f"combination={combination} is defined for LoRA runs; {method} runs mix "
                                         f"their parameters linearly: combination=linear (or combination=ensemble "
                                         f"for peft runs)")
        return
    for s in sources:
        for key in ("use_dora", "lora_bias"):
            require(not s.peft.get(key), f"run={s.path} has {key}=true, which combine cannot mix (LoRA without it)")
    ranks = [(s.peft.get("r"), s.peft.get("rank_pattern") or {}) for s in sources]
    if combination in SAME_RANK and len(set(map(repr, ranks))) > 1:
        raise UserError(f"combination={combination} needs adapters of one rank, the runs have r="
                        f"{', '.join(str(r) for r, _ in ranks)}{' (and rank patterns)' if any(p for _, p in ranks) else ''}; "
                        f"mix other ranks with combination=svd or cat")
    if len({isinstance(s.peft.get("target_modules"), str) for s in sources}) > 1:
        raise UserError("the runs' target_modules mix a regex and a list of names, which peft cannot combine")


def names(sources: list) -> list[str]:
    """Short names of the sources: s<sigma> when their sigmas tell them apart, else their folders."""
    sigmas = [s.info.sigma for s in sources]
    if None not in sigmas and len(set(sigmas)) == len(sigmas):
        return [f"s{float(x):g}" for x in sigmas]
    return [Path(s.path).name for s in sources]


def label(sources: list, weights: list[float], combination: str) -> str:
    """run.json `method`: e.g. lora[linear 0.5*s0.25+0.5*s0.5], lora[1.5*s0.25], lora[ensemble s0.25+s0.5]."""
    parts = names(sources)
    if combination == "ensemble" and len(set(weights)) == 1:
        terms = "+".join(parts)
    else:
        terms = "".join(("" if i == 0 else "+" if w >= 0 else "-") + f"{abs(w) if i else w:g}*{n}"
                        for i, (w, n) in enumerate(zip(weights, parts)))
    head = "" if len(sources) == 1 else f"{combination} "
    return f"{sources[0].method}[{head}{terms}]"


def default_out(sources: list, weights: list[float], combination: str) -> Path:
    """outputs/combine/<combination>_<w>x<run>+...: one folder per combination, weights and runs."""
    terms = "+".join(f"{w:g}x{Path(s.path).name}" for w, s in zip(weights, sources))
    return OUT_DIR / re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{combination}_{terms}")


def write_run(p: Plan):
    """Build the run in a hidden sibling of out, load it back, rename it into place; its RunInfo."""
    from peftsmooth.runtime import atomic_directory

    with atomic_directory(p.out) as tmp:
        return _build(p, tmp)


def _build(p: Plan, tmp: Path):
    """The run's files and run.json in `tmp`, checked by loading it back; its RunInfo."""
    from omegaconf import OmegaConf

    from peftsmooth.models import build_classifier, count_parameters
    from peftsmooth.runs import RunInfo, command_line, load_run
    from peftsmooth.runtime import seed_everything

    first = p.sources[0].info
    model_cfg, files = _model_config(p.sources[0], tmp)
    seed_everything(int(first.seed or 0))  # a head timm initialises at random starts as in training
    classifier = build_classifier(OmegaConf.create(model_cfg), int(first.num_classes), list(first.image_size))
    adapt, written, record = BUILDERS[p.sources[0].kind if p.combination != "ensemble" else "ensemble"](p, classifier, tmp)
    info = RunInfo.from_fields(
        command="combine", method=label(p.sources, p.weights, p.combination), model=model_cfg,
        model_name=first.model_name, dataset=first.dataset, num_classes=first.num_classes,
        image_size=first.image_size, input_size=first.input_size, sigma=_common([s.info.sigma for s in p.sources]),
        adapt=adapt, front=None, base=_common([s.info.base for s in p.sources]),
        trainable_params=sum(_numel(tmp / f) for f in written), files=[*files, *written],
        argv=command_line("combine"), seed=p.seed, finished=True,
        combine={"combination": p.combination, "sources": [str(s.path) for s in p.sources], "weights": p.weights,
                 **p.options, **record})
    info.write(tmp)
    model, _ = load_run(tmp)  # what certify will load
    final = {**model_cfg, "checkpoint": str(p.out.resolve() / INIT_FILE)} if files else model_cfg
    return info.updated(total_params=count_parameters(model)[1], model=final).write(tmp)


def _model_config(source, tmp: Path) -> tuple[dict, list[str]]:
    """The sources' model config; a randomly initialised backbone kept in the source run (INIT_FILE)
    is copied into the new run, so that it stands on its own."""
    model = dict(source.info.model)
    own = Path(source.path) / INIT_FILE
    if model.get("checkpoint") and Path(str(model["checkpoint"])).expanduser().resolve() == own.resolve():
        shutil.copy2(own, tmp / INIT_FILE)
        return {**model, "checkpoint": str(tmp / INIT_FILE)}, [INIT_FILE]
    return model, []


def _common(values: list):
    """The value every source shares, else None (e.g. sigma of runs trained at different noise levels)."""
    return values[0] if all(v == values[0] for v in values) else None


def _numel(path: Path) -> int:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return 0
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _build_lora(p: Plan, classifier, tmp: Path) -> tuple[dict, list[str], dict]:
    from peftsmooth.library import arithmetic
    from peftsmooth.models import save_state_dict_file

    if len(p.sources) == 1:
        config, tensors = arithmetic.lora_rescaled(p.sources[0], p.weights[0], classifier)
    else:
        config, tensors = arithmetic.lora_mixed(p.sources, p.weights, classifier, p.combination, p.options, p.seed)
    config.save_pretrained(str(tmp))
    save_state_dict_file(tensors, tmp / arithmetic.ADAPTER_WEIGHTS)
    adapt = dict(p.sources[0].info.adapt)
    adapt.update({k: getattr(config, k) for k in ("r", "lora_alpha") if k in adapt})
    return adapt, [src.PEFT_CONFIG, arithmetic.ADAPTER_WEIGHTS], {"rank": int(config.r)}


def _build_weights(p: Plan, classifier, tmp: Path) -> tuple[dict, list[str], dict]:
    from peftsmooth.library import arithmetic
    from peftsmooth.models import save_state_dict_file

    name, tensors = arithmetic.module_weights(p.sources, p.weights, classifier)
    save_state_dict_file(tensors, tmp / name)
    return dict(p.sources[0].info.adapt), [name], {}


def _build_ensemble(p: Plan, classifier, tmp: Path) -> tuple[dict, list[str], dict]:
    from peftsmooth.library.ensemble import write_members

    adapt, files = write_members(p.sources, tmp)
    return {**adapt, "weights": p.weights}, files, {}


BUILDERS = {src.LORA: _build_lora, src.WEIGHTS: _build_weights, "ensemble": _build_ensemble}
