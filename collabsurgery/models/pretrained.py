"""Pretrained initialisation: a backbone's weights from a file, or from timm's/torchvision's
local cache, with the classifier re-initialised when the class count differs.

``pretrained`` (the recipe's ``model.pretrained``, ``cs.wrap(..., pretrained=...)``) is

- a weights file: one of our exports (``collabsurgery export``), or any state-dict file that
  timm's ``pretrained_cfg_overlay=dict(file=...)`` reads (``.safetensors``; ``.pth``/``.pt``/
  ``.bin`` loaded with ``torch.load(weights_only=True)``; a checkpoint's ``state_dict``/``model``
  entry, its EMA weights first, and a ``module.`` prefix are taken as timm takes them);
- ``true``: the weights timm (or torchvision) would download for the model, taken from the
  local cache only (Hugging Face hub cache, torch hub checkpoints); nothing is downloaded;
- ``null``/``false``: untrained (the factory's own initialisation).

Loading (:func:`fit`): every key of the model but the classifier's must be in the weights
with the same shape, and the weights may hold no other key; the classifier's keys are loaded
when their shapes match and left freshly initialised otherwise (another class count). The
classifier is the model's own: timm's ``pretrained_cfg["classifier"]`` (what timm itself resets
for another class count), otherwise (torchvision, a ready module) the last module with
parameters that the model's forward runs (:func:`classifier_modules`), e.g. torchvision
ResNet's ``fc``, MobileNetV2's ``classifier.1``, VGG's ``classifier.6``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from collabsurgery.common.tensorfile import load_state
from collabsurgery.errors import UserError, first_line
from collabsurgery.models.backbones import BackboneSpec

KEY = "model.pretrained"  # how messages name the setting (the recipe key)
VALID = "valid: a weights file path (.safetensors, .pth, .pt, .bin state dict)"


def normalise(source: Any) -> bool | str | None:
    """``None`` for untrained (null, false), ``True``, or a path as a string; UserError for
    anything else."""
    if source is None or source is False:
        return None
    if source is True:
        return True
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.strip()):
        return os.fspath(source)
    raise UserError(f"{KEY} must be a weights file path, true or null, got {source!r}; {VALID} "
                    "or true (timm's local cache)")


def load_pretrained(module: nn.Module, spec: BackboneSpec, source: Any,
                    input_size: Sequence[int]) -> frozenset[str]:
    """Load ``source`` into ``module`` (built from ``spec``); returns the keys it loaded
    (empty for an untrained source). ``input_size`` (C, H, W) is the probe's, when the
    classifier is found by running the model."""
    source = normalise(source)
    if source is None:
        return frozenset()
    if source is True:
        state, where = cached_state(spec), f"{KEY}=true ({spec.qualified_name}'s cached weights)"
    else:
        state, where = read_weights(source), f"{KEY} {source}"
    return fit(module, state, classifier_modules(module, spec, input_size), where,
               spec.qualified_name)


# ---------------------------------------------------------------------------- reading weights

def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (see the module docstring); UserError naming the file
    when it is missing, unreadable or holds no state dict."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "names no existing file"
        raise UserError(f"{KEY} {path} {what}; {VALID} or true (timm's local cache)")
    if path.suffix == ".safetensors":
        raw: Any = load_state(path)  # verifies the checksum of our own files
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and weights_only refusals alike
            raise UserError(f"{KEY} {path} could not be read as a state dict "
                            f"({first_line(err)}); {VALID}") from None
    return _state_of(raw, path)


def _state_of(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint, as timm's ``load_state_dict`` finds it: EMA
    weights first, then ``state_dict`` or ``model``; a ``module.`` prefix (DDP) dropped."""
    if isinstance(raw, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{KEY} {path} holds no state dict (a mapping of parameter names to "
                        f"tensors), got {type(raw).__name__}; {VALID}")
    state = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{KEY} {path} holds no state dict: entry '{key}' is a "
                            f"{type(value).__name__}, not a tensor; {VALID}")
        state[key[len("module."):] if str(key).startswith("module.") else str(key)] = value
    return state


# ---------------------------------------------------------------------------- the local cache

@contextmanager
def offline() -> Iterator[None]:
    """Within the block the Hugging Face hub is offline (``HF_HUB_OFFLINE=1``, also for a
    ``huggingface_hub`` imported earlier, which read the variable then)."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - timm depends on it
        hub_constants = None
    flag = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = flag
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _torch_hub_file(url: str) -> Path:
    """Where torch hub (timm and torchvision alike) keeps the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_cached_file(hub_id: str, filename: str | None) -> str | None:
    """The cached file of hub repo ``hub_id`` (``repo@revision``), or None; safetensors first,
    as timm reads it."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    repo, _, revision = hub_id.partition("@")
    names = [filename] if filename else ["pytorch_model.bin"]
    if names[0].endswith(".bin"):  # timm's safe alternatives
        names.insert(0, "model.safetensors" if names[0] == "pytorch_model.bin"
                     else names[0].replace("pytorch_model.bin", "model.safetensors"))
    for name in names:
        found = huggingface_hub.try_to_load_from_cache(
            repo, name, cache_dir=hub_constants.HF_HUB_CACHE, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _refuse(name: str, looked: list[str]) -> UserError:
    where = "; ".join(looked) if looked else "its library names no pretrained weights for it"
    return UserError(f"{KEY}=true: no cached weights for '{name}' in the local cache ({where}); "
                     f"nothing is downloaded; {VALID}")


def _timm_cached_file(spec: BackboneSpec) -> str:
    """The cached weights file of timm model ``spec``; the one-line refusal if none."""
    import huggingface_hub.constants as hub_constants
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(spec.name)
        cfg = cfg.to_dict() if cfg is not None else {}
    except Exception:  # noqa: BLE001 - a model without pretrained configs has none to find
        cfg = {}
    looked: list[str] = []
    if cfg.get("file"):
        if os.path.isfile(cfg["file"]):
            return cfg["file"]
        looked.append(f"file {cfg['file']}")
    if cfg.get("hf_hub_id"):
        found = _hf_cached_file(cfg["hf_hub_id"], cfg.get("hf_hub_filename"))
        if found:
            return found
        looked.append(f"Hugging Face cache {hub_constants.HF_HUB_CACHE} for {cfg['hf_hub_id']}")
    if cfg.get("url"):
        cached = _torch_hub_file(cfg["url"])
        if cached.is_file():
            return str(cached)
        looked.append(f"torch hub {cached}")
    raise _refuse(spec.qualified_name, looked)


def cached_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The weights ``pretrained=True`` would give ``spec``'s model, from the local cache only,
    as the state dict of the model built with the checkpoint's own class count (the caller fits
    the classifier). UserError (the one-line refusal) when they are not cached."""
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "num_classes"}
    if spec.library == "timm":
        import timm

        path = _timm_cached_file(spec)
        try:
            with offline():
                model = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=dict(
                    file=path, source=""), **kwargs)
        except Exception as err:  # timm raises RuntimeError, AssertionError, KeyError, ...
            raise UserError(f"{KEY}=true: timm could not load the cached weights of "
                            f"'{spec.name}' from {path} ({first_line(err)}); {VALID}") from None
        return model.state_dict()
    if spec.library == "torchvision":
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        except (ValueError, AttributeError, KeyError):
            raise _refuse(spec.qualified_name, []) from None
        cached = _torch_hub_file(weights.url)
        if not cached.is_file():
            raise _refuse(spec.qualified_name, [f"torch hub {cached}"])
        try:  # torchvision finds the cached file and downloads nothing
            model = torchvision.models.get_model(spec.name, weights=weights, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{KEY}=true: torchvision could not load the cached weights of "
                            f"'{spec.name}' from {cached} ({first_line(err)}); {VALID}") from None
        return model.state_dict()
    raise UserError(f"{KEY}=true needs a model given by name (timm or torchvision.<name>), not "
                    f"a ready {spec.name}; {VALID}")


# ---------------------------------------------------------------------------- the classifier

def classifier_modules(module: nn.Module, spec: BackboneSpec,
                       input_size: Sequence[int]) -> tuple[str, ...]:
    """The names of the modules that make up the classifier (their parameters depend on the
    class count), from the model's own knowledge: timm's ``pretrained_cfg["classifier"]``;
    for torchvision the modules whose parameter shapes change with ``num_classes`` (the
    factory run on the meta device, nothing allocated; auxiliary classifiers included);
    otherwise (or when the factory cannot run on the meta device) the last module with
    parameters of its own that a forward of one ``input_size`` example runs."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if spec.library == "timm" else None
    if named:
        return (named,) if isinstance(named, str) else tuple(named)
    if spec.library == "torchvision":
        found = _class_dependent(module, spec)
        if found:
            return found
    return _last_parametrised(module, input_size)


def _class_dependent(module: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    """The modules of torchvision model ``spec`` whose parameters change shape with the class
    count (empty when its factory cannot build on the meta device)."""
    import torchvision

    other = int(spec.kwargs.get("num_classes", 1000)) + 1
    try:
        with torch.device("meta"):
            probe = torchvision.models.get_model(spec.name, weights=None,
                                                 **{**spec.kwargs, "num_classes": other})
    except Exception:  # noqa: BLE001 - e.g. RegNet computes its widths with real tensors
        return ()
    theirs = probe.state_dict()
    changed = [k for k, v in module.state_dict().items()
               if k in theirs and theirs[k].shape != v.shape]
    return tuple(dict.fromkeys(k.rsplit(".", 1)[0] for k in changed))


def _last_parametrised(module: nn.Module, input_size: Sequence[int]) -> tuple[str, ...]:
    order: list[str] = []
    hooks = [sub.register_forward_hook(lambda *_, name=name: order.append(name))
             for name, sub in module.named_modules()
             if name and any(True for _ in sub.parameters(recurse=False))]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_size))
    except Exception as err:  # noqa: BLE001 - a model that cannot run is reported where it is cut
        raise UserError(f"{KEY}: cannot find the classifier of {type(module).__name__} by "
                        f"running it on one {tuple(input_size)} input ({first_line(err)})"
                        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    return (order[-1],) if order else ()


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


# ---------------------------------------------------------------------------- loading

def fit(module: nn.Module, state: dict[str, torch.Tensor], classifier: Sequence[str],
        where: str, name: str) -> frozenset[str]:
    """Load ``state`` into ``module``: every non-classifier key exactly (name and shape; a
    missing BatchNorm ``num_batches_tracked`` is allowed, as ``load_state_dict`` allows it in old
    checkpoints), the classifier's keys (under the module names ``classifier``) only when all
    of them are there with the model's shapes. Returns the keys loaded; UserError naming the
    first key that does not fit, with both shapes."""
    own = module.state_dict()
    head = [k for k in own if _under(k, classifier)]
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in own.items():
        if key in head:
            continue
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise UserError(f"{where} does not fit {name}: {key} ({_shape(tensor)} in the model) "
                            "is missing from the file")
        if state[key].shape != tensor.shape:
            raise UserError(f"{where} does not fit {name}: {key} is {_shape(state[key])} in the "
                            f"file but {_shape(tensor)} in the model")
        loaded[key] = state[key]
    for key in state:
        if key not in own and not _under(key, classifier):
            raise UserError(f"{where} does not fit {name}: the file has {key} "
                            f"({_shape(state[key])}), which the model does not")
    if head and all(k in state and state[k].shape == own[k].shape for k in head):
        loaded.update({k: state[k] for k in head})
    own.update(loaded)  # keeps the state's _metadata (module versions) for load_state_dict
    with torch.no_grad():
        module.load_state_dict(own, strict=True)
    return frozenset(loaded)
