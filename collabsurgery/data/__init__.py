"""Data: sources (the built-in digits, imagefolders, saved datasets), splits, label noise and
the deterministic training view (:mod:`.datasets`), and the batch providers the engine asks for
``(x, labels)`` (:mod:`.batches`: one shared loader, or per-student subsets).

May import: errors, common. See docs/architecture.md.
"""
