"""Calibration batches for the command line: real images, random tensors or a tensor file."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .models import CLIError

FASHION_MNIST_DIR = Path(os.environ.get("CLEANAI_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

DATA_HELP = """calibration data (--calib-data), used by data-dependent importances:
  fashion-mnist   Fashion-MNIST training images (idx files in /usr/share/datasets/fashion-mnist,
                  or $CLEANAI_FASHION_MNIST), resized and repeated to the input shape
  sklearn-digits  scikit-learn's bundled 8x8 digits, resized the same way
  random          normal noise of the input shape (labels random in 0..9)
  FILE.pt         a tensor [N, ...] (or a (inputs, labels) pair) saved with torch.save,
                  read with torch.load(weights_only=True); token ids for hf: models"""


def read_idx(path: Union[str, Path]) -> torch.Tensor:
    """An idx file (the MNIST format, optionally gzip-compressed) of unsigned bytes, as a uint8
    tensor of its shape. Raises ``ValueError`` for any other file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def fashion_mnist(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``"train"`` (60k) or ``"t10k"`` (10k) images as floats in [0, 255],
    ``[N, 1, 28, 28]``, and their labels, from the idx files in :data:`FASHION_MNIST_DIR`."""
    x = read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz").float().unsqueeze(1)
    return x, read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz").long()


def labelled_images(source: str = "fashion-mnist", n_train: Optional[int] = None,
                    n_test: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
    """``(train_x, train_y, test_x, test_y, name)`` for the examples: Fashion-MNIST
    (``[N, 1, 28, 28]``), or scikit-learn's digits (``[N, 1, 8, 8]``, the first 1400 for
    training) when ``source="sklearn-digits"`` or the idx files are missing; images
    standardised with the training mean and deviation, each split cut to its ``n_``."""
    if source == "fashion-mnist" and (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        (train_x, train_y), (test_x, test_y) = fashion_mnist("train"), fashion_mnist("t10k")
        name = "Fashion-MNIST"
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
        train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
        name = "sklearn digits (8x8)"
    train_x, train_y, test_x, test_y = train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test]
    mean, std = train_x.mean(), train_x.std()
    return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y, name


def _images(source: str, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` grayscale images in [0, 1] as ``[count, 1, H, W]`` and their labels."""
    if source == "fashion-mnist":
        img = FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"
        lab = FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"
        if not img.is_file() or not lab.is_file():
            raise CLIError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (apt install "
                           f"dataset-fashion-mnist, or set CLEANAI_FASHION_MNIST)")
        try:
            x, y = read_idx(img), read_idx(lab)
        except ValueError as exc:
            raise CLIError(str(exc)) from exc
        return x[:count].float().div(255).unsqueeze(1), y[:count].long()
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise CLIError("sklearn-digits needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    x = torch.tensor(digits.images[:count], dtype=torch.float32).div(16).unsqueeze(1)
    return x, torch.tensor(digits.target[:count], dtype=torch.long)


def calibration_batches(source: str, example_inputs: Any, batches: int,
                        batch_size: int) -> List[Any]:
    """``batches`` batches for ``StructuredPruner.calibrate``: ``(inputs, labels)`` pairs for
    images, the model's input dict for token models."""
    if source in ("fashion-mnist", "sklearn-digits", "random"):
        if isinstance(example_inputs, dict):
            if source != "random":
                raise CLIError(f"--calib-data {source} gives images; this model takes tokens: "
                               f"use random or a .pt file of token ids")
            ids = example_inputs["input_ids"]
            high = int(ids.max()) + 1
            gen = torch.Generator().manual_seed(1)
            out = []
            for _ in range(batches):
                t = torch.randint(0, max(high, 2), (batch_size, ids.shape[1]), generator=gen)
                out.append({"input_ids": t, "attention_mask": torch.ones_like(t)})
            return out
        shape = list(example_inputs.shape)
        if source == "random":
            gen = torch.Generator().manual_seed(1)
            return [(torch.randn(batch_size, *shape[1:], generator=gen),
                     torch.randint(0, 10, (batch_size,), generator=gen)) for _ in range(batches)]
        if len(shape) != 4:
            raise CLIError(f"--calib-data {source} gives images; this model's input shape is "
                           f"{shape}, not N,C,H,W")
        x, y = _images(source, batches * batch_size)
        x = F.interpolate(x, size=shape[2:], mode="bilinear", align_corners=False)
        x = ((x - x.mean()) / x.std()).repeat(1, shape[1], 1, 1)
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    path = Path(source)
    if path.suffix != ".pt" or not path.is_file():
        raise CLIError(f"unknown --calib-data {source!r}: use fashion-mnist, sklearn-digits, "
                       f"random or an existing .pt file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"could not read {path} as plain tensors: {exc}") from exc
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.Tensor):
        x, y = data, None
    else:
        raise CLIError(f"{path} must hold a tensor or an (inputs, labels) pair of tensors")
    out = []
    for i in range(0, min(len(x), batches * batch_size), batch_size):
        xb = x[i:i + batch_size]
        if isinstance(example_inputs, dict):
            out.append({"input_ids": xb.long(), "attention_mask": torch.ones_like(xb.long())})
        else:
            out.append((xb.float(), y[i:i + batch_size]) if y is not None else xb.float())
    return out
