"""Find the calls in a stretch of code that would make the host wait for a CUDA device, on any
device (the CPU included), so that "the training step makes no host sync" is checked without a
GPU.

On CUDA a host sync is a device-to-host read: ``.item()``/``float(t)``/``bool(t)``
(``aten._local_scalar_dense``), ``.tolist()``/``.cpu()``/``.numpy()``, and ops whose output
shape depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``bincount``, ``repeat_interleave`` without ``output_size``, ``equal``). ``HostSyncRecorder``
records the dispatcher-level ones through a ``TorchDispatchMode`` (it sees the ops autograd runs
in backward too) and the Python-level reads by wrapping the ``torch.Tensor`` methods for its
duration. ``torch.cuda.set_sync_debug_mode("error")`` remains the check on a GPU; this one
runs in every CI. Code compiled with ``torch.compile`` runs eagerly while the recorder is active
(dynamo steps aside for a dispatch mode): the recorder checks the eager form of a step.

Usage::

    with HostSyncRecorder() as syncs:
        trainer.train_step([batch])
    assert not syncs.calls, syncs.calls
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that read a device value on the host, or size their output by the data.
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,
}
# Tensor methods that copy to the host (on a CPU tensor they dispatch nothing).
_HOST_READS = ("tolist", "cpu", "numpy", "__array__")


def _frame() -> str:
    """The innermost caller outside torch and this module: where the sync comes from."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and frame.filename != __file__:
            return f"{name}:{frame.lineno}"
    return "?"


def _data_dependent(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _SYNC_OPS:
        return True
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Records each would-be host sync as ``"op at file:line"`` in ``self.calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._saved: dict[str, Any] = {}  # name -> torch.Tensor's own attribute, or None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _data_dependent(func, args, kwargs):
            self.calls.append(f"{func} at {_frame()}")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncRecorder:
        for name in _HOST_READS:
            self._saved[name] = vars(torch.Tensor).get(name)
            setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                if original is None:  # inherited from torch._C.TensorBase
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            self._saved.clear()

    def _recording(self, name: str, original: Any) -> Any:
        calls = self.calls

        def method(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(f"Tensor.{name} at {_frame()}")
            return original(tensor, *args, **kwargs)

        return method
