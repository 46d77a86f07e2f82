"""Building a model on the meta device: every parameter and buffer with its shape and dtype,
none with data, whatever the model's size."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def build_on_meta(model_factory: Callable[[], nn.Module]) -> nn.Module:
    """``model_factory()`` with its weights on the meta device.

    The factory first runs inside ``with torch.device("meta")``: nothing is allocated. A
    constructor that computes with tensor values (RegNet derives its widths with
    ``torch.pow(...).tolist()``) cannot run there; it then runs on the CPU while every
    parameter and buffer is moved to the meta device as it is registered, so at most one
    layer's tensors exist at a time."""
    try:
        with torch.device("meta"):
            return model_factory()
    except (RuntimeError, TypeError) as exc:  # "Cannot copy out of meta tensor", ".item()" or
        # ".numpy()" on meta: the constructor read a value
        if "meta" not in str(exc):
            raise
    with _registered_on_meta():
        return model_factory()


@contextmanager
def _registered_on_meta() -> Iterator[None]:
    """``nn.Module.register_parameter`` / ``register_buffer`` put their tensors on the meta
    device inside the block (restored on exit, also when it raises)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_on_meta(self, name, tensor, persistent=True):
        if tensor is not None and not tensor.is_meta:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
