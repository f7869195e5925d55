"""Ragged attention backends on the encoder's packed context tokens: time and peak memory, fwd+bwd.

    python -m benchmarks.attention_table [--quick] [--out benchmarks/results/attention.json]

Each sample keeps its own number of context tokens (the complement of the target blocks, drawn by
``engine.masks.MaskSampler`` with the recipe's mask config), packed into one sequence with per-sample lengths.
(The predictor's sequences are context + all targets = every patch, so they are not ragged.) Backends
(``kernels/attention.py``): ``xformers`` (block-diagonal mask over the packed sequence, CUDA only),
``sdpa`` (padded to the longest sample with a key-padding mask), ``dense-bias`` (SDPA over the whole
packed sequence with a materialised [T, T] block-diagonal bias: what a naive block-diagonal costs) and
``reference`` (a per-sample loop). Shapes: the encoders of the ViT-B/16 and ViT-H/14 recipes (width,
heads, patch grid and masks from their configs, see ``benchmarks/kernels_table.py``), batch 128 on CUDA
in bf16; on CPU a batch of 4 in fp32 (said in the output).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks import kernels_table as kt
from benchmarks.common import allocated_peak, attention_with_bias, block_diagonal_bias, save_json, time_fn
from kernels import attention as A


def run(quick: bool, out, device: torch.device) -> dict:
    batch = 128 if device.type == "cuda" else 4
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = ["sdpa", "dense-bias", "reference"] + (["xformers"] if A.xformers_usable() else [])
    rows = []
    if device.type != "cuda":
        print(f"CPU: batch {batch} instead of 128, fp32; xformers needs CUDA and is skipped")
    for recipe, s in kt.RECIPES.items():
        _, lens = kt.recipe_counts(recipe, batch)  # context tokens per sample, the recipe's masks
        T, H, Dh = sum(lens), s["heads"], s["enc_width"] // s["heads"]
        qkv = [torch.randn(T, H, Dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        bias = None

        def step(backend):
            nonlocal bias
            if backend == "dense-bias":
                bias = block_diagonal_bias(lens, device=device, dtype=dtype)
                out_ = attention_with_bias(*qkv, bias)
            else:
                out_ = A.ragged_attention(*qkv, lens, backend=backend)
            out_.float().sum().backward()

        for backend in backends:
            fn = lambda b=backend: step(b)  # noqa: E731
            ms = time_fn(fn, device, reps=3 if quick else 10, warmup=1)
            mib = allocated_peak(fn, device) / 2 ** 20
            rows.append(dict(recipe=recipe, backend=backend, tokens=T, max_len=max(lens), ms=ms, peak_mib=mib))
            print(f"{recipe:9s} {backend:11s} T={T:6d} max_len={max(lens):4d}  {ms:9.2f} ms  {mib:9.1f} MiB")
    result = dict(device=str(device), batch=batch, dtype=str(dtype), rows=rows)
    save_json(result, out)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    run(args.quick, args.out, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))


if __name__ == "__main__":
    main()
