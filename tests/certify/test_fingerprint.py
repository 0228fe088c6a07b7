"""The weights fingerprint a certification records: the same weights give the same hash, any change another."""

import torch
import torch.nn as nn

from peftsmooth.certify.fingerprint import weights_sha256


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_same_weights_same_hash_and_any_change_another():
    model = _model()
    reference = weights_sha256(model)
    assert weights_sha256(_model()) == reference and len(reference) == 64
    with torch.no_grad():
        model[2].weight[1, 0] += 1e-6  # one parameter, one ulp-scale step
    assert weights_sha256(model) != reference
    assert weights_sha256(_model().to(torch.bfloat16)) != reference  # same values rounded: another f
    moved = _model()
    moved[1].running_mean += 0.5  # buffers are weights too (batch norm statistics)
    assert weights_sha256(moved) != reference
