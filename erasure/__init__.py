"""erasure: erase concepts from diffusers pipelines (ESD) and ship the result as verifiable concept packs.

The main objects import from here (lazily: ``import erasure`` loads no torch)::

    >>> from erasure import ConceptPack, ESDConfig, train_pack
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it (docs: README.md, "Layout")
_PUBLIC = {
    "ConceptPack": "erasure.pack.concept_pack",
    "Manifest": "erasure.pack.manifest",
    "with_packs": "erasure.pack.compose",
    "compose_denoiser": "erasure.pack.compose",
    "ESDConfig": "erasure.training.config",
    "train_pack": "erasure.training.train",
    "AttackConfig": "erasure.redteam.config",
    "RedTeam": "erasure.redteam.team",
    "load_base": "erasure.base.loading",
    "generate": "erasure.sampling.generate",
    "RequestRange": "erasure.sampling.request",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'erasure' has no attribute {name!r}")


__all__ = ["__version__", *_PUBLIC]
