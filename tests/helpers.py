"""What several test files share: the tiny configs, the subprocess environment, the eval command, the run
folder readers. Test files import from here, never from one another."""
import csv
import os
import signal
import subprocess
import sys

import torch

from engine.config import IWMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- pretraining ------------------------------------------------------------------------------------------
TINY = [  # a pretraining run of a few seconds: 32 px, a 2-block encoder and predictor, 160 embedded images
    "data.img_size=32", "data.batch_size=16", "data.num_workers=0", "data.embedded_per_class=16",
    "data.embedded_native_size=48",
    "model.encoder='custom'", "model.embed_dim=48", "model.depth=2", "model.num_heads=4", "model.patch_size=8",
    "model.predictor_depth=2", "model.predictor_width=32", "model.predictor_heads=4",
    "optim.warmup_epochs=1", "optim.lr=2e-3", "optim.start_lr=2e-4", "optim.ema=(0.99, 1.0)",
    "train.log_every=2", "train.ckpt_every=10", "train.progress=False",
    "eval.mrr_images=2", "eval.mrr_candidates=16",
]


def tiny_config(out_dir, steps, extra=()):
    """The TINY pretraining config in ``out_dir`` for ``steps`` optimizer steps, then ``extra`` overrides."""
    cfg = IWMConfig(name="test")
    for a in TINY + list(extra):
        cfg.override(a)
    cfg.train.out_dir = str(out_dir)
    cfg.optim.max_steps = steps
    return cfg.validate()


def tiny_cfg(conditioning="feature", img=32, patch=8):
    """A tiny network config for tests that build models directly (no run)."""
    cfg = IWMConfig()
    cfg.data.img_size = img
    cfg.model.encoder = "custom"
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 32, 2, 4
    cfg.model.patch_size = patch
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 2, 16, 2
    cfg.model.conditioning = conditioning
    return cfg.validate()


# ---- finetuning -------------------------------------------------------------------------------------------
FINETUNE = [  # learnable in ~100 steps at 32 px: mild crops, no mixup / RandAugment / stochastic depth
    "data.batch_size=32", "data.num_workers=0", "data.embedded_per_class=32", "data.embedded_native_size=48",
    "optim.warmup_epochs=1", "optim.lr=5e-3", "optim.start_lr=1e-4", "optim.final_lr=1e-5",
    "optim.weight_decay=0.05", "optim.final_weight_decay=0.05", "train.log_every=25", "train.ckpt_every=50",
    "train.progress=False", "finetune.mixup=0.0", "finetune.cutmix=0.0", "finetune.randaugment=''",
    "finetune.crop_scale=(0.5, 1.0)", "finetune.drop_path=0.0", "finetune.layer_decay=0.9",
]


def finetune_config(source, out, protocol, steps=100, extra=()):
    """A finetuning run of ``protocol`` from the pretraining checkpoint ``source`` in ``out``."""
    cfg = IWMConfig(name=f"ft_{protocol}")
    for a in FINETUNE + [f"finetune.protocol='{protocol}'"] + list(extra):
        cfg.override(a)
    cfg.finetune.checkpoint = source
    cfg.train.out_dir = str(out)
    cfg.optim.max_steps = steps
    return cfg


# ---- processes, files -------------------------------------------------------------------------------------
def subprocess_env(**extra):
    """This environment without the one-rank variables an in-process pretrain() set (RANK, MASTER_PORT, ...):
    a child must pick its own rendezvous."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)


def deepspeed_launcher():
    """The ``deepspeed`` launcher of this interpreter's environment."""
    return os.path.join(os.path.dirname(sys.executable), "deepspeed")


def run_ranks(args, ranks: int = 2, timeout: float = 500) -> subprocess.CompletedProcess:
    """``python ARGS`` as ``ranks`` processes on this host, each given the variables a launcher sets (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port): what ``deepspeed --num_gpus N`` starts,
    without its two interpreters above the ranks (the tests of the launcher itself start it). Returns the
    worst exit code and every rank's output, rank by rank; a rank that fails ends the others 30 s later, and
    all are killed at ``timeout``."""
    import tempfile
    import time

    from engine.distributed import free_port, remove_shm_buffers

    port, procs, logs = free_port(), [], []
    base = subprocess_env()
    for r in range(ranks):
        logs.append(tempfile.TemporaryFile(mode="w+"))
        rank_env = dict(base, RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=rank_env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
    deadline, failed_at = time.time() + timeout, None
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.time()
        if failed_at is not None and time.time() > failed_at + 30:
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    remove_shm_buffers(port)  # a killed rank cannot remove its own
    text = ""
    for r, f in enumerate(logs):
        f.seek(0)
        text += f"---- rank {r} ----\n{f.read()}"
        f.close()
    codes = [p.returncode for p in procs]
    worst = next((c for c in codes if c != 0), 0)
    return subprocess.CompletedProcess(args, worst, text, "")


def pretrain_on_ranks(runs, ranks: int = 2) -> None:
    """``tests/engine/pretrain_ranks.py`` on ``ranks`` ranks (:func:`run_ranks`), each (out, steps, overrides)
    of ``runs`` in turn in the same processes; asserts they all finished."""
    args = ["tests/engine/pretrain_ranks.py"]
    for i, (out, steps, overrides) in enumerate(runs):
        args += (["--then"] if i else []) + [str(out), str(steps), *overrides]
    p = run_ranks(args, ranks)
    assert p.returncode == 0, p.stdout[-6000:]


def run_eval(*args):
    """``python -m engine.eval ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "engine.eval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env())


def eval_in_process(*args):
    """``engine.eval``'s command line called in this process (no interpreter start, no imports): the exit code
    and what it printed, as :func:`run_eval` returns them (for the bad-input cases; one real command per test
    file is enough to check the entry point)."""
    import contextlib
    import io

    from engine.cli import eval_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = eval_main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return subprocess.CompletedProcess(["engine.eval", *args], code, out.getvalue(), err.getvalue())


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return [r for r in csv.DictReader(f)]


def write_folder(root, classes=2, per_class=3, bad=True):
    """An ImageFolder of random 40 px PNGs (with a corrupt .jpg and a .txt when ``bad``)."""
    from PIL import Image

    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(d / f"{i}.png")
    if bad:
        (root / "class_0" / "corrupt.jpg").write_bytes(b"not an image at all")
        (root / "class_1" / "notes.txt").write_text("hello")
    return root


def shm_buffers(port):
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of the launch on ``port`` (66 MB of RAM per rank)."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return [n for n in names if n.startswith(prefix) and n[len(prefix):].rsplit("_", 2)[1:2] == [str(port)]]
