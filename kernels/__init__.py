"""Fused ops for the IWM engine: one file per op (PyTorch reference, Triton kernels, autograd.Function,
public function); the backend is chosen in one place, :mod:`kernels.dispatch` (``IWM_KERNELS``).
Nothing here imports ``engine/``.

=====================================================  ==================================================
``kernels.gather.gather_tokens(x, flat_idx)``           packed context / target token gather
``kernels.l2_loss.masked_l2_loss(pred, target, idx)``   gather + fp32 layer norm of targets + squared L2
                                                        + gradient, one pass
``kernels.feature_conditioning.feature_conditioning``   action-conditioned mask tokens: per-position fc1
                                                        + gather + GELU, fused backward
``kernels.layer_norm_linear.layer_norm_linear``       LayerNorm in the prologue of the following linear
                                                        projection (a block's LN -> QKV, LN -> fc1), fused
                                                        weight-gradient and LayerNorm backward
``kernels.ema.ema_update_flat_(flat, online, m)``       target-encoder EMA over a ``FlatBuffer``: one
                                                        launch (online: a list of tensors or one flat
                                                        partition)
``kernels.attention.ragged_attention``                  ragged attention backends
``kernels.aot``                                         compile every kernel for sm_80 / sm_90 without a
                                                        GPU; registers, spills, shared memory
=====================================================  ==================================================

Backends and tiles are chosen in :mod:`kernels.dispatch` (``configure``, ``backend``, ``tiles``,
``use_tiles``, ``TILE_POLICIES``).

Import the ops from their modules (``from kernels.l2_loss import masked_l2_loss``). They are not
re-exported here on purpose: ``kernels.feature_conditioning`` must stay the module, not the function.
"""
from kernels.dispatch import get_backend, set_backend, triton_available, use_triton

__all__ = ["get_backend", "set_backend", "triton_available", "use_triton"]
