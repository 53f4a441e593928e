"""Launch every op of the kernel backend on CUDA once, for compute-sanitizer:

    compute-sanitizer --tool memcheck --report-api-errors no python scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck python scripts/sanitize_kernels.py --ops nvfp4_quant

``--report-api-errors no``: NCCL probes kernel images while it initialises (``cudaErrorNoKernelImageForDevice``
from ``ncclInitKernelsForDevice``, 8 of them on H200); memcheck counts those API errors of NCCL's as errors
unless told not to. Memory errors in kernels are reported either way.

Each op runs its registered opcheck samples (small, odd shapes) moved to the GPU. The collective ops
run in a 1-rank NCCL group. Prints one line per op and exits non-zero if any call raised.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

import fusionpasses.kernels  # noqa: F401
from fusionpasses.kernels.library import registered_opcheck_samples
from fusionpasses.symm_mem import setup_symm_mem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    args = parser.parse_args()
    wanted = {f"fusionpasses::{n}" for n in args.ops.split(",") if n}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    setup_symm_mem(dist.group.WORLD)
    failed = 0
    for name, op, samples in registered_opcheck_samples():
        if wanted and name not in wanted:
            continue
        calls = 0
        try:
            for sample in samples():
                a, kw = pytree.tree_map_only(torch.Tensor, lambda t: t.cuda(), (sample.args, sample.kwargs))
                op(*a, **kw)
                calls += 1
            torch.cuda.synchronize()
            print(f"ok      {name}: {calls} calls", flush=True)
        except Exception as e:  # noqa: BLE001 - report every op, then fail
            failed += 1
            print(f"FAILED  {name} after {calls} calls: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
