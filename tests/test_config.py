import pytest
import torch

from minikv import MiniKVConfig


def test_defaults_are_the_measured_ones():
    c = MiniKVConfig()  # chosen by evals/fidelity.py, evals/sweep.py and evals/shared_context.py (docs/)
    assert (c.bits, c.key_bits, c.value_bits, c.budget, c.recent, c.scorer) == (2, 4, 2, 0.5, 0.25, "kvzip")
    assert (c.schedule, c.head_budgets) == ("global", "adaptive")
    assert MiniKVConfig(budget="auto") == c and c.replace(bits=4).budget == 0.5  # "auto" chooses again
    assert (c.sink_tokens, c.clips, c.rotation, c.q_group_size, c.residual_length) == (4, True, "kv", None, 128)
    off = MiniKVConfig(bits=16)  # compression off needs no other knob
    assert (off.key_bits, off.value_bits, off.clips, off.rotation) == (16, 16, False, "none")
    assert MiniKVConfig(bits=4).key_bits == 4


@pytest.mark.parametrize("head_dim, group", [(64, 32), (128, 32), (256, 32), (80, 16), (16, 16)])
def test_the_automatic_group_size_is_the_first_that_divides_head_dim(head_dim, group):
    assert MiniKVConfig(rotate="none").for_head_dim(head_dim).q_group_size == group
    assert MiniKVConfig(q_group_size=16).for_head_dim(head_dim).q_group_size == 16
    assert MiniKVConfig(residual_length=48).for_head_dim(head_dim).q_group_size == 16


def test_no_automatic_group_size_fits_a_tiny_head():
    with pytest.raises(ValueError, match=r"no automatic q_group_size in \[32, 16\] divides the model's head_dim=8"):
        MiniKVConfig().for_head_dim(8)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=3), "bits must be one of [2, 4, 16]"),
        (dict(bits=8), "bits"),
        (dict(budget=0), "at least 1 token"),
        (dict(budget=-5), "at least 1 token"),
        (dict(budget=0.0), "(0, 1]"),
        (dict(budget=1.5), "(0, 1]"),
        (dict(budget="half"), "budget must be an int >= 1, a float in (0, 1], None or 'auto'"),
        (dict(budget=True), "budget must be"),
        (dict(budget=64, recent=65), "recent=65 is larger than budget=64"),
        (dict(recent=-1), "recent must be >= 0"),
        (dict(recent=1.5), "[0, 1]"),
        (dict(q_group_size=12), "multiple of 16"),
        (dict(bits=4, q_group_size=12), "multiple of 8"),
        (dict(residual_length=100), "multiple of q_group_size=16"),
        (dict(residual_length=40, q_group_size=16), "multiple of q_group_size=16"),
        (dict(residual_dtype="float64"), "residual_dtype must be one of ['model', 'float16', 'bfloat16']"),
        (dict(scorer="h2o"), "scorer must be one of"),
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(pool_kernel=4), "pool_kernel must be odd"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_knobs_name_the_parameter_and_range(kwargs, words):
    with pytest.raises(ValueError) as e:
        MiniKVConfig(**kwargs)
    assert words in str(e.value)


def test_the_residual_dtype_resolves_per_model_dtype():
    from minikv.config import residual_dtype

    assert residual_dtype(None, torch.float32) == torch.float16  # the default: fp16 for an fp32 model
    assert residual_dtype(None, torch.bfloat16) == torch.bfloat16
    assert residual_dtype("model", torch.float32) == torch.float32
    assert residual_dtype("bfloat16", torch.float16) == torch.bfloat16


def test_group_size_must_divide_head_dim():
    MiniKVConfig(q_group_size=32).check_head_dim(64)
    with pytest.raises(ValueError, match="must divide the model's head_dim=48"):
        MiniKVConfig(q_group_size=32).check_head_dim(48)
    MiniKVConfig(bits=16, q_group_size=32).check_head_dim(48)  # nothing is quantized


def test_valid_variants():
    MiniKVConfig(bits=4, q_group_size=8, residual_length=32)
    MiniKVConfig(bits=16, budget=None)
    MiniKVConfig(budget=256, recent=64, scorer="snapkv", schedule="pyramid")


def test_the_evals_spell_out_the_snapkv_preset_they_were_measured_with():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
    from fidelity_configs import DEFAULTS

    from minikv.config import build_config

    spelled, actual = build_config(**DEFAULTS).for_head_dim(64), build_config(preset="snapkv").for_head_dim(64)
    effective = (
        "key_bits",
        "value_bits",
        "clips",
        "rotation",
        "sink_tokens",
        "budget",
        "recent",
        "scorer",
        "schedule",
        "q_group_size",
        "residual_length",
    )
    assert [getattr(spelled, k) for k in effective] == [getattr(actual, k) for k in effective]


def test_automatic_schedule_and_head_budgets_follow_the_scorer_and_choose_again_on_replace():
    c = MiniKVConfig()
    snap = c.replace(scorer="snapkv")  # SnapKV's scores do not compare across layers: uniform, every head alike
    assert (snap.schedule, snap.head_budgets) == ("uniform", "uniform")
    assert (snap.replace(scorer="kvzip").schedule, snap.replace(scorer="kvzip").head_budgets) == ("global", "adaptive")
    assert MiniKVConfig(bits=16).head_budgets == "uniform" and MiniKVConfig(budget=None).schedule == "uniform"
    assert MiniKVConfig(crush=0.2).head_budgets == "uniform"
    assert MiniKVConfig(scorer="snapkv", head_budgets="adaptive").head_budgets == "adaptive"  # given: kept
    pinned = MiniKVConfig(schedule="uniform")
    assert pinned.replace(budget=0.3).schedule == "uniform"  # a knob given stays given
    assert c.replace(q_group_size=32) == MiniKVConfig(q_group_size=32)
