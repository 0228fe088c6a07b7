from peftsmooth.config import hydra_app


def run_train(cfg):
    from omegaconf import OmegaConf
    print(OmegaConf.to_yaml(cfg))
    return {}


main = hydra_app("train", run_train)
