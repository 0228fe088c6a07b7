"""The noise-adapter library: new runs made from trained runs, which `certify` and `report` treat like any other.

`combine` mixes the adapters of runs on one base classifier: weight arithmetic (peft's
add_weighted_adapter for LoRA, linear combinations of our own modules' parameters; combine.py,
arithmetic.py) or an ensemble of the adapters on the shared backbone (ensemble.py); the runs it starts
from are read and checked in sources.py. `quantize` stores a run's adapter at 8/4/2/1 bits (quantize.py).
"""
