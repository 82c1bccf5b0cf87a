"""Preset ``timm``: the model's data configuration and timm's own transforms, drawn per example.

:func:`timm_pipeline` resolves what the model expects (``timm.data.resolve_data_config`` on the
plain model of head 0: input size, interpolation, mean/std, crop_pct), lays the recipe's
``data`` keys over it, and builds timm's training transform (``create_transform(...,
is_training=True)``: RandomResizedCrop with ``scale``/``ratio``, flips, colour jitter,
``auto_augment`` policies, random erasing) and its evaluation transform (resize to
``size / crop_pct``, centre crop, normalise).

A model that carries no timm data configuration (a torchvision model, a plain module) gets
timm's ImageNet defaults, with a warning: 224 px, bicubic, ImageNet mean/std, crop_pct 0.875.

One repair: timm's PosterizeIncreasing (the ``inc1`` policies' posterize, e.g.
``rand-m9-mstd0.5-inc1``) keeps 0 bits at the top magnitude, which Pillow 13 refuses with a
ValueError that would stop training at random; here 0 bits give the black image older Pillow
gave (:func:`_posterize`). Every other output is timm's own.

timm's transforms draw from the global RNGs (``random``, NumPy's, torch's CPU generator).
:func:`seed_rngs` seeds all three from one seed before each view, so a view is a function of
``(seed, epoch, example, view)`` as in the small preset; in the main process (no DataLoader
workers) :func:`kept_rngs` restores them afterwards (once per example, or once per batch where
the DataLoader fetches a batch at once), leaving the engine's own RNG stream untouched.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from collabsurgery.errors import UserError, warn

__all__ = ["AUTO_AUGMENT_FORMS", "TimmPipeline", "kept_rngs", "model_data_config", "seed_rngs",
           "seeded", "timm_pipeline"]

#: what ``data.auto_augment`` accepts, in words (timm's policy strings)
AUTO_AUGMENT_FORMS = ("RandAugment rand-m9-mstd0.5-inc1 (m magnitude, n ops, mstd, inc), AugMix "
                      "augmix-m5-w4-d2 (m magnitude, w width, d depth), AutoAugment original, "
                      "originalr, v0, v0r, or 3a")
#: the defaults timm's resolve_data_config gives a model without a data configuration
_TIMM_DEFAULTS = "224 px, bicubic, ImageNet mean/std, crop_pct 0.875"


@contextmanager
def kept_rngs() -> Iterator[None]:
    """Put the states of ``random``, NumPy's and torch's CPU RNG back after the block, in the
    main process (a DataLoader worker's own RNG streams matter to nobody: nothing to keep)."""
    if get_worker_info() is not None:
        yield
        return
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def seed_rngs(seed: int) -> None:
    """Seed ``random``, NumPy's and torch's CPU generator (not CUDA's) from ``seed``."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """:func:`seed_rngs` for the block, inside :func:`kept_rngs`."""
    with kept_rngs():
        seed_rngs(seed)
        yield


def model_data_config(model: Any) -> dict[str, Any]:
    """``timm.data.resolve_data_config({}, model=...)`` of a model name (a list: its first,
    head 0's architecture) or module: ``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``. A model timm has no data configuration for gets timm's defaults, with a
    warning."""
    import timm.data

    from collabsurgery.models.backbones import parse_model_name, resolve

    if isinstance(model, (list, tuple)):
        model = model[0] if model else None
    if model is None:
        raise UserError("data.preset=timm takes the model's data configuration, but no model "
                        "was given; give model= (the recipe's model.name)")
    if isinstance(model, str):
        spec = parse_model_name(model)  # a bad name: the usual one-line error
        if spec.library == "timm":
            try:
                with torch.device("meta"):  # the architecture only: no memory, no init time
                    module, _ = resolve(model)
            except Exception:  # noqa: BLE001 - a model that cannot be built on meta: on the CPU
                module, _ = resolve(model)
        else:
            module = None
        name = spec.qualified_name
    else:
        module, name = model, type(model).__name__
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if not cfg:
        warn(f"data.preset=timm: model '{name}' has no timm data configuration "
             f"(pretrained_cfg); using timm's defaults: {_TIMM_DEFAULTS} (set data.image_size, "
             "data.interpolation, data.mean, data.std, data.crop_pct to change them)")
        return dict(timm.data.resolve_data_config({}, pretrained_cfg={"architecture": name}))
    return dict(timm.data.resolve_data_config({}, pretrained_cfg=dict(cfg)))


@dataclass
class TimmPipeline:
    """Resolved preset-timm settings and timm's transforms.

    ``settings`` are the ``data`` keys as resolved (what a run records, so evaluation later
    needs no model); ``train`` is the training transform, ``eval`` the evaluation one."""

    image_size: int
    test_image_size: int
    interpolation: str
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: Any
    eval: Any

    @property
    def settings(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "test_image_size": self.test_image_size,
                "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "mean": list(self.mean), "std": list(self.std)}


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize; keeping 0 bits gives the black image (what older Pillow returned;
    Pillow 13 raises a ValueError for 0 bits)."""
    from timm.data import auto_augment

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _repair_posterize(transform: Any) -> None:
    """Point every posterize op of timm's RandAugment, AugMix or AutoAugment in ``transform``
    at :func:`_posterize`."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", None) or [])
        ops += [op for sub in getattr(step, "policy", None) or [] for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


def _check_range(key: str, pair: Any, low: float | None = None) -> tuple[float, float]:
    a, b = (float(v) for v in pair)
    if a > b:
        raise UserError(f"recipe key 'data.{key}' is [{a}, {b}]: its minimum exceeds its "
                        f"maximum; valid: [min, max] with min <= max, e.g. [0.08, 1.0]")
    if low is not None and a <= low:
        raise UserError(f"recipe key 'data.{key}' is [{a}, {b}]: values must be > {low}")
    return a, b


def _train_transform(size: int, *, augment: bool, hflip: bool, scale: tuple[float, float],
                     ratio: tuple[float, float], color_jitter: float | None,
                     auto_augment: str | None, interpolation: str, mean: Any, std: Any,
                     reprob: float) -> Any:
    from timm.data import create_transform

    try:
        transform = create_transform(
            size, is_training=True, no_aug=not augment, scale=scale, ratio=ratio,
            hflip=0.5 if hflip else 0.0, color_jitter=color_jitter, auto_augment=auto_augment,
            interpolation=interpolation, mean=mean, std=std, re_prob=reprob)
        _repair_posterize(transform)
        if auto_augment:  # timm parses some policy parts only when it applies them
            with seeded(0):
                transform(Image.new("RGB", (size, size)))
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as err:
        if not auto_augment:
            raise
        detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else "not parsed"
        raise UserError(f"recipe key 'data.auto_augment' is {auto_augment!r}, which timm does "
                        f"not accept ({detail}); valid: {AUTO_AUGMENT_FORMS}") from None
    return transform


def timm_pipeline(model: Any = None, *, image_size: int | None = None,
                  test_image_size: int | None = None, augment: bool = True, hflip: bool = False,
                  scale: Any = (0.08, 1.0), ratio: Any = (3 / 4, 4 / 3),
                  color_jitter: float | None = 0.4, auto_augment: str | None = None,
                  reprob: float = 0.0, crop_pct: float | None = None,
                  interpolation: str | None = None, mean: Any = None,
                  std: Any = None) -> TimmPipeline:
    """The preset's settings and transforms: each null key from the model's data configuration
    (``model`` is needed only when one of image_size, interpolation, crop_pct, mean, std is
    null); bad keys are one-line UserErrors naming them."""
    scale = _check_range("scale", scale, low=0.0)
    ratio = _check_range("ratio", ratio, low=0.0)
    given = {"image_size": image_size, "interpolation": interpolation, "crop_pct": crop_pct,
             "mean": mean, "std": std}
    cfg: dict[str, Any] = {}
    if any(v is None for v in given.values()):
        cfg = model_data_config(model)
    size = image_size or int(cfg["input_size"][-1])
    if image_size is None and cfg["input_size"][-1] != cfg["input_size"][-2]:
        warn(f"data.preset=timm: the model expects {cfg['input_size'][-2]}x"
             f"{cfg['input_size'][-1]} inputs; this data module makes square ones of {size}")
    interp = interpolation or cfg["interpolation"]
    eval_interp = cfg["interpolation"] if interp == "random" and cfg else interp
    if eval_interp == "random":
        eval_interp = "bilinear"  # as timm's create_transform for a non-random crop
    pct = float(crop_pct if crop_pct is not None else cfg["crop_pct"])
    mean = tuple(float(v) for v in (mean if mean is not None else cfg["mean"]))
    std = tuple(float(v) for v in (std if std is not None else cfg["std"]))
    if any(s <= 0 for s in std):
        raise UserError(f"recipe key 'data.std' must be positive numbers, got {list(std)}")
    test_size = test_image_size or size
    from timm.data import create_transform

    train = _train_transform(size, augment=augment, hflip=hflip, scale=scale, ratio=ratio,
                             color_jitter=color_jitter, auto_augment=auto_augment,
                             interpolation=interp, mean=mean, std=std, reprob=reprob)
    evaluation = create_transform(test_size, is_training=False, interpolation=eval_interp,
                                  mean=mean, std=std, crop_pct=pct)
    return TimmPipeline(size, test_size, interp, pct, mean, std, train, evaluation)
