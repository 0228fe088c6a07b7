"""One thin module per CLI command: a plain `run_<command>(cfg) -> dict` and a Hydra `main`."""
