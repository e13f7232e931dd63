"""The kernel benchmarks (benchmarks/linear_kernels.py, attention_kernels.py, decoder_stack_step.py,
cpu_peak.py) and the weight-rounding agreement check
run end to end on tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tessera.backends.cpu import group_quant_linear as cpu_quant

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args], capture_output=True, text=True, timeout=600, check=True
    )
    return result.stdout


def test_linear_kernels_prints_one_row_per_row_count() -> None:
    out = _run("linear_kernels.py", "--rows", "1", "64", "--repeats", "1")
    layers, head = out.split("LM head")
    rows = [line for line in layers.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "64"]
    assert rows[1].split("|")[4].strip() == "-"  # torch's int4 kernel is timed at decode sizes only
    assert all(float(cell) > 0 for cell in rows[0].split("|")[2:5])
    tessera_int4 = [r.split("|")[5].strip() for r in rows]
    assert all(cell == "n/a" for cell in tessera_int4) or all(float(cell) > 0 for cell in tessera_int4)
    head_rows = [line for line in head.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in head_rows] == ["1", "64"]
    assert all(float(r.split("|")[2]) > 0 for r in head_rows)
    tessera_q8 = [r.split("|")[3].strip() for r in head_rows]
    assert all(cell == "n/a" for cell in tessera_q8) or all(float(cell) > 0 for cell in tessera_q8)


def test_attention_kernels_prints_decode_and_prefill_tables() -> None:
    out = _run("attention_kernels.py", "--repeats", "1")
    if "decode not measured" not in out:
        rows = [line for line in out.splitlines() if line.startswith("| 32 x 600 |")]
        assert len(rows) == 1
        kernel, layer_call = (float(cell.replace(",", "")) for cell in rows[0].strip("|").split("|")[1:3])
        assert kernel > 0 and layer_call > 0
    assert "| 600 |" in out


def test_decoder_stack_step_prints_one_row_per_batch() -> None:
    if not cpu_quant.kernel_available():
        pytest.skip("the decoder stack needs the CPU kernels (AVX512-BF16, VNNI, a C++ build)")
    out = _run("decoder_stack_step.py", "--requests", "1", "3", "--context", "20", "--calls", "2")
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r[0].strip() for r in rows] == ["1 x 20", "3 x 20"]
    assert all(float(r[1]) > 0 for r in rows)


@pytest.mark.skipif(not cpu_quant.kernel_available(), reason="needs AVX512-BF16 and VNNI")
def test_cpu_peak_times_the_dot_products_and_each_kind_beside_them() -> None:
    out = _run("cpu_peak.py", "--threads", "2", "--iterations", "20000")
    peaks = [line.split("|") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [p[1].strip() for p in peaks] == ["1", "2"]
    assert all(float(p[3]) > 0 and float(p[5]) > 0 for p in peaks)
    kinds = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| v")}
    assert {"vfmadd231ps", "vmulps", "vaddps", "vpunpcklbw"} <= kinds


def test_weight_rounding_agreement_prints_both_arithmetics() -> None:
    out = _run("weight_rounding_agreement.py", "--prompts", "1", "--tokens", "2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| bf16")]
    assert [r[1].strip() for r in rows] == ["bf16 inputs, exact weights", "bf16 inputs, bf16 weights"]
    assert all(r[2].strip().endswith("% of 2") for r in rows)
