"""The denoisers' old module path, kept for run directories written by earlier versions: their
run.json names `peftsmooth.denoisers.*` as the `_target_` of `front` (and `front.arch`), which
`runs.load_run` instantiates. The code is in `peftsmooth.front.denoisers` and `peftsmooth.front.diffusion`."""

from peftsmooth.front.denoisers import DnCNN, MemNet, TrainedDenoiser  # noqa: F401
from peftsmooth.front.diffusion import PretrainedDiffusion  # noqa: F401
