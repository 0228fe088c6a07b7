"""An ensemble of adapters on one shared backbone, as one base classifier `certify` certifies at any sigma.

    f(x) = log( sum_i w_i softmax(f_i(x)) / sum_i w_i ),   f_i = the backbone with adapter i

The members are peft adapters loaded side by side into one PeftModel (`load_adapter`), each with its
own head (modules_to_save); a forward pass runs the backbone once per adapter (`set_adapter`). The
output is the log of the weighted mean probability, so argmax (what smoothing counts) and softmax
(the mean itself) work on it like on logits. The adapters stay as they are before certification:
folding one into the weights would drop the others (peftsmooth.adapt.peft_tuners.merge_exact leaves a
model with several adapters alone). The run directory holds a copy of every member's adapter files in
members/m<i>/, so it does not depend on the source runs staying where they are.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from peftsmooth.adapt.base import Adaptation
from peftsmooth.errors import UserError, require

MEMBERS_DIR = "members"
TARGET = "peftsmooth.library.ensemble.AdapterEnsemble"


class EnsembleClassifier(nn.Module):
    """The weighted mean of the members' softmax outputs (its log), one backbone pass per adapter."""

    def __init__(self, model: nn.Module, names: list[str], weights: list[float]):
        super().__init__()
        self.model, self.names = model, list(names)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for name, weight in zip(self.names, self.weights):
            self.model.set_adapter(name, inference_mode=True)
            p = torch.softmax(self.model(x).float(), dim=-1) * weight
            mean = p if mean is None else mean + p
        return torch.log(mean)


class AdapterEnsemble(Adaptation):
    """run.json `adapt` of a `combine combination=ensemble` run: its members (folders under
    members/) and their weights. Nothing trains; `load` builds the EnsembleClassifier."""

    name = "ensemble"
    trains = False
    no_lp_ft = "an ensemble is made by `peftsmooth combine`, not trained"

    def __init__(self, members: list[str], weights: list[float] | None = None):
        members = [str(m) for m in members]
        weights = [float(w) for w in (weights or [1.0] * len(members))]
        require(len(members) >= 2, "an adapter ensemble needs at least two members")
        require(len(weights) == len(members), f"ensemble weights {weights} do not match its {len(members)} members")
        require(all(w > 0 for w in weights), f"ensemble weights {weights} must be > 0 (mixture weights)")
        self.members, self.weights = members, weights

    def apply(self, classifier: nn.Module) -> nn.Module:
        raise UserError("an adapter ensemble is made by `peftsmooth combine combination=ensemble`, not trained")

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        from peft import PeftModel

        paths = [Path(run_dir) / MEMBERS_DIR / m for m in self.members]
        for path in paths:
            require(path.is_dir(), f"run={run_dir} has no {MEMBERS_DIR}/{path.name} (the ensemble's member adapter)")
        model = PeftModel.from_pretrained(classifier, str(paths[0]), adapter_name=self.members[0])
        for name, path in zip(self.members[1:], paths[1:]):
            model.load_adapter(str(path), adapter_name=name)
        return EnsembleClassifier(model, self.members, self.weights)


def write_members(sources, out: Path) -> tuple[dict, list[str]]:
    """Copy every member's adapter files into out/members/m<i>/: (the run.json `adapt`, the files)."""
    from peftsmooth.adapt.peft_tuners import ADAPTER_FILES

    names, files = [], []
    for i, source in enumerate(sources):
        name = f"m{i}"
        (out / MEMBERS_DIR / name).mkdir(parents=True)
        for file in ADAPTER_FILES:
            shutil.copy2(Path(source.path) / file, out / MEMBERS_DIR / name / file)
            files.append(f"{MEMBERS_DIR}/{name}/{file}")
        names.append(name)
    return {"_target_": TARGET, "members": names}, files
