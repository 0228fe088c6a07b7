"""Training: the loop `train` and `denoise-baseline` share, and what varies around it.

`loop` (`fit`: preflight, epochs, evaluation, metrics), `settings` (`TrainSettings`), `steps` (one
optimizer step, first or zeroth order), `state` (the checkpoint of an exact resume), `phases` (the
schedule: standard or LP-FT), `batch` (what an objective sees), `losses` and `robust_losses` (the
objectives, MACER and SmoothAdv among them), `watch` (training.png, TensorBoard), `run` (the lifecycle
of a run directory).
"""
