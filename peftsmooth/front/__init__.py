"""The front stage: a module installed as `classifier.front`, in front of a frozen classifier.

    x + noise (native [0,1] space) -> front -> resize / normalize -> backbone (+ adapter) -> logits

A front module maps a noisy native-size image to a native-size image, so it is part of the base
classifier f and certificates stay in native pixel space (validity rule 1 in docs/architecture.md).
The classifier behind it is frozen and pinned to eval mode (`runtime.freeze`, `runtime.pin_eval`);
the front trains where `runs.load_run` rebuilds it, as the classifier's `front`.

    denoisers.py    CNN denoisers (DnCNN, MemNet) trained by `denoise-baseline`, `DenoisedClassifier`
    diffusion.py    the one-shot DDPM denoiser (Carlini et al. 2022), used as it is
    coordinator.py  BlackVIP's coordinator: a frozen encoder and a small trainable decoder
    spsa.py         SPSA-GC, the zeroth-order optimizer of the coordinator
    blackbox.py     the black-box adaptations (`peft=blackbox`, `peft=blackbox_fo`) and the query oracle

The objectives that train a denoiser are in `peftsmooth.train.losses`, with every other objective.
"""
