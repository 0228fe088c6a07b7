"""Certification: the smoothed classifier and everything between a classifier and its certificates.

`smoothing` (CERTIFY and PREDICT, Cohen et al. 2019), `sequential` (CERTIFY decided at a fixed grid of
looks), `noise` (the seeded noise streams), `stats` (the bounds), `engine` (the `certify` command's
settings, modes and row loop), `classifier` (what `certify` certifies), `results` and `tsv` (the files
of a certification directory), `progress` (the progress bar).

`from peftsmooth.certify import Smooth` is the Python API (also `peftsmooth.smoothing`, Cohen's path).
"""

__all__ = ["Smooth", "image_seed"]


def __getattr__(name: str):
    # Lazy, so that reading a certify.tsv (report, merge) does not import the sampler.
    if name in __all__:
        from peftsmooth.certify import smoothing

        return getattr(smoothing, name)
    raise AttributeError(f"module 'peftsmooth.certify' has no attribute {name!r}")
