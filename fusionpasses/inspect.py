"""``python -m fusionpasses.inspect``: compile a model with the passes and show what they did, and why not.

    python -m fusionpasses.inspect --world-size 2 --passes sequence_parallel,async_tp --out inspect_out
    python -m fusionpasses.inspect path/to/my_model.py:build --passes async_tp
    torchrun --nproc-per-node 2 -m fusionpasses.inspect --passes sequence_parallel,async_tp --compare

It compiles the reference model (:mod:`fusionpasses.models`) or a user's module with torch.compile and
the chosen passes, then prints per pass and pattern what matched and what was declined (with the
reason), how each pass changed each graph, and an op histogram before/after; it writes a
self-contained HTML report with the graphs drawn before and after each pass, plus the raw graph dumps.

Where it runs:
- by default on CPU in one process with a *fake* process group of ``--world-size`` ranks (collectives
  are traced and compiled but move no data);
- under ``torchrun`` on a real group (NCCL on GPUs, gloo on CPU), where ``--compare`` also times the
  compiled model with and without the passes on every rank.

The CPU preview: SymmetricMemory exists only on CUDA, the size thresholds keep the passes off on a
tiny model, and capability-gated decisions decline without a GPU. So on a fake process group the
command sets, unless told otherwise (``--no-preview``, or ``--set field=value``), the FusionConfig
fields in :data:`PREVIEW` that concern the enabled passes, which make them show the rewrite they
would make on a Hopper GPU. The fused ops of fusionpasses have CPU reference kernels, so such a graph
still runs; a graph calling an op with no kernel on the device (upstream ``symm_mem`` ops on CPU,
say) is compiled and not executed: that graph then runs uncompiled, so later graphs still compile.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import importlib
import importlib.util
import inspect as pyinspect
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from . import envs
from .config import FusionConfig
from .graph_svg import GraphChanges, graph_changes
from .inspection import GraphSnapshot, PassStats, format_report, snapshot, target_name
from .pass_manager import PassManager
from .passes import PASS_ORDER, FusionPass

PASS_SWITCHES: tuple[str, ...] = tuple(switch for switch, _, _ in PASS_ORDER)
PASS_ALIASES: dict[str, str] = {"sp": "sequence_parallel"}

# FusionConfig fields the CPU preview sets: value, why, and the passes the field matters to (the
# preview leaves a field alone when none of them runs, or when the user sets it with --set).
PREVIEW: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "symm_mem": ("assume", "SymmetricMemory is CUDA-only: AsyncTP shows the fused ops it would emit", ("async_tp",)),
    "async_tp_gating": ("always", "the cost model declines every GEMM of a tiny model", ("async_tp",)),
    "sp_min_tokens": (0, "SP wherever the token count divides by the world size (no GPU-family size table)",
                      ("sequence_parallel",)),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FACTORY_PARAMETERS = ("group", "world_size", "rank", "device", "dtype", "tokens")

class InspectError(Exception):
    """A usage problem the command reports in one line (bad module path, factory, pass name...)."""


# ---------------------------------------------------------------------------------------------
# What one inspection found
# ---------------------------------------------------------------------------------------------


@dataclass
class PassStep:
    """One pass applied to one graph: the graph before and after it."""

    pass_name: str
    before: GraphSnapshot
    after: GraphSnapshot
    seconds: float

    @property
    def changes(self) -> GraphChanges:
        return graph_changes(self.before.nodes, self.after.nodes)

    def text_diff(self, graph_index: int) -> str:
        return "".join(
            difflib.unified_diff(
                self.before.text.splitlines(keepends=True),
                self.after.text.splitlines(keepends=True),
                fromfile=f"graph{graph_index} before {self.pass_name}",
                tofile=f"graph{graph_index} after {self.pass_name}",
            )
        )


@dataclass
class GraphRecord:
    """One graph Inductor handed to the pass manager, before the first and after the last pass."""

    index: int
    before: GraphSnapshot
    after: GraphSnapshot
    steps: list[PassStep]
    missing_kernels: list[str]
    """Ops of the final graph with no kernel for the graph's device (e.g. symm_mem ops on CPU)."""


@dataclass
class RankTiming:
    rank: int
    baseline_ms: float | None
    passes_ms: float | None
    max_abs_diff: float | None

    @property
    def speedup(self) -> float | None:
        if self.baseline_ms is None or self.passes_ms is None:
            return None
        return self.baseline_ms / self.passes_ms


@dataclass
class InspectionResult:
    model: str
    inputs: str
    world_size: int
    rank: int
    process_group: str
    device: str
    config: FusionConfig
    preview: dict[str, str]
    """FusionConfig fields the CPU preview set, with the reason."""
    extra_passes: list[str]
    stats: list[PassStats]
    graphs: list[GraphRecord]
    executed: bool
    execution_note: str
    compile_seconds: float
    timings: list[RankTiming] = field(default_factory=list)
    timing_note: str = ""
    environment: dict[str, str] = field(default_factory=dict)

    def histogram(self) -> list[tuple[str, int, int]]:
        """(op, count before the passes, count after) over all graphs, changed ops first."""
        before: Counter[str] = Counter()
        after: Counter[str] = Counter()
        for g in self.graphs:
            before.update(g.before.op_histogram())
            after.update(g.after.op_histogram())
        rows = [(op, before[op], after[op]) for op in sorted(before.keys() | after.keys())]
        return sorted(rows, key=lambda r: (r[1] == r[2], r[0]))

    def report_table(self) -> str:
        return format_report(self.stats)


# ---------------------------------------------------------------------------------------------
# Pass manager that keeps every graph
# ---------------------------------------------------------------------------------------------


class InspectingPassManager(PassManager):
    """A PassManager that also records each graph before and after the whole pipeline, and can
    append passes from outside the package (``--extra-pass``) after the built-in ones."""

    def __init__(self, config: FusionConfig, extra_passes: Sequence[type[FusionPass]] = ()) -> None:
        super().__init__(config)
        for cls in extra_passes:
            extra = cls(self.config, dump_dir=self.config.dump_dir or envs.dump_dir())
            reason = extra.disabled_reason()
            if reason is not None:
                self._disabled[extra.name] = reason
                extra.note(f"pass off: {reason}")
            self.passes.append(extra)
        self.graphs: list[GraphRecord] = []

    def __call__(self, graph: fx.Graph) -> None:
        seen = {id(p): len(p.stats.runs) for p in self.passes}
        before = snapshot(graph)
        super().__call__(graph)
        steps = [
            PassStep(p.name, run.before, run.after, run.seconds)
            for p in self.passes
            for run in p.stats.runs[seen[id(p)]:]
            if run.before is not None and run.after is not None
        ]
        self.graphs.append(GraphRecord(len(self.graphs), before, snapshot(graph), steps, _missing_kernels(graph)))


def _missing_kernels(graph: fx.Graph) -> list[str]:
    """Ops Inductor will call as extern kernels that have no kernel for the device of their inputs."""
    missing: set[str] = set()
    for node in graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op.namespace in ("aten", "prims"):
            continue
        devices = {v.device.type for a in node.all_input_nodes if isinstance(v := a.meta.get("val"), torch.Tensor)}
        for device in devices:
            keys = [{"cpu": "CPU", "cuda": "CUDA"}.get(device, device.upper())]
            keys += ["CompositeExplicitAutograd", "CompositeImplicitAutograd"]
            if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k) for k in keys):
                missing.add(f"{target_name(op)} ({device})")
    return sorted(missing)


# ---------------------------------------------------------------------------------------------
# Command-line pieces
# ---------------------------------------------------------------------------------------------


def parse_passes(spec: str) -> tuple[str, ...]:
    """``"sp,async_tp"`` -> ("sequence_parallel", "async_tp"); "none" and "all" work too."""
    names = [s.strip().lower().replace("-", "_") for s in spec.split(",") if s.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        return tuple(s for s in PASS_SWITCHES if pass_available(s))
    chosen = []
    for name in names:
        switch = PASS_ALIASES.get(name, name)
        if switch not in PASS_SWITCHES:
            raise InspectError(f"unknown pass {name!r}; passes are {', '.join(PASS_SWITCHES)} (aliases: sp), all, none")
        if not pass_available(switch):
            raise InspectError(f"pass {switch!r} is not part of this installation (no module fusionpasses.passes.{switch})")
        chosen.append(switch)
    return tuple(s for s in PASS_SWITCHES if s in chosen)


def pass_available(switch: str) -> bool:
    module = next(m for s, m, _ in PASS_ORDER if s == switch)
    return importlib.util.find_spec(f"fusionpasses.passes.{module}") is not None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["symm_mem=off", "token_range=(1, 8192)"]`` -> FusionConfig field values."""
    fields = {f.name for f in dataclasses.fields(FusionConfig)}
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise InspectError(f"--set expects field=value, got {item!r}")
        if key not in fields:
            raise InspectError(f"--set: FusionConfig has no field {key!r}; fields: {', '.join(sorted(fields))}")
        if key == "sp_thresholds":
            raise InspectError("--set cannot build sp_thresholds; use sp_min_tokens, or pass a FusionConfig from Python")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: the string fields (symm_mem=off, async_tp_gating=always)
        overrides[key] = value
    return overrides


def build_config(passes: Sequence[str], overrides: dict[str, Any], preview: bool) -> tuple[FusionConfig, dict[str, str]]:
    """The FusionConfig to compile with, and the preview fields that were applied (field -> reason)."""
    fields: dict[str, Any] = {switch: switch in passes for switch in PASS_SWITCHES}
    applied: dict[str, str] = {}
    if preview:
        for name, (value, reason, concerns) in PREVIEW.items():
            if name not in overrides and any(p in passes for p in concerns):
                fields[name] = value
                applied[name] = reason
    fields.update(overrides)
    fields["record_graphs"] = True
    try:
        return FusionConfig(**fields), applied
    except (TypeError, ValueError) as e:
        raise InspectError(f"invalid FusionConfig: {e}") from e


def load_object(spec: str, what: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` -> the object, with clear errors."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise InspectError(f"{what} must be given as path/to/file.py:name or package.module:name, got {spec!r}")
    if location.endswith(".py") or os.sep in location or "/" in location:
        path = Path(location).expanduser()
        if not path.is_file():
            raise InspectError(f"{what}: no such file: {path}")
        # One module per file: loading it again (a second inspection in one process) must not re-run
        # its registrations (custom ops, for instance).
        module_name = f"_fusionpasses_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
        if module_name in sys.modules:
            return _attribute(sys.modules[module_name], location, name, what)
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise InspectError(f"{what}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise InspectError(f"{what}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as e:
            raise InspectError(f"{what}: cannot import module {location!r}: {e}") from e
    return _attribute(module, location, name, what)


def _attribute(module: Any, location: str, name: str, what: str) -> Any:
    if not hasattr(module, name):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise InspectError(f"{what}: {location} has no attribute {name!r}; callables there: {', '.join(public) or 'none'}")
    return getattr(module, name)


def call_factory(factory: Any, spec: str, **context: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """Call a user factory with the keyword arguments it asks for; returns (model, example inputs)."""
    params = pyinspect.signature(factory).parameters
    unknown = [
        n for n, p in params.items()
        if n not in context and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if unknown:
        raise InspectError(
            f"{spec}: the factory asks for {', '.join(unknown)}; it may take any of {', '.join(FACTORY_PARAMETERS)}"
        )
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    result = factory(**{k: v for k, v in context.items() if takes_all or k in params})
    if not (isinstance(result, tuple) and len(result) == 2 and callable(result[0])):
        raise InspectError(f"{spec}: the factory must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs:
        raise InspectError(f"{spec}: the factory returned no example inputs")
    return model, inputs


def load_extra_pass(spec: str) -> type[FusionPass]:
    cls = load_object(spec, "--extra-pass")
    if not (isinstance(cls, type) and issubclass(cls, FusionPass)):
        raise InspectError(f"--extra-pass {spec}: expected a FusionPass subclass, got {cls!r}")
    return cls


# ---------------------------------------------------------------------------------------------
# Process group, compile, run, time
# ---------------------------------------------------------------------------------------------


@dataclass
class GroupInfo:
    kind: str
    group: dist.ProcessGroup
    rank: int
    world_size: int


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


@contextlib.contextmanager
def process_group(world_size: int, device: torch.device) -> Iterator[GroupInfo]:
    """The WORLD group: an existing one, torchrun's (NCCL on CUDA, gloo on CPU), else a fake one."""
    created = False
    if not dist.is_initialized():
        if under_torchrun():
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        else:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        created = True
    try:
        group = dist.group.WORLD
        yield GroupInfo(str(dist.get_backend(group)), group, dist.get_rank(group), dist.get_world_size(group))
    finally:
        if created:
            dist.destroy_process_group()


class _InspectBackend:
    """A torch.compile backend: Inductor with the pass manager installed, FX graph cache off.

    A compiled graph that cannot run here is replaced by the uncompiled graph (eager), so that the
    graphs after it still get compiled and inspected: one that calls an op with no kernel on the
    device (upstream ``symm_mem`` ops on CPU, say), or every graph when ``cannot_run`` says why (a
    fake process group on CUDA, where fused collective ops would try to reach peers that don't exist).
    """

    def __init__(self, pass_manager: InspectingPassManager | None, progress: Callable[[str], None],
                 cannot_run: str | None = None) -> None:
        self.pass_manager = pass_manager
        self.progress = progress
        self.cannot_run = cannot_run
        self.fallbacks: list[str] = []
        self.graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        index = self.graphs
        self.graphs += 1
        start = time.perf_counter()
        self.progress(f"  Dynamo graph {index}: {len(gm.graph.nodes)} FX nodes, compiling with Inductor ...")
        # No FX graph cache (and so no AOTAutograd cache, which needs it): a cache hit would skip the
        # passes and leave nothing to show. Compiled kernels are still cached by their source.
        patches: dict[str, Any] = {"fx_graph_cache": False}
        recorded = 0
        if self.pass_manager is not None:
            patches["post_grad_custom_post_pass"] = self.pass_manager
            recorded = len(self.pass_manager.graphs)
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        self.progress(f"  Dynamo graph {index}: compiled in {time.perf_counter() - start:.1f} s")
        # Named like the report names them: by the pass manager's graph index.
        new_graphs = self.pass_manager.graphs[recorded:] if self.pass_manager is not None else []
        reasons = [f"graph {g.index} calls {', '.join(g.missing_kernels)}, with no kernel here"
                   for g in new_graphs if g.missing_kernels]
        if not reasons and self.cannot_run:
            reasons = [f"graph {', '.join(str(g.index) for g in new_graphs) or index}: {self.cannot_run}"]
        if not reasons:
            return compiled
        self.fallbacks += reasons
        return gm.forward


def compile_model(model: Callable[..., Any], backend: _InspectBackend, dynamic: bool | None) -> Callable[..., Any]:
    torch._dynamo.reset()  # a fresh Dynamo cache, so the graphs are compiled (and recorded) again
    return torch.compile(model, backend=backend, dynamic=dynamic)


def time_forward(fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn(*inputs)`` over ``iters`` calls (CUDA events on GPUs).

    Every rank makes the same number of calls (no adaptive repeat count as in do_bench), because each
    call runs collectives that all ranks must join.
    """
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        if dist.is_initialized():
            dist.barrier()
        samples = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in events:
                start.record()
                fn(*inputs)
                end.record()
            torch.cuda.synchronize(device)
            samples = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn(*inputs)
                samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return next((t for t in (_first_tensor(o) for o in out) if t is not None), None)
    return None


def _describe(values: Sequence[Any]) -> str:
    return ", ".join(
        f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        for v in values
    )


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "command": " ".join(["python -m fusionpasses.inspect", *sys.argv[1:]]),
    }
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    return env


# ---------------------------------------------------------------------------------------------
# The inspection
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusionpasses.inspect",
        description="Compile a model with fusionpasses and show what each pass matched, declined and rewrote.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", nargs="?", default="reference",
                   help="'reference' (the TP Llama-style model) or path/to/file.py:factory; the factory may take "
                        f"keyword arguments {', '.join(FACTORY_PARAMETERS)} and returns (model, example_inputs)")
    p.add_argument("--passes", default="sequence_parallel,async_tp",
                   help=f"comma-separated FusionConfig switches ({', '.join(PASS_SWITCHES)}; sp = sequence_parallel), "
                        "'all' (every pass this installation has) or 'none'")
    p.add_argument("--extra-pass", action="append", default=[], metavar="FILE.py:Class",
                   help="also run this FusionPass subclass after the built-in passes (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="set a FusionConfig field, e.g. --set async_tp_gating=cost_model (repeatable)")
    preview = p.add_mutually_exclusive_group()
    preview.add_argument("--preview", dest="preview", action="store_true", default=None,
                         help="apply the CPU preview fields (default on a fake process group)")
    preview.add_argument("--no-preview", dest="preview", action="store_false",
                         help="the passes' own decisions: on CPU, AsyncTP then declines for lack of SymmetricMemory")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the fake process group (ignored under torchrun)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda under torchrun when CUDA is available, else cpu")
    p.add_argument("--tokens", type=int, default=64, help="tokens (rows) of the reference model's input")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (symbolic token count)")
    m = p.add_argument_group("reference model")
    m.add_argument("--linear", choices=("bf16", "scaled_mm", "bmm_fp8"), default="bf16",
                   help="GEMM of every linear: bf16 F.linear, FP8 torch._scaled_mm, or FP8 fusionpasses.bmm_fp8")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--intermediate-size", type=int, default=512)
    m.add_argument("--num-heads", type=int, default=8)
    m.add_argument("--num-kv-heads", type=int, default=4)
    m.add_argument("--layers", type=int, default=2)
    t = p.add_argument_group("timing")
    t.add_argument("--compare", action="store_true", default=None,
                   help="also compile without the passes; time both on every rank and compare outputs "
                        "(default on under torchrun)")
    t.add_argument("--iters", type=int, default=30)
    t.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="inspect_out", help="directory for report.html, summary.json and graphs/")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log every pass decision (logger fusionpasses)")
    return p


ModelBuilder = Callable[[GroupInfo, torch.device], tuple[str, Callable[..., Any], tuple[Any, ...]]]


def model_builder(args: argparse.Namespace) -> ModelBuilder:
    """Check the model argument before any process group exists; build it once one does."""
    if args.model != "reference":
        factory = load_object(args.model, "model factory")
        if not callable(factory):
            raise InspectError(f"{args.model}: {type(factory).__name__} object is not callable")

        def build_user_model(group: GroupInfo, device: torch.device) -> tuple[str, Callable[..., Any], tuple[Any, ...]]:
            model, inputs = call_factory(
                factory, args.model, group=group.group, world_size=group.world_size, rank=group.rank, device=device,
                dtype=DTYPES[args.dtype], tokens=args.tokens,
            )
            return f"{args.model} -> {type(model).__name__}", model, inputs

        return build_user_model

    from .models import TPModelConfig, TPTransformer, example_input

    try:
        cfg = TPModelConfig(
            hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads, num_layers=args.layers, linear=args.linear, dtype=DTYPES[args.dtype],
        )
    except ValueError as e:
        raise InspectError(f"reference model: {e}") from e

    def build_reference(group: GroupInfo, device: torch.device) -> tuple[str, Callable[..., Any], tuple[Any, ...]]:
        try:
            model = TPTransformer(cfg, group.group, device)
        except ValueError as e:
            raise InspectError(f"reference model: {e}") from e
        desc = (
            f"TPTransformer(hidden={cfg.hidden_size}, intermediate={cfg.intermediate_size}, heads={cfg.num_heads}/"
            f"{cfg.num_kv_heads} kv, layers={cfg.num_layers}, linear={cfg.linear}, dtype={args.dtype})"
        )
        return desc, model, (example_input(cfg, args.tokens, device),)

    return build_reference


def run_inspection(args: argparse.Namespace, progress: Callable[[str], None]) -> InspectionResult:
    passes = parse_passes(args.passes)
    extra = [load_extra_pass(spec) for spec in args.extra_pass]
    overrides = parse_overrides(args.overrides)
    build_model = model_builder(args)
    if args.world_size < 1:
        raise InspectError(f"--world-size must be >= 1, got {args.world_size}")
    distributed = under_torchrun() or dist.is_initialized()
    device = torch.device(args.device or ("cuda" if distributed and torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InspectError("--device cuda: no CUDA device on this machine")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)

    # On CPU, Inductor's pool of compile workers would take the cores the timed runs need (and
    # starting it costs more than it saves on a small CI machine): compile in this process instead.
    scope = torch._inductor.config.patch(compile_threads=1) if device.type == "cpu" else contextlib.nullcontext()
    with scope, process_group(args.world_size, device) as group:
        preview = args.preview if args.preview is not None else group.kind == "fake"
        config, applied = build_config(passes, overrides, preview)
        compare = args.compare if args.compare is not None else group.kind != "fake"
        cannot_run = None
        if group.kind == "fake" and device.type == "cuda":
            cannot_run = "a fake process group on CUDA: compiled for the GPU, not executed"

        progress(f"[1/3] building {args.model} on {device} (world size {group.world_size}, {group.kind} process group)")
        desc, model, inputs = build_model(group, device)
        pass_manager = InspectingPassManager(config, extra)
        backend = _InspectBackend(pass_manager, progress, cannot_run)
        progress(f"[2/3] compiling with passes: {', '.join(p.name for p in pass_manager.passes) or 'none'}")
        start = time.perf_counter()
        compiled = compile_model(model, backend, True if args.dynamic else None)
        with torch.no_grad():
            out = compiled(*inputs)
        compile_seconds = time.perf_counter() - start
        executed = not backend.fallbacks
        if executed:
            first = _first_tensor(out)
            note = f"compiled model ran: output {_describe([first]) if first is not None else type(out).__name__}"
            if group.kind == "fake":
                note += " (fake process group: collectives moved no data)"
        else:
            note = (
                "compiled, not executed: " + "; ".join(backend.fallbacks)
                + ". Those graphs ran uncompiled, so the rest of the model still compiled."
            )

        result = InspectionResult(
            model=desc, inputs=_describe(inputs), world_size=group.world_size, rank=group.rank,
            process_group=group.kind, device=str(device), config=config, preview=applied,
            extra_passes=list(args.extra_pass), stats=pass_manager.stats(), graphs=pass_manager.graphs,
            executed=executed, execution_note=note, compile_seconds=compile_seconds, environment=environment(device),
        )
        if compare:
            progress(f"[3/3] timing with and without the passes ({args.iters} iterations per rank)")
            _compare(result, model, inputs, compiled, out, args, device, group, progress)
        else:
            progress("[3/3] no timing (pass --compare, or run under torchrun)")
    return result


def _compare(
    result: InspectionResult, model: Callable[..., Any], inputs: tuple[Any, ...], compiled: Callable[..., Any],
    out: Any, args: argparse.Namespace, device: torch.device, group: GroupInfo, progress: Callable[[str], None],
) -> None:
    """Time the compiled model with the passes, then compiled without them, on every rank."""
    notes = []
    passes_ms = None
    if result.executed:
        passes_ms = time_forward(compiled, inputs, device, args.iters, args.warmup)
    else:
        notes.append("the model with passes cannot run here, so only the baseline is timed")
    fused_out = _first_tensor(out)
    fused_out = fused_out.detach().clone() if fused_out is not None else None
    baseline = compile_model(model, _InspectBackend(None, progress), True if args.dynamic else None)
    with torch.no_grad():
        base_out = _first_tensor(baseline(*inputs))
    baseline_ms = time_forward(baseline, inputs, device, args.iters, args.warmup)
    diff = None
    if group.kind != "fake" and result.executed and fused_out is not None and base_out is not None:
        diff = (fused_out.float() - base_out.float()).abs().max().item()
    mine = RankTiming(group.rank, baseline_ms, passes_ms, diff)
    if group.kind == "fake":
        result.timings = [mine]
        notes.append("fake process group: collectives moved no data, so these are compute-only timings")
    else:
        rows: list[Any] = [None] * group.world_size
        dist.all_gather_object(rows, dataclasses.asdict(mine), group=group.group)
        result.timings = [RankTiming(**r) for r in rows]
    result.timing_note = "; ".join(notes)


# ---------------------------------------------------------------------------------------------
# Output: the printed tables, the raw dumps, summary.json, report.html
# ---------------------------------------------------------------------------------------------


def format_summary(result: InspectionResult, out_dir: Path | None) -> str:
    """Everything the command prints, in sections headed ``== name ==`` (tests parse them)."""
    lines = [
        f"fusionpasses inspect: {result.model}",
        f"  inputs {result.inputs}; world size {result.world_size} ({result.process_group} process group, "
        f"rank {result.rank}); {result.device}; torch {result.environment.get('torch', torch.__version__)}",
        "  config: " + config_line(result.config),
    ]
    if result.preview:
        lines.append("  CPU preview (turn off with --no-preview):")
        lines += [f"    {k}={getattr(result.config, k)!r}: {why}" for k, why in result.preview.items()]
    if result.extra_passes:
        lines.append(f"  extra passes: {', '.join(result.extra_passes)}")

    lines += ["", "== passes ==", result.report_table()]

    lines += ["", "== graph changes =="]
    steps = [(g.index, s) for g in result.graphs for s in g.steps]
    if not result.graphs:
        lines.append("no graph reached the pass manager")
    for index, step in steps:
        lines.append(f"graph {index}  {step.pass_name:<22} {step.changes.summary()}  ({step.seconds * 1e3:.1f} ms)")
    for g in result.graphs:
        if not g.steps:
            lines.append(f"graph {g.index}  no pass ran ({len(g.before.nodes)} nodes)")

    lines += ["", "== op histogram ==", f"{'op':<52} {'before':>6} {'after':>6}"]
    rows = result.histogram()
    changed = [r for r in rows if r[1] != r[2]]
    lines += [f"{op:<52} {b:>6} {a:>6}" for op, b, a in changed]
    lines.append(f"({len(rows) - len(changed)} other ops unchanged)" if changed else f"(no op count changed; {len(rows)} ops)")

    lines += ["", "== execution ==", result.execution_note]
    if result.timings:
        lines += ["", "== timings ==", f"{'rank':>4} {'no passes ms':>13} {'passes ms':>10} {'speedup':>8} {'max|diff|':>10}"]
        for t in result.timings:
            lines.append(
                f"{t.rank:>4} {_fmt(t.baseline_ms, '.3f'):>13} {_fmt(t.passes_ms, '.3f'):>10} "
                f"{_fmt(t.speedup, '.2f', 'x'):>8} {_fmt(t.max_abs_diff, '.3g'):>10}"
            )
        if result.timing_note:
            lines.append(f"note: {result.timing_note}")
    if out_dir is not None:
        lines += ["", "== files ==", f"report: {out_dir / 'report.html'}", f"raw graphs: {out_dir / 'graphs'}/"]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def config_line(config: FusionConfig) -> str:
    """The fields that differ from FusionConfig(), except record_graphs (always on here)."""
    fields = non_default_fields(config)
    fields.pop("record_graphs", None)
    return ", ".join(f"{k}={v!r}" for k, v in fields.items()) or "defaults (no pass enabled)"


def non_default_fields(config: FusionConfig) -> dict[str, Any]:
    default = FusionConfig()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(FusionConfig)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def write_dumps(result: InspectionResult, directory: Path) -> list[Path]:
    """graphN.0.input.txt, graphN.K.<pass>.txt after each pass, and graphN.K.<pass>.diff."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for g in result.graphs:
        path = directory / f"graph{g.index}.0.input.txt"
        path.write_text(g.before.text)
        written.append(path)
        for k, step in enumerate(g.steps, start=1):
            after = directory / f"graph{g.index}.{k}.{step.pass_name}.txt"
            after.write_text(step.after.text)
            diff = directory / f"graph{g.index}.{k}.{step.pass_name}.diff"
            diff.write_text(step.text_diff(g.index))
            written += [after, diff]
    return written


def summary_json(result: InspectionResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "inputs": result.inputs,
        "world_size": result.world_size,
        "process_group": result.process_group,
        "device": result.device,
        "config": json.loads(result.config.fingerprint()),
        "preview": result.preview,
        "passes": [
            {
                "name": s.name,
                "seconds": s.seconds,
                "notes": list(s.notes),
                "patterns": {
                    name: {"matched": p.matched, "declined": [dataclasses.asdict(d) for d in p.declined]}
                    for name, p in sorted(s.patterns.items())
                },
            }
            for s in result.stats
        ],
        "graphs": [
            {
                "index": g.index,
                "nodes_before": len(g.before.nodes),
                "nodes_after": len(g.after.nodes),
                "missing_kernels": g.missing_kernels,
                "steps": [
                    {"pass": s.pass_name, "added": sorted(s.changes.added), "removed": sorted(s.changes.removed),
                     "rewired": sorted(s.changes.rewired), "seconds": s.seconds}
                    for s in g.steps
                ],
            }
            for g in result.graphs
        ],
        "op_histogram": [{"op": op, "before": b, "after": a} for op, b, a in result.histogram()],
        "executed": result.executed,
        "execution_note": result.execution_note,
        "timings": [dataclasses.asdict(t) | {"speedup": t.speedup} for t in result.timings],
        "timing_note": result.timing_note,
        "environment": result.environment,
    }


def write_outputs(result: InspectionResult, out_dir: Path, table: str) -> None:
    from .report_html import render_report

    out_dir.mkdir(parents=True, exist_ok=True)
    write_dumps(result, out_dir / "graphs")
    (out_dir / "summary.txt").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary_json(result), indent=1, default=repr) + "\n")
    (out_dir / "report.html").write_text(render_report(result), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Before the process group exists only torchrun's RANK says which rank this is.
    quiet = args.quiet or int(os.environ.get("RANK", "0")) != 0
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("fusionpasses").addHandler(handler)
        logging.getLogger("fusionpasses").setLevel(logging.DEBUG)
    try:
        result = run_inspection(args, progress)
    except InspectError as e:
        print(f"fusionpasses.inspect: error: {e}", file=sys.stderr)
        return 2
    if result.rank == 0:
        out_dir = Path(args.out)
        table = format_summary(result, out_dir)
        write_outputs(result, out_dir, table)
        print(table, flush=True)
        progress(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
