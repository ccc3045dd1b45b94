import pytest

from minikv import MiniKVConfig


def test_defaults_are_the_papers():
    c = MiniKVConfig()
    assert (c.bits, c.budget, c.recent, c.scorer, c.q_group_size, c.residual_length) == (2, 0.5, 0.5, "minikv", 16, 128)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=3), "bits must be one of [2, 4, 16]"),
        (dict(bits=8), "bits"),
        (dict(budget=0), "at least 1 token"),
        (dict(budget=-5), "at least 1 token"),
        (dict(budget=0.0), "(0, 1]"),
        (dict(budget=1.5), "(0, 1]"),
        (dict(budget="half"), "budget must be"),
        (dict(budget=True), "budget must be"),
        (dict(budget=64, recent=65), "recent=65 is larger than budget=64"),
        (dict(recent=-1), "recent must be >= 0"),
        (dict(recent=1.5), "[0, 1]"),
        (dict(q_group_size=12), "multiple of 16"),
        (dict(bits=4, q_group_size=12), "multiple of 8"),
        (dict(residual_length=100), "multiple of q_group_size=16"),
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


def test_group_size_must_divide_head_dim():
    MiniKVConfig(q_group_size=32).check_head_dim(64)
    with pytest.raises(ValueError, match="must divide the model's head_dim=48"):
        MiniKVConfig(q_group_size=32).check_head_dim(48)
    MiniKVConfig(bits=16, q_group_size=32).check_head_dim(48)  # nothing is quantized


def test_valid_variants():
    MiniKVConfig(bits=4, q_group_size=8, residual_length=32)
    MiniKVConfig(bits=16, budget=None)
    MiniKVConfig(budget=256, recent=64, scorer="snapkv", schedule="pyramid")
