"""Every way of adapting a base classifier; configs in conf/peft/ choose one with `_target_`.

An adaptation object has three methods:
  apply(classifier)          -> the model to train (what is trainable is set here)
  save(model, run_dir)       -> writes its weights in the run directory, returns the file names
  load(classifier, run_dir)  -> the trained model rebuilt from run_dir (used by certify)
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn


class NoAdaptation:
    """`peft=none`: no training; the off-the-shelf classifier is certified as it is."""

    name = "none"
    trains = False

    def apply(self, classifier: nn.Module) -> nn.Module:
        for p in classifier.parameters():
            p.requires_grad_(False)
        return classifier

    def save(self, model: nn.Module, run_dir: Path) -> list[str]:
        return []

    def load(self, classifier: nn.Module, run_dir: Path) -> nn.Module:
        return classifier
