"""Sampling: the request range (request.py), pipelines and images (generate.py), guidance away from a pack's concepts
(guidance.py), and the batched loop whose rows carry their own pack sets (denoise.py, mixed.py)."""
