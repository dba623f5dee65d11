"""The GPU check of the learner in its CPU mode: ``python -m ray_rlhf.bench.learner_check --tiny --device cpu``
builds the learner on a random-init model, joins a process group of one (FSDP2 at world size 1) and
times prepare and update, with packing off and on; the token log-prob check runs too."""

from __future__ import annotations

import json

from ray_rlhf.bench import learner_check


def test_variants_put_the_telling_ones_first_and_cover_the_grid():
    names = [v.name for v in learner_check.variants(["1.5b", "0.5b"])]
    assert len(names) == len(set(names)) == 16  # 2 shapes x gc x compile x packing
    assert names[:3] == ["1.5b gc=off compile=off packing=on", "1.5b gc=off compile=off packing=off",
                         "1.5b gc=on compile=off packing=on"]


def test_cpu_mode_runs_the_learner_with_and_without_packing(tmp_path, capsys):
    out = tmp_path / "check.json"
    rc = learner_check.main(["--tiny", "--device", "cpu", "--only", "compile=off", "--variants", "2",
                             "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(out.read_text())
    assert report["token_logprobs"]["ok"]
    rows = {r["variant"]: r for r in report["results"]}
    on, off = rows["tiny gc=off compile=off packing=on"], rows["tiny gc=off compile=off packing=off"]
    for r in (on, off):
        assert "error" not in r, r
        assert r["steps"] == 2 and r["update_s"] > 0 and r["prepare_s"] > 0
        assert 0 < r["mfu_update"] < 1 and r["update_tokens_per_s"] > 0
    # packed passes run the real tokens only; padded ones more (long-tailed response lengths)
    assert on["padded_over_real"] == 1.0
    assert off["padded_over_real"] > 1.05
    assert "| tiny gc=off compile=off packing=on |" in printed
