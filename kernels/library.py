"""The one op namespace of the kernel backend, input checks, and the opcheck registry.

Every kernel of the backend is a real torch op, ``torch.ops.fusionpasses.<name>``, defined with
``torch.library.custom_op`` in the kernel's own file, next to its launcher, its fake impl and its
plain-PyTorch reference (registered as the CPU kernel). Graph passes match and emit these ops, so
their schemas are the contract between ``fusionpasses/`` and ``kernels/``.

Conventions for a kernel file ``kernels/<op>.py``:

- ``reference_<op>(...)``: plain PyTorch, device-agnostic, the definition of the op's result.
- ``@torch.library.custom_op(op_name("<op>"), mutates_args=..., device_types="cuda")``: the fast path.
- ``<op>.register_kernel("cpu")``: the reference (so gloo tests and CPU inspection run the op).
- ``<op>.register_fake``: shapes only, symbolic-size safe (no ``int()`` of sizes, no data-dependent checks).
- ``@opcheck_samples(<op>)``: a generator of small CPU sample inputs that ``tests/test_opcheck.py`` feeds
  to ``torch.library.opcheck``. It is called inside a 1-rank gloo process group (the WORLD group), so
  collective ops can name ``dist.group.WORLD.group_name``.
- Input validation through :func:`check` and friends, so every error names the op and the argument.
- Buffers an op keeps between calls (workspaces, constants) come from :func:`cached_buffer`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")
K = TypeVar("K")

NAMESPACE = "fusionpasses"

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def op_name(name: str) -> str:
    """Qualified name for ``torch.library.custom_op``: ``fusionpasses::<name>``."""
    return f"{NAMESPACE}::{name}"


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, interpreted: int) -> int:
    """SMs of the CUDA device that launch grids are sized for (cached: launchers ask on every call);
    ``interpreted`` for tensors on the CPU, under Triton's interpreter."""
    if device.type != "cuda":
        return interpreted
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


class KernelInputError(ValueError):
    """A fused op was called with arguments it does not support (dtype, layout, shape, divisibility)."""


def outside_graph_pools(make: Callable[[], T], device: torch.device | int | None = None) -> T:
    """Run ``make`` on a helper thread and wait for its GPU work: for buffers an op keeps between calls.

    While Inductor's CUDA graph trees warm a graph up, every allocation of the calling thread lands
    in the graph's memory pool, and a cached buffer found there fails the warm-up check ("tensor(s)
    in the cudagraph pool not tracked as outputs"); a later replay could also reuse its memory. The
    pool is chosen per thread, so a helper thread allocates from the ordinary caching allocator.
    Not for use while the caller's stream is capturing (allocate per call then).
    """
    device = torch.cuda.current_device() if device is None else device
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            torch.cuda.set_device(device)
            result.append(make())
            torch.cuda.current_stream().synchronize()  # the caller's streams may not wait for this one
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            failure.append(e)

    thread = threading.Thread(target=run, name="fusionpasses-outside-graph-pools")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def cached_buffer(
    cache: dict[K, torch.Tensor], key: K, make: Callable[[], torch.Tensor], device: torch.device
) -> torch.Tensor:
    """``cache[key]``, made by ``make`` on first use, outside CUDA graph pools. A buffer missing during
    a capture is made for that call only and belongs to the graph, like its other temporaries."""
    buffer = cache.get(key)
    if buffer is None:
        if device.type != "cuda":
            buffer = cache[key] = make()
        elif torch.cuda.is_current_stream_capturing():
            return make()
        else:
            buffer = cache[key] = outside_graph_pools(make, device)
    return buffer


def check(condition: bool, op: str, message: str) -> None:
    """Raise :class:`KernelInputError` naming ``op`` when ``condition`` is false."""
    if not condition:
        raise KernelInputError(f"fusionpasses.{op}: {message}")


def check_dtype(t: torch.Tensor, op: str, arg: str, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    check(
        t.dtype in allowed,
        op,
        f"{arg} must have dtype in {[str(d).removeprefix('torch.') for d in allowed]}, got {t.dtype}",
    )


def check_ndim(t: torch.Tensor, op: str, arg: str, ndim: int) -> None:
    check(t.dim() == ndim, op, f"{arg} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_contiguous(t: torch.Tensor, op: str, arg: str) -> None:
    check(t.is_contiguous(), op, f"{arg} must be contiguous (row-major), got strides {t.stride()}")


def check_column_major(t: torch.Tensor, op: str, arg: str) -> None:
    """A 2-D (K, N) operand stored as the transpose of a contiguous (N, K) tensor."""
    check(
        t.dim() == 2 and t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0]),
        op,
        f"{arg} must be column-major (the .t() of a contiguous (N, K) weight), got shape "
        f"{tuple(t.shape)} and strides {t.stride()}",
    )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    check(len(set(devices.values())) <= 1, op, f"all tensors must be on one device, got {devices}")


def check_tensorwise_scale(t: torch.Tensor, op: str, arg: str) -> None:
    check(t.dtype == torch.float32, op, f"{arg} must be float32, got {t.dtype}")
    check(t.numel() == 1, op, f"{arg} must be a tensor-wise scale with one element, got shape {tuple(t.shape)}")


def check_divisible(value: int, divisor: int, op: str, what: str) -> None:
    check(value % divisor == 0, op, f"{what} ({value}) must be divisible by {divisor}")


# ---------------------------------------------------------------------------------------------
# opcheck registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSample:
    """One call of an op for ``torch.library.opcheck``: positional args and kwargs, CPU tensors."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str = ""


_OPCHECK_SAMPLES: dict[str, tuple[Any, Callable[[], Iterator[OpSample]]]] = {}


def opcheck_samples(op: Any) -> Callable[[Callable[[], Iterable[OpSample]]], Callable[[], Iterable[OpSample]]]:
    """Register a generator of sample inputs for ``op`` (a custom op object or an OpOverload)."""

    def register(fn: Callable[[], Iterable[OpSample]]) -> Callable[[], Iterable[OpSample]]:
        key = _op_key(op)
        if key in _OPCHECK_SAMPLES:
            raise RuntimeError(f"opcheck samples for {key} registered twice")
        _OPCHECK_SAMPLES[key] = (op, fn)
        return fn

    return register


def registered_opcheck_samples() -> Sequence[tuple[str, Any, Callable[[], Iterable[OpSample]]]]:
    """(qualified name, op, sample generator) for every op that registered samples."""
    return [(key, op, fn) for key, (op, fn) in sorted(_OPCHECK_SAMPLES.items())]


def _op_key(op: Any) -> str:
    # custom_op objects expose `_qualname`; OpOverload/OpOverloadPacket expose `name()`/`_qualified_op_name`.
    for attr in ("_qualname", "_qualified_op_name"):
        if hasattr(op, attr):
            return str(getattr(op, attr))
    return str(op.name())
