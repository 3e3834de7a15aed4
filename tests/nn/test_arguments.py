"""Bad arguments raise ValueError naming the argument and its value; parameter matching."""

import pytest
import torch

from aoe import AoE, DenseFFN, MoE, match_d_wide


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: MoE(16, 32, 4, 0), "top_k=0"),
        (lambda: MoE(16, 32, 4, 5), "top_k=5"),
        (lambda: AoE(16, 4, 4, 0, d_ffn=32), "top_k=0"),
        (lambda: AoE(16, 4, 4, 9, d_ffn=32), "top_k=9"),
        (lambda: AoE(16, 0, 4, 2, d_ffn=32), "d_low=0"),
        (lambda: AoE(16, -3, 4, 2, d_ffn=32), "d_low=-3"),
        (lambda: AoE(16, 4, 4, 2), "d_wide=None"),
        (lambda: AoE(16, 4, 4, 2, d_wide=40, d_ffn=32), "d_wide=40"),
        (lambda: AoE(16, 4, 4, 2, d_ffn=32, norm="l3"), "norm='l3'"),
        (lambda: MoE(16, 32, 0, 1), "n_experts=0"),
        (lambda: MoE(16, 0, 4, 2), "d_ffn=0"),
        (lambda: MoE(16, 32, 4, 2, aux_loss_coef=-1), "aux_loss_coef=-1"),
        (lambda: MoE(16, 32, 4, 2, grouped_mm="cuda"), "grouped_mm='cuda'"),
        (lambda: DenseFFN(16, 0), "d_ffn=0"),
        (lambda: match_d_wide(16, 4, 64), "d_low=64"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(build, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        build()


def test_wrong_input_width_is_refused():
    with pytest.raises(ValueError, match="d_model=16"):
        MoE(16, 32, 4, 2)(torch.randn(3, 8))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("d_model, d_ffn, d_low, E", [(512, 1024, 128, 8), (2048, 1024, 256, 64), (2048, 4096, 512, 8),
                                                      (64, 128, 16, 4), (96, 256, 32, 8), (768, 2048, 256, 16)])
def test_parameter_matched_aoe_is_within_one_percent_of_moe(d_model, d_ffn, d_low, E):
    d_wide = match_d_wide(d_model, d_ffn, d_low)
    exact = (3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)
    assert abs(d_wide - exact) <= 16
    moe = MoE(d_model, d_ffn, E, 2, init_std=0.0) if d_model <= 768 else None
    aoe = AoE(d_model, d_low, E, 2, d_ffn=d_ffn) if d_model <= 768 else None
    moe_params = E * (3 * d_model * d_ffn) + d_model * E
    aoe_params = E * (d_model * d_low + d_low * d_wide + 2 * d_model * d_wide)
    if moe is not None:
        assert n_params(moe) == moe_params and n_params(aoe) == aoe_params and aoe.d_wide == d_wide
    assert abs(aoe_params - moe_params) <= 0.01 * moe_params


def test_match_d_wide_rounds_to_multiple_when_close_enough():
    assert match_d_wide(512, 1024, 128) % 16 == 0
    assert match_d_wide(512, 1024, 128) == 1312  # exact 1308.4
    # small shapes: the multiple is halved until within 1%
    d = match_d_wide(64, 128, 16)  # exact 163.6; 160 would be 2% off
    assert abs(64 * 16 + 16 * d + 2 * 64 * d - 3 * 64 * 128) <= 0.01 * 3 * 64 * 128


def test_match_d_wide_says_when_its_width_loses_the_aligned_kernel():
    """164 (a multiple of 4) is what saved configs without d_wide recompute: kept, with a warning
    that names the aligned widths; min_multiple=8 picks the nearest of them instead."""
    from aoe.nn.aoe import _warn_unaligned_width

    _warn_unaligned_width.cache_clear()  # once per width: an earlier test may have built this one
    with pytest.warns(UserWarning, match=r"d_wide=164 .*not a multiple of 8.*160 \(-2\.1% parameters\), 168 \(\+2\.6%"):
        assert match_d_wide(64, 128, 16) == 164
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert match_d_wide(64, 128, 16) == 164  # said once
    assert match_d_wide(64, 128, 16, min_multiple=8) == 160  # exact 163.6: nearest multiple of 8
    assert match_d_wide(16, 24, 4, min_multiple=8) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert match_d_wide(512, 1024, 128) == 1312  # aligned: no warning
        assert match_d_wide(512, 1024, 128, min_multiple=8) == 1312
