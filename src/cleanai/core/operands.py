"""What a forward's autograd graph forgets, recorded while the model runs: the operand shapes
of additions, which splits were given their sizes, the tensors the calls read, and where a
write into part of a tensor landed (see :class:`OperandRecorder`). Used by
:func:`cleanai.core.record.record_forward`; the walk reads it as ``operand_shapes``."""
from __future__ import annotations

import collections
import contextlib
import itertools
import linecache
import os
import sys
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .widths import width_free

# torch's own switch for "no __torch_function__ handling here" (modes and subclasses)
NoTorchFunction = getattr(torch._C, "DisableTorchFunction", contextlib.nullcontext)


def step_aside(mode: "OperandRecorder") -> Optional["OperandRecorder"]:
    """Take ``mode`` off torch's function-mode stack if it is on top; returns it if taken."""
    if _POP is None or torch._C._len_torch_function_stack() == 0:
        return None
    top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
    return _POP() if top is mode else None


def step_back(mode: Optional["OperandRecorder"]) -> None:
    if mode is not None:
        _PUSH(mode)


# torch's function-mode stack (what ``with mode:`` pushes and pops), where this torch has it
_POP = getattr(torch._C, "_pop_torch_function_stack", None)
_PUSH = getattr(torch._C, "_push_on_torch_function_stack", None)
if _PUSH is None or not hasattr(torch._C, "_get_function_stack_at"):
    _POP = None


class OperandRecorder(TorchFunctionMode):
    """Records what the autograd graph forgets: the operand shapes of additions and
    subtractions (``x + 3`` and ``x + constant`` look alike there), and which splits were
    given their sizes (``x.split(64)``, sizes written in the model's code that will not follow
    a pruned width) rather than a number of parts (``x.chunk(2)``): both leave a
    ``SplitBackward0``. A split is recorded under the key ``("split", grad_fn)``. A tensor
    written into a slice of another (``out[..., :d].copy_(a)``, ``out[:, 2:] = b``) leaves a
    ``CopySlices`` that forgets where (so does an in-place op on a view): the slice is recorded
    under ``("write", grad_fn)`` as ``(dim, start, length, whether the view selected one
    index of dim, which the tensor written lacks, storage pointer of the tensor written into,
    whether it replaced the values there)``, or ``"not one range"``. Every write also
    records the call that made it (``("write op", grad_fn)``: ``copy_``, ``add_``,
    ``index_add_``...) and, under ``("write fresh", grad_fn)``, whether it wrote into a tensor
    a factory made in the forward and nothing changed since (``zeros_like``, ``new_empty``...):
    only such a tensor holds no values of its own per channel."""

    _OPS = ("AddBackward0", "SubBackward0")
    _FUNCS = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__",
              "__isub__", "__rsub__", "rsub", "subtract"}
    _SPLITS = {"split", "split_with_sizes"}

    # calls that only view a buffer (its values reach an op unchanged)
    _VIEWS = {"__getitem__", "narrow", "view", "reshape", "unsqueeze", "squeeze", "expand",
              "expand_as", "transpose", "permute", "t", "contiguous", "detach", "to", "type_as",
              "__get__"}
    _ELEMENTWISE = _FUNCS | {"mul", "mul_", "__mul__", "__imul__", "__rmul__", "multiply",
                             "div", "div_", "__truediv__", "__itruediv__", "divide"}
    # factories of one value everywhere, and of values about to be written over
    _FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
              "new_ones", "new_full"}
    _EMPTY = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
    # calls that hand a factory's tensor on with its values as they were (another dtype,
    # device, layout, or repeated)
    _KEEP_FRESH = {"to", "type_as", "clone", "contiguous", "repeat", "expand", "expand_as",
                   "float", "half", "bfloat16", "double", "detach", "view", "reshape",
                   "unsqueeze", "squeeze", "transpose", "permute", "t", "cuda", "cpu"}
    # in-place calls that leave one value everywhere
    _REFILLS = {"fill_", "zero_"}

    def __init__(self, buffers: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        self.shapes: Dict[Any, List[Optional[Tuple[int, ...]]]] = {}
        #: the model's buffers outside known layers, by storage pointer
        ptrs = [(b.untyped_storage().data_ptr(), n) for n, b in (buffers or {}).items()]
        counts = collections.Counter(p for p, _ in ptrs)
        shared = {p for p, c in counts.items() if c > 1}
        # (two buffers on one storage, or none on meta: neither is told apart)
        self._buffers = {p: n for p, n in ptrs if p and p not in shared}
        #: ``grad_fn`` of an element-wise op -> ``{operand index: (buffer name, the operand)}``
        #: for operands that view one of those buffers (``x + self.pe[:n]``)
        self.buffer_operands: Dict[Any, Dict[int, Tuple[str, torch.Tensor]]] = {}
        #: buffers some other call read (``pe.sum()``, a matrix product): never sliced
        self.buffer_reads: set = set()
        #: the first call that may hold a channel count of its own (see core/widths.py)
        self.sized: Optional[str] = None
        #: the storage of each tensor a factory made (see :func:`_storage_key`) -> (a weak
        #: reference to the latest tensor handed on with it, "fill" | "empty"); a write
        #: through any alias of that storage ends it
        self._fresh: Dict[Any, Tuple[Any, str]] = {}
        #: the autograd nodes of the outputs of the calls seen
        self.made: set = set()
        #: ``id()`` of the autograd nodes of the tensors the calls seen read (``x.detach()``
        #: reads x); ids, not the nodes, which would keep the activations they saved alive
        self.read: set = set()
        #: ``(id(grad_fn), output_nr)`` of each known layer's outputs -> a weak reference to the
        #: tensor: one still alive after the forward is held somewhere (stored on a module,
        #: returned inside an object the trace cannot look into)
        self.results: Dict[Tuple[int, int], Any] = {}

    def saw(self, out) -> None:
        """Note the autograd nodes of a call's outputs (a tensor or a tuple of them)."""
        for t in (out,) if isinstance(out, torch.Tensor) else \
                out if isinstance(out, (tuple, list)) else ():
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.made.add(t.grad_fn)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.sized is None and not width_free(func, args, kwargs):
            self.sized = _call_name(func)
        for a in itertools.chain(args, kwargs.values() if kwargs else ()):
            if isinstance(a, torch.Tensor):
                if a.grad_fn is not None:
                    self.read.add(id(a.grad_fn))
            elif type(a) in (list, tuple):  # torch.cat([...]), torch.stack
                self.read.update(id(t.grad_fn) for t in a
                                 if isinstance(t, torch.Tensor) and t.grad_fn is not None)
        name = getattr(func, "__name__", "")
        target = _write_base(func, args)
        written = _written_slice(func, args) if target is not None else None
        before = target.grad_fn if target is not None else None
        fresh = target is not None and before is None and self._is_fresh(target)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        kept = self._fresh_kind(first) if name in self._KEEP_FRESH else None
        refill = name in self._REFILLS and first is not None and \
            self._fresh_kind(first) is not None and not kwargs and \
            (len(args) == 1 or not isinstance(args[1], torch.Tensor))
        if first is not None and (name == "__setitem__" or name.startswith("__i") or
                                  (name.endswith("_") and not name.endswith("__"))):
            # written into (this write was judged above): its values are its own now
            self._fresh.pop(_storage_key(first), None)
        outs = kwargs.get("out") if kwargs else None
        for t in (outs if isinstance(outs, (tuple, list)) else (outs,)):
            if isinstance(t, torch.Tensor):  # ``torch.mul(a, b, out=t)`` writes into t
                self._fresh.pop(_storage_key(t), None)
        out = func(*args, **(kwargs or {}))
        self.saw(out)
        if self._buffers:
            self._buffer_use(func, args, kwargs, out)
        made = "fill" if name in self._FILLS else "empty" if name in self._EMPTY else kept
        if refill and first._base is None:  # ``new_empty(...).fill_(0)``: one value again
            made, out = "fill", first
        if made is not None and isinstance(out, torch.Tensor):
            self._fresh[_storage_key(out)] = (weakref.ref(out), made)
        if target is not None:
            fn = target.grad_fn  # a new node only when autograd recorded this write
            if fn is not None and fn is not before and fn.name().endswith("CopySlices"):
                self.shapes[("write op", fn)] = name
                self.shapes[("write fresh", fn)] = fresh
                if written is not None:
                    where = written[1]
                    self.shapes[("write", fn)] = where + (
                        target.untyped_storage().data_ptr(),
                        name in ("copy_", "__setitem__")) if where else "not one range"
        if getattr(func, "__name__", "") in self._SPLITS and isinstance(out, (tuple, list)) \
                and out and isinstance(out[0], torch.Tensor) and out[0].grad_fn is not None:
            self.shapes[("split", out[0].grad_fn)] = [tuple(t.shape) for t in out]
            self.shapes[("split line", out[0].grad_fn)] = _calling_code()
            return out
        if getattr(func, "__name__", "") not in self._FUNCS:
            return out
        fn = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if fn is not None and fn.name() in self._OPS and fn not in self.shapes:
            operands = list(args[:2])
            if getattr(func, "__name__", "") in ("__radd__", "__rsub__", "rsub"):
                operands.reverse()
            self.shapes[fn] = [tuple(a.shape) if isinstance(a, torch.Tensor) else ()
                               for a in operands]
        return out


    def _fresh_kind(self, t: Optional[torch.Tensor]) -> Optional[str]:
        """"fill" or "empty" for a tensor a factory made in this forward (or a call handed on
        as it was, ``.to(dtype)``) and nothing wrote into since; None for any other."""
        if t is None:
            return None
        entry = self._fresh.get(_storage_key(t))
        alias = entry[0]() if entry is not None else None
        return entry[1] if alias is not None and _storage_key(alias) == _storage_key(t) \
            else None

    def _is_fresh(self, t: torch.Tensor) -> bool:
        """True when ``t`` is a tensor a factory made in this forward, nothing wrote into
        since, still one value everywhere (``zeros_like``) or never read (``new_empty``,
        written over)."""
        kind = self._fresh_kind(t)
        if kind is None:
            return False
        if kind == "empty" or t.is_meta or t.numel() == 0:
            return True
        with torch.no_grad(), NoTorchFunction():
            first = t.reshape(-1)[0]
            return bool((t == first).all()) or bool(t.isnan().all())

    def _buffer_use(self, func, args, kwargs, out) -> None:
        """Note how a call used the buffers (see ``buffer_operands``, ``buffer_reads``): a
        view of one (sharing its storage) is no use yet; an element-wise op with it as one of
        its two operands is recorded; anything else reads it (a copy, a size, a reduction,
        a list holding it)."""
        name = getattr(func, "__name__", "")
        for i, a in enumerate(itertools.chain(args, kwargs.values() if kwargs else ())):
            if type(a) in (list, tuple):  # torch.cat([pe, x]): never sliced
                self.buffer_reads.update(self._buffers[p] for p in (
                    t.untyped_storage().data_ptr() for t in a if isinstance(t, torch.Tensor))
                    if p in self._buffers)
                continue
            if not isinstance(a, torch.Tensor) or a.grad_fn is not None or a.requires_grad:
                continue
            held = self._buffers.get(a.untyped_storage().data_ptr())
            if held is None:
                continue
            if name in self._VIEWS and isinstance(out, torch.Tensor) and \
                    out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr():
                continue  # a view: its own uses are what count
            fn = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
            in_place = i == 0 and (name.endswith("_") or name.startswith("__i"))
            if name in self._ELEMENTWISE and i < 2 and fn is not None and not kwargs and \
                    not in_place:  # (a buffer updated in place is state, not a table)
                self.buffer_operands.setdefault(fn, {})[i] = (held, a)
            elif name != "dim":  # a copy, a size, a reduction...: the buffer keeps its shape
                self.buffer_reads.add(held)


# PyTorch's and CleanAI's own files: the code that called a split is the first frame outside
_LIBRARIES = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                   for m in (torch, sys.modules[__name__.rpartition(".core")[0]]))


def _calling_code() -> str:
    """The source text of the call being run by the innermost frame outside PyTorch and
    CleanAI (all its lines, for a call written over several), or "" where there is none."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame = frame.f_back
    if frame is None:
        return ""
    code = frame.f_code
    first = last = frame.f_lineno
    try:
        pos = next(itertools.islice(code.co_positions(), frame.f_lasti // 2, None), None)
        if pos and pos[0] is not None and pos[1] is not None:
            first, last = pos[0], pos[1]
    except (AttributeError, ValueError):  # before Python 3.11: the current line alone
        pass
    return " ".join(linecache.getline(code.co_filename, n).strip()
                    for n in range(first, last + 1))


def _storage_key(t: torch.Tensor) -> Any:
    """What ties a tensor to its aliases (views, ``detach``): its storage; a tensor without
    one (meta, sparse), by itself."""
    try:
        ptr = t.untyped_storage().data_ptr() if t.layout == torch.strided else 0
    except (NotImplementedError, RuntimeError):
        ptr = 0
    return ptr if ptr else ("object", id(t))


def _write_base(func, args) -> Optional[torch.Tensor]:
    """The tensor a call writes into part or all of: ``x`` for ``x[index] = v``, the base of
    the view an in-place method runs on; None for any other call."""
    name = getattr(func, "__name__", "")
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    target = args[0]
    if name == "__setitem__":
        return target._base if target._base is not None else target
    if name.endswith("_") and not name.endswith("__") and target._base is not None:
        return target._base
    return None


def _written_slice(func, args) -> Optional[Tuple[torch.Tensor, Optional[Tuple[int, int, int,
                                                                               bool]]]]:
    """For a write into part of a tensor (``x[index] = v``, or an in-place method on a view:
    ``view.copy_(src)``, ``x[:, :2].relu_()``): the tensor written into and the slice
    ``(dim, start, length, selected)`` of it written: one range of one dim, or one index of
    one dim (``out[:, :, i] = v``, ``selected``: the view lacks that dim); None when the view
    is neither (a step, several dims). None for anything else, and for a view that covers
    all of its base (an element-wise op on it)."""
    name = getattr(func, "__name__", "")
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    target = args[0]
    if name == "__setitem__":
        if len(args) < 2:
            return None
        try:
            view = target.detach()[args[1]]
        except Exception:  # the write itself will raise
            return None
        if view.untyped_storage().data_ptr() != target.untyped_storage().data_ptr():
            return None  # advanced indexing: an index_put, not a slice
        value = args[2] if len(args) > 2 else None
        if isinstance(value, torch.Tensor) and _same_memory(value, view):
            return None  # ``x[:, :4] += y`` stores the updated view back into itself
    elif name.endswith("_") and not name.endswith("__") and target._base is not None:
        view = target
    else:
        return None
    base = target._base if target._base is not None else target
    if view.numel() == base.numel():
        return None
    if view.dim() == base.dim() - 1:
        where = _selected_index(view, base)
        return base, where if where is not None else _block(view, base)
    if view.dim() != base.dim():
        return base, _block(view, base)
    diff = [i for i, (a, b) in enumerate(zip(view.shape, base.shape)) if a != b]
    offset = view.storage_offset() - base.storage_offset()
    if len(diff) != 1 or any(u != t for u, t, n in zip(view.stride(), base.stride(), view.shape)
                             if n > 1):
        return base, _block(view, base)
    d = diff[0]
    step = base.stride(d)
    if step <= 0 or offset % step or not 0 <= offset // step <= base.shape[d] - view.shape[d]:
        return base, None
    return base, (d, offset // step, view.shape[d], False)


def _block(view: torch.Tensor, base: torch.Tensor) -> Optional[tuple]:
    """``("block", dims, whole)`` for a view into several dims of ``base`` at once
    (``attn[..., i, :i]``): for each dim of ``view`` the dim of ``base`` it runs along (the
    one of the same stride; -1 for a dim of size 1), and the dims of ``base`` it covers
    whole. None when the strides or the offset do not say (a view that wraps across a dim
    of the base)."""
    dims, used = [], set()
    for n, stride in zip(view.shape, view.stride()):
        if n == 1:
            dims.append(-1)
            continue
        found = [d for d in range(base.dim()) if base.stride(d) == stride and
                 base.shape[d] >= n and d not in used]
        if len(found) != 1:
            return None
        used.add(found[0])
        dims.append(found[0])
    # where the view starts, dim by dim of the base (largest stride first): it must lie
    # inside the base along every dim it runs along
    rest = view.storage_offset() - base.storage_offset()
    start = [0] * base.dim()
    for d in sorted(range(base.dim()), key=lambda d: -base.stride(d)):
        if base.stride(d) > 0 and base.shape[d] > 1:
            start[d], rest = divmod(rest, base.stride(d))
    if rest or any(start[d] < 0 or start[d] >= max(1, base.shape[d]) for d in range(base.dim())):
        return None
    if any(d >= 0 and start[d] + n > base.shape[d] for n, d in zip(view.shape, dims)):
        return None
    whole = tuple(d for n, d in zip(view.shape, dims) if d >= 0 and n == base.shape[d])
    return ("block", tuple(dims), whole)


def _selected_index(view: torch.Tensor, base: torch.Tensor) -> Optional[Tuple[int, int, int,
                                                                              bool]]:
    """``(d, i, 1, True)`` when ``view`` is ``base.select(d, i)`` (the same strides on the
    other dims), None when no single dim, or more than one, explains it."""
    offset = view.storage_offset() - base.storage_offset()
    found = []
    for d in range(base.dim()):
        shape = base.shape[:d] + base.shape[d + 1:]
        stride = base.stride()[:d] + base.stride()[d + 1:]
        step = base.stride(d)
        if tuple(view.shape) != tuple(shape) or step <= 0 or offset % step or \
                not 0 <= offset // step < base.shape[d] or \
                any(u != t for u, t, n in zip(view.stride(), stride, view.shape) if n > 1):
            continue
        found.append((d, offset // step, 1, True))
    return found[0] if len(found) == 1 else None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape
            and a.stride() == b.stride())


def _call_name(func) -> str:
    """``view()``, or ``Tensor.shape`` for an attribute read."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        return "Tensor." + getattr(getattr(func, "__self__", None), "__name__", "attribute")
    return name + "()"
