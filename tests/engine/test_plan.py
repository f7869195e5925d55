"""engine.plan: the memory / time formulas against hand arithmetic, the saved activations against what
autograd really saves, the whole estimate against a measured CPU peak, and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.config import ConfigError, IWMConfig
from engine.models import IWM
from engine.cli import plan_main
from engine.plan import (GPUS, PRECISIONS, TokenStats, activation_layers, block_params, block_saved_bytes,
                         comm_bytes, link_bandwidth, load_recipe, memory_plan, param_counts, param_tensors,
                         persistent_bytes, reuse_kept_elements, stage3_gathered, time_plan)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FP32 = PRECISIONS["fp32"]


def tiny_config(conditioning="none") -> IWMConfig:
    cfg = IWMConfig()
    cfg.data.img_size, cfg.data.batch_size = 8, 2
    cfg.model.encoder, cfg.model.patch_size = "custom", 4  # 2 x 2 patches
    cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads = 8, 1, 2
    cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.predictor_heads = 1, 8, 2
    cfg.model.conditioning = conditioning
    return cfg.validate()


def test_block_params_by_hand():
    # qkv 8*24 + 24, proj 8*8 + 8, fc1 8*32 + 32, fc2 32*8 + 8, two layer norms 2*(8 + 8)
    assert block_params(8, 4.0) == (192 + 24) + (64 + 8) + (256 + 32) + (256 + 8) + 32 == 872


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
def test_param_counts_match_the_model(conditioning):
    cfg = tiny_config(conditioning)
    with torch.device("meta"):
        model = IWM(cfg)
    counts = param_counts(cfg)
    assert counts["encoder"] == sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert counts["predictor"] == sum(p.numel() for p in model.predictor.parameters())


def test_block_saved_bytes_by_hand():
    # 10 tokens, D=8, H=2, MLP 32. fp32: residual 2*8*4, LN stats 16, LN outputs 2*8*4, qkv 3*8*4,
    # attention output 8*4, MLP hidden before/after GELU 2*32*4, log-sum-exp 2*4 -> 536 B per token
    assert block_saved_bytes(10, 8, 2, 4.0, FP32) == 10 * (64 + 16 + 64 + 96 + 32 + 256 + 8)
    # autocast: fp32 residual 2*8*4, stats 16, bf16 for the rest: 2*8*2 + 3*8*2 + 8*2 + 2*32*2, lse 8
    assert block_saved_bytes(10, 8, 2, 4.0, PRECISIONS["autocast"]) == 10 * (64 + 16 + 32 + 48 + 16 + 128 + 8)
    # padded to 12 rows (sdpa): + 12 * (4 padded copies of 8 floats + lse 2 floats) + an int64 per token
    assert block_saved_bytes(10, 8, 2, 4.0, FP32, padded_tokens=12) == \
        10 * (64 + 16 + 64 + 96 + 32 + 256) + 12 * (4 * 8 * 4 + 2 * 4) + 10 * 8
    # LN -> QKV / fc1 fused (the Triton path): the two layer-norm outputs (2*8*4) are not saved
    assert block_saved_bytes(10, 8, 2, 4.0, FP32, fused_layer_norm=True) == 10 * (64 + 16 + 96 + 32 + 256 + 8)


def test_fused_layer_norm_on_the_cuda_path_only():
    # the packed (CUDA) path runs the fused LN -> linear unless the kernels are forced to the reference;
    # the padded (CPU) path runs timm's LayerNorm + Linear, which keep the layer-norm outputs
    from engine.plan import fused_layer_norm
    cfg = IWMConfig()
    assert fused_layer_norm(cfg, "packed") and not fused_layer_norm(cfg, "padded")
    cfg.train.kernels = "reference"
    assert not fused_layer_norm(cfg, "packed")


def test_memory_plan_by_hand_tiny():
    cfg = tiny_config()
    enc = (3 * 16 * 8 + 8) + 872 + 16  # patch embed, one block, final norm (positions are fixed)
    pred = (8 * 8 + 8) + 8 + 872 + 16 + (8 * 8 + 8)  # embed, mask token, block, norm, proj
    P = enc + pred
    tok = TokenStats(4, 2.0, 2.0, 2.0, 4.0, 2)
    m0 = memory_plan(cfg, 0, 1, FP32, False, tok, "packed", overhead_bytes=0.0)
    assert m0.params == 4 * P and m0.optimizer == 8 * P and m0.ema == 4 * enc
    assert m0.master == 0 and m0.grads_full == 4 * P
    # stage 0's peak here (tiny activations): the backward's end, every gradient and DeepSpeed's flat all-reduce
    # copy of them (one bucket: P < 5e8), on one rank too
    assert m0.peak_phase == "grad_reduce" and m0.grads == 4 * P and m0.buffers == 4 * P and m0.activations == 0
    assert m0.total == pytest.approx(4 * P + 8 * P + 4 * enc + 4 * P + 4 * P)
    N = 4
    m1 = memory_plan(cfg, 1, N, FP32, False, tok, "packed", overhead_bytes=0.0)
    assert m1.params == 4 * P and m1.optimizer == 8 * P / N and m1.master == 4 * P / N
    assert m1.buffers == 5e8 * 4 and m1.ema == 4 * enc
    m3 = memory_plan(cfg, 3, N, FP32, False, tok, "packed", overhead_bytes=0.0)
    assert persistent_bytes(cfg, 3, N, FP32, P, enc)[3] == 4 * enc / N
    assert m3.master == 4 * P / N  # stage 3 clones its fp32 partition like stages 1-2
    # every trained tensor here is under the persistence threshold: replicated whole besides its partition
    assert m3.params == 4 * P / N + 4 * P and m3.grads == 4 * P / N  # + the gradient partitions, from init on
    # the target encoder is partitioned whole and gathered whole in its forward, through one flat buffer
    assert m3.peak_phase == "target_forward" and m3.ema == 4 * enc / N + 2 * 4 * enc
    # on the CPU (resident): the bucket's written pages, and the reduction's two copies of the P gradients at the
    # end of the backward (DeepSpeed's interleaved copy, gloo's clone of it)
    cpu = memory_plan(cfg, 3, N, FP32, False, tok, "packed", overhead_bytes=0.0, resident=True)
    assert cpu.peak_phase == "grad_reduce" and cpu.buffers == 4 * P + 2 * 4 * P and cpu.activations == 0
    assert m3.buffers - 5e8 * 4 == 0  # the GPU's bucket, allocated whole
    # the first step: torch's AdamW allocates its moments in its first step(), so they are not there before it
    assert cpu.first_step_total == pytest.approx(cpu.total - cpu.optimizer)
    assert m0.first_step_phase == "optimizer_step" and m0.first_step_total == pytest.approx(
        4 * P + 4 * enc + 4 * P + 8 * P)  # params + target + gradients through the step + the new moments
    # the components at the peak add up to the total
    for m in (m0, m1, m3):
        parts = m.params + m.grads + m.optimizer + m.master + m.ema + m.activations + m.buffers + m.overhead
        assert parts == pytest.approx(m.total)


def test_zero_stages_divide_by_n():
    cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_vith.py"))
    P = param_counts(cfg)["trainable"]
    tok = TokenStats(256, 130.0, 126.0, 140.0, 256.0, 256)
    N = 16
    m = {s: memory_plan(cfg, s, N, PRECISIONS["autocast"], False, tok) for s in (0, 1, 2, 3)}
    assert m[1].optimizer == m[0].optimizer / N == 8 * P / N
    assert m[2].optimizer == m[3].optimizer == m[1].optimizer
    assert m[1].params == m[2].params == 4 * P
    # ZeRO-3 with DeepSpeed's defaults: the reuse distance (1e9 elements) keeps the forward's last 5e8 elements
    # whole into the backward, plus one prefetch and one flat gather buffer: at the backward's start ViT-H/14's
    # ZeRO-3 rank holds about as many parameters as a ZeRO-1 rank (lower stage3_max_reuse_distance to change it)
    assert m[3].peak_phase == "backward" and 0.9 * 4 * P < m[3].params < 1.1 * 4 * P
    assert m[1].ema == m[2].ema == N * m[3].ema
    # gradients held through the optimizer step: full module + fp32 partition, then partitions only
    assert m[0].grads_step == 4 * P
    assert m[1].grads_step == pytest.approx(4 * P + 4 * P / N)
    assert m[2].grads_step == pytest.approx(8 * P / N)
    assert m[3].grads_step == pytest.approx(8 * P / N)  # the gradient partitions + the fp32 copy AdamW steps on


def test_activation_checkpointing_lowers_activations():
    cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_vith.py"))
    tok = TokenStats(256, 130.0, 126.0, 140.0, 256.0, 256)
    for stage in (1, 2, 3):
        off = memory_plan(cfg, stage, 16, PRECISIONS["autocast"], False, tok)
        on = memory_plan(cfg, stage, 16, PRECISIONS["autocast"], True, tok)
        assert on.activations < off.activations / 3 and on.total < off.total
        t_off = time_plan(cfg, stage, 16, GPUS["h100"], PRECISIONS["autocast"], False, tok)
        t_on = time_plan(cfg, stage, 16, GPUS["h100"], PRECISIONS["autocast"], True, tok)
        assert t_on.compute_s > t_off.compute_s  # the recomputed forward


def test_comm_and_time_by_hand():
    cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_vith.py"))
    P = param_counts(cfg)["trainable"]
    PT = param_counts(cfg)["target_encoder"]
    c1 = comm_bytes(cfg, 1, 16, PRECISIONS["autocast"])
    assert c1["grad_reduce"] == pytest.approx(15 / 16 * P * 4)
    assert c1["param_gather"] == pytest.approx(15 / 16 * P * 4)
    c3 = comm_bytes(cfg, 3, 16, PRECISIONS["autocast"])
    assert c3["param_gather"] == pytest.approx(15 / 16 * (2 * 4 * P + 4 * PT))
    assert link_bandwidth(GPUS["h100"], 16) == pytest.approx(50e9 * 0.7)  # 2 nodes: InfiniBand
    assert link_bandwidth(GPUS["h100"], 8) == pytest.approx(450e9 * 0.7)  # one node: NVLink per direction
    tok = TokenStats(256, 130.0, 126.0, 140.0, 256.0, 256)
    t = time_plan(cfg, 1, 16, GPUS["h100"], PRECISIONS["autocast"], False, tok, mfu=0.4)
    assert t.comm_s == pytest.approx(15 / 16 * P * 8 / (50e9 * 0.7))
    # compute: per-token 24 D^2 + 4 L D per block (engine/flops.py), forward+backward 3x, target 1x
    B = 128

    def vit(tokens, L, D, depth):
        return tokens * depth * (24 * D * D + 4 * L * D)

    flops = vit(B * 256, 256, 1280, 32) + 3 * (vit(B * 130, 130, 1280, 32) + vit(B * 256, 256, 384, 12))  # predictor 12x384
    assert t.compute_s == pytest.approx(flops / (989.4e12 * 0.4))
    assert t.steps_per_epoch == 1_281_167 // (16 * 128)
    assert t.epoch_s == pytest.approx(t.steps_per_epoch * t.step_s)


def test_saved_activations_match_autograd(monkeypatch):
    """The activation formula against the bytes autograd actually saves (saved_tensors_hooks), CPU sdpa."""
    from engine.masks import MaskSampler
    from kernels import dispatch
    from kernels.l2_loss import masked_l2_loss

    cfg = tiny_config("feature")
    cfg.data.img_size, cfg.data.batch_size, cfg.model.patch_size = 32, 4, 8
    cfg.model.embed_dim, cfg.model.depth, cfg.model.predictor_depth = 32, 2, 2
    torch.manual_seed(0)
    model = IWM(cfg)
    B = cfg.data.batch_size
    masks = MaskSampler(cfg.masks, 4, 4).sample(B, torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with dispatch.backend("reference", attention="sdpa"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pred = model(torch.randn(B, 3, 32, 32), masks, torch.randn(B, cfg.views.action_dim))
        masked_l2_loss(pred, torch.randn(B, 16, 32), masks.flat_target())
    c, t = masks.context_counts, masks.target_counts
    tok = TokenStats(16, sum(c) / B, sum(t) / B, max(c), max(a + b for a, b in zip(c, t)), B)
    estimate = sum(L.saved for L in activation_layers(cfg, B, tok, FP32, False, "padded"))
    assert estimate == pytest.approx(sum(saved.values()), rel=0.02)


def zero3_trace(model) -> list:
    """DeepSpeed's ZeRO-3 trace of one training step: every module in the order its forward pre-hook fires, each
    with the trainable parameters its hook fetches (its own and those registered as external), then the same
    modules in reverse order for the backward."""
    from engine.masks import MaskSampler
    from kernels import dispatch

    external = {}
    for module, param in model.external_parameters():
        external.setdefault(id(module), []).append(param)
    order = []
    handles = [m.register_forward_pre_hook(lambda mod, *_: order.append(mod)) for m in model.modules()]
    cfg = model.cfg
    B, grid = 2, cfg.data.img_size // cfg.model.patch_size
    masks = MaskSampler(cfg.masks, grid, grid).sample(B, torch.Generator().manual_seed(0))
    with dispatch.backend("reference", attention="sdpa"), torch.no_grad():
        model(torch.randn(B, 3, cfg.data.img_size, cfg.data.img_size), masks, torch.randn(B, cfg.views.action_dim))
    for h in handles:
        h.remove()
    fetched = [[p for p in list(m.parameters(recurse=False)) + external.get(id(m), []) if p.requires_grad]
               for m in order]
    return fetched + fetched[::-1]


def kept_by_release_rule(trace: list, max_reuse: int, threshold: int) -> int:
    """DeepSpeed's __params_to_release, written out: after a module's forward, its parameters above the threshold
    are released unless one of them is fetched again before max_reuse elements of fetched parameters have passed
    (counted module by module from the next one). Returns the elements still whole when the forward ends."""
    kept = 0
    for i in range(len(trace) // 2):
        candidates = {id(p): p.numel() for p in trace[i] if p.numel() > threshold}
        seen, traversed = set(), 0
        for params in trace[i + 1:]:
            if traversed >= max_reuse:
                break
            seen |= {id(p) for p in params}
            traversed += sum(p.numel() for p in params)
        kept += sum(n for k, n in candidates.items() if k in seen)
    return kept


def test_zero3_reuse_distance_keeps_what_deepspeeds_release_rule_keeps():
    cfg = tiny_config("feature")
    cfg.data.img_size, cfg.model.patch_size, cfg.model.embed_dim = 32, 8, 32
    cfg.model.depth, cfg.model.predictor_depth = 6, 6
    torch.manual_seed(0)
    model = IWM(cfg)
    model.cfg = cfg
    trace = zero3_trace(model)
    tensors = param_tensors(cfg)["encoder"] + param_tensors(cfg)["predictor"]
    total = sum(tensors)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total
    block = block_params(cfg.model.embed_dim, cfg.model.mlp_ratio)  # the rule acts per module, the plan per tensor
    for threshold in (0, 100, 1000):
        partitioned = sum(n for n in tensors if n > threshold)
        for max_reuse in (0, 1000, total // 4, total // 2, total, 3 * total // 2, 2 * total, 10 ** 9):
            plan = reuse_kept_elements(tensors, max_reuse, threshold)
            assert abs(plan - kept_by_release_rule(trace, max_reuse, threshold)) <= block, (threshold, max_reuse)
            if max_reuse == 0 or max_reuse >= 2 * total:
                assert plan == kept_by_release_rule(trace, max_reuse, threshold) == (max_reuse and partitioned)


def test_zero3_gathers_nothing_on_one_rank_and_module_by_module_in_the_first_step():
    cfg = load_recipe(os.path.join(ROOT, "recipes", "pretrain_vitb_inv.py"))
    assert stage3_gathered(cfg, 1).live == stage3_gathered(cfg, 1).target == 0  # the partition is the parameter
    first, later = stage3_gathered(cfg, 2, first_step=True), stage3_gathered(cfg, 2)
    largest = max(max(t) for t in param_tensors(cfg).values())
    assert first.live == first.buffer == largest  # the trace is recorded: no prefetch, released after each module
    P = param_counts(cfg)["trainable"]
    assert later.live > 0.99 * P  # ViT-B + 12 x 384 is far under half the reuse distance: all of it stays whole
    assert later.target == param_counts(cfg)["target_encoder"]


def test_measured_cpu_peak_within_25_percent():
    from benchmarks import plan_validation

    (row,) = plan_validation.validate([plan_validation.QUICK])
    assert 0.75 <= row["ratio"] <= 1.25, row


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "engine.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


@pytest.mark.parametrize("recipe", ["pretrain_vith", "pretrain_tiny"])
def test_cli_prints_a_table(recipe, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan_main([os.path.join(ROOT, "recipes", f"{recipe}.py"), "--gpus", "16", "--gpu-mem", "80",
               "--json", str(out), "--set", "data.batch_size=64"])
    text = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 6  # stages 1, 2, 3 x checkpointing off / on
    result = json.loads(out.read_text())
    assert result["batch_per_gpu"] == 64 and len(result["rows"]) == 6
    assert {r["zero_stage"] for r in result["rows"]} == {1, 2, 3}


def test_a100_computes_slower_than_h100():
    recipe = os.path.join(ROOT, "recipes", "pretrain_vith.py")
    cfg = load_recipe(recipe)
    tok = TokenStats(256, 130.0, 126.0, 140.0, 256.0, 256)
    h = time_plan(cfg, 1, 8, GPUS["h100"], PRECISIONS["autocast"], False, tok)
    a = time_plan(cfg, 1, 8, GPUS["a100"], PRECISIONS["autocast"], False, tok)
    assert a.compute_s == pytest.approx(h.compute_s * 989.4 / 312)


@pytest.mark.parametrize("args, needle", [
    (["recipes/no_such_recipe.py", "--gpus", "16"], "not found"),
    (["recipes/pretrain_vith.py", "--gpus", "0"], "--gpus 0"),
    (["recipes/pretrain_vith.py", "--gpus", "16", "--gpu", "v100"], "--gpu"),
    (["recipes/pretrain_vith.py", "--gpus", "16", "--set", "model.nope=1"], "unknown field"),
    (["recipes/pretrain_vith.py"], "--gpus"),
])
def test_cli_bad_input_one_line_exit_2(args, needle, capsys):
    """In process (the command's own function: a parser error exits, a bad value returns 2); the command
    itself, as a user runs it, below."""
    try:
        rc = plan_main([os.path.join(ROOT, a) if a.startswith("recipes/") else a for a in args])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")


def test_the_command_refuses_bad_input_in_one_line():
    proc = _cli("recipes/pretrain_vith.py", "--gpus", "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gpus 0" in lines[0] and lines[0].startswith("error:")


def test_config_error_for_bad_mfu():
    with pytest.raises(ConfigError, match="mfu"):
        from engine.plan import plan
        plan(load_recipe(os.path.join(ROOT, "recipes", "pretrain_tiny.py")), 2, mfu=1.5)
