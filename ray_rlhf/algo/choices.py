"""The names of the algorithm's choices, without torch: the config validates against them before
anything heavy is imported (a mistyped key is one line in well under a second)."""

KL_PLACEMENTS = ("reward", "loss")
"""Where the KL to the reference acts: a per-token reward penalty, or a loss term."""

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
"""Loss aggregation modes of :func:`~ray_rlhf.algo.losses.loss_denominators` (verl's
``loss_agg_mode``, with underscores)."""
