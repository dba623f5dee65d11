"""Packed sequences: layout by hand, first-fit bins, and one packed pass equal to the padded one."""

import torch

from ray_rlhf.models.packing import first_fit, pack, packed_hidden, unpack
from ray_rlhf.models.policy import sequence_inputs


def test_pack_layout_by_hand():
    # row 0: prompt [5, 6] (one pad on the left), response [7] (one pad on the right)
    # row 1: prompt [1, 2, 3], response [4, 8]
    prompt_ids = torch.tensor([[0, 5, 6], [1, 2, 3]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_ids = torch.tensor([[7, 0], [4, 8]])
    response_mask = torch.tensor([[1, 0], [1, 1]])
    ids, mask, pos = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    p_ids, p_pos = pack(ids, mask, pos)
    assert p_ids.tolist() == [[5, 6, 7, 1, 2, 3, 4, 8]]
    assert p_pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # restarts at each row
    back = unpack(p_ids.unsqueeze(-1).float(), mask).squeeze(-1)
    assert back.tolist() == [[0, 5, 6, 7, 0], [1, 2, 3, 4, 8]]


def test_first_fit_by_real_tokens():
    # lengths 7, 5, 4, 3, 9 (over the budget 8): 9 alone; 7 then 5 (no room) -> new bin; 4 -> with 5? 5+4=9 > 8 -> new;
    # 3 -> 5+3 = 8 fits the second bin
    bins = first_fit([0, 1, 2, 3, 4], [7, 5, 4, 3, 9], 8)
    assert bins == [[4], [0], [1, 3], [2]]


def test_packed_pass_equals_padded():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(cfg).eval()
    # real lengths 5, 9, 3, 2; lines of at most 9 (the longest row), first-fit decreasing: [1], [0, 2], [3]
    prompt_ids = torch.randint(1, 50, (4, 5))
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]])
    response_ids = torch.randint(1, 50, (4, 4))
    response_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]])
    ids, mask, pos = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    with torch.no_grad():
        padded = lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        packed = packed_hidden(lm.get_decoder(), ids, mask, pos)
    keep = mask.bool()
    torch.testing.assert_close(packed[keep], padded[keep], atol=1e-5, rtol=1e-5)
    seen = []
    handle = lm.get_decoder().register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                         with_kwargs=True)
    with torch.no_grad():
        packed_hidden(lm.get_decoder(), ids, mask, pos)
    handle.remove()
    assert seen == [(3, 9)]  # 19 real tokens in 3 lines of the longest row's 9, not one line of 19


def test_yaml_bool_reads_as_the_word():
    from ray_rlhf.config.schema import PPOConfig

    assert PPOConfig(packing=True).packing == "on" and PPOConfig(packing=False).packing == "off"
    assert PPOConfig().packing == "auto"


def test_probe_refuses_alibi_and_auto_resolves_off(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    from ray_rlhf.models.packing_probe import probe_checkpoint, resolve_packing

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(tmp_path)
    assert "differ" in probe_checkpoint(str(tmp_path))
    assert resolve_packing("auto", tmp_path) is False and resolve_packing("on", tmp_path) is True
    assert resolve_packing("off", tmp_path) is False


def test_probe_passes_for_the_tiny_policy(tiny_policy_path):
    from ray_rlhf.models.packing_probe import resolve_packing

    assert resolve_packing("auto", tiny_policy_path) is True
