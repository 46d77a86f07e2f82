"""Pruning a checkpoint larger than memory: plan on a meta-device model, slice on disk.

The dependency graph needs shapes, not values. :func:`prune_checkpoint` builds the model on
the meta device, traces it, and plans with :class:`~cleanai.importance.WeightImportance`
whose weight norms are read from the checkpoint tensor by tensor. The plan is applied to the
meta model (shapes, module attributes and ``model.config`` follow), and again to a meta copy
whose layer pruners' slices are logged (:func:`cleanai.core.slicing.recorded_slices`): each
parameter's kept indices per dim, exactly as the in-memory pruner cuts them (packed qkv,
heads, grouped-query attention...). The checkpoint is then rewritten shard by shard, each
tensor read, sliced with those indices and written straight to its shard, so that memory
holds about one tensor at a time, never a whole shard or the model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.graph import is_meta_model, module_signature
from .meta import build_on_meta
from ..core.parametrized import computed_weight, deepcopy_module
from ..core.slicing import recorded_slices
from ..importance import WeightImportance
from ..importance.base import member_weights, slice_norms
from . import files
from .files import (CheckpointError, CheckpointReader, import_safetensors, parse_size,
                    shard_layout, shard_names, side_files, write_index)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: pruner options that need weight values, data or timing, which a checkpoint pass lacks
_UNSUPPORTED = {
    "compensate": "compensation needs calibration data; prune in memory for it",
    "keep_teacher": "a teacher copy of a model larger than memory cannot be kept",
    "target_latency": "a latency budget times the model on real weights; use target_macs",
}


def prune_checkpoint(model_factory: Callable[[], nn.Module], checkpoint: PathLike,
                     out_dir: PathLike, example_inputs: Any = None, *, overwrite: bool = False,
                     max_shard_size: Union[int, str] = "500MB",
                     **pruner_options: Any) -> Path:
    """Prune the model stored in ``checkpoint`` without loading it, and write the pruned
    checkpoint to ``out_dir``. Beyond the interpreter and the meta model, peak memory is
    about two copies of the largest tensor: tensors are read, cut and written one at a time.

    Args:
        model_factory: ``model_factory() -> nn.Module`` builds the (unpruned) architecture;
            it is called inside ``with torch.device("meta")``, so no weight is allocated
            (see :func:`build_on_meta` for constructors that compute with tensor values).
            For Hugging Face: ``lambda: AutoModelForCausalLM.from_config(config)``.
        checkpoint: a folder with ``model.safetensors`` or sharded safetensors and
            ``model.safetensors.index.json`` (as ``save_pretrained`` writes them), or with
            ``pytorch_model.bin`` (read memory-mapped); or one such file or index.
        out_dir: the folder to write; it must not exist unless ``overwrite=True``. It is
            written as a hidden sibling folder first and renamed at the end, so an
            interrupted run never leaves a complete-looking ``out_dir``.
        example_inputs: inputs for the trace (moved to the meta device); inferred from the
            first layer when omitted, as :class:`~cleanai.StructuredPruner` does. The
            forward must not read tensor values on the meta device (no ``attention_mask``
            for most Hugging Face models; see :class:`~cleanai.DependencyGraph`).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        max_shard_size: largest output shard, in bytes or as ``"500MB"``, ``"2GB"``...
        **pruner_options: :class:`~cleanai.StructuredPruner` arguments (``pruning_ratio``,
            ``layer_pruning_ratios`` and ``ignored_layers`` by name, ``kinds``,
            ``round_to``, ``iterative_steps``, ``target_macs``, ``target_params``...).
            ``importance`` may be a :class:`~cleanai.importance.WeightImportance` (the
            default: its ``p`` and ``normalizer`` are used, the norms read from disk) or an
            importance that reads no weights (``RandomImportance``); ``compensate``,
            ``keep_teacher`` and ``target_latency`` need the weights in memory and are refused.

    ``out_dir`` receives the pruned weights as safetensors shards (named as transformers
    names them, with an index when there are several), the updated ``config.json`` when the
    model has a Hugging Face config, the checkpoint folder's other files (tokenizer,
    generation config) and ``cleanai.json``: the pruning history, so that both
    ``from_pretrained(out_dir)`` (when every layer was pruned alike, see
    :mod:`cleanai.pruner.attributes`) and :func:`cleanai.load_pruned` rebuild the model.
    The pruned weights are exactly those that pruning the loaded model in memory with the
    same options gives. Returns ``out_dir``.

    Raises:
        CheckpointError: the checkpoint does not match the architecture (a tensor missing,
            unexpected or of another shape; named), or cannot be read. Nothing is written.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ImportError: safetensors is not installed (``pip install 'cleanai[checkpoint]'``).
    """
    from ..pruner.apply import replay
    from ..pruner.history import get_history
    from ..pruner.structured import StructuredPruner

    import_safetensors()
    max_bytes = parse_size(max_shard_size)
    for option, why in _UNSUPPORTED.items():
        if pruner_options.get(option) not in (None, False):
            raise ValueError(f"prune_checkpoint does not support {option}: {why}")
    importance = _checkpoint_importance(pruner_options.pop("importance", None))
    out = Path(out_dir)
    reader = CheckpointReader(checkpoint)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if out.resolve() == reader.folder.resolve() or out.resolve() in reader.folder.resolve().parents:
        raise ValueError(f"out_dir {out} is or holds the checkpoint's own folder; write elsewhere")

    model = build_on_meta(model_factory)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory returned {type(model).__name__}, not an nn.Module")
    if not is_meta_model(model):
        where = next(n for n, t in [*model.named_parameters(), *model.named_buffers()]
                     if not t.is_meta)
        raise ValueError(f"model_factory built {where} outside the meta device; build every "
                         f"tensor on the default device so that no weight is allocated")
    computed = next((n for n, m in model.named_modules()
                     if computed_weight(m, recurse=False)), None)
    if computed is not None:
        raise ValueError(f"prune_checkpoint does not support {computed}, whose weight is "
                         f"computed (weight norm, torch.nn.utils.parametrize): its norms and "
                         f"gain need the values; load the model and prune it instead")
    names, aliases = _match(model, reader)
    original = module_signature(model)
    heads_before = {n: m.head_dim for n, m in model.named_modules()
                    if isinstance(m, nn.MultiheadAttention)}
    shadow = deepcopy_module(model)  # replays each step with its slices logged
    shadow_tensors = dict(shadow.state_dict(keep_vars=True))
    pruner = StructuredPruner(model, example_inputs, importance=importance, **pruner_options)
    chains: Dict[str, Dict[int, torch.Tensor]] = {}  # name -> {dim: kept indices}
    while pruner.current_step < pruner.iterative_steps:
        if isinstance(importance, CheckpointWeightImportance):
            importance.norms = _read_norms(reader, model, pruner.graph, names, chains,
                                           importance.p)
        done = len(pruner.history)
        pruner.step()
        for entry in pruner.history[done:]:
            with recorded_slices() as log:
                replay(shadow, entry["layers"])
            _compose(chains, log, shadow_tensors)
    final = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_followed(model, reader, chains, final, heads_before)

    record = get_history(model)
    steps = record["steps"] if record is not None else []
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        layout = shard_layout([(n, final[n], t.dtype) for n, t in reader.tensors.items()],
                              max_bytes)
        layout = dict(zip(shard_names(len(layout)), layout))
        stream = _pruned_tensors(reader, chains, final)
        shards = {name: files.write_shard(tmp / name, part, stream)
                  for name, part in layout.items()}
        if len(layout) > 1:
            write_index(tmp, layout)
        _write_config(getattr(model, "config", None), tmp)
        for f in side_files(reader.folder) if reader.path.is_dir() else ():
            shutil.copy2(f, tmp / f.name)
        info = _info(model, original, steps, final, shards, aliases)
        (tmp / "cleanai.json").write_text(json.dumps(info))
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("pruned %s: %d -> %d parameters, written to %s", reader.path,
                info["original"]["params"], info["final"]["params"], out)
    return out


class CheckpointWeightImportance(WeightImportance):
    """:class:`WeightImportance` whose per-slice norms are read from a checkpoint on disk
    (set in :attr:`norms` before each step), while the group arithmetic stays the parent's:
    the scores equal those of the loaded model."""

    needs_values = False

    def __init__(self, p: float = 2, normalizer: Optional[str] = "mean") -> None:
        super().__init__(p, normalizer)
        #: ``_view_key(tensor, dim)`` -> ``sum |w|^p`` of each slice along dim
        self.norms: Dict[tuple, torch.Tensor] = {}

    def _slice_norms(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        hit = self.norms.get(_view_key(tensor, dim))
        if hit is None:
            raise RuntimeError(f"no norms were read for a tensor of shape {tuple(tensor.shape)} "
                               f"(dim {dim}); the checkpoint pass missed it")
        return hit


def _checkpoint_importance(importance: Any) -> Any:
    """The importance to plan with: a WeightImportance reads its norms from disk."""
    if importance is None:
        return CheckpointWeightImportance()
    if isinstance(importance, WeightImportance):
        return CheckpointWeightImportance(importance.p, importance.normalizer)
    if getattr(importance, "requires_data", False):
        raise ValueError(f"{type(importance).__name__} scores channels from data, which "
                         f"prune_checkpoint does not run; use WeightImportance")
    return importance


def _match(model: nn.Module, reader: CheckpointReader
           ) -> Tuple[Dict[int, str], Dict[str, str]]:
    """Check that the checkpoint holds every tensor of ``model``'s state_dict with its shape
    (a tensor shared under several names, tied embeddings, needs one of them) and nothing
    else. Returns ``{id(tensor): name in the checkpoint}`` and ``{alias: name}`` for the
    names the checkpoint leaves out."""
    where = reader.path
    by_tensor: Dict[int, List[str]] = {}
    tensors = model.state_dict(keep_vars=True)
    for name, t in tensors.items():
        by_tensor.setdefault(id(t), []).append(name)
    names: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for key, group in by_tensor.items():
        present = [n for n in group if n in reader.tensors]
        if not present:
            shape = tuple(tensors[group[0]].shape)
            raise CheckpointError(f"{where} has no tensor {group[0]!r}, which "
                                  f"{type(model).__name__} holds (shape {list(shape)}); the "
                                  f"checkpoint does not match the architecture")
        for n in present:
            want, got = tuple(tensors[n].shape), reader.tensors[n].shape
            if want != got:
                raise CheckpointError(f"{where}: tensor {n!r} has shape {list(got)}, but "
                                      f"{type(model).__name__} holds {list(want)}; the "
                                      f"checkpoint does not match the architecture")
        names[key] = present[0]
        aliases.update((n, present[0]) for n in group if n not in reader.tensors)
    extra = next((n for n in reader.tensors if n not in tensors), None)
    if extra is not None:
        raise CheckpointError(f"{where} holds tensor {extra!r}, which {type(model).__name__} "
                              f"does not have; the checkpoint does not match the architecture")
    return names, aliases


def _view_key(tensor: torch.Tensor, dim: int) -> tuple:
    """Names a (view of a) model tensor and a dim: layer pruners hand out views such as
    ``in_proj_weight.view(3, inner, -1)``, made anew each time."""
    base = tensor._base if tensor._base is not None else tensor
    return (id(base), tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(), dim)


def _read_norms(reader: CheckpointReader, model: nn.Module, graph, names: Dict[int, str],
                chains: Dict[str, Dict[int, torch.Tensor]], p: float) -> Dict[tuple, torch.Tensor]:
    """``sum |w|^p`` per slice of every weight the groups score, read from the checkpoint
    one tensor at a time and cut as the model's tensor has been cut so far."""
    wanted: Dict[str, Dict[tuple, Tuple[torch.Tensor, int]]] = {}
    for group in graph.groups:
        if group.size <= 1 or not group.prunable:
            continue  # never scored
        for _, tensor, dim in member_weights(group, model):
            base = tensor._base if tensor._base is not None else tensor
            name = names.get(id(base))
            if name is None:
                raise RuntimeError(f"a weight of group {group.id} (shape "
                                   f"{tuple(tensor.shape)}) is not in the model's state_dict")
            wanted.setdefault(name, {})[_view_key(tensor, dim)] = (tensor, dim)
    norms: Dict[tuple, torch.Tensor] = {}
    for file in reader.files:
        todo = [n for n, info in reader.tensors.items() if info.file == file and n in wanted]
        for name, real in reader.read(file, todo):
            real = _sliced(real, chains.get(name)).contiguous()
            for key, (tensor, dim) in wanted[name].items():
                base = tensor._base if tensor._base is not None else tensor
                if real.shape != base.shape or not base.is_contiguous():
                    raise RuntimeError(f"{name}: the checkpoint tensor, cut so far, has shape "
                                       f"{tuple(real.shape)}; the model holds "
                                       f"{tuple(base.shape)}")
                view = real if tensor is base else torch.as_strided(
                    real, tensor.shape, tensor.stride(), tensor.storage_offset())
                norms[key] = slice_norms(view, dim, p)
            del real
    return norms


def _compose(chains: Dict[str, Dict[int, torch.Tensor]], log: list,
             tensors: Dict[str, torch.Tensor]) -> None:
    """Fold one step's logged slices ``(tensor, dim, kept)`` into ``chains`` (by name)."""
    name_of: Dict[int, List[str]] = {}
    for name, t in tensors.items():
        name_of.setdefault(id(t), []).append(name)
    for t, dim, keep in log:
        for name in name_of.get(id(t), ()):  # a stand-in for a tied weight is not named
            chain = chains.setdefault(name, {})
            d = dim % t.dim()
            chain[d] = chain[d].index_select(0, keep) if d in chain else keep


def _pruned_tensors(reader: CheckpointReader, chains: Dict[str, Dict[int, torch.Tensor]],
                    final: Dict[str, tuple]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Every checkpoint tensor, in file order, cut to its pruned shape; one in memory at a
    time (with its source while it is cut)."""
    for name, tensor in reader:
        sliced = _sliced(tensor, chains.get(name))
        del tensor
        if tuple(sliced.shape) != final[name]:
            raise RuntimeError(f"{name}: slicing gave {tuple(sliced.shape)}, the pruned "
                               f"model holds {final[name]}")
        yield name, sliced
        del sliced


def _sliced(tensor: torch.Tensor, chain: Optional[Dict[int, torch.Tensor]]) -> torch.Tensor:
    """``tensor`` with the kept indices of each dim in ``chain``."""
    for dim, keep in sorted((chain or {}).items()):
        tensor = tensor.index_select(dim, keep)
    return tensor


def _check_followed(model: nn.Module, reader: CheckpointReader,
                    chains: Dict[str, Dict[int, torch.Tensor]], final: Dict[str, tuple],
                    heads_before: Dict[str, int]) -> None:
    """Refuse, before anything is written, what the logged slices cannot reproduce: a layer
    pruner that sliced a tensor without :func:`cleanai.core.layers._keep` (the tensor's
    logged cuts do not give its pruned shape), or one that changed values (the attention
    scale folded into the query rows when dims leave every ``nn.MultiheadAttention`` head)."""
    for name, info in reader.tensors.items():
        chain = chains.get(name, {})
        shape = tuple(len(chain[d]) if d in chain else n for d, n in enumerate(info.shape))
        if shape != final[name]:
            raise RuntimeError(f"{name}: its layer pruner cut it to {list(final[name])} in a "
                               f"way prune_checkpoint cannot follow (the cuts it logged give "
                               f"{list(shape)}); slice with cleanai.core.layers._keep, as the "
                               f"built-in layer pruners do")
    for name, d in heads_before.items():
        if model.get_submodule(name).head_dim != d:
            raise NotImplementedError(
                f"{name}: attention='head_dims' rescales an nn.MultiheadAttention's query "
                f"weights, which prune_checkpoint does not do; use attention='heads'")


def _write_config(config: Any, folder: Path) -> None:
    """``config.json`` of a Hugging Face config; one transformers refuses to save (a pruned
    hidden size no longer a multiple of the head count) is written as it is, with a warning."""
    if not hasattr(config, "save_pretrained"):
        return
    try:
        config.save_pretrained(folder)
    except Exception as exc:
        config.to_json_file(folder / "config.json", use_diff=False)
        warnings.warn(f"transformers refuses the pruned config ({exc}); config.json is "
                      f"written anyway, but from_pretrained will not load it: load the "
                      f"checkpoint with cleanai.load_pruned, or prune with sizes the config "
                      f"accepts (kinds=..., round_to=...)", stacklevel=3)


def _info(model: nn.Module, original: Dict[str, tuple], steps: List[Dict[str, Any]],
          final: Dict[str, tuple], shards: Dict[str, str], aliases: Dict[str, str]
          ) -> Dict[str, Any]:
    """``cleanai.json``, as :func:`cleanai.save_pruned` writes it, with safetensors shards."""
    from ..pruner.history import signature_json
    from ..utils.save import pruned_info

    return pruned_info(type(model).__name__, signature_json(original), steps,
                       {k: list(v) for k, v in final.items()},
                       {n for n, _ in model.named_parameters()},
                       {"format": "safetensors", "files": shards, "aliases": aliases})


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``: a rename; an existing ``out`` goes only after."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
