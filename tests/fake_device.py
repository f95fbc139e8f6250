"""Run CPU code as if its tensors lived on an accelerator, so that a tensor created without `device=` shows up.

Every parameter, buffer and input becomes an `OnDevice`: a CPU tensor that reports the `meta` device and computes
with its real data, so data-dependent code (`nonzero`, `.item()`, boolean masks) runs as it does on a GPU. Under
`FakeDeviceMode` an op mixing an `OnDevice` with a plain CPU tensor of one or more dimensions raises the error CUDA
raises ("Expected all tensors to be on the same device"), except the ops CUDA lets cross devices (copies, CPU index
tensors); CPU scalars (0-dim) mix as they do on CUDA. A factory call with `device=<the fake device>` makes an
`OnDevice`; one without `device=` makes a plain CPU tensor, which is the bug this catches.

torch's `FakeTensorMode` has no data, so each data-dependent step would need its own shim. Here `torch.tensor(data,
device=...)` needs a function mode (`FakeDeviceFactories`), and two shims remain: autocast knows no `meta` device
(`autocast_off_the_fake_device`, so mixed precision is not exercised), and `accelerator.device` names the fake
device as it would name the GPU (`fake_device_run`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten
FAKE_DEVICE = torch.device("meta")
# Ops CUDA runs with CPU operands of any size: copies between devices, and CPU index tensors into device tensors.
CROSS_DEVICE_OPS = {
    aten._to_copy.default, aten.copy_.default, aten.index.Tensor, aten.index_put_.default,
    aten._index_put_impl_.default,
}  # fmt: skip


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that reports `FAKE_DEVICE`; ops on it run on `elem` through `_dispatch`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=FAKE_DEVICE, requires_grad=elem.requires_grad,
        )  # fmt: skip

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def tolist(self) -> Any:  # reads the data, as `.tolist()` of a GPU tensor does after a sync
        return self.elem.tolist()

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"


def _dispatch(func, args: tuple, kwargs: dict) -> Any:
    tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if any(x.device.type == FAKE_DEVICE.type and not isinstance(x, OnDevice) for x in tensors):
        raise AssertionError(f"{func} got a real {FAKE_DEVICE} tensor, without data: a factory the harness missed")
    on_device = any(isinstance(x, OnDevice) for x in tensors)
    device = kwargs.get("device")
    to_device = device is not None and torch.device(device).type == FAKE_DEVICE.type
    if on_device and func not in CROSS_DEVICE_OPS:
        stray = [tuple(x.shape) for x in tensors if not isinstance(x, OnDevice) and x.dim() > 0]
        if stray:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {FAKE_DEVICE} and "
                f"cpu! ({func} with CPU tensors of shapes {stray})"
            )
    passed = {}  # id of what the op gets -> what the caller gave, so that in-place ops return the caller's tensor

    def unwrap(x):
        if isinstance(x, torch.Tensor):
            inner = x.elem if isinstance(x, OnDevice) else x
            passed[id(inner)] = x
            return inner
        return x

    args, kwargs = tree_map(unwrap, (args, kwargs))
    if to_device:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*args, **kwargs)
    leaves_device = device is not None and not to_device and func is aten._to_copy.default  # `.cpu()`, `.to("cpu")`
    if not (on_device or to_device) or leaves_device:
        return out

    def wrap(x):
        if isinstance(x, torch.Tensor):
            given = passed.get(id(x))
            return given if given is not None else OnDevice(x)
        return x

    return tree_map(wrap, out)


class FakeDeviceMode(TorchDispatchMode):
    """Routes every op, factory calls included, through `_dispatch`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class FakeDeviceFactories(TorchFunctionMode):
    """`torch.tensor(data, device=FAKE_DEVICE)` and its kind: `torch.tensor` copies its data to the device below the
    dispatch modes, where a real `meta` tensor would lose it, so factories with no tensor input are made on the CPU
    and wrapped here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        factory = not any(isinstance(x, torch.Tensor) for x in tree_leaves(args))
        if factory and device is not None and torch.device(device).type == FAKE_DEVICE.type:
            out = func(*args, **{**kwargs, "device": torch.device("cpu")})
            return tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) else x, out)
        return func(*args, **kwargs)


def to_fake_device(module: torch.nn.Module) -> None:
    """Every parameter (shared ones stay shared, `requires_grad` kept) and buffer of `module` becomes an `OnDevice`."""
    converted: dict[int, torch.nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is None or isinstance(param, OnDevice):
                continue
            if id(param) not in converted:
                converted[id(param)] = torch.nn.Parameter(OnDevice(param.detach()), requires_grad=param.requires_grad)
            submodule._parameters[name] = converted[id(param)]
        for name, buffer in submodule._buffers.items():
            if buffer is not None and not isinstance(buffer, OnDevice):
                submodule._buffers[name] = OnDevice(buffer)


def autocast_off_the_fake_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch.is_autocast_enabled(device_type)` and `torch.get_autocast_dtype` raise for `meta`: no autocast there."""
    enabled, dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a == (FAKE_DEVICE.type,) else enabled(*a))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda d: torch.float32 if d == FAKE_DEVICE.type else dtype(d))


@contextmanager
def fake_device_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`FakeDeviceMode`, with the accelerator naming the fake device as its device and autocast shimmed."""
    autocast_off_the_fake_device(monkeypatch)
    monkeypatch.setattr(Accelerator, "device", property(lambda self: FAKE_DEVICE))
    with FakeDeviceMode(), FakeDeviceFactories():
        yield
