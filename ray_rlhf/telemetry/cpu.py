"""What CPU a benchmark ran on, in words: its model name and the vector instructions it has.

CPUs of one model name differ in what they expose (an AMD EPYC VM may or may not show AVX-512;
an Intel Xeon may add AMX), and fp32/bf16 matmul speed follows those flags, not the name. So a
reported number names both: ``AMD EPYC (AVX-512 with BF16, VNNI; no AMX)``. Read from
``/proc/cpuinfo``; never assumed.
"""

from __future__ import annotations

import platform


def vector_isa(flags: set[str]) -> str:
    """The widest vector instructions among the CPU ``flags`` (as /proc/cpuinfo spells them), with
    the bf16 and int8 extensions that matter to matmuls."""
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in flags]
        isa = "AVX-512" + (f" with {', '.join(extras)}" if extras else "")
    elif "avx2" in flags:
        isa = "AVX2, no AVX-512"
    elif flags:
        isa = "no AVX2"
    else:
        return "instruction set unknown"
    amx = [name for flag, name in (("amx_bf16", "BF16"), ("amx_int8", "INT8")) if flag in flags]
    return isa + (f"; AMX ({', '.join(amx)})" if amx else "; no AMX" if "avx512f" in flags else "")


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in ``/proc/cpuinfo``'s ``text`` ("" and an empty
    set where a field is missing, e.g. on ARM, which says ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def read_cpuinfo() -> str:
    """This machine's ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """This machine's CPU flags, as /proc/cpuinfo spells them (empty where unknown)."""
    return parse_cpuinfo(read_cpuinfo())[1]


def describe_cpu(cpuinfo: str | None = None) -> str:
    """``"<model name> (<vector ISA>)"`` of this machine (or of the ``cpuinfo`` text given)."""
    model, flags = parse_cpuinfo(read_cpuinfo() if cpuinfo is None else cpuinfo)
    return f"{model or platform.processor() or platform.machine()} ({vector_isa(flags)})"

