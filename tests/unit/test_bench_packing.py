"""``ray-rlhf bench --learner-packing --quick``: runs in seconds, packing removes the padding."""

from ray_rlhf.bench.run import main


def test_quick_learner_packing_bench(tmp_path, tiny_policy_path, capsys):
    assert main(["--learner-packing", "--quick", "--out", str(tmp_path), "--cache-dir", str(tiny_policy_path.parent)]) == 0
    import json

    result = json.loads((tmp_path / "learner_packing.json").read_text())
    on = [r for r in result["table"] if r["packing"]]
    off = [r for r in result["table"] if not r["packing"]]
    assert len(on) == len(off) == 2
    assert all(r["padded_tokens"] == r["real_tokens"] for r in on)
    assert all(r["padded_tokens"] > r["real_tokens"] for r in off)
    assert "padded/real tokens" in capsys.readouterr().out
