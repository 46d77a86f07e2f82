"""Checkpoint files on disk, read and written one tensor at a time.

:class:`CheckpointReader` reads what Hugging Face and PyTorch write: ``model.safetensors``,
sharded safetensors with ``model.safetensors.index.json``, and ``pytorch_model.bin`` (or any
``.bin`` / ``.pt`` / ``.pth`` file, alone or sharded with an index), through
``torch.load(mmap=True, weights_only=True)``. :func:`write_shard` writes a safetensors shard
one tensor at a time, so that memory never holds a whole shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]
Entry = Tuple[str, Tuple[int, ...], torch.dtype]  # (name, shape, dtype)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
#: files of a checkpoint folder that hold (or index) weights: never copied to the output
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")

_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_SAFE_CODES = {dtype: code for code, dtype in _SAFE_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the model built for it."""


def import_safetensors():
    """The ``safetensors`` package, or an ImportError that says how to get it."""
    try:
        import safetensors
        import safetensors.torch  # noqa: F401  (load_file, for load_pruned)
    except ImportError as exc:
        raise ImportError("pruning a checkpoint on disk reads safetensors files: "
                          "pip install 'cleanai[checkpoint]' (or pip install safetensors)") from exc
    return safetensors


def nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype, device="meta").element_size()


class TensorInfo:
    """Where a checkpoint tensor lives, and its shape and dtype, read from the file headers."""

    __slots__ = ("file", "shape", "dtype")

    def __init__(self, file: Path, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        self.file, self.shape, self.dtype = file, shape, dtype


class CheckpointReader:
    """The tensors of a checkpoint, listed from the file headers and read one at a time.

    ``path`` is a folder (holding one of the index or single files named above, or exactly one
    ``.safetensors`` file), a weights file, or an index ``.json``. ``tensors`` maps each name
    to its :class:`TensorInfo`, in file order; :meth:`read` yields the tensors of one file,
    iterating the reader yields them all.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.files = self._files()
        self.tensors: Dict[str, TensorInfo] = {}
        for file in self.files:
            for name, shape, dtype in self._headers(file):
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is stored twice "
                                          f"({self.tensors[name].file.name} and {file.name})")
                self.tensors[name] = TensorInfo(file, shape, dtype)

    @property
    def folder(self) -> Path:
        """The folder that holds the checkpoint's files."""
        return self.path if self.path.is_dir() else self.path.parent

    def _files(self) -> List[Path]:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"checkpoint {p} does not exist")
        if p.is_dir():
            for name in (SAFE_INDEX, SAFE_SINGLE, TORCH_INDEX, TORCH_SINGLE):
                if (p / name).is_file():
                    return self._files_of(p / name)
            found = sorted(p.glob("*.safetensors"))
            if len(found) == 1:
                return found
            raise CheckpointError(
                f"{p} holds no checkpoint CleanAI can read: expected {SAFE_INDEX}, "
                f"{SAFE_SINGLE}, {TORCH_INDEX}, {TORCH_SINGLE} or a single .safetensors file"
                + (f" (found {len(found)} .safetensors files and no index)" if found else ""))
        return self._files_of(p)

    def _files_of(self, file: Path) -> List[Path]:
        if file.name.endswith(".json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{file} is not a readable checkpoint index (a JSON "
                                      f"object with a \"weight_map\"): {exc}") from exc
            files = [file.parent / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{file} names shard {missing[0]}, which is missing")
            return files
        if file.suffix == ".safetensors" or file.suffix in _TORCH_SUFFIXES:
            return [file]
        raise CheckpointError(f"{file}: not a checkpoint file CleanAI reads (.safetensors, "
                              f".bin, .pt, .pth or an index .json)")

    def _headers(self, file: Path) -> Iterator[Entry]:
        if file.suffix == ".safetensors":
            # the header alone: 8 bytes of length, then JSON (no tensor is read)
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file: "
                                      f"{exc}") from exc
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = _SAFE_DTYPES.get(entry.get("dtype"))
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype "
                                          f"{entry.get('dtype')!r}, which CleanAI cannot slice")
                yield name, tuple(entry["shape"]), dtype
            return
        for name, t in self._torch_file(file).items():
            yield name, tuple(t.shape), t.dtype

    def _torch_file(self, file: Path) -> Dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{file} could not be read as plain tensors: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or \
                not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file} does not hold a state_dict of tensors")
        return state

    def read(self, file: Path, names: Optional[List[str]] = None
             ) -> Iterator[Tuple[str, torch.Tensor]]:
        """The tensors of ``file`` (``names`` of them, or all), one at a time, in file order.
        Safetensors files are read with ``pread`` where the installed safetensors can: only
        the tensor asked for is in memory, never the whole file."""
        wanted = [n for n, info in self.tensors.items() if info.file == file] \
            if names is None else names
        if file.suffix == ".safetensors":
            safetensors = import_safetensors()
            try:
                handle = safetensors.safe_open(str(file), framework="pt", backend="pread")
            except TypeError:  # a safetensors without backends: memory-mapped
                handle = safetensors.safe_open(str(file), framework="pt")
            with handle as f:
                for name in wanted:
                    yield name, f.get_tensor(name)
                    release_memory()
            return
        state = self._torch_file(file)
        for name in wanted:
            yield name, state[name]
            release_memory()

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, in file order."""
        for file in self.files:
            yield from self.read(file)


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Hand the memory freed since the last call back to the OS (glibc's ``malloc_trim``;
    nothing elsewhere). Tensors of a few MB are allocated from the heap, which fragments over
    thousands of them: without this, a pass over a checkpoint keeps growing the resident
    memory by a fraction of the checkpoint's size."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"1GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size such as "
                         f"'500MB', got {size!r}")
    unit = m.group(2) or "B"
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** power)


def shard_layout(entries: List[Entry], max_bytes: int) -> List[List[Entry]]:
    """``(name, shape, dtype)`` entries, in order, cut into shards of at most ``max_bytes``
    (a larger tensor gets a shard of its own), as transformers cuts them."""
    shards: List[List[Entry]] = []
    size = 0
    for entry in entries:
        n = nbytes(entry[1], entry[2])
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return [s for s in shards if s]


def shard_names(count: int) -> List[str]:
    """The file names transformers gives ``count`` shards."""
    if count == 1:
        return [SAFE_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard(path: Path, layout: List[Entry],
                tensors: Iterator[Tuple[str, torch.Tensor]]) -> str:
    """Write one safetensors file holding ``layout``, taking its tensors one at a time from
    ``tensors`` (which must yield them in that order): the header is known in advance, so
    memory holds one tensor, never the shard. Returns the file's sha256.

    The format is safetensors' own (8-byte little-endian header length, a JSON header padded
    with spaces to 8 bytes, the raw little-endian data in header order), with
    ``{"format": "pt"}`` metadata as transformers expects."""
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in layout:
        code = _SAFE_CODES.get(dtype)
        if code is None:
            raise CheckpointError(f"{name}: dtype {dtype} cannot be written as safetensors")
        n = nbytes(shape, dtype)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for name, shape, dtype in layout:
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"{path.name}: expected {name} {list(shape)} {dtype}, got "
                                   f"{got} {list(tensor.shape)} {tensor.dtype}")
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
            del tensor, data
    return digest.hexdigest()


def write_index(folder: Path, shards: Dict[str, List[Entry]]) -> None:
    """``model.safetensors.index.json`` for ``{file name: its layout}``: which shard holds
    each tensor, and the total size."""
    weight_map = {e[0]: file for file, part in shards.items() for e in part}
    total = sum(nbytes(shape, dtype) for part in shards.values() for _, shape, dtype in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def side_files(folder: Path) -> List[Path]:
    """The files of a checkpoint folder other than weights, indexes, ``config.json`` and
    CleanAI's own file: tokenizer files, ``generation_config.json``... (copied as they are)."""
    return sorted(f for f in folder.iterdir() if f.is_file()
                  and not f.name.endswith(WEIGHT_SUFFIXES)
                  and f.name not in ("config.json", "cleanai.json") and not f.name.startswith("."))
