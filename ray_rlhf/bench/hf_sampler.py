"""Sampling with plain transformers ``generate``: the no-Ray, no-vLLM path to rollouts.

Used to train the :class:`~ray_rlhf.learning.learner.Learner` on its own (tests, debugging) and as
the transformers baseline of the generation benchmark. Produces the same
:class:`~ray_rlhf.records.RolloutBatch` as :class:`~ray_rlhf.generation.generator.Generator`.
"""

from __future__ import annotations

import torch

from ray_rlhf.records import PromptItem, RolloutBatch, SamplingSpec


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[PromptItem], sampling: SamplingSpec, policy_version: int = 0,
                batch_size: int = 64) -> RolloutBatch:
    """``sampling.n`` samples per prompt with ``model.generate``; stops at EOS or the length limit.

    Sampler logprobs are those of the temperature-scaled distribution the tokens were drawn from.
    """
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    items = [(p, k) for p in prompts for k in range(sampling.n)]
    rows: dict[str, list] = {k: [] for k in ("prompt_index", "sample_index", "prompt_ids", "response_ids",
                                             "sampler_logprobs", "prompt", "response", "finish_reason")}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids = [list(p.prompt_ids) or tokenizer(p.text)["input_ids"] for p, _ in chunk]
        P = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (P - len(x)) + x for x in ids])
        attention = (torch.arange(P)[None, :] >= torch.tensor([P - len(x) for x in ids])[:, None]).long()
        gen = model.generate(
            input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=0, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=None if sampling.ignore_eos else eos,
            pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
        )
        new = gen.sequences[:, P:]
        logprobs = torch.stack(gen.scores, dim=1).float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        for row, ((prompt, k), prompt_ids) in enumerate(zip(chunk, ids)):
            toks = new[row].tolist()
            n = toks.index(eos) + 1 if eos in toks and not sampling.ignore_eos else len(toks)
            for key, value in (("prompt_index", prompt.index), ("sample_index", k), ("prompt_ids", prompt_ids),
                               ("response_ids", toks[:n]), ("sampler_logprobs", logprobs[row, :n].tolist()),
                               ("prompt", prompt.text),
                               ("response", tokenizer.decode(toks[:n], skip_special_tokens=True)),
                               ("finish_reason", "length" if sampling.ignore_eos or eos not in toks[:n] else "stop")):
                rows[key].append(value)
    model.train(was_training)
    return RolloutBatch.from_sequences(**rows, policy_version=policy_version, generator_id="hf")
