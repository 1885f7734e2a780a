"""erasure: erase concepts from diffusers pipelines (ESD) and ship the result as verifiable concept packs."""

__version__ = "0.1.0"
