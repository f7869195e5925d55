"""Test set-up shared by every tier.

Triton's interpreter must be switched on before ``triton`` is first imported, so it is set here, at the
very top: on this CPU-only machine the Triton kernels then run (slowly, one program at a time) on CPU
tensors and can be compared with their PyTorch references.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
