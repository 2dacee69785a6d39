"""This CPU's float32 fused multiply-add throughput per core, 512-bit and 256-bit: the ceiling of the block-format
kernels (``hyprec/kernels/gguf_blocks.c``), which spend about one vector instruction per weight value.

What it measures
    A C loop of independent FMA chains (8 and 16, so latency cannot be the limit) on one thread, compiled with the
    kernels' flags for this CPU; prints G instructions/s and G multiply-adds/s. Together with the kernels' values/s
    (``benchmarks/generate_throughput.py``'s bandwidth column) it says whether decoding is bound by memory or by
    arithmetic.

Usage
    .venv/bin/python benchmarks/vector_throughput.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_flags, cpu_model

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#define RUN(VEC, SET1, FMA, LANES, CHAINS)                                                            \
    {                                                                                                \
        VEC a[CHAINS];                                                                               \
        for (int i = 0; i < CHAINS; i++) a[i] = SET1(1.0f + i * 1e-3f);                              \
        const VEC b = SET1(0.9999f), c = SET1(1e-4f);                                                \
        struct timespec t0, t1;                                                                      \
        clock_gettime(CLOCK_MONOTONIC, &t0);                                                         \
        const long n = 100000000;                                                                    \
        for (long i = 0; i < n; i++)                                                                 \
            for (int j = 0; j < CHAINS; j++) a[j] = FMA(a[j], b, c);                                 \
        clock_gettime(CLOCK_MONOTONIC, &t1);                                                         \
        const double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;                 \
        float sink = 0;                                                                              \
        for (int j = 0; j < CHAINS; j++) sink += ((float *)&a[j])[0];                                \
        printf("| %d-bit | %d | %.2f | %.1f | (%g)\n", LANES * 32, CHAINS, n * CHAINS / s / 1e9,     \
               n * CHAINS * (double)LANES / s / 1e9, sink);                                          \
    }
int main(void) {
    printf("| vector | chains | G FMA instructions/s | G multiply-adds/s |\n|---|---|---|---|\n");
#ifdef __AVX512F__
    RUN(__m512, _mm512_set1_ps, _mm512_fmadd_ps, 16, 8)
    RUN(__m512, _mm512_set1_ps, _mm512_fmadd_ps, 16, 16)
#endif
    RUN(__m256, _mm256_set1_ps, _mm256_fmadd_ps, 8, 8)
    RUN(__m256, _mm256_set1_ps, _mm256_fmadd_ps, 8, 16)
    return 0;
}
"""


def main() -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("no C compiler (cc/gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "fma.c", Path(tmp) / "fma"
        source.write_text(SOURCE)
        subprocess.run([compiler, "-O2", "-march=native", str(source), "-o", str(binary)], check=True)
        table = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    print(f"{cpu_model()}, flags {cpu_flags()}, one thread\n")
    print("\n".join(line.rsplit(" (", 1)[0] for line in table.splitlines()))


if __name__ == "__main__":
    main()
