"""The concept pack, the contract between training, the registry and serving: its manifest (manifest.py), the pack
and its checks against a base (concept_pack.py), its model card (card.py, templates/), composition onto a base
(compose.py) and exports for plain diffusers (export.py)."""
