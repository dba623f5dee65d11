"""KL estimators, the KL-shaped per-token reward, and the beta controllers, checked by hand."""

import math

import pytest
import torch

from ray_rlhf.algo.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    per_token_rewards,
)


def test_estimators_on_given_numbers():
    logp = torch.tensor([-1.0, -2.0, -0.7])
    ref = torch.tensor([-1.5, -1.0, -0.7])
    # d = logp - ref = [0.5, -1.0, 0.0]; log r = ref - logp = -d
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.5, -1.0, 0.0]))
    # k2 = 0.5 d^2 = [0.125, 0.5, 0]
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.125, 0.5, 0.0]))
    # k3 = exp(-d) - 1 + d = [e^-0.5 - 0.5, e^1 - 2, 0] = [0.10653066, 0.71828183, 0]
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]))
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_estimate(logp, ref, name), fn(logp, ref))


def test_k1_and_k3_are_unbiased_in_exact_expectation():
    # pi = [0.5, 0.3, 0.2], ref = [0.2, 0.5, 0.3]; E_pi[k] summed exactly over the 3 outcomes.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()  # KL(pi || ref) = 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) = 0.22563...
    assert kl.item() == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6) + 0.2 * math.log(2 / 3))
    for fn in (kl_k1, kl_k3):
        assert (p * fn(p.log(), q.log())).sum().item() == pytest.approx(kl.item(), rel=1e-12)
    assert (kl_k3(p.log(), q.log()) >= 0).all() and (kl_k2(p.log(), q.log()) >= 0).all()


def test_unknown_estimator_names_valid_choices():
    with pytest.raises(ValueError, match=r"'k4'.*k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_per_token_rewards_ragged_placement():
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3, math.nan],  # length 3; NaN padding must not leak
            [0.5, 9.0, 9.0, 9.0],  # length 1
            [0.1, 0.1, 0.1, 0.1],  # length 4 (full)
        ]
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    scores = torch.tensor([1.0, 2.0, 3.0])
    out = per_token_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor(
        [
            [-0.01, -0.02, -0.03 + 1.0, 0.0],  # -0.1*kl, score 1 on the last valid token (index 2)
            [-0.05 + 2.0, 0.0, 0.0, 0.0],  # single token carries both its KL term and the score
            [-0.01, -0.01, -0.01, -0.01 + 3.0],  # score on index 3
        ]
    )
    torch.testing.assert_close(out, expected)
    # the row sum is score - beta * sum(kl): Ouyang et al. 2022 eq. 2 with per-token KL
    torch.testing.assert_close(out.sum(1), torch.tensor([1.0 - 0.06, 2.0 - 0.05, 3.0 - 0.04]))
    torch.testing.assert_close(per_token_rewards(scores, kl, mask.bool(), beta=0.1), expected)


def test_per_token_rewards_rejects_empty_row_and_bad_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(torch.ones(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores must be"):
        per_token_rewards(torch.ones(3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(-1.0)


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2; beta *= 1 + 0.2 * 256/10000 = 1.00512
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512)  # 0.100512
    # KL 6.6: error 0.1 (inside the clip); beta *= 1 + 0.1 * 1000/10000 = 1.01
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.100512 * 1.01)  # 0.10151712
    # KL 0: error -1, clipped to -0.2; beta *= 1 - 0.2 * 500/10000 = 0.99
    ctl.update(0.0, 500)
    assert ctl.value == pytest.approx(0.10151712 * 0.99)  # 0.1005019488
    # at the target: error 0, beta unchanged
    before = ctl.value
    ctl.update(6.0, 10000)
    assert ctl.value == pytest.approx(before)


def test_adaptive_controller_error_clip_is_symmetric_and_saturates():
    up, way_up = AdaptiveKLController(1.0, 1.0, 100), AdaptiveKLController(1.0, 1.0, 100)
    up.update(1.2, 10)  # error exactly 0.2 -> beta 1 + 0.2 * 0.1 = 1.02
    way_up.update(1000.0, 10)  # error 999 -> clipped to 0.2 -> same 1.02
    assert up.value == pytest.approx(1.02) and way_up.value == pytest.approx(1.02)
    down = AdaptiveKLController(1.0, 1.0, 100)
    down.update(0.0, 10)  # error -1 -> -0.2 -> 0.98
    assert down.value == pytest.approx(0.98)


def test_adaptive_controller_state_roundtrip_and_errors():
    ctl = AdaptiveKLController(0.2, 3.0, 50)
    ctl.update(5.0, 7)
    sd = ctl.state_dict()
    assert set(sd) == {"value"} and type(sd["value"]) is float
    fresh = AdaptiveKLController(0.2, 3.0, 50)
    fresh.load_state_dict(sd)
    assert fresh.value == ctl.value
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(math.nan, 1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, 1.0, 0)
