import torch

from quantscope.finite import all_finite


def test_all_finite_catches_nan_and_inf_and_survives_an_overflowing_sum():
    t = torch.randn(1000)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[537] = bad
        assert not all_finite(u)
    big = torch.full((10,), 3e38)  # finite values whose sum overflows to inf: still finite
    assert all_finite(big)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float64))
