"""Run one stage -- ``sft``, ``rm`` or ``dpo`` -- on one learner rank (in-process), or as one rank of
several (:mod:`ray_rlhf.stages.group` starts them; every rank runs this same loop).

The stage tokenizes its file once (:func:`examples_to_batches`), then takes ``steps`` optimizer
steps, each on the next ``batch_size`` examples of a permutation seeded by ``seed`` and the epoch,
through the learner's :class:`~ray_rlhf.learning.engine.Engine` and the stage's objective. Every
``checkpoint_every`` steps it saves the model, AdamW's state, the step and the random states to
``out/checkpoint.pt`` (written to a temporary name, then renamed: never half-written); a run
started with the same ``out`` resumes from it and takes exactly the steps the uninterrupted run
would have. At the end the model is saved in Hugging Face format in ``out/model`` (for ``rm`` a
``*ForSequenceClassification`` directory, num_labels=1, that ``reward.model_path`` loads).

Several ranks (``num_ranks > 1``): each builds the same model and data, joins the ranks' process
group (DDP, gloo), and takes the same steps; the engine splits each batch's rows between the ranks
and sums their gradients, so the update is one rank's. Rank 0 alone writes the checkpoint, the
metrics rows and the model; a stop (SIGTERM) is agreed by all ranks at the end of a step.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_rlhf.data.pairs import load_preferences, load_sft
from ray_rlhf.data.prompts import render_prompt
from ray_rlhf.errors import UserError
from ray_rlhf.learning import parallel
from ray_rlhf.learning.batch import pad_batch
from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization

STAGES = ("sft", "rm", "dpo")


@dataclass(frozen=True)
class StageOptions:
    stage: str
    model_path: str
    data_path: str
    out: str
    steps: int = 30
    batch_size: int = 16
    micro_batch_size: int = 16
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10
    beta: float = 0.1
    """dpo.beta (> 0)."""
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    max_tokens: int = 128
    """Prompt and completion are each cut to this many tokens."""
    eval_fraction: float = 0.0
    """``data.eval_fraction``: hold out this fraction of the rows (a seeded draw, at least one row)
    for evaluation; 0 = no held-out split from the training file."""
    eval_path: str = ""
    """``data.eval_path``: a separate evaluation file of the same format (takes precedence over
    ``eval_fraction``)."""
    eval_every: int = 10
    """Evaluate after the first step, every this many steps and after the last one (``eval/<metric>``
    in that step's metrics)."""
    num_ranks: int = 1
    """``learner.num``: ranks that train together (DDP)."""
    num_cpus: float = 1.0
    """``learner.num_cpus``: Ray CPUs (and torch threads) per rank when ``num_ranks > 1``."""
    strategy: str = "ddp"
    """``learner.strategy``: ``ddp`` or ``fsdp`` (FSDP2) across the ranks."""
    device: str = "cpu"
    """``learner.device``: ``cpu`` or ``cuda`` (each rank on its own GPU)."""
    dtype: str = "float32"
    """``learner.dtype``: ``float32`` or ``bfloat16`` (autocast compute)."""
    lora_rank: int = 0
    """``lora.rank`` (sft, dpo): adapters of this rank on the frozen policy; 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0


def _ids(tokenizer, prompt, completion: str | None, max_tokens: int) -> tuple[list[int], list[int]]:
    text, templated = render_prompt(prompt, tokenizer)
    p = tokenizer(text, add_special_tokens=not templated)["input_ids"][-max_tokens:]
    if completion is None:
        return p, []
    r = tokenizer(completion, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [tokenizer.eos_token_id]
    return p, r


def examples_to_batches(opts: StageOptions, tokenizer, path: str | None = None):
    """The stage's whole dataset (``path``, default ``data_path``) as padded batches: SFT one
    batch; RM/DPO (chosen, rejected, margin)."""
    path = opts.data_path if path is None else path
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if opts.stage == "sft":
        rows = [_ids(tokenizer, e.prompt, e.response, opts.max_tokens) for e in load_sft(path)]
        return pad_batch([p for p, _ in rows], [r for _, r in rows], pad)
    prefs = load_preferences(path)
    c = [_ids(tokenizer, e.prompt, e.chosen, opts.max_tokens) for e in prefs]
    r = [_ids(tokenizer, e.prompt, e.rejected, opts.max_tokens) for e in prefs]
    return (pad_batch([p for p, _ in c], [x for _, x in c], pad), pad_batch([p for p, _ in r], [x for _, x in r], pad),
            torch.tensor([e.margin for e in prefs]))


def build(opts: StageOptions, rank: int = 0, address: tuple[str, int] | None = None):
    """(engine, objective, prepared training set, prepared eval set or None, tokenizer) of the stage;
    with several ranks, the engine has joined their process group at ``address`` (rank 0's store)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ray_rlhf.learning.loading import disable_dropout, load_causal_lm
    from ray_rlhf.learning.lora import AdapterOffReference, Adapters, LoraSpec
    from ray_rlhf.learning.objectives.dpo import DPOObjective
    from ray_rlhf.learning.objectives.rm import PairScorer, RMObjective, RMPairs
    from ray_rlhf.learning.objectives.sft import SFTObjective
    from ray_rlhf.models.policy import PolicyWithValueHead, ReferenceModel

    if opts.stage not in STAGES:
        raise UserError(f"unknown stage {opts.stage!r}; one of {', '.join(STAGES)}")
    if opts.stage == "dpo" and opts.beta <= 0:
        raise UserError(f"dpo.beta={opts.beta} must be > 0 (DPO's KL strength; 0.1 is usual)")
    if not 0.0 <= opts.eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={opts.eval_fraction} must be in [0, 1) (e.g. 0.1)")
    if opts.eval_every < 1:
        raise UserError(f"eval_every={opts.eval_every} must be >= 1")
    tokenizer = AutoTokenizer.from_pretrained(opts.model_path)
    data = _to(examples_to_batches(opts, tokenizer), opts.device)  # bad rows are refused before the model loads
    held = _to(examples_to_batches(opts, tokenizer, opts.eval_path), opts.device) if opts.eval_path else None
    torch.manual_seed(opts.seed)
    optim = Optimization(epochs=1, minibatch_size=opts.batch_size, micro_batch_size=opts.micro_batch_size,
                         lr=opts.lr, max_grad_norm=opts.max_grad_norm)
    if opts.stage == "rm":
        lm = AutoModelForSequenceClassification.from_pretrained(opts.model_path, num_labels=1, dtype=torch.float32)
        if lm.config.pad_token_id is None:
            lm.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        disable_dropout(lm)
        engine = _joined(Engine(PairScorer(lm.to(opts.device)), None, _engine_options(opts, rank), optim,
                                device=opts.device, seed=opts.seed), address)
        train, held = split(RMPairs(*data), None if held is None else RMPairs(*held), opts)
        return engine, RMObjective(), train, held, tokenizer
    lm = load_causal_lm(opts.model_path, opts.device)
    adapters = None
    if opts.lora_rank:  # the trunk frozen, adapters injected in place; DPO's reference: adapters off
        adapters = Adapters(lm, LoraSpec(opts.lora_rank, opts.lora_alpha, opts.lora_targets, opts.lora_dropout))
    reference = None
    if opts.stage == "dpo":
        reference = AdapterOffReference(adapters) if adapters else ReferenceModel(copy.deepcopy(lm))
    engine = _joined(Engine(PolicyWithValueHead(lm, value_head=False), reference, _engine_options(opts, rank), optim,
                            device=opts.device, seed=opts.seed, adapters=adapters), address)
    if opts.stage == "sft":
        return (engine, SFTObjective(), *split(data, held, opts), tokenizer)
    obj = DPOObjective(opts.beta, opts.loss, opts.label_smoothing)
    train = obj.reference(data[0], data[1], engine)  # reference log-probs once per example
    return (engine, obj, *split(train, None if held is None else obj.reference(held[0], held[1], engine), opts),
            tokenizer)


def _engine_options(opts: StageOptions, rank: int) -> EngineOptions:
    return EngineOptions(rank=rank, world_size=opts.num_ranks, strategy=opts.strategy, dtype=opts.dtype)


def _to(data, device: str):
    """The tokenized examples (a batch, or SFT's one batch / RM-DPO's (chosen, rejected, margin)) on ``device``."""
    return tuple(x.to(device) for x in data) if isinstance(data, tuple) else data.to(device)


def _joined(engine: Engine, address: tuple[str, int] | None) -> Engine:
    if engine.options.world_size > 1:
        if address is None:
            raise ValueError("several stage ranks need rank 0's address to join their process group")
        engine.join_group(*address)
    return engine


def _rows(dataset) -> int:
    return len(dataset.batch) if hasattr(dataset, "batch") else len(dataset)


def split(data, held, opts: StageOptions):
    """(training rows, evaluation rows or None): ``held`` (from ``data.eval_path``) if given, else
    the last ``ceil(eval_fraction * n)`` rows of a permutation seeded by ``seed`` held out of
    ``data``; every row is in exactly one of the two."""
    if held is not None or opts.eval_fraction == 0:
        return data, held
    n = _rows(data)
    k = math.ceil(opts.eval_fraction * n)
    if k >= n:
        raise UserError(f"data.eval_fraction={opts.eval_fraction} leaves no training row of {n}; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed * 7919 + 1))
    return data.select(order[: n - k].sort().values), data.select(order[n - k:].sort().values)


def evaluate(obj, held, engine) -> dict:
    """``eval/<metric>`` of the held-out rows (``eval/loss`` for SFT: mean NLL per response token)."""
    out = obj.evaluate(held, engine)
    return {"eval/loss": out} if isinstance(out, float) else {f"eval/{k}": v for k, v in out.metrics().items()}


def run_stage(opts: StageOptions, stop_after: int | None = None, report=None, should_stop=None, rank: int = 0,
              address: tuple[str, int] | None = None) -> list[dict]:
    """Train (resuming from ``out/checkpoint.pt`` if there); one metrics dict per step. With
    ``stop_after``, stop (after checkpointing) once that many steps are done; ``should_stop()``
    true (SIGTERM) does the same after the current step. ``report(row)`` gets each step's metrics.
    ``rank``/``address``: this process's rank of ``opts.num_ranks`` and rank 0's store."""
    out = Path(opts.out)
    writer = rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    engine, obj, dataset, held, tokenizer = build(opts, rank, address)
    n = _rows(dataset)
    ckpt = out / "checkpoint.pt"
    step = _resume(engine, ckpt) if ckpt.exists() else 0
    per_epoch = max(n // opts.batch_size, 1)
    history = []
    while step < opts.steps:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
        rows = order[k * opts.batch_size : (k + 1) * opts.batch_size]
        prepared, _ = obj.prepare(dataset.select(rows), engine)
        stats, upd = engine.train(prepared, obj.loss)
        step += 1
        history.append({"step": step, **stats.metrics(), "grad_norm": upd.grad_norm})
        if held is not None and (step == 1 or step % opts.eval_every == 0 or step == opts.steps):
            history[-1].update(evaluate(obj, held, engine))
        if report is not None:
            report(history[-1])
        stop = should_stop is not None and should_stop()
        if opts.num_ranks > 1:  # every rank stops at the same step, or the others hang in a collective
            stop = bool(engine.comm.all_reduce_max(torch.tensor([float(stop)])).item())
        if stop:
            stop_after = step
        if step % opts.checkpoint_every == 0 or step == opts.steps or step == stop_after:
            _save(engine, ckpt, step)  # every rank: FSDP gathers the whole state
        if stop_after is not None and step >= stop_after:
            return history
    full = parallel.full_state_dict(engine.model, opts.num_ranks, opts.strategy) if engine.sharded else None
    if writer:
        lm_state = {k.removeprefix("lm."): v for k, v in full.items() if k.startswith("lm.")} if full else None
        if engine.adapters is not None:  # the merged model (loads anywhere), and the adapters alone
            lm_state = engine.adapters.merged_state()
            engine.adapters.peft.save_pretrained(out / "adapter", safe_serialization=True)
        engine.model.lm.save_pretrained(out / "model", **({"state_dict": lm_state} if lm_state else {}))
        tokenizer.save_pretrained(out / "model")
    return history


def _save(engine: Engine, ckpt: Path, step: int) -> None:
    """Every rank calls it (FSDP2 gathers the full model and AdamW state); rank 0 writes ``ckpt``
    (whole tensors: it resumes at any number of ranks of the same strategy), via a temporary name."""
    o = engine.options
    model = parallel.full_state_dict(engine.model, o.world_size, o.strategy)
    optim = parallel.optimizer_state(engine.train_model, engine.optimizer, o.world_size, o.strategy)
    if engine.comm.rank != 0:
        return
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"model": model, "optimizer": optim, "engine_rng": engine.rng.get_state(), "step": step,
                "optimizer_format": _optimizer_format(engine)}, tmp)
    os.replace(tmp, ckpt)


def _optimizer_format(engine: Engine) -> str:
    return "by_name" if engine.sharded else "by_position"  # FSDP2 keys AdamW's state by name


def _resume(engine: Engine, ckpt: Path) -> int:
    """Every rank restores ``ckpt``; returns its step."""
    o = engine.options
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    if state.get("optimizer_format", "by_position") != _optimizer_format(engine):
        raise UserError(f"{ckpt} was written with another learner.strategy ({state.get('optimizer_format')} "
                        f"optimizer state); resume with the learner.strategy and learner.num > 1 it was written with")
    parallel.load_full_state_dict(engine.model, state["model"], o.world_size, o.strategy)
    parallel.load_optimizer_state(engine.train_model, engine.optimizer, state["optimizer"], o.world_size, o.strategy)
    engine.rng.set_state(state["engine_rng"])
    return int(state["step"])
