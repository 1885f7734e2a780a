"""The base pipeline: its family and denoiser (families.py), how prompts condition it (conditioning.py, and soft
prompts: softprompt.py), and loading it with what a pack records about it (loading.py)."""
