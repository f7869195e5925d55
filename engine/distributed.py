"""Process-group set-up that works under the DeepSpeed launcher, torchrun, ``srun`` without a launcher, or
plain ``python``."""
from __future__ import annotations

import atexit
import ctypes
import os
import socket
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from engine.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_NEEDED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST")


class LaunchError(ConfigError):
    """The environment does not say which rank this process is; the message names the variable to set."""


def slurm_environment(environ=None) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from what ``srun`` sets for each task:
    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first host of SLURM_NODELIST (parsed as submitit
    parses it: ``gpu[003-004,007]`` -> gpu003). MASTER_ADDR / MASTER_PORT already set win; the port is
    otherwise drawn from the job id (the same for every task of the job, and again after a requeue)."""
    from submitit.slurm.slurm import _parse_node_list

    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
    missing = [k for k in SLURM_NEEDED if not (nodelist if k == "SLURM_NODELIST" else env.get(k))]
    if missing:
        raise LaunchError(f"running under srun (SLURM_PROCID is set) but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: start the ranks with srun inside an "
                          f"allocation (sbatch / salloc), or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
                          f"MASTER_PORT yourself (or use the deepspeed / torchrun launcher)")
    try:
        rank, world, local = (int(env[k]) for k in SLURM_NEEDED[:3])
        master = _parse_node_list(nodelist)[0]
    except Exception as e:  # int(), or submitit's parser (its own exception class)
        raise LaunchError(f"cannot read the SLURM task layout (SLURM_PROCID={env.get('SLURM_PROCID')!r}, "
                          f"SLURM_NTASKS={env.get('SLURM_NTASKS')!r}, SLURM_LOCALID={env.get('SLURM_LOCALID')!r}, "
                          f"SLURM_NODELIST={nodelist!r}: {e}): start the ranks with srun") from None
    job = env.get("SLURM_JOB_ID", "0")
    port = 20000 + (int(job) if job.isdigit() else sum(map(ord, job))) % 40000
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
            "MASTER_ADDR": env.get("MASTER_ADDR", master), "MASTER_PORT": env.get("MASTER_PORT", str(port))}


def launch_environment(environ=None) -> dict:
    """What this process's rendezvous variables must be: a launcher's (RANK set: deepspeed, torchrun,
    submitit), srun's SLURM_* (no launcher), or one rank on this host (plain ``python``)."""
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env:
        return slurm_environment(env)
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA).

    Under ``srun`` with no launcher the ranks come from SLURM's variables (:func:`slurm_environment`); under
    plain ``python`` there is no launcher: this sets a one-rank environment first, so DeepSpeed does not go
    looking for MPI (``mpi4py``)."""
    import deepspeed

    os.environ.update(launch_environment())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        keep_freed_memory()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if backend == "gloo":  # this rank's shared-memory all-reduce buffer goes with the process
            atexit.register(remove_shm_buffers, os.environ["MASTER_PORT"], rank=local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(environ=None, libc_name: str = "libc.so.6") -> bool:
    """CPU ranks: tell glibc to serve tensors up to 32 MiB from the heap and to keep freed memory
    (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB), the PyTorch CPU tuning guide's advice. glibc's
    defaults hand a step's freed temporaries back to the OS and page-fault them in again on the next step
    (about a third of the views' time at 64 px: ``benchmarks/data_pipeline.py``). Skipped, returning False,
    when ``IWM_MALLOC=default`` or the user set glibc's own ``MALLOC_*_THRESHOLD_`` variables (theirs win),
    or where the C library is not glibc. The cost: the process's RSS stays at its high-water mark."""
    env = os.environ if environ is None else environ
    if env.get("IWM_MALLOC", "keep") == "default" or any(k in env for k in MALLOC_ENV):
        return False
    if env.get("IWM_MALLOC", "keep") != "keep":
        raise ValueError(f"IWM_MALLOC={env['IWM_MALLOC']!r}: use keep (the default on CPU) or default")
    try:
        mallopt = ctypes.CDLL(libc_name).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def remove_shm_buffers(port, shm: str = "/dev/shm", rank: Optional[int] = None) -> List[str]:
    """Delete the shared-memory all-reduce buffers of the launch on ``port`` (only local rank ``rank``'s if
    given). DeepSpeed's CPU communication (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates one of about
    66 MB per local rank, ``deepspeed_allreduce_buffer_<uid>_<master addr>_<port>_<rank>``, and never
    unlinks it: without this every CPU launch leaves that much memory behind in /dev/shm (tmpfs: RAM).
    Unlinking at exit is safe: a mapping outlives its name."""
    prefix, removed = f"deepspeed_allreduce_buffer_{os.getuid()}_", []
    for name in os.listdir(shm) if os.path.isdir(shm) else []:
        parts = name[len(prefix):].rsplit("_", 2)
        if (name.startswith(prefix) and len(parts) == 3 and parts[1] == str(port) and parts[2].isdigit()
                and (rank is None or int(parts[2]) == rank)):
            try:
                os.unlink(os.path.join(shm, name))
            except FileNotFoundError:  # another rank of the launch removed it first
                continue
            removed.append(name)
    return removed


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value, device) -> float:
    """Sum of a number (or 0-dim tensor) over ranks, as a Python float: a host sync, for log steps only."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.item()


def is_partitioned(params) -> bool:
    """True if these are ZeRO-3 parameters (each rank holds a shard; ``p.data`` is empty outside forward)."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params):
    """A context in which every parameter of ``params`` is whole on every rank (a collective under ZeRO-3,
    read-only: changes made inside are not written back); a no-op otherwise."""
    import contextlib

    params = list(params)
    if not is_partitioned(params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
