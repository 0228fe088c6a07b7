"""The rows of an incremental certification (certify=incremental): route, then two pools of images in flight.

Every image's route is decided first, from its parent row only (`incremental.choose_route`), so no
sample of the variant can move an image from one route to the other. Then:
- ROUTE_PARENT rows (the parent certified nothing) are written at once, with no sample;
- ROUTE_DISAGREEMENT images run the disagreement test in a pool over the pair classifier (f and f' on
  the same noisy inputs, every forward pass full, both models counted in `samples`);
- ROUTE_SEQUENTIAL images run ordinary sequential CERTIFY of f' at alpha_total in a pool over f'.
All new samples come from the image's incremental seed (`incremental.incremental_seed`), which no
parent certificate used. Each image's answer depends on its own noise streams only, so rows do not
depend on the batch size, the pool size or a resume (validity rule 7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from peftsmooth.certify import incremental as inc
from peftsmooth.certify.pool import run_pool
from peftsmooth.certify.reference import Parent, check_fingerprint, check_images, check_labels, check_merge
from peftsmooth.certify.sequential import StopRule, look_plan, sequential_job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncrementalPlan:
    """Everything fixed before sampling: the parent, alpha's split, the route rule and the fallback's rule."""

    parent: Parent
    alpha_total: float
    n0: int
    n_max: int
    stop: StopRule  # the fallback's stopping rule (sequential CERTIFY)
    route_rule: inc.RouteRule

    @property
    def alpha_2(self) -> float:
        return self.alpha_total - self.parent.alpha


def incremental_plan(parent: Parent, sigma: float, alpha_total: float, n0: int, n_max: int, stop: StopRule,
                     radii: Sequence[float], fallback: str, expected_disagreement: float) -> IncrementalPlan:
    alpha_2 = alpha_total - parent.alpha
    rule = inc.RouteRule(sigma=float(sigma), radii=tuple(float(r) for r in radii), n0=int(n0),
                         sequential_plan=look_plan(n_max, alpha_total, stop=stop.stop),
                         disagreement_plan=inc.disagreement_plan(n_max, alpha_2),
                         expected_disagreement=float(expected_disagreement), fallback=str(fallback))
    return IncrementalPlan(parent, float(alpha_total), int(n0), int(n_max), stop, rule)


def routes(plan: IncrementalPlan, indices: Iterable[int]) -> dict[int, str]:
    """Each image's route, from its parent row only."""
    rows = plan.parent.rows
    return {i: inc.choose_route(rows[i].certified, rows[i].lower, plan.route_rule) for i in indices}


def incremental_rows(g, g_pair, plan: IncrementalPlan, todo: Sequence[int], load: Callable,
                     batch_size: int, pool_size: int | None) -> Iterator[dict]:
    """One row per image of `todo` (load(idx) gives its Image), in completion order: kept parent rows,
    then the disagreement tests (pool over g_pair), then the fallback's sequential certificates (pool over g)."""
    chosen = routes(plan, todo)
    for idx in (i for i in todo if chosen[i] == inc.ROUTE_PARENT):
        image = load(idx)
        parent = plan.parent.rows[idx]
        yield _row(image, parent.predict, parent.radius, 0, 0.0, 0.0, inc.ROUTE_PARENT, 0)  # no bound on f
    tests = ((image, inc.disagreement_job(g_pair, image.x, image.seed, plan.route_rule.disagreement_plan,
                                          plan.parent.rows[image.idx].lower, plan.route_rule.radii))
             for image in (load(i) for i in todo if chosen[i] == inc.ROUTE_DISAGREEMENT))
    for done in run_pool(g_pair, tests, batch_size, max_in_flight=pool_size):
        r, parent = done.result, plan.parent.rows[done.key.idx]
        yield _row(done.key, inc.incremental_prediction(parent.predict, r), r.radius, 2 * r.samples, done.seconds,
                   max(r.lower, 0.0), inc.ROUTE_DISAGREEMENT, r.disagreements)
    seq_plan = plan.route_rule.sequential_plan
    direct = ((image, sequential_job(g, image.x, inc.incremental_seed(image.seed), plan.n0, seq_plan, plan.stop))
              for image in (load(i) for i in todo if chosen[i] == inc.ROUTE_SEQUENTIAL))
    for done in run_pool(g, direct, batch_size, max_in_flight=pool_size):
        c = done.result
        yield _row(done.key, c.prediction, c.radius, c.samples, done.seconds, c.result.lower, inc.ROUTE_SEQUENTIAL, 0)


def _row(image, prediction: int, radius: float, samples: int, seconds: float, lower: float, route: str,
         disagreements: int) -> dict:
    """`lower` (column pA_lower) is what the row's certificate rests on, on every route: a lower bound on
    P(f'(x+e) = predict's class) at alpha_total (pA_lower - zeta_upper, or the fallback's own bound), and 0
    on a parent-route row, which rests on no bound about f' (the parent's own bound was about f)."""
    return {"idx": image.idx, "label": image.label, "predict": prediction, "radius": radius,
            "correct": int(prediction == image.label), "time": seconds, "samples": samples,
            "pA_lower": lower, "route": route, "disagreements": disagreements}


# --- the command's pieces: the parent classifier, the pair classifier, what the summary records ----

def load_parent_model(parent: Parent | None, dataset, indices: Sequence[int]):
    """The parent run's classifier f, after checking that the parent certified every image of `indices`
    (same idx, same label: one pass over the selected images' labels) and that its weights are the
    certified ones; returns f and 'verified' or 'unverified' (`reference.check_fingerprint`), or
    (None, None) without a parent."""
    from peftsmooth.certify.fingerprint import weights_sha256
    from peftsmooth.runs import load_run

    if parent is None:
        return None, None
    check_images(parent, indices)
    check_labels(parent, {i: int(dataset[i][1]) for i in indices})
    model, _ = load_run(parent.run)
    return model, check_fingerprint(parent, weights_sha256(model))


def pair_smooth(parent_model, variant_model, device, s, sigma: float, parent: Parent | None):
    """The `Smooth` of the pair classifier (f and f' on one batch); f prepared and run as its certificate
    was computed (the parent's merge and precision), f' as this certification runs it; None without one."""
    from peftsmooth.certify.classifier import prepare_for_certify
    from peftsmooth.certify.smoothing import Smooth

    if parent_model is None:
        return None
    parent_model, merged = prepare_for_certify(parent_model, device, merge_adapters=bool(parent.merged_adapters),
                                               channels_last=s.channels_last)
    check_merge(parent, merged)
    if str(parent.summary.get("device", device)).split(":")[0] != device.type:
        log.warning("the parent was certified on %s, f is rebuilt on %s: kernels may differ near f's decision "
                    "boundary (recorded as parent_device in summary.json)", parent.summary.get("device"), device)
    pair = inc.DisagreementClassifier(parent_model, variant_model, parent_precision=parent.precision,
                                      variant_precision=s.precision)
    return Smooth(pair, 2, sigma, precision="fp32", channels_last=s.channels_last)  # each member autocasts itself


def parent_meta(parent: Parent | None, alpha_total: float, fingerprint: str | None) -> dict:
    """What an incremental certification records of its parent and of its alpha split ({} without one)."""
    if parent is None:
        return {}
    return {"reference": str(parent.path), "parent_run": str(parent.run), "parent_mode": parent.summary.get("mode"),
            "alpha_parent": parent.alpha, "alpha_disagreement": alpha_total - parent.alpha,
            "parent_precision": parent.precision, "parent_merged_adapters": parent.merged_adapters,
            "parent_device": parent.summary.get("device"), "parent_fingerprint": fingerprint}
