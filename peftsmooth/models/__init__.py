"""Models: the base classifier f (preprocessing inside, so radii stay in native pixels) and the sources
it is built from: timm (default), the randomized-smoothing literature's published checkpoints (`rs`),
torchvision, Hugging Face transformers (`hf`) and the user's own module (`python`).

    classifier = build_classifier(cfg.model, num_classes, image_size)   # one entry point, any source
"""

from peftsmooth.models.classifier import BaseClassifier, classifier_name, count_parameters  # noqa: F401
from peftsmooth.models.sources import SOURCES, build_classifier, check_model_config, make_portable, model_label, \
    module_tree  # noqa: F401
from peftsmooth.models.weights import load_state_dict_file, save_state_dict_file  # noqa: F401
