"""Training a pack: the options (config.py), the methods (methods/: one registry), ESD's trainer (trainer.py) and its
robust terms (robust.py), and `erasure train` end to end (train.py)."""
