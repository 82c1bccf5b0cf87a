"""Seeds derived from keys such as (seed, epoch, example): how runs replay their random choices.

Python's ``hash()`` is salted per process, so keys are hashed with blake2b instead: the same key
gives the same seed in every process, on every rank, and after a resume.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*key: Any) -> int:
    """A stable 63-bit seed from a key of ints and strings."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*key: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed` of ``key``."""
    return torch.Generator().manual_seed(derive_seed(*key))
