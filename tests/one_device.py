"""A device check that runs on a CPU-only machine: code under test runs on PyTorch's "meta" device
(tensors with shapes and no values), and every torch operation is checked to take its tensors from
one device. A tensor made on the CPU by mistake (`torch.arange(n)` with no device) then fails here
as it would fail on a GPU, where a CPU tensor meets a CUDA one."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves


class OneDevice(TorchFunctionMode):
    """Within `with OneDevice():`, an operation whose tensor arguments lie on two devices raises
    AssertionError naming it. A 0-dim CPU tensor may join any device (as on CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                   and not (t.dim() == 0 and t.device.type == "cpu")}
        assert len(devices) <= 1, f"{getattr(func, '__name__', func)} mixes devices {devices}"
        return func(*args, **kwargs)


HOST_READS = ("cannot be called on meta tensors", "Cannot copy out of meta tensor",
              "can't convert meta device type tensor")


def run_on_meta(function, *args):
    """function(*args) under OneDevice, its arguments on the meta device; None where the code reads
    a value on the host (.item(), .tolist(), int(tensor), .cpu()), which a meta tensor cannot give:
    such code is graded by the other tests alone."""
    try:
        with OneDevice():
            return function(*args)
    except (RuntimeError, NotImplementedError, TypeError) as error:
        if any(text in str(error) for text in HOST_READS):
            return None
        raise
