"""Black-box PEFTSmoothing: a coordinator in front of a sealed classifier (BlackVIP, Oh et al. 2023).

The classifier's weights and gradients are off limits; only its output probabilities can be
queried. `apply` seals the classifier (all weights frozen, always in eval mode) and installs a
`Coordinator` as `classifier.front`, so the trained model is f(x) = classifier(coordinator(x)) and
`certify` treats it as one base classifier.

- `peft=blackbox` (`BlackBoxSPSA`): zeroth-order. `training_step` estimates the coordinator's
  gradient with SPSA-GC from cross-entropy values of the classifier's probabilities, obtained only
  through a `QueryOracle` (no_grad, detached, counted): a gradient cannot reach the classifier.
- `peft=blackbox_fo` (`WhiteBoxCoordinator`): the same coordinator trained by the shared loop with
  true gradients through the frozen classifier: what the zeroth-order estimate costs.

Both count classifier queries (images sent to the classifier during training) and report them in
`training_step`'s result / `extra_run_info()`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.adapt.base import Adaptation, ZerothOrderAdaptation
from peftsmooth.errors import UserError, require
from peftsmooth.front.coordinator import Coordinator
from peftsmooth.front.spsa import SPSA, SPSAConfig
from peftsmooth.runtime import freeze, pin_eval

WEIGHTS_FILE = "coordinator.safetensors"


def seal(classifier: nn.Module) -> nn.Module:
    """Freeze every weight of the classifier and pin its backbone to eval mode (a sealed API):
    model.train() elsewhere must not update its batch-norm statistics."""
    freeze(classifier)
    pin_eval(getattr(classifier, "backbone", classifier))
    return classifier


def bare_classifier(classifier: nn.Module):
    """The classifier without its front module: native image -> logits (what the black box is)."""
    if hasattr(classifier, "backbone") and hasattr(classifier, "preprocess"):
        return lambda x: classifier.backbone(classifier.preprocess(x))
    return classifier


class QueryOracle:
    """Query-only access to a classifier: probabilities for a batch, under no_grad, counted.

    Not an nn.Module on purpose: the classifier does not show up among anyone's parameters through
    it. Inputs are detached and outputs carry no graph, so no gradient can flow into (or out of) it.
    """

    def __init__(self, classify, num_classes: int, max_batch: int | None = None):
        self._classify = classify
        self.num_classes = int(num_classes)
        self.max_batch = int(max_batch) if max_batch else None
        self.queries = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.detach()
            chunks = x.split(self.max_batch) if self.max_batch else (x,)
            logits = torch.cat([self._classify(chunk) for chunk in chunks])
        if logits.dim() != 2 or logits.shape != (x.shape[0], self.num_classes):
            raise UserError(f"the classifier returns shape {tuple(logits.shape)} for {x.shape[0]} images, "
                            f"not a vector of dataset.num_classes={self.num_classes} class scores per image")
        self.queries += int(x.shape[0])
        return logits.float().softmax(dim=-1).detach()


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel ranks (under torchrun), so every rank takes the same SPSA step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(0)).device


class _CoordinatorAdaptation(Adaptation):
    """Shared part: build/install/save/load the coordinator in front of a sealed classifier."""

    name = "coordinator"
    trains = True
    no_lp_ft = "it trains a front module before a sealed classifier, not the classification head"

    def __init__(self, num_classes: int, image_size, coordinator: dict | None = None, seed: int = 0, **_):
        require(int(num_classes) >= 2, f"num_classes={num_classes} must be >= 2")
        self.num_classes = int(num_classes)
        self.image_size = [int(v) for v in image_size]
        self.coordinator_cfg = dict(coordinator or {})
        self.seed = int(seed)
        self.queries = 0

    def build_coordinator(self) -> Coordinator:
        cfg = dict(self.coordinator_cfg)
        encoder = dict(cfg.pop("encoder", None) or {})
        return Coordinator(self.image_size, encoder=encoder, **cfg)

    def _check_output(self, classifier: nn.Module) -> None:
        """One probe query before any training: the classifier must output num_classes scores."""
        probe = QueryOracle(bare_classifier(classifier), self.num_classes)
        probe(torch.zeros(1, *self.image_size, device=_device(classifier)))

    def apply(self, classifier: nn.Module) -> nn.Module:
        seal(classifier)
        self._check_output(classifier)
        with torch.random.fork_rng(devices=[]):   # seeded decoder init, without touching the caller's RNG
            torch.manual_seed(self.seed)
            coordinator = self.build_coordinator()
        classifier.front = coordinator.to(_device(classifier))
        return classifier

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        from peftsmooth.models import save_state_dict_file

        save_state_dict_file(model.front.trainable_state_dict(), Path(run_dir) / WEIGHTS_FILE)
        return [WEIGHTS_FILE]

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        from peftsmooth.models import load_state_dict_file

        seal(classifier)
        coordinator = self.build_coordinator()
        coordinator.load_trainable_state_dict(load_state_dict_file(Path(run_dir) / WEIGHTS_FILE))
        classifier.front = coordinator.to(_device(classifier))
        return classifier

    def extra_run_info(self) -> dict:
        """Fields for run.json: classifier queries spent in training."""
        return {"queries": self.queries}


class WhiteBoxCoordinator(_CoordinatorAdaptation):
    """`peft=blackbox_fo`: the coordinator trained by backpropagation through the frozen classifier.

    The shared loop does the training; queries are counted with a hook on the classifier's backbone
    (every image that goes through it while gradients are on, i.e. in training).
    """

    name = "blackbox_fo"

    def apply(self, classifier: nn.Module) -> nn.Module:
        classifier = super().apply(classifier)
        target = getattr(classifier, "backbone", classifier)

        def count(_module, args):
            if torch.is_grad_enabled():
                self.queries += int(args[0].shape[0])

        target.register_forward_pre_hook(count)
        return classifier


class BlackBoxSPSA(_CoordinatorAdaptation, ZerothOrderAdaptation):
    """`peft=blackbox`: the coordinator trained by SPSA-GC from classifier probabilities only."""

    name = "blackbox"

    def __init__(self, num_classes: int, image_size, coordinator: dict | None = None, spsa: dict | None = None,
                 seed: int = 0, query_batch_size: int | None = None, **kwargs):
        super().__init__(num_classes, image_size, coordinator, seed, **kwargs)
        self.spsa_config = SPSAConfig(**dict(spsa or {}))   # validates: UserError before any work
        require(query_batch_size is None or int(query_batch_size) >= 1,
                f"peft.query_batch_size={query_batch_size} must be >= 1 or null")
        self.query_batch_size = query_batch_size
        self.optimizer: SPSA | None = None
        self.oracle: QueryOracle | None = None

    def apply(self, classifier: nn.Module) -> nn.Module:
        classifier = super().apply(classifier)
        self.oracle = QueryOracle(bare_classifier(classifier), self.num_classes, self.query_batch_size)
        self.optimizer = SPSA(self.spsa_config, seed=self.seed)
        return classifier

    def training_step(self, model: nn.Module, x_noisy: torch.Tensor, y: torch.Tensor) -> dict:
        """One SPSA-GC update of the coordinator's trainable parameters; no backward pass anywhere.

        Data parallel (if the loop runs it under torchrun): each rank queries its own shard and the
        2q losses are averaged over ranks, so all ranks take the same step (perturbations are
        seeded by the step number).

        Returns what the shared loop logs: `loss` (mean of the 2q perturbed losses), `correct`
        (argmax of the mean perturbed probabilities; the perturbations are small) and `queries`
        (images sent to the classifier in this step; the loop sums it per epoch).
        """
        require(self.oracle is not None, "BlackBoxSPSA.training_step called before apply()")
        coordinator = model.front
        params = [p for p in coordinator.parameters() if p.requires_grad]
        before = self.oracle.queries
        mean_probs = torch.zeros(len(y), self.num_classes, device=y.device)

        def losses(points: torch.Tensor) -> torch.Tensor:
            """Cross-entropy at each row of `points`: all 2q coordinator outputs in one query."""
            nonlocal mean_probs
            inputs = []
            for theta in points:
                torch.nn.utils.vector_to_parameters(theta, params)
                inputs.append(coordinator(x_noisy))
            probs = self.oracle(torch.cat(inputs)).view(len(points), len(y), self.num_classes)
            mean_probs = probs.mean(0)
            log_p = probs.clamp_min(1e-12).log().gather(2, y.view(1, -1, 1).expand(len(points), -1, 1))
            return _all_sum(-log_p.squeeze(2).mean(1)) / _world_size()   # every rank: the same losses

        with torch.no_grad():
            theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
            theta, info = self.optimizer.step(losses, theta, batched=True)
            torch.nn.utils.vector_to_parameters(theta, params)
        local = self.oracle.queries - before
        self.queries += int(_all_sum(torch.tensor([local], device=y.device)).item())   # all ranks, for run.json
        return {"loss": info["loss"], "correct": int((mean_probs.argmax(1) == y).sum()), "queries": local}

    def state_dict(self) -> dict:
        """SPSA state for resuming (step counter, momentum, query count)."""
        return {"spsa": self.optimizer.state_dict() if self.optimizer else None, "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        if state.get("spsa") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["spsa"])
        self.queries = int(state.get("queries", 0))
