"""The certification engine: which images, which are already done, and one row per image.

    s = Settings.from_config(cfg.certify)            # every certify.* key checked, before any model
    indices = select_indices(len(dataset), s)          # Cohen's skip/start/max, then this shard's part
    done = resume_rows(out, identity, set(indices))    # rows already in certify.tsv (torn tail dropped)
    certify_into(out, certify_rows(g, dataset, todo, s, seed, batch_size), on_row=progress)

A certification MODE is one entry of `MODES`: it turns (Smooth, one image, its seed, the settings) into
the fields of the image's row (prediction, radius, samples). `cohen` (CERTIFY), `predict` (PREDICT)
and `sequential` (sequential CERTIFY) are registered below as pool jobs (`job` and `outcome`): many
images in flight fill every forward pass (`peftsmooth.certify.pool`), and rows come in completion
order. A new mode subclasses `Mode`, checks its own certify.* keys in `read_options`, returns either a
job or the row fields from `certify_one` (image by image), and registers itself with `@register("name")`.
`incremental` (a variant certified from its parent's certificate, peftsmooth.certify.incremental_run)
makes its own rows: routes first, then one pool over the pair classifier and one over the variant.
Every row carries `samples`: the classifier evaluations spent on the image, selection samples included
(both models counted in incremental rows), and a certifying mode's `pA_lower` (Mode.extra). A *sample*
is one noisy copy x + e, one row of a forward pass; a *forward pass* is one call of f on a batch of up
to certify.batch_size samples, possibly of several images.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from peftsmooth.certify import results
from peftsmooth.certify.incremental import FALLBACKS, DisagreementClassifier
from peftsmooth.certify.incremental_run import incremental_plan, incremental_rows
from peftsmooth.certify.noise import NOISE_SCHEME
from peftsmooth.certify.pool import Job, run_pool
from peftsmooth.certify.reference import check_parent, read_parent
from peftsmooth.certify.sequential import STOP_RULES, SequentialCertificate, look_plan, sequential_job, stop_rule
from peftsmooth.certify.smoothing import Certificate, Smooth, image_seed
from peftsmooth.distributed import rank_share
from peftsmooth.errors import UserError, choice_error, require
from peftsmooth.runtime import PRECISIONS

log = logging.getLogger(__name__)

AUTO_BATCH = {"cuda": 4096, "cpu": 256}  # first try for certify.batch_size=auto (halved on out-of-memory)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --- modes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Image:
    """One selected test image: its index, label, pixels and noise seed (validity rule 7)."""

    idx: int
    label: int
    x: torch.Tensor
    seed: int


class Mode:
    """One certification procedure. A mode that runs in the pool of images in flight (`pool`) returns a
    job from `job` and reads its answer in `outcome`; a simpler mode certifies image by image in
    `certify_one`."""

    uses_n0 = True  # whether certify.n0 is part of the rows' identity (resume, merge)
    pooled = False  # whether it runs as pool jobs (`job`, `outcome`) rather than `certify_one`

    def read_options(self, c) -> dict[str, Any]:
        """This mode's own certify.* keys, checked (a UserError names the first bad one)."""
        return {}

    def identity(self, s: Settings) -> dict[str, Any]:
        """The sample-size keys and the noise scheme that give a row its meaning (see results.IDENTITY_KEYS)."""
        return {"n0": s.n0 if self.uses_n0 else None, "n": s.n, "noise": NOISE_SCHEME}

    def job(self, g: Smooth, x: torch.Tensor, seed: int, s: Settings) -> Job | None:
        """The image's certification as a pool job, or None for a mode that runs `certify_one`."""
        return None

    def outcome(self, result: Any, s: Settings) -> tuple[int, float, int]:
        """(prediction, radius, samples) from a job's answer."""
        raise NotImplementedError

    def certify_one(self, g: Smooth, x: torch.Tensor, seed: int, s: Settings,
                    batch_size: int) -> tuple[int, float, int]:
        """(prediction, radius, samples) of one image."""
        raise NotImplementedError

    def extra(self, result: Any) -> dict[str, Any]:
        """Extra certify.tsv columns of a job's answer (e.g. pA_lower)."""
        return {}

    def check_run(self, s: Settings, *, sigma: float, dataset: str) -> None:
        """Checks that need the certified sigma and dataset (before any model is built)."""


MODES: dict[str, Mode] = {}
MODE_KEYS = {"sequential": ("n_max", "stop", "radii"), "incremental": ("reference", "fallback", "n_max")}  # their own


def register(name: str) -> Callable[[type[Mode]], type[Mode]]:
    """Class decorator: make `certify.mode=name` run this Mode."""
    def add(cls: type[Mode]) -> type[Mode]:
        MODES[name] = cls()
        return cls
    return add


@register("cohen")
class Certify(Mode):
    """CERTIFY (validity rule 2): n0 selection samples, then n estimation samples."""

    pooled = True

    def job(self, g: Smooth, x: torch.Tensor, seed: int, s: Settings) -> Job:
        return g.certify_job(x, seed, s.n0, s.n, s.alpha)

    def outcome(self, result: Certificate, s: Settings) -> tuple[int, float, int]:
        return result.prediction, result.radius, s.n0 + s.n

    def extra(self, result: Certificate) -> dict[str, Any]:
        return {"pA_lower": result.pABar}


@register("predict")
class Predict(Mode):
    """PREDICT (validity rule 3): n samples, a binomial test of the top two counts; no radius."""

    uses_n0 = False
    pooled = True

    def job(self, g: Smooth, x: torch.Tensor, seed: int, s: Settings) -> Job:
        return g.predict_job(x, seed, s.n, s.alpha)

    def outcome(self, result: int, s: Settings) -> tuple[int, float, int]:
        return result, 0.0, s.n


@register("sequential")
class Sequential(Certify):
    """Sequential CERTIFY (peftsmooth.certify.sequential): CERTIFY's selection, then estimation samples
    look by look up to certify.n_max, stopped as soon as the stopping rule (certify.stop) is settled; a
    time-uniform lower bound keeps the certificate's failure probability at alpha (validity rule 6)."""

    def read_options(self, c) -> dict[str, Any]:
        n_max = c.get("n_max")
        require(_is_int(n_max, 1), f"certify.n_max={n_max} must be an integer >= 1")
        require(c.get("n") == n_max, f"certify.n={c.get('n')} must equal certify.n_max={n_max} in sequential "
                                     f"mode (set certify.n_max)")
        stop = c.get("stop")
        require(str(stop) in STOP_RULES, str(choice_error("certify.stop", stop, STOP_RULES)))
        radii = c.get("radii")
        if stop == "radii" and radii is None:
            # the positive radii of certify.radius_grid: by default RADIUS_GRID's, i.e. DEFAULT_RADII
            radii = [r for r in c.get("radius_grid") or [] if isinstance(r, (int, float)) and r > 0] or [0.0]
        loss = c.get("max_radius_loss") if stop == "radius" else None
        key = "radii" if stop == "radii" else "max_radius_loss"
        try:
            rule = stop_rule(str(stop), list(radii) if stop == "radii" else None, loss)
        except ValueError as err:
            raise UserError(f"certify.{key}={radii if stop == 'radii' else loss}: {err}") from None
        return {"n_max": int(n_max), "stop": rule.stop, "radii": list(rule.radii) or None,
                "max_radius_loss": rule.max_radius_loss}

    def identity(self, s: Settings) -> dict[str, Any]:
        keys = ("stop", "radii", "max_radius_loss")
        return {**super().identity(s), **{k: s.options[k] for k in keys}}

    def job(self, g: Smooth, x: torch.Tensor, seed: int, s: Settings) -> Job:
        o = s.options
        rule = stop_rule(o["stop"], o["radii"], o["max_radius_loss"])
        return sequential_job(g, x, seed, s.n0, look_plan(o["n_max"], s.alpha, stop=rule.stop), rule)

    def outcome(self, result: SequentialCertificate, s: Settings) -> tuple[int, float, int]:
        return result.prediction, result.radius, result.samples

    def extra(self, result: SequentialCertificate) -> dict[str, Any]:
        return {"pA_lower": result.result.lower}


@register("incremental")
class Incremental(Sequential):
    """Incremental certification (peftsmooth.certify.incremental): a variant f' certified from its
    parent's certificate (certify.reference) and a sequential test of the disagreement between f and f',
    or routed to sequential CERTIFY (certify.fallback); every row holds at alpha_total = certify.alpha."""

    pooled = False

    def read_options(self, c) -> dict[str, Any]:
        options = super().read_options(c)
        require(str(c.get("fallback")) in FALLBACKS, str(choice_error("certify.fallback", c.get("fallback"), FALLBACKS)))
        zeta = c.get("expected_disagreement")
        require(isinstance(zeta, (int, float)) and not isinstance(zeta, bool) and 0 <= zeta < 1,
                f"certify.expected_disagreement={zeta} must be a number in [0, 1) (the rate the route costs assume)")
        require(options["stop"] == "radii", "certify.stop=radius is not available with certify=incremental (use radii)")
        parent = read_parent(c.get("reference"))
        return {**options, "reference": str(parent.path), "fallback": str(c.fallback),
                "expected_disagreement": float(zeta), "parent": parent}

    def identity(self, s: Settings) -> dict[str, Any]:
        keys = ("reference", "fallback", "expected_disagreement")
        return {**super().identity(s), **{k: s.options[k] for k in keys}}

    def check_run(self, s: Settings, *, sigma: float, dataset: str) -> None:
        check_parent(s.options["parent"], sigma=sigma, dataset=dataset, alpha_total=s.alpha)

    def rows(self, g: Smooth, g_pair: Smooth, todo: Sequence[int], load: Callable, s: Settings,
             batch_size: int) -> Iterator[dict]:
        o = s.options
        plan = incremental_plan(o["parent"], g.sigma, s.alpha, s.n0, o["n_max"], stop_rule("radii", o["radii"]),
                                o["radii"], o["fallback"], o["expected_disagreement"])
        yield from incremental_rows(g, g_pair, plan, todo, load, batch_size, s.pool_size if s.pack else 1)


# --- settings, checked before anything runs -------------------------------------------------

@dataclass
class Settings:
    mode: str
    n0: int
    n: int
    alpha: float
    batch_size: int | str
    skip: int
    start: int
    max: int | None
    shard: int
    num_shards: int
    resume: str | None
    precision: str
    compile: bool
    compile_mode: str
    channels_last: bool
    merge_adapters: bool
    pack: bool
    radius_grid: list[float]
    pool_size: int | None = None  # most images in flight (None: as many as fill a batch)
    preflight: int = 100  # images of the preflight check (0: none; peftsmooth.certify.preflight)
    preflight_min_acc: float | None = None  # refuse below this clean accuracy (None: only warn)
    options: dict[str, Any] = field(default_factory=dict)  # the mode's own keys (Mode.read_options)

    @classmethod
    def from_config(cls, c) -> Settings:
        """certify.* as Settings, or a UserError naming the first bad key."""
        require(str(c.get("mode")) in MODES, str(choice_error("certify.mode", c.get("mode"), MODES)))
        missing = [k for k in MODE_KEYS.get(str(c.mode), ()) if k not in c]  # certify.mode=X without certify=X
        require(not missing, f"certify.mode={c.mode} lacks certify.{missing[0] if missing else ''}: choose the mode "
                             f"with its group, certify={c.mode} (it brings the mode's keys)")
        options = MODES[str(c.mode)].read_options(c)
        _check_numbers(c)
        if str(c.get("precision")) not in PRECISIONS:
            raise choice_error("certify.precision", c.get("precision"), PRECISIONS)
        if str(c.get("compile_mode", "default")) not in COMPILE_MODES:
            raise choice_error("certify.compile_mode", c.get("compile_mode"), COMPILE_MODES)
        grid = list(c.get("radius_grid") or [])
        require(all(isinstance(r, (int, float)) and r >= 0 for r in grid), f"certify.radius_grid={grid} must be radii >= 0")
        return cls(mode=str(c.mode), n0=int(c.n0), n=int(c.n), alpha=float(c.alpha), batch_size=c.batch_size,
                   skip=int(c.skip), start=int(c.start), max=c.get("max"), shard=int(c.shard),
                   num_shards=int(c.num_shards), resume=c.get("resume"), precision=str(c.precision),
                   compile=bool(c.compile), compile_mode=str(c.get("compile_mode", "default")),
                   channels_last=bool(c.channels_last), merge_adapters=bool(c.merge_adapters),
                   pack=bool(c.get("pack", True)), radius_grid=[float(r) for r in grid],
                   pool_size=c.get("pool_size"), preflight=int(c.get("preflight", 100)),
                   preflight_min_acc=c.get("preflight_min_acc"), options=options)

    @property
    def engine_mode(self) -> Mode:
        return MODES[self.mode]

    def batch_for(self, device: torch.device) -> int:
        """certify.batch_size, with `auto` as the first try for this device."""
        return AUTO_BATCH.get(device.type, 256) if self.batch_size == "auto" else int(self.batch_size)

    def for_rank(self, rank: int, world_size: int) -> Settings:
        """Under torchrun every process certifies one shard: shard = rank of world_size."""
        return dataclasses.replace(self, shard=rank, num_shards=world_size) if world_size > 1 else self


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_numbers(c) -> None:
    for key in ("n0", "n"):
        require(_is_int(c.get(key), 1), f"certify.{key}={c.get(key)} must be an integer >= 1")
    alpha = c.get("alpha")
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1,
            f"certify.alpha={alpha} must lie strictly between 0 and 1 (Cohen's default: 0.001)")
    bs = c.get("batch_size")
    require(bs == "auto" or _is_int(bs, 1), f"certify.batch_size={bs} must be an integer >= 1 or auto")
    require(_is_int(c.get("skip"), 1), f"certify.skip={c.get('skip')} must be an integer >= 1")
    require(_is_int(c.get("start"), 0), f"certify.start={c.get('start')} must be an integer >= 0")
    pool = c.get("pool_size")
    require(pool is None or _is_int(pool, 1), f"certify.pool_size={pool} must be an integer >= 1 or null "
                                              f"(null: as many images in flight as fill a batch)")
    require(c.get("max") is None or _is_int(c.get("max"), 1), f"certify.max={c.get('max')} must be null or an integer >= 1")
    require(_is_int(c.get("preflight", 100), 0), f"certify.preflight={c.get('preflight')} must be an integer >= 0 "
                                                 f"(images of the preflight check; 0 turns it off)")
    low = c.get("preflight_min_acc")
    require(low is None or (isinstance(low, (int, float)) and not isinstance(low, bool) and 0 <= low <= 1),
            f"certify.preflight_min_acc={low} must be null or a clean accuracy in [0, 1]")
    require(_is_int(c.get("num_shards"), 1), f"certify.num_shards={c.get('num_shards')} must be an integer >= 1")
    require(_is_int(c.get("shard"), 0) and c.get("shard") < c.get("num_shards"),
            f"certify.shard={c.get('shard')} must be an integer in [0, certify.num_shards={c.get('num_shards')})")


# --- which images ---------------------------------------------------------------------------

def select_indices(num_images: int, s: Settings) -> list[int]:
    """Cohen's selection (every `skip`-th test image from `start`, at most `max`), then this shard's part."""
    chosen = list(range(s.start, num_images, s.skip))
    if s.max is not None:
        chosen = chosen[: s.max]
    return rank_share(chosen, s.shard, s.num_shards)


def resume_rows(out: Path, identity: dict, wanted: set[int], *, resume: str | None = None) -> list[dict]:
    """Rows already in out/certify.tsv (a torn last line is dropped), after checking they were certified
    with these settings and belong to this image selection (which may extend the previous one, e.g. a
    larger max). With `resume` (certify.resume) the TSV must exist."""
    tsv = out / results.TSV_FILE
    require(not resume or tsv.is_file(), f"certify.resume={resume} holds no {results.TSV_FILE} to resume")
    if not tsv.is_file():
        return []
    rows = results.read_tsv(tsv)
    previous = results.read_summary(out)
    require(previous is not None, f"{tsv} exists without a {results.SUMMARY_FILE}: not a certify directory to resume")
    require(previous.get("noise") == identity.get("noise"),
            f"{out} holds rows certified with noise scheme {previous.get('noise') or 'blocks-v1 (before 0.2)'}, this "
            f"version draws {identity.get('noise')}; a resume never mixes the two: certify into another directory "
            f"(hydra.run.dir=...)")
    for key in results.IDENTITY_KEYS:
        require(previous.get(key) == identity.get(key),
                f"{out} holds a certification with {key}={previous.get(key)}, this run has {key}={identity.get(key)}; "
                f"certify into another directory (hydra.run.dir=...)")
    recorded = previous.get("weights_sha256")  # absent in certifications made before it was recorded
    require(recorded is None or recorded == identity.get("weights_sha256"),
            f"{out} holds rows certified with other weights (weights_sha256 {str(recorded)[:12]}..., this run's "
            f"{str(identity.get('weights_sha256'))[:12]}...): the classifier changed since; certify into another "
            f"directory (hydra.run.dir=...)")
    extra = sorted(r["idx"] for r in rows if r["idx"] not in wanted)
    require(not extra, f"{out} holds images outside this run's selection (idx {extra[:3]}...; skip/start/max/shard "
                       f"differ); certify into another directory (hydra.run.dir=...)")
    if rows:
        log.info("resuming %s: %d images already certified", out, len(rows))
    return rows


# --- the loop -------------------------------------------------------------------------------

def certify_rows(g: Smooth, dataset, todo: Sequence[int], s: Settings, seed: int, batch_size: int, *,
                 companion: Smooth | None = None) -> Iterator[dict]:
    """One row per image of `todo`: idx, label, predict, radius, correct, time, samples (and the mode's
    extra columns). Pool modes run with many images in flight (one at a time without certify.pack) and
    give rows in completion order; a mode without jobs, image by image in order; incremental
    certification its own way (`companion`: the pair classifier of parent and variant). An image's row
    never depends on which."""
    mode = s.engine_mode
    if isinstance(mode, Incremental):
        yield from mode.rows(g, companion, todo, lambda idx: load_image(dataset, idx, seed), s, batch_size)
        return
    images = (load_image(dataset, idx, seed) for idx in todo)
    if not mode.pooled:
        for image in images:
            start = time.perf_counter()
            prediction, radius, samples = mode.certify_one(g, image.x, image.seed, s, batch_size)
            yield _row(image, prediction, radius, samples, time.perf_counter() - start)
        return
    jobs = ((image, mode.job(g, image.x, image.seed, s)) for image in images)
    for done in run_pool(g, jobs, batch_size, max_in_flight=s.pool_size if s.pack else 1):
        yield _row(done.key, *mode.outcome(done.result, s), done.seconds) | mode.extra(done.result)


def _row(image: Image, prediction: int, radius: float, samples: int, seconds: float) -> dict:
    return {"idx": image.idx, "label": image.label, "predict": prediction, "radius": radius,
            "correct": int(prediction == image.label), "time": seconds, "samples": samples}


def load_image(dataset, idx: int, seed: int) -> Image:
    x, label = dataset[idx]
    return Image(idx, int(label), x, image_seed(seed, idx))


def session_counters(smoothers: Sequence[Smooth | None], start: float) -> dict:
    """The forward-pass counters of this session (None entries skipped); classifier_evaluations counts
    both models of a pair classifier (one per sample in the one-model modes: it equals samples_drawn);
    batch_capacity sums the rows each completed pass could hold (less after an out-of-memory retry)."""
    smoothers = [g for g in smoothers if g is not None]
    calls = sum(g.forward_calls for g in smoothers)
    evaluations = sum(g.samples_drawn * (2 if isinstance(g.base_classifier, DisagreementClassifier) else 1)
                      for g in smoothers)
    return {"forward_calls": calls, "samples_drawn": sum(g.samples_drawn for g in smoothers),
            "classifier_evaluations": evaluations, "batch_capacity": sum(g.batch_capacity for g in smoothers),
            "wall_seconds": time.perf_counter() - start}


def certify_into(out: Path, rows: Iterable[dict], on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Append every row to out/certify.tsv as it comes (flushed), telling `on_row` (e.g. a progress bar)."""
    written = []
    with results.TsvWriter(out / results.TSV_FILE) as writer:
        for row in rows:
            writer.write_row(row)
            written.append(row)
            if on_row is not None:
                on_row(row)
    return written
