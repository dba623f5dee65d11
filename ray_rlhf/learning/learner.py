"""The learner: PPO update of a policy with a value head, against a frozen reference.

A plain class (the driver wraps it with ``ray.remote`` at launch; tests build it in-process).
One call to :meth:`Learner.step` takes a batch of scored rollouts and

1. collates them into padded tensors (:func:`~ray_rlhf.learning.batch.collate`);
2. computes, without gradients, the current policy's logprobs ("old"), values and the reference
   logprobs (:meth:`Learner.prepare`);
3. turns the scores into per-token rewards with a KL penalty, and those into GAE advantages;
4. runs ``ppo.epochs`` passes over shuffled minibatches, with gradient accumulation over
   micro-batches, grad-norm clipping and AdamW (:meth:`Learner.update`);
5. bumps the policy version and returns a :class:`LearnerStats`.

Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ray_rlhf.algo.advantages import gae
from ray_rlhf.algo.kl import AdaptiveKLController, FixedKLController, kl_estimate, per_token_rewards
from ray_rlhf.algo.losses import aggregate, explained_variance, policy_loss, value_loss
from ray_rlhf.algo.masked import masked_mean, masked_whiten
from ray_rlhf.config.schema import KLConfig, PPOConfig
from ray_rlhf.learning.batch import PreparedBatch, TensorBatch, collate
from ray_rlhf.models.policy import PolicyWithValueHead, reference_logprobs
from ray_rlhf.records import RolloutBatch
from ray_rlhf.sync.sender import WeightSender
from ray_rlhf.sync.types import GroupInfo, SyncResult


@dataclass
class LearnerStats:
    """Diagnostics of one PPO step (defined in docs/metrics.md)."""

    version: int
    """Policy version after this update."""
    policy_loss: float
    value_loss: float
    entropy: float
    approx_kl: float
    clipfrac: float
    ratio_mean: float
    ratio_max: float
    value_clipfrac: float
    explained_variance: float
    grad_norm: float
    kl_ref: float
    kl_beta: float
    lr: float
    sampler_logprob_diff: float
    advantage_mean: float
    return_mean: float
    value_mean: float
    score_mean: float
    response_tokens: int
    prepare_seconds: float
    update_seconds: float
    optimizer_steps: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _load_causal_lm(path: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


class Learner:
    """Policy + value head, frozen reference, AdamW, KL controller; PPO update per :meth:`step`."""

    def __init__(
        self,
        model_path: str,
        ppo: PPOConfig,
        kl: KLConfig,
        seed: int = 0,
        device: str = "cpu",
        temperature: float = 1.0,
        critic_path: str | None = None,
        torch_threads: int | None = None,
    ):
        from transformers import AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.ppo, self.kl_cfg, self.device, self.temperature = ppo, kl, device, temperature
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lm = _load_causal_lm(model_path, device)
        critic = _load_causal_lm(critic_path, device) if critic_path else None
        self.model = PolicyWithValueHead(lm, critic).to(device)
        self.reference = copy.deepcopy(lm).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ppo.lr, weight_decay=ppo.weight_decay)
        self.kl_ctl = (
            AdaptiveKLController(kl.beta, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.beta)
        )
        self.rng = torch.Generator().manual_seed(seed)
        self.weights = WeightSender(self.model.lm.state_dict)
        """The weight-source side of the broadcast (the ``weight*`` methods delegate to it)."""
        self.version = 0
        """Policy version: 0 = initial weights, +1 per update."""

    # ---- phase 2a: fixed quantities --------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: TensorBatch) -> tuple[PreparedBatch, dict[str, float]]:
        """Old logprobs, values, reference logprobs, per-token rewards and GAE advantages."""
        self.model.eval()
        b = batch.to(self.device)
        mask = b.response_mask
        olds, vals, refs = [], [], []
        for idx in torch.arange(len(b)).split(self.ppo.micro_batch_size):
            mb = b.select(idx)
            out = self.model(*self._inputs(mb), temperature=self.temperature, with_entropy=False)
            olds.append(out.logprobs)
            vals.append(out.values)
            refs.append(reference_logprobs(self.reference, *self._inputs(mb), temperature=self.temperature))
        old_logprobs, old_values, ref_logprobs = (torch.cat(x) for x in (olds, vals, refs))
        old_values = old_values * mask
        kl = kl_estimate(old_logprobs, ref_logprobs, self.kl_cfg.estimator) * mask
        rewards = per_token_rewards(b.scores, kl, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        seq_kl = (kl * mask).sum(dim=1).mean().item()
        stats = {
            "kl_ref": seq_kl,
            "sampler_logprob_diff": masked_mean((old_logprobs - b.sampler_logprobs).abs(), mask).item(),
            "advantage_mean": masked_mean(advantages, mask).item(),
            "return_mean": masked_mean(returns, mask).item(),
            "value_mean": masked_mean(old_values, mask).item(),
        }
        prepared = PreparedBatch(b, old_logprobs, old_values, ref_logprobs, advantages, returns)
        return prepared, stats

    # ---- phase 2b: the PPO update ---------------------------------------------------------
    def update(self, prep: PreparedBatch) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled minibatches; the loss is a token mean per minibatch.

        loss = policy_loss + c1 * value_loss - c2 * entropy, each aggregated as a sum over the
        minibatch's valid tokens divided by the minibatch's token count, so that micro-batching
        (gradient accumulation) does not change the gradient.
        """
        self.model.train()
        p = self.ppo
        B = len(prep.batch)
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(p.epochs):
            perm = torch.randperm(B, generator=self.rng)
            for mb_idx in perm.split(p.minibatch_size):
                n_tokens = prep.batch.response_mask[mb_idx].sum().clamp(min=1.0)
                self.optimizer.zero_grad(set_to_none=True)
                acc: dict[str, float] = {}
                for idx in mb_idx.split(p.micro_batch_size):
                    micro = self._micro_step(prep, idx.to(self.device), n_tokens)
                    ratio_max = max(acc.get("ratio_max", 0.0), micro.pop("ratio_max"))
                    acc = _add(acc, micro)  # token-weighted: the micro-batch terms sum to the minibatch's
                    acc["ratio_max"] = ratio_max
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                self.optimizer.step()
                acc["grad_norm"] = float(grad_norm)
                totals = _add(totals, acc)
                steps += 1
        out = {k: v / steps for k, v in totals.items()}
        out["optimizer_steps"] = steps
        return out

    def _micro_step(self, prep: PreparedBatch, idx: torch.Tensor, n_tokens: torch.Tensor) -> dict[str, float]:
        mb = prep.batch.select(idx)
        mask = mb.response_mask
        out = self.model(*self._inputs(mb), temperature=self.temperature)
        pg, pg_stats = policy_loss(
            out.logprobs, prep.old_logprobs[idx], prep.advantages[idx], mask,
            clip_eps=self.ppo.clip, dual_clip=self.ppo.dual_clip, num_tokens=n_tokens,
        )
        vf, vf_stats = value_loss(
            out.values, prep.old_values[idx], prep.returns[idx], mask,
            clip_eps=self.ppo.value_clip, num_tokens=n_tokens,
        )
        ent = aggregate(out.entropy, mask, num_tokens=n_tokens)
        loss = pg + self.ppo.vf_coef * vf - self.ppo.ent_coef * ent
        loss.backward()
        share = float(mask.sum() / n_tokens)  # this micro-batch's share of the minibatch's tokens
        return {
            "policy_loss": pg.item(),
            "value_loss": vf.item(),
            "entropy": ent.item(),
            # ratio-based stats are per-token means over the micro-batch: weight by token share
            "approx_kl": pg_stats.approx_kl * share,
            "clipfrac": pg_stats.clipfrac * share,
            "ratio_mean": pg_stats.ratio_mean * share,
            "ratio_max": pg_stats.ratio_max,
            "value_clipfrac": vf_stats.clipfrac * share,
        }

    # ---- the whole step ---------------------------------------------------------------------
    def step(self, rollouts: RolloutBatch) -> LearnerStats:
        """One PPO step on a scored batch; returns diagnostics and bumps :attr:`version`."""
        t0 = time.perf_counter()
        batch = collate(rollouts, self.pad_id)
        prep, pstats = self.prepare(batch)
        t1 = time.perf_counter()
        ustats = self.update(prep)
        t2 = time.perf_counter()
        mask = prep.batch.response_mask
        with torch.no_grad():
            ev = explained_variance(prep.old_values, prep.returns, mask)
        beta = self.kl_ctl.value
        self.kl_ctl.update(pstats["kl_ref"], len(batch))
        self.version += 1
        return LearnerStats(
            version=self.version,
            policy_loss=ustats["policy_loss"],
            value_loss=ustats["value_loss"],
            entropy=ustats["entropy"],
            approx_kl=ustats["approx_kl"],
            clipfrac=ustats["clipfrac"],
            ratio_mean=ustats["ratio_mean"],
            ratio_max=ustats["ratio_max"],
            value_clipfrac=ustats["value_clipfrac"],
            explained_variance=float(ev),
            grad_norm=ustats["grad_norm"],
            kl_ref=pstats["kl_ref"],
            kl_beta=beta,
            lr=self.optimizer.param_groups[0]["lr"],
            sampler_logprob_diff=pstats["sampler_logprob_diff"],
            advantage_mean=pstats["advantage_mean"],
            return_mean=pstats["return_mean"],
            value_mean=pstats["value_mean"],
            score_mean=float(batch.scores.mean()),
            response_tokens=int(mask.sum()),
            prepare_seconds=t1 - t0,
            update_seconds=t2 - t1,
            optimizer_steps=int(ustats["optimizer_steps"]),
        )

    # ---- weights for the generators (the WeightSource surface; see ray_rlhf.sync) ---------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy LM's weights under Hugging Face checkpoint names, as CPU tensors (value head
        excluded): what the generators load."""
        return self.weights.export()

    def weights_checksum(self) -> str:
        """:func:`~ray_rlhf.sync.checksum.state_dict_checksum` of :meth:`hf_state_dict`."""
        return self.weights.checksum()

    def weight_group_open(self, world_size: int, backend: str = "gloo", timeout_s: float = 300.0) -> GroupInfo:
        return self.weights.group_open(world_size, backend, timeout_s)

    def weight_group_connect(self) -> None:
        self.weights.group_connect()

    def weight_group_send(self, version: int) -> SyncResult:
        return self.weights.group_send(version)

    def weight_group_close(self) -> None:
        self.weights.group_close()

    def ping(self) -> int:
        return self.version

    # ---- full state, for checkpoints ------------------------------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Write the full learner state into ``directory`` (which must exist and be empty).

        ``policy/``: the LM in Hugging Face format (safetensors + tokenizer; loads in transformers
        and vLLM); ``value_head.safetensors`` (+ ``critic/``); ``optimizer.pt`` (tensors and plain
        values only, read back with ``weights_only=True``); ``learner.json`` (version, KL controller);
        ``rng.safetensors`` (torch RNG states). Nothing is pickled.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        self.model.lm.save_pretrained(d / "policy", safe_serialization=True)
        self.tokenizer.save_pretrained(d / "policy")
        if self.model.critic is not None:
            self.model.critic.save_pretrained(d / "critic", safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                  str(d / "value_head.safetensors"))
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
        save_file({"learner": self.rng.get_state(), "torch": torch.get_rng_state()}, str(d / "rng.safetensors"))
        (d / "learner.json").write_text(json.dumps({"version": self.version, "kl_ctl": self.kl_ctl.state_dict()}))

    def load_state(self, directory: str | Path) -> None:
        """Restore what :meth:`save_state` wrote (the model architecture must match)."""
        from safetensors.torch import load_file

        d = Path(directory)
        lm_state = _load_hf_state(d / "policy")
        self.model.lm.load_state_dict(lm_state, strict=True)
        if self.model.critic is not None:
            self.model.critic.load_state_dict(_load_hf_state(d / "critic"), strict=True)
        self.model.value_head.load_state_dict(load_file(str(d / "value_head.safetensors")))
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True, map_location=self.device))
        rng = load_file(str(d / "rng.safetensors"))
        self.rng.set_state(rng["learner"])
        torch.set_rng_state(rng["torch"])
        meta = json.loads((d / "learner.json").read_text())
        self.version = int(meta["version"])
        self.kl_ctl.load_state_dict(meta["kl_ctl"])

    # ---- helpers -------------------------------------------------------------------------------
    def _inputs(self, b: TensorBatch):
        return b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask



def _add(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    out = dict(acc)
    for k, v in new.items():
        out[k] = out.get(k, 0.0) + v
    return out


def _load_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face safetensors checkpoint directory (single or sharded)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state
