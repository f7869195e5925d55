"""kernels/dispatch.py: one setting picks Triton or the PyTorch reference for every op."""
import pytest
import torch

from kernels import dispatch
from kernels.dispatch import get_backend, set_backend, use_triton
from kernels.gather import gather_tokens


def _grad_fn_name(x, idx):
    return type(gather_tokens(x, idx).grad_fn).__name__


def test_default_is_auto_and_auto_picks_reference_on_cpu():
    assert get_backend() == "auto"
    x = torch.randn(2, 3, 4)
    assert use_triton(x) is False
    assert use_triton() is False  # nothing to decide on: reference
    assert "GatherTokensFunction" not in _grad_fn_name(x.requires_grad_(), torch.tensor([0, 5]))


def test_env_triton_forces_triton_on_cpu_under_interpreter(monkeypatch):
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("IWM_KERNELS", "triton")
    assert get_backend() == "triton"
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert use_triton(x) is True
    assert "GatherTokensFunction" in _grad_fn_name(x, torch.tensor([0, 5]))


def test_env_reference_and_case_insensitive(monkeypatch):
    monkeypatch.setenv("IWM_KERNELS", " Reference ")
    assert get_backend() == "reference"
    assert use_triton(torch.randn(3)) is False


def test_bad_env_value_raises_naming_the_variable_and_choices(monkeypatch):
    monkeypatch.setenv("IWM_KERNELS", "cuda")
    with pytest.raises(ValueError) as err:
        get_backend()
    msg = str(err.value)
    assert "IWM_KERNELS" in msg and "'cuda'" in msg
    for name in ("auto", "triton", "reference"):
        assert name in msg
    with pytest.raises(ValueError):
        use_triton(torch.randn(3))


def test_bad_set_backend_raises():
    with pytest.raises(ValueError, match="auto, triton, reference"):
        set_backend("fast")


def test_set_backend_overrides_env_and_none_clears(monkeypatch):
    monkeypatch.setenv("IWM_KERNELS", "reference")
    set_backend("auto")
    assert get_backend() == "auto"
    set_backend(None)
    assert get_backend() == "reference"


def test_backend_context_manager_restores():
    set_backend("reference")
    with dispatch.backend("auto"):
        assert get_backend() == "auto"
    assert get_backend() == "reference"


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.randn(3))


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert use_triton(torch.randn(3)) is False  # auto
    set_backend("triton")
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        use_triton(torch.randn(3))


def test_triton_available_is_bool():
    assert isinstance(dispatch.triton_available(), bool)


def test_next_power_of_2():
    assert [dispatch.next_power_of_2(n) for n in (0, 1, 2, 3, 384, 1023, 1024, 1280)] == \
        [1, 1, 2, 4, 512, 1024, 1024, 2048]


def test_kernels_package_does_not_import_engine():
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "engine" or n.startswith("engine.") for n in names), f"{path.name} imports {names}"


def test_column_block_pads_least():
    assert [dispatch.column_block(n) for n in (384, 512, 768, 1023, 1280, 100)] == [128, 512, 256, 1024, 256, 128]


def test_tile_policies_cover_every_op_and_target():
    assert set(dispatch.TILE_POLICIES) == {"masked_l2_loss", "gather_tokens", "feature_conditioning", "ema_update",
                                           "layer_norm_linear", "layer_norm_linear_dw", "layer_norm_backward"}
    for op, policies in dispatch.TILE_POLICIES.items():
        assert set(policies) == set(dispatch.TILE_TARGETS), op


def test_min_rows_keeps_dot_sized_tiles():
    # tl.dot takes blocks of 16 rows and more: the LN -> linear policies never go below, however wide N is
    for target in dispatch.TILE_TARGETS:
        for op in ("layer_norm_linear", "layer_norm_linear_dw"):
            t = dispatch.TILE_POLICIES[op][target].tiles(8192)
            assert t.block_t >= 16 and t.block_d >= 16, (op, target, t)
    assert dispatch.TilePolicy(elements=1024, max_rows=64, min_rows=16).tiles(4096).block_t == 16


def test_cuda_tiles_at_the_recipe_widths():
    # (op, width) -> (BLOCK_T, BLOCK_D, num_warps), worked out by hand from the policies' rules:
    # column tile padding the width least, elements // BLOCK_D rows (capped), a warp per 1024 elements
    expected = {
        ("gather_tokens", 768): (16, 256, 4), ("gather_tokens", 1280): (16, 256, 4),
        ("gather_tokens", 512): (8, 512, 4), ("gather_tokens", 100): (32, 128, 4),
        ("masked_l2_loss", 768): (8, 1024, 8), ("masked_l2_loss", 1280): (4, 2048, 8),
        ("masked_l2_loss", 64): (64, 64, 4),
        ("feature_conditioning", 384): (16, 128, 4), ("feature_conditioning", 512): (4, 512, 4),
        ("feature_conditioning", 1023): (4, 512, 4),
        ("ema_update", 630_762_240): (1, 4096, 4), ("ema_update", 100): (1, 128, 4),
    }
    for (op, D), want in expected.items():
        t = dispatch.tiles(op, D, on_cuda=True)
        assert (t.block_t, t.block_d, t.num_warps) == want, (op, D, t)


def test_interpreter_tiles_are_whole_rows_and_use_tiles_overrides():
    t = dispatch.tiles("gather_tokens", 1280, on_cuda=False)
    assert (t.block_t, t.block_d) == (16, 2048)          # whole rows, few programs
    assert dispatch.tiles("ema_update", 77100, on_cuda=False).block_d == 1 << 16
    with dispatch.use_tiles("cuda"):
        assert dispatch.tiles("gather_tokens", 1280, on_cuda=False).block_d == 256
        with dispatch.use_tiles("interpreter"):
            assert dispatch.tiles("gather_tokens", 1280, on_cuda=True).block_d == 2048
        assert dispatch.tile_target(False) == "cuda"
    assert dispatch.tile_target(False) == "interpreter" and dispatch.tile_target(True) == "cuda"


def test_tile_errors_name_the_choices():
    with pytest.raises(ValueError, match="cuda, interpreter"):
        dispatch.use_tiles("gpu")
    with pytest.raises(KeyError, match="known ops are"):
        dispatch.tiles("layer_norm", 64, True)


def test_configure_and_backend_context(monkeypatch):
    monkeypatch.delenv(dispatch.ATTENTION_ENV_VAR, raising=False)
    dispatch.configure(kernels="reference", attention="sdpa")
    try:
        assert dispatch.get_backend() == "reference" and dispatch.get_attention_backend() == "sdpa"
        with dispatch.backend("triton", attention="reference"):
            assert dispatch.get_backend() == "triton" and dispatch.get_attention_backend() == "reference"
        assert dispatch.get_backend() == "reference" and dispatch.get_attention_backend() == "sdpa"
        dispatch.configure(kernels="auto", attention=None)  # back to the environment
        assert dispatch.get_backend() == "auto" and dispatch.get_attention_backend() == "auto"
    finally:
        dispatch.configure()
