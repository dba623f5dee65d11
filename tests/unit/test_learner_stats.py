"""The learner's stats records: every field names its metric key (documented in docs/metrics.md),
how micro-batches and ranks combine it, and its value when no update ran."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from ray_rlhf.learning.objectives.ppo import PPOLossStats, PPOPrepareStats, PPOStats
from ray_rlhf.learning.stats import LearnerStats, UpdateStats, combine, divided, merged, summed

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_keys() -> set[str]:
    keys = set()
    for line in DOCS.read_text().splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def test_every_field_of_a_ppo_step_is_one_documented_metric():
    keys = [f.metadata["metric"] for f in dataclasses.fields(PPOStats)]
    assert len(keys) == len(set(keys)) == 39
    assert not set(keys) - documented_keys(), "keys missing from docs/metrics.md"
    assert issubclass(PPOStats, LearnerStats)  # what the driver logs of any objective's step


def test_a_step_without_an_update_reports_the_records_defaults():
    """Every row left out of the update (e.g. all groups of zero spread dropped): the loss terms are
    NaN (no loss was taken), the KL term 0, the importance weights 1, and no optimizer step."""
    s = combine(PPOStats, PPOPrepareStats(kl_ref=0.5), UpdateStats(), version=1, lr=1e-3, response_tokens=8,
                prepare_seconds=0.1, update_seconds=0.0, kl_beta=0.05, score_mean=0.2)
    assert math.isnan(s.policy_loss) and math.isnan(s.value_loss) and math.isnan(s.grad_norm)
    assert (s.kl_loss, s.is_weight_mean, s.optimizer_steps, s.padded_tokens, s.kl_ref) == (0.0, 1.0, 0, 0, 0.5)
    m = s.metrics()
    assert (m["ppo/kl_ref"], m["adv/zero_std_groups"], m["perf/padded_tokens"]) == (0.5, 0, 0)
    with pytest.raises(ValueError, match="given twice"):
        combine(PPOStats, PPOPrepareStats(), PPOPrepareStats())


def test_passes_add_up_maxima_stay_maxima_and_minibatches_average():
    """Two micro-batches' token-weighted shares of one minibatch sum (0.25 + 0.5); the largest
    ratio is a max (3 over 2); two minibatches (0.75 and 0.25) average to 0.5."""
    a = PPOLossStats(policy_loss=0.25, ratio_max=2.0, is_weight_max=1.0)
    b = PPOLossStats(policy_loss=0.5, ratio_max=3.0, is_weight_max=1.5)
    mb = merged(a, b)
    assert (mb.policy_loss, mb.ratio_max, mb.is_weight_max) == (0.75, 3.0, 1.5)
    avg = divided(summed(mb, PPOLossStats(policy_loss=0.25, ratio_max=1.0, is_weight_max=1.0)), 2)
    assert (avg.policy_loss, avg.ratio_max, avg.is_weight_max) == (0.5, 2.0, 1.25)


def test_a_record_reads_like_a_dict_by_field_name():
    s = PPOPrepareStats(kl_ref=0.5)
    assert s["kl_ref"] == 0.5 and s.to_dict()["kl_ref"] == 0.5
    with pytest.raises(KeyError):
        s["ppo/kl_ref"]
