"""Data: sources (the built-in digits, imagefolders, saved datasets), splits, label noise and
the deterministic training view (:mod:`.datasets`; preset timm: the model's data configuration
and timm's transforms, :mod:`.transforms`), and the batch providers the engine asks for
``(x, labels)`` (:mod:`.batches`: one shared loader, or per-student subsets).

May import: errors, common, models (a model's data configuration). See docs/architecture.md.
"""
