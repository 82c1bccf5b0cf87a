"""Neutral helpers that every layer may use: atomic writes (:mod:`.atomic`), checksums and
finiteness checks (:mod:`.integrity`), safetensors files with verified metadata
(:mod:`.tensorfile`), seeds derived from keys (:mod:`.seeding`) and a full disk as one line
(:mod:`.diskfull`).

This package imports nothing from the rest of collabsurgery except :mod:`collabsurgery.errors`.
See docs/architecture.md for the order of the layers.
"""
__version__ = "0.1.0"
