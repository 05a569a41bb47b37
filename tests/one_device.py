"""A device check that runs on a CPU-only machine, without a second device. Inside
`with PretendDevice(*roots):` the tensors reached from `roots` (the inputs, the model's parameters
and buffers) count as lying on "the device", and so does every result of an operation on them or of
a factory asked for a device (torch.zeros(n, device=x.device), x.new_zeros, torch.zeros_like(x)).
A tensor that a factory makes with no device (torch.arange(n), torch.tensor(values)) counts as lying
on the CPU. An operation that takes tensors of both kinds raises AssertionError, as it would on a
GPU: a 0-dim CPU tensor may join any device, as on CUDA, and a copy from one to the other
(x[...] = y, copy_, .to) is allowed. An exercise's grading thus catches a tensor made on the CPU
beside the model's device, which a test on a CPU alone would never see."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

MARK = "_on_the_device"
COPIES = {"__setitem__", "copy_"}            # may take both kinds; their result keeps its own place
TO_THE_HOST = {"cpu", "numpy", "tolist", "item"}
DEVICE_NAMES = {"cpu", "cuda", "mps", "meta"}


def tensors(tree):
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def on_the_device(tensor):
    """Whether `tensor` counts as lying on the device (see PretendDevice)."""
    return getattr(tensor, MARK, False)


def mark(tree):
    for tensor in tensors(tree):
        setattr(tensor, MARK, True)


def asks_for_a_device(args, kwargs):
    return kwargs.get("device") is not None or any(
        isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in DEVICE_NAMES)
        for a in args)


class PretendDevice(TorchFunctionMode):
    """See the module's docstring. roots: tensors, or modules (their parameters and buffers)."""

    def __init__(self, *roots):
        super().__init__()
        for root in roots:
            mark([*root.parameters(), *root.buffers()] if isinstance(root, torch.nn.Module)
                 else root)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        given = tensors((args, kwargs))
        cpu = [t for t in given if not on_the_device(t) and t.dim() > 0]
        if name not in COPIES and cpu and len(cpu) < len(given) and any(map(on_the_device, given)):
            raise AssertionError(f"{name} takes a tensor made on the CPU (shape "
                                 f"{tuple(cpu[0].shape)}) beside the device's: make it with "
                                 f"device=")
        out = func(*args, **kwargs)
        if name not in COPIES and name not in TO_THE_HOST and (
                any(map(on_the_device, given)) or asks_for_a_device(args, kwargs)):
            mark(out)
        return out
