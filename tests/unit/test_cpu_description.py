"""The CPU named beside every benchmark number: model name and vector instructions, from
hand-written ``/proc/cpuinfo`` excerpts of the machine classes these benchmarks run on."""

from __future__ import annotations

from ray_rlhf.telemetry.cpu import describe_cpu, parse_cpuinfo, vector_isa

XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2
"""
EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
EPYC_AVX512 = "model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni avx512vl\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n"


def test_the_first_processors_name_and_flags():
    model, flags = parse_cpuinfo(XEON_AMX)
    assert model == "Intel(R) Xeon(R) Platinum 8480+" and "amx_tile" in flags  # the first block, not the second
    assert parse_cpuinfo("") == ("", set())


def test_each_machine_class_is_told_apart():
    assert describe_cpu(XEON_AMX) == "Intel(R) Xeon(R) Platinum 8480+ (AVX-512 with BF16, VNNI; AMX (BF16, INT8))"
    assert describe_cpu(EPYC_AVX512) == "AMD EPYC (AVX-512 with BF16, VNNI; no AMX)"
    assert describe_cpu(EPYC_AVX2) == "AMD EPYC (AVX2, no AVX-512)"
    assert vector_isa({"avx512f"}) == "AVX-512; no AMX"
    assert vector_isa({"fp", "asimd"}) == "no AVX2"
    assert vector_isa(set()) == "instruction set unknown"
    assert describe_cpu(ARM).endswith("(no AVX2)")  # no model name line: the platform's name stands in
