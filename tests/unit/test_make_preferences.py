"""The bundled SFT / preference sets: reproducible, chosen richer in the target letter, loadable."""

from importlib import resources
from pathlib import Path

from ray_rlhf.data.make_preferences import frequency, generate, write
from ray_rlhf.data.pairs import load_preferences, load_sft

BUNDLED = Path(str(resources.files("ray_rlhf.data") / "bundled"))


def test_generation_is_reproducible_and_chosen_has_more_of_the_letter():
    sft, prefs = generate(64, seed=3)
    assert (sft, prefs) == generate(64, seed=3)
    assert all(frequency(p["chosen"], p["letter"]) > frequency(p["rejected"], p["letter"]) for p in prefs)
    assert all(s["messages"][-1]["role"] == "assistant" for s in sft)


def test_bundled_files_are_what_the_script_writes_and_load(tmp_path):
    sft, prefs = write(tmp_path)
    assert sft.read_text() == (BUNDLED / "sft_letters.jsonl").read_text()
    assert prefs.read_text() == (BUNDLED / "prefs_letters.jsonl").read_text()
    assert len(load_sft(BUNDLED / "sft_letters.jsonl")) == 128
    assert len(load_preferences(BUNDLED / "prefs_letters.jsonl")) == 128
