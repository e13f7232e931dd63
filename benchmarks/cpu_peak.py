"""The CPU's AVX-512 dot-product peak, and which instructions share the dot products' pipes.

Builds `benchmarks/csrc/cpu_peak.cpp` with the C++ compiler (`c++ -O2 -march=native`, into a
temporary folder) and runs it: the time of one `vdpbf16ps` (bf16 pairs into float32, what the
4-bit kernel runs) and one `vpdpbusd` (8-bit, what the LM head runs) on 16 independent register
chains, on 1 to --threads threads at once; then, on one thread, what adding 8 instructions of
another kind per 16 dot products costs, in dot-product slots (1: it takes a dot product's pipe;
0: free). This is the machine's ceiling for the matmul kernels (backends/cpu/csrc/
group_quant_linear.cpp), whose epilogue FMAs are the instructions that take slots.

Needs a CPU with AVX512-BF16 and AVX512-VNNI and a C++ compiler.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "cpu_peak.cpp"


def cpu_has_instructions() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags and "avx512_vnni" in flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iterations", type=int, default=2_000_000, help="loop trips per timed run")
    args = parser.parse_args()
    compiler = os.environ.get("CXX", "c++")
    if not cpu_has_instructions():
        print("cpu_peak: this CPU lacks AVX512-BF16 or AVX512-VNNI", file=sys.stderr)
        return 2
    if shutil.which(compiler) is None:
        print(f"cpu_peak: no C++ compiler ({compiler})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "cpu_peak"
        subprocess.run([compiler, "-O2", "-march=native", "-std=c++17", "-pthread", str(SOURCE), "-o", str(binary)],
                       check=True)
        return subprocess.run([str(binary), str(args.threads), str(args.iterations)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
