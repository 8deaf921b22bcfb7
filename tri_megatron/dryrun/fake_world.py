"""One rank of a large job in this process: torch's fake process group at the target world size,
megatron-core's real ``parallel_state`` on it, and every allocation on the meta device.

* ``fake_rank(rank, world, tp, pp, vpp, cp)``: a context in which ``torch.distributed`` and megatron's
  parallel state are those of ``rank`` in a ``world``-GPU job (collectives do nothing). megatron's
  gloo groups (used only to save / load distributed-optimizer state) are answered with the fake
  groups, since gloo cannot run on a fake store; ``all_gather_object`` returns this rank's object for
  every rank (a symmetric world), which is what megatron's optimizer setup gathers for. On a torch
  without meta kernels for c10d's collectives (2.6), ``_meta_collectives`` registers them.
* ``MetaAllocations``: a torch-function mode that puts every factory call (``torch.empty(...,
  device="cuda")``, ``new_zeros``, ...) on the meta device (``torch.tensor(data)``, a host constant
  megatron reads back with ``.item()``, stays where it is) and answers megatron's
  ``param.type() == "torch.cuda.BFloat16Tensor"`` checks for meta tensors; models, DDP buffers and
  optimizer shards are then built with their real shapes and dtypes and no memory.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.rand, torch.randn, torch.randint,
              torch.empty_strided, torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
              torch.linspace, torch.eye}
_NEW = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}
_CUDA_TYPES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
               torch.float16: "torch.cuda.HalfTensor"}


class MetaAllocations(TorchFunctionMode):
    """Every tensor factory allocates on the meta device (in backward functions too)."""

    _run = None
    _depth = 0

    def __enter__(self):
        import torch.autograd.graph
        from torch.overrides import _get_current_function_mode_stack

        self._depth += 1
        if self._depth == 1:
            run = self._run = torch.autograd.graph._engine_run_backward

            def run_with_mode(*args, **kwargs):  # a mode is popped while it handles .backward(): put it back
                if any(m is self for m in _get_current_function_mode_stack()):
                    return run(*args, **kwargs)
                with self:
                    return run(*args, **kwargs)

            torch.autograd.graph._engine_run_backward = torch.autograd._engine_run_backward = run_with_mode
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.autograd.graph

        out = super().__exit__(*exc)
        self._depth -= 1
        if self._depth == 0:
            torch.autograd.graph._engine_run_backward = torch.autograd._engine_run_backward = self._run
            self._run = None
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].device.type == "meta":
            return _CUDA_TYPES.get(args[0].dtype, "torch.cuda.meta")
        if func in _FACTORIES or getattr(func, "__name__", "") in _NEW:
            kwargs["device"] = "meta"
            kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


def _symmetric_all_gather_object(object_list, obj, group=None):
    for i in range(len(object_list)):
        object_list[i] = obj


# c10d's collectives the model build and the meta forward / backward may run (megatron DDP's parameter
# broadcast, sequence parallelism's gather / reduce-scatter, TP all-reduces)
_C10D_OPS = ("broadcast_", "allreduce_", "allgather_", "_allgather_base_", "reduce_scatter_", "_reduce_scatter_base_",
             "reduce_", "alltoall_base_")


@contextlib.contextmanager
def _meta_collectives(dist):
    """Collectives on meta tensors do what the fake group does for real ones: nothing. Torch 2.11 / 2.13
    register meta kernels for c10d's ops; torch 2.6 has none (DDP's broadcast of its meta buffers raised
    NotImplementedError), so there each op gets one for this context, which hands the call to the op's
    CPU kernel: the fake group's collective, which never reads the tensors."""
    try:
        dist.broadcast(torch.empty(1, device="meta"), 0)
        native = True
    except NotImplementedError:
        native = False
    if native:
        yield
        return
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    lib = torch.library.Library("c10d", "IMPL")

    def to_cpu_kernel(op):
        def meta(*args):
            return op.redispatch(cpu, *args)
        return meta

    for name in _C10D_OPS:
        if hasattr(torch.ops.c10d, name):
            lib.impl(name, to_cpu_kernel(getattr(torch.ops.c10d, name).default), "Meta")
    try:
        yield
    finally:
        lib._destroy()


@contextlib.contextmanager
def fake_rank(rank: int, world: int, tp: int, pp: int, vpp, cp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tri_megatron import compat
    from tri_megatron.mcore_internals import gloo_groups_as_main

    if dist.is_initialized():
        raise RuntimeError("the dry run needs a process without a process group")
    compat.activate()  # megatron's torch.cuda calls on a host without CUDA
    saved_all_gather_object = dist.all_gather_object
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(tp, pp, vpp if vpp and vpp > 1 else None, context_parallel_size=cp,
                                     create_gloo_process_groups=False)
        dist.all_gather_object = _symmetric_all_gather_object
        with gloo_groups_as_main(), _meta_collectives(dist):  # the first: the seam in mcore_internals
            model_parallel_cuda_manual_seed(1234)
            yield
    finally:
        dist.all_gather_object = saved_all_gather_object
        ps.destroy_model_parallel()
        dist.destroy_process_group()
