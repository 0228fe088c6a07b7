"""The black-box adaptations' old module path, kept for run directories written by earlier versions:
their run.json names `peftsmooth.adapt.blackbox.*` as the `_target_` of `adapt`, which
`runs.load_run` instantiates. The code is in `peftsmooth.front.blackbox`."""

from peftsmooth.front.blackbox import BlackBoxSPSA, WhiteBoxCoordinator  # noqa: F401
