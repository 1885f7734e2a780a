"""Training methods, one registry (erasure/training/methods/registry.py): the ESD methods (esd.py) and UCE's
closed-form edit (uce.py). A new method is one module here that calls ``register_method``, imported below.

Example:
    >>> from erasure.training.methods import METHODS, select_parameters
    >>> list(METHODS)
    ['esd-x', 'esd-x-strict', 'esd-u', 'esd-all', 'uce']
"""

from . import esd, uce  # noqa: F401  (the built-in methods register themselves)
from .registry import METHODS, Method, NoOptions, get_method, register_method, select_parameters, unregister_method

__all__ = ["METHODS", "Method", "NoOptions", "get_method", "register_method", "select_parameters",
           "unregister_method"]
