"""Where concept packs live: a local directory registry (the embedded default) and the Hugging Face Hub.

Both backends share one interface (``Registry``) and one layout: one repository per pack, the pack's files at the
repository root, versions as commits (40-hex sha) and tags. Every pull is pinned to a commit sha and verified
(sha256 of every file against the manifest, and against the Hub tree's LFS oid) before it is handed over.
"""
