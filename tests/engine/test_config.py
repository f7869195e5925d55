"""Config: overrides from the command line, validation messages that name the field and the fix."""
import pytest

from engine.config import ConfigError, IWMConfig


def test_defaults_follow_the_paper():
    cfg = IWMConfig().validate()
    v = cfg.views
    assert (v.jitter_p, v.brightness, v.contrast, v.saturation, v.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert (v.blur_p, v.grayscale_p) == (0.2, 0.2)
    assert cfg.masks.num_blocks == 4 and cfg.masks.block_scale == (0.15, 0.2)
    assert cfg.optim.ema == (0.996, 1.0) and cfg.optim.lr == 1e-3
    assert cfg.eval.mrr_candidates == 256 and v.action_dim == 12


def test_override_and_roundtrip():
    cfg = IWMConfig()
    cfg.override("optim.lr=5e-4")
    cfg.override("model.conditioning=none")
    cfg.override("masks.block_scale=[0.1, 0.2]")
    assert cfg.optim.lr == 5e-4 and cfg.model.conditioning == "none" and cfg.masks.block_scale == (0.1, 0.2)
    again = IWMConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("assignment,needle", [
    ("optim.lrr=1", "unknown field 'lrr'"),
    ("optimizer.lr=1", "no config section 'optimizer'"),
    ("optim.lr", "expected section.field=value"),
])
def test_bad_overrides(assignment, needle):
    with pytest.raises(ConfigError, match=needle):
        IWMConfig().override(assignment)


@pytest.mark.parametrize("assignment,needle", [
    ("views.blur_p=1.5", "probability"),
    ("train.zero_stage=4", "ZeRO stages"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.lr=1e999", "finite"),
    ("optim.clip_grad=-1.0", "optim.clip_grad"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("optim.global_batch=0", "optim.global_batch"),
    ("train.attention='flash'", "train.attention"),
    ("model.encoder='vit_giant'", "unknown"),
    ("model.predictor_width=100", "not divisible"),
    ("masks.block_scale=(0.3, 0.2)", "min <= max"),
    ("model.cond_position='inside'", "model.cond_position='inside': use one of"),
    ("train.monitor_samples=0", "train.monitor_samples"),
])
def test_bad_values_name_the_field(assignment, needle):
    cfg = IWMConfig()
    cfg.override(assignment)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


@pytest.mark.parametrize("raw,value", [("true", True), ("false", False), ("True", True), ("0", False)])
def test_set_accepts_true_false(raw, value):
    cfg = IWMConfig()
    cfg.override(f"train.activation_checkpointing={raw}")
    assert cfg.train.activation_checkpointing is value


def test_configs_saved_before_the_position_option_load_with_the_position_before_the_mlp():
    saved = IWMConfig().to_dict()
    del saved["model"]["cond_position"]  # what a checkpoint written before the option holds
    assert IWMConfig.from_dict(saved).model.cond_position == "before"
    now = IWMConfig()
    now.model.cond_position = "residual"
    assert IWMConfig.from_dict(now.to_dict()).model.cond_position == "residual"
