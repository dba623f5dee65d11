"""The reward-model objective on a tiny LlamaForSequenceClassification: it learns which of a pair
holds more of one token, and the trained model saved as a Hugging Face directory scores the same
after AutoModelForSequenceClassification loads it (what ``reward.model_path`` does)."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from ray_rlhf.learning.batch import collate
from ray_rlhf.learning.engine import Engine, EngineOptions, Optimization
from ray_rlhf.learning.objectives.rm import PairScorer, RMObjective, RMPairs
from tests.batches import make_batch

TARGET, VOCAB = 5, 12


def pairs(n, seed):
    """Chosen responses hold more TARGET tokens than the rejected ones."""
    g = torch.Generator().manual_seed(seed)
    c, r = [], []
    for _ in range(n):
        prompt = torch.randint(1, VOCAB, (2,), generator=g).tolist()
        base = torch.randint(6, VOCAB, (4,), generator=g).tolist()
        k = int(torch.randint(1, 4, (1,), generator=g))
        c.append(dict(prompt_ids=prompt, response_ids=[TARGET] * k + base[k:], reward=0.0))
        r.append(dict(prompt_ids=prompt, response_ids=base, reward=0.0))
    return RMPairs(collate(make_batch(c), 0), collate(make_batch(r), 0), torch.zeros(n))


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    return PairScorer(LlamaForSequenceClassification(cfg).float())


def test_rm_learns_the_pairs_and_round_trips_through_hugging_face(tmp_path):
    train, held_out = pairs(32, 0), pairs(16, 1)
    optim = Optimization(epochs=1, minibatch_size=8, micro_batch_size=4, lr=3e-3, max_grad_norm=1.0)
    e = Engine(model(), None, EngineOptions(), optim, seed=0)
    obj = RMObjective()
    for _ in range(15):
        e.train(obj.prepare(train, e)[0], obj.loss)
    after = obj.evaluate(held_out, e)
    assert after.accuracy > 0.8 and after.margin > 0
    e.model.lm.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours = e.model(*held_out.batch.inputs()).rewards
        again = PairScorer(loaded)(*held_out.batch.inputs()).rewards
    assert torch.allclose(ours, again, atol=1e-5)
