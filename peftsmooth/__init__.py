"""peftsmooth: PEFTSmoothing and randomized-smoothing certification for pretrained classifiers."""

__version__ = "0.2.0"
