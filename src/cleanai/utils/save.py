"""Saving and loading pruned models without pickling code.

A saved pruned model is a directory with two files:

* ``cleanai.json``: the format version, the original architecture's fingerprint (every
  parameter and buffer shape, the parameter count), the pruning history (which indices each
  layer kept, step by step), the final weight shapes, a checksum of the weights and free
  user metadata (the command line stores how to rebuild the architecture there).
* ``weights.pt``: the ``state_dict`` as plain tensors, read back with
  ``torch.load(..., weights_only=True)``: no code is ever executed on load.
  (:func:`cleanai.prune_checkpoint` writes safetensors shards instead; ``cleanai.json``
  lists them, and loading reads either.)

Loading builds the original architecture (your model or factory), checks the whole history
against it before anything changes, replays it, then loads the weights strictly. Like a PEFT
adapter, the file describes a change to a known architecture rather than the model object.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

__all__ = ["save_pruned", "load_pruned", "read_pruned_info", "pruned_info", "LoadError",
           "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "cleanai-pruned"
FORMAT_VERSION = 1
INFO_FILE = "cleanai.json"
WEIGHTS_FILE = "weights.pt"

PathLike = Union[str, os.PathLike]


class LoadError(ValueError):
    """A saved pruned model does not fit the model it is loaded into, or its files are damaged.

    Raised before the model changes; the model is left exactly as it was."""


def save_pruned(model_or_pruner: Any, path: PathLike,
                metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``model_or_pruner`` (an ``nn.Module`` or a :class:`StructuredPruner`) to the
    directory ``path`` (created if needed) as ``cleanai.json`` + ``weights.pt``.

    The pruning history comes from the model itself: every step applied by any pruner (or by
    :func:`cleanai.replay`) is recorded on it, so several pruners and iterative steps are all
    saved. A model never pruned is saved with an empty history. ``metadata`` is any JSON-able
    mapping stored as ``info["meta"]``. Returns the directory.

    Raises:
        ValueError: if the model's shapes were changed outside CleanAI after pruning (the
            history could not rebuild it), or ``metadata`` is not JSON-able.
    """
    from ..pruner.history import get_history, signature_json
    from ..core.graph import module_signature

    # a module may have a submodule called ``model`` (Hugging Face heads): only a pruner is
    # unwrapped
    model = model_or_pruner if isinstance(model_or_pruner, nn.Module) else \
        getattr(model_or_pruner, "model", model_or_pruner)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pruned needs an nn.Module or a StructuredPruner, "
                        f"got {type(model_or_pruner).__name__}")
    record = get_history(model)
    current = signature_json(module_signature(model))
    if record is not None:
        if record["broken"]:
            raise ValueError(f"cannot save {type(model).__name__}: {record['broken']}, so its "
                             f"pruning history no longer describes it")
        if record["current"] != current:
            raise ValueError(f"cannot save {type(model).__name__}: its parameter shapes changed "
                             f"outside CleanAI after the last pruning step, so its pruning "
                             f"history no longer describes it")
        original, steps = record["original"], record["steps"]
    else:
        original, steps = current, []
    param_names = {n for n, _ in model.named_parameters()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    info = pruned_info(type(model).__name__, original, steps,
                       {k: list(v.shape) for k, v in state.items()}, param_names,
                       {"file": WEIGHTS_FILE}, metadata)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / WEIGHTS_FILE)
    info["weights"]["sha256"] = _sha256(out / WEIGHTS_FILE)
    try:
        text = json.dumps(info)
    except TypeError as exc:
        raise ValueError(f"save_pruned: metadata must be JSON-able: {exc}") from exc
    (out / INFO_FILE).write_text(text)
    return out


def pruned_info(model_class: str, original: Dict[str, List[int]], steps: List[Any],
                final_shapes: Dict[str, List[int]], param_names: set, weights: Dict[str, Any],
                metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The content of ``cleanai.json``: ``original`` is the unpruned model's signature
    (name -> shape), ``final_shapes`` the pruned ``state_dict``'s, ``weights`` says where the
    weights are: ``{"file": "weights.pt"}``, or safetensors shards
    ``{"format": "safetensors", "files": {name: sha256}, "aliases": {name: stored name}}``
    (:func:`cleanai.prune_checkpoint`; an alias is a tied weight stored once)."""
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "model_class": model_class,
        "original": {"params": _params_of(original, param_names), "signature": original},
        "steps": steps,
        "final": {"params": _params_of(final_shapes, param_names), "state_dict": final_shapes},
        "weights": dict(weights),
        "meta": dict(metadata or {}),
    }


def read_pruned_info(path: PathLike) -> Dict[str, Any]:
    """The parsed ``cleanai.json`` of a saved pruned model (format checked), e.g. to read
    ``info["meta"]`` before building the model. Raises :class:`LoadError` when it is not one."""
    file = _info_file(path)
    try:
        info = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{file} is not a readable CleanAI file: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
        raise LoadError(f"{file} is not a CleanAI pruned-model file (no \"format\": "
                        f"\"{FORMAT_NAME}\")")
    if info.get("version") != FORMAT_VERSION:
        raise LoadError(f"{file} has format version {info.get('version')!r}; this CleanAI reads "
                        f"version {FORMAT_VERSION}")
    for key, kind in (("original", dict), ("steps", list), ("final", dict), ("weights", dict)):
        if not isinstance(info.get(key), kind):
            raise LoadError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
    return info


def load_pruned(model_or_factory: Union[nn.Module, Callable[[], nn.Module]],
                path: PathLike) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` and return it.

    ``model_or_factory`` is a freshly built model of the original architecture (its weights do
    not matter), or a function returning one. In order: the file is read and its whole history
    checked against the model (architecture fingerprint, module names, dims, indices in range,
    sizes step by step); the weights are read with ``torch.load(weights_only=True)`` and
    checked (checksum, names, shapes); only then is the history replayed and the weights loaded
    with ``load_state_dict(strict=True)``. Any failure leaves the model unchanged.

    Raises:
        LoadError: naming the first problem found (file, step, layer, index).
    """
    from ..pruner.apply import atomic

    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pruned: the factory returned {type(model).__name__}, "
                        f"not an nn.Module")
    info = read_pruned_info(path)
    where = _info_file(path)
    _check_architecture(model, info, where)
    _check_steps(model, info["steps"], where)
    state = _read_weights(Path(where).parent, info, where)

    config = getattr(model, "config", None)
    fields = {e["attr"] for st in info["steps"] for e in st["layers"] if e["kind"] == "config"}
    config_before = {f: getattr(config, f, None) for f in fields}
    config_had = {f for f in fields if hasattr(config, f)}

    try:
        # atomic puts every module back when anything below raises; the config is not a module
        with atomic(list(model.modules())):
            _replay_and_load(model, info, state, where)
    except BaseException:
        for f, v in config_before.items():
            if f in config_had:
                setattr(config, f, v)
            elif hasattr(config, f):  # a derived size the replay added
                delattr(config, f)
        raise
    return model


def _replay_and_load(model: nn.Module, info: Dict[str, Any], state: Dict[str, torch.Tensor],
                     where: Path) -> None:
    """Replay the checked history, check the final shapes and dtypes, load the weights."""
    from ..pruner.apply import replay
    from ..pruner.history import set_history

    for i, step in enumerate(info["steps"], 1):
        try:
            replay(model, step["layers"])
        except Exception as exc:
            raise LoadError(f"{where}: step {i} does not apply to {type(model).__name__}: "
                            f"{type(exc).__name__}: {exc}. The model was left unchanged.") from exc
    current = model.state_dict()
    got = {k: list(v.shape) for k, v in current.items()}
    if got != info["final"]["state_dict"]:
        raise LoadError(f"{where}: after replaying the history the model's shapes differ "
                        f"from the saved ones ({_first_diff(got, info['final']['state_dict'])});"
                        f" the file does not match this architecture. The model was left "
                        f"unchanged.")
    odd = next((k for k, v in state.items() if v.dtype != current[k].dtype), None)
    if odd is not None:
        raise LoadError(f"{where}: {odd!r} was saved as {state[odd].dtype} but the model "
                        f"holds {current[odd].dtype}; convert the fresh model first (e.g. "
                        f"model.to({state[odd].dtype})). The model was left unchanged.")
    model.load_state_dict(state, strict=True)
    set_history(model, info["original"]["signature"], info["steps"])


# --- checks --------------------------------------------------------------------------------

def _check_architecture(model: nn.Module, info: Dict[str, Any], where: Path) -> None:
    from ..pruner.history import get_history, signature_json
    from ..core.graph import module_signature

    if get_history(model) is not None and get_history(model)["steps"]:
        raise LoadError(f"load_pruned needs a fresh, unpruned {type(model).__name__}; this one "
                        f"was already pruned by CleanAI")
    mine = signature_json(module_signature(model))
    theirs = info["original"].get("signature")
    if not isinstance(theirs, dict):
        raise LoadError(f"{where}: field 'original.signature' is missing")
    if mine != theirs:
        raise LoadError(f"{where} was saved from another architecture than this "
                        f"{type(model).__name__} (saved from {info.get('model_class')!r}): "
                        f"{_first_diff(mine, theirs)}")


def _check_steps(model: nn.Module, steps: List[Any], where: Path) -> None:
    """Simulate the history on channel counts alone: names, dims, indices, sizes."""
    from ..core.layers import get_layer_pruner

    lengths: Dict[tuple, int] = {}
    modules = dict(model.named_modules())
    # a buffer applied along the channels is sliced as a bare parameter is
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for i, step in enumerate(steps, 1):
        if not isinstance(step, dict) or not isinstance(step.get("layers"), list):
            raise LoadError(f"{where}: step {i} has no list of layers")
        for entry in step["layers"]:
            if isinstance(entry, dict) and entry.get("kind") in ("attr", "config"):
                _check_setting(model, modules, entry, f"{where}: step {i}")
                continue
            if isinstance(entry, dict) and entry.get("kind") == "scale":
                _check_scale(model, modules, entry, f"{where}: step {i}")
                continue
            if isinstance(entry, dict) and entry.get("kind") == "bias":
                module = modules.get(entry.get("name"))
                if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    raise LoadError(f"{where}: step {i}: a bias entry must name a Linear or "
                                    f"conv of {type(model).__name__}, got {entry.get('name')!r}")
                continue
            if not isinstance(entry, dict) or not {"name", "kind", "dim", "keep"} <= set(entry):
                raise LoadError(f"{where}: step {i}: a layer entry lacks name/kind/dim/keep")
            name, kind, dim, keep = entry["name"], entry["kind"], entry["dim"], entry["keep"]
            here = f"{where}: step {i}, {name!r} ({kind})"
            if not isinstance(name, str) or not isinstance(dim, int) or \
                    kind not in ("in", "out", "param", "internal"):
                raise LoadError(f"{here}: malformed entry (name must be a string, dim an int, "
                                f"kind one of in/out/param/internal/attr/config/bias/scale)")
            if not isinstance(keep, list) or not keep or \
                    not all(isinstance(k, int) and not isinstance(k, bool) for k in keep):
                raise LoadError(f"{here}: 'keep' must be a non-empty list of channel indices")
            if kind in ("in", "out") and dim != -1:
                raise LoadError(f"{here}: dim must be -1 for a layer's {kind}put channels, "
                                f"got {dim}")
            key = (name, kind, dim)
            if key not in lengths:
                lengths[key] = _initial_length(model, modules, params, name, kind, dim, here,
                                               get_layer_pruner)
            n = lengths[key]
            bad = next((k for k in keep if not 0 <= k < n), None)
            if bad is not None:
                raise LoadError(f"{here}: index {bad} is out of range; the layer has {n} "
                                f"channels at that step")
            if any(b <= a for a, b in zip(keep, keep[1:])):
                raise LoadError(f"{here}: kept indices must be sorted and distinct")
            lengths[key] = len(keep)


def _check_setting(model: nn.Module, modules: Dict[str, nn.Module], entry: Dict[str, Any],
                   where: str) -> None:
    """An ``attr`` entry sets an integer attribute of a module (``num_heads``...) or a shape
    it stores (a list of ints); a ``config`` entry sets an integer field of ``model.config``
    or a list of per-stage sizes. Both must name something that exists."""
    kind, attr, value = entry["kind"], entry.get("attr"), entry.get("value")
    here = f"{where}, {entry.get('name')!r} ({kind} {attr!r})"
    shape = isinstance(value, list) and bool(value) and all(map(_is_int, value))
    if not isinstance(attr, str) or not (_is_int(value) or shape):
        raise LoadError(f"{here}: malformed entry (attr must be a string, value an int or a "
                        f"list of ints)")
    if kind == "attr":
        module = modules.get(entry.get("name"))
        if module is None:
            raise LoadError(f"{here}: {type(model).__name__} has no module named "
                            f"{entry.get('name')!r}")
        owner = module
    else:
        owner = getattr(model, "config", None)
        if owner is None:
            raise LoadError(f"{here}: {type(model).__name__} has no config to update")
    from ..pruner.attributes import DERIVED_CONFIG  # sizes a config may lack until pruned

    if not hasattr(owner, attr) and not (kind == "config" and attr in DERIVED_CONFIG):
        raise LoadError(f"{here}: {type(owner).__name__} has no attribute {attr!r}")


def _check_scale(model: nn.Module, modules: Dict[str, nn.Module], entry: Dict[str, Any],
                 where: str) -> None:
    """A ``scale`` entry sets a float scale the module holds to a positive ``value``."""
    attr, value = entry.get("attr"), entry.get("value")
    here = f"{where}, {entry.get('name')!r} (scale {attr!r})"
    module = modules.get(entry.get("name"))
    if module is None:
        raise LoadError(f"{here}: {type(model).__name__} has no module named "
                        f"{entry.get('name')!r}")
    if not isinstance(attr, str) or not isinstance(value, (int, float)) or \
            isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise LoadError(f"{here}: malformed entry (attr must be a string, value a positive "
                        f"number)")
    if type(getattr(module, attr, None)) is not float:
        raise LoadError(f"{here}: {type(module).__name__} has no float scale {attr!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _initial_length(model, modules, params, name, kind, dim, here, get_layer_pruner) -> int:
    if kind == "param":
        p = params.get(name)
        if p is None:
            raise LoadError(f"{here}: {type(model).__name__} has no parameter named {name!r}")
        if not 0 <= dim < p.dim():
            raise LoadError(f"{here}: dim {dim} is out of range for a parameter of shape "
                            f"{tuple(p.shape)}")
        return p.shape[dim]
    module = modules.get(name)
    if module is None:
        raise LoadError(f"{here}: {type(model).__name__} has no module named {name!r}")
    pruner = get_layer_pruner(module, inherited=True)
    if pruner is None:
        raise LoadError(f"{here}: CleanAI cannot prune a {type(module).__name__} (no layer "
                        f"pruner registered for it); register the one used when saving")
    if kind == "internal":
        dims = pruner.internal_dims(module)
        if not 0 <= dim < len(dims) or dims[dim] is None:
            raise LoadError(f"{here}: a {type(module).__name__} has no internal dim {dim}")
        return int(dims[dim].length)
    n = pruner.in_channels(module) if kind == "in" else pruner.out_channels(module)
    if n is None:
        raise LoadError(f"{here}: a {type(module).__name__} has no {kind}put channels to slice")
    return int(n)


def _read_weights(folder: Path, info: Dict[str, Any], where: Path) -> Dict[str, torch.Tensor]:
    if info["weights"].get("format") == "safetensors":
        state = _read_safetensors(folder, info["weights"], where)
        shapes = {k: list(v.shape) for k, v in state.items()}
        if shapes != info["final"].get("state_dict"):
            raise LoadError(f"the weights in {folder} do not match {where}: "
                            f"{_first_diff(shapes, info['final'].get('state_dict') or {})}")
        return state
    file = folder / str(info["weights"].get("file", WEIGHTS_FILE))
    if not file.is_file():
        raise LoadError(f"{where}: the weights file {file} is missing")
    digest = info["weights"].get("sha256")
    if digest is not None and _sha256(file) != digest:
        raise LoadError(f"{file} is not the weights file saved with {where} (checksum differs)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"{file} could not be read as plain tensors: {type(exc).__name__}: "
                        f"{exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{file} does not hold a state_dict of tensors")
    shapes = {k: list(v.shape) for k, v in state.items()}
    if shapes != info["final"].get("state_dict"):
        raise LoadError(f"{file} does not match {where}: {_first_diff(shapes, info['final'].get('state_dict') or {})}")
    return state


def _read_safetensors(folder: Path, weights: Dict[str, Any], where: Path
                      ) -> Dict[str, torch.Tensor]:
    """The shards :func:`cleanai.prune_checkpoint` wrote (checksums checked), tied weights
    filled in under each of their names."""
    from ..checkpoint.files import import_safetensors

    files, aliases = weights.get("files"), weights.get("aliases") or {}
    if not isinstance(files, dict) or not files or not isinstance(aliases, dict):
        raise LoadError(f"{where}: field 'weights' must list the safetensors files")
    load_file = import_safetensors().torch.load_file
    state: Dict[str, torch.Tensor] = {}
    for name, digest in files.items():
        file = folder / str(name)
        if not file.is_file():
            raise LoadError(f"{where}: the weights file {file} is missing")
        if digest is not None and _sha256(file) != digest:
            raise LoadError(f"{file} is not the weights file saved with {where} "
                            f"(checksum differs)")
        try:
            state.update(load_file(str(file)))
        except Exception as exc:
            raise LoadError(f"{file} could not be read as safetensors: {type(exc).__name__}: "
                            f"{exc}") from exc
    for alias, stored in aliases.items():
        if stored not in state:
            raise LoadError(f"{where}: {alias!r} is stored as {stored!r}, which no file holds")
        state[alias] = state[stored]
    return state


def _first_diff(got: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    for k in want:
        if k not in got:
            return f"{k!r} is expected but missing"
    for k in got:
        if k not in want:
            return f"{k!r} is not expected"
    for k in want:
        if list(got[k]) != list(want[k]):
            return f"{k!r} has shape {list(got[k])}, expected {list(want[k])}"
    return "no difference"


def _params_of(signature: Mapping[str, List[int]], names: set) -> int:
    return sum(math.prod(shape) for name, shape in signature.items() if name in names)


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _info_file(path: PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p / INFO_FILE
