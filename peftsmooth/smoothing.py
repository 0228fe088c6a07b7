"""`from peftsmooth.smoothing import Smooth`: the import path of Cohen et al.'s `core.py`, kept for the
scripts that researchers port from it. The code is in `peftsmooth.certify.smoothing`."""

from peftsmooth.certify.smoothing import Smooth, image_seed  # noqa: F401
