"""A float32 matmul kernel for few rows and large weights, on AVX-512 CPUs.

Why: a streaming block multiplies M = 36 rows (3 guidance rows x 12 tokens) by ~450 MB of
weights per forward pass, so every weight byte comes from memory once per call and is used
36 times. The library kernels (MKL, oneDNN) run such a call as "load, then compute": their
time is the memory time plus the compute time (measured: it grows by one row's compute per
row, from the memory-bound M = 1 time). This kernel overlaps the two. Weights are packed
into panels of 32 columns; while a thread multiplies the rows by one panel (held in L2, reused
by every 12-row tile), it software-prefetches the next panel, spread evenly over the panel's
work. Measured on the 2-core development machine at M = 36: 1.3-1.4x faster than oneDNN with
prepacked weights for every linear shape of the `paper` config (docs/benchmarks.md).

Arithmetic: each output is bias + sum over k in increasing order of x[m, k] * w[n, k], with
fused multiply-adds in float32, so it differs from MKL/oneDNN by rounding only (~1e-6), and a
row's result does not depend on the other rows or on the thread count. The optional GELU
(tanh approximation) epilogue computes x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
which equals 0.5 x (1 + tanh u), with a polynomial exp (relative error ~1e-7).

The kernel is C, compiled on first use with the system C compiler into a per-user cache
(`AVATAR_FORCING_KERNEL_DIR`, default `~/.cache/avatar_forcing/kernels`; a build step can fill
it ahead of time with `python -m avatar_forcing.nn.small_gemm`). It runs on torch's OpenMP
thread pool (it links the same `libgomp.so.1`, which torch has already loaded). Where any of
that is missing (no compiler, no AVX-512, another OpenMP runtime, not Linux x86-64), or with
`AVATAR_FORCING_SMALL_GEMM=0`, `available()` is False and callers use their other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

PANEL = 32  # weight columns per panel (two 16-float registers); N must be a multiple
K_CHUNK = 1024  # reduction length per pass over a panel (keeps the rows' slice in L2)
ABI = 1

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define NB 32        /* columns per panel */
#define MT 12        /* rows per tile: 12 x 2 accumulators of 16 floats */
#define KC 1024      /* reduction chunk */

int af_abi(void) { return 1; }

/* Weights are packed [chunk][panel][kc][NB]: chunk c holds k in [c*KC, c*KC + kc). */
static const float* chunk_panel(const float* w, long K, long N, long c, long p) {
    long kc = K - c * KC < KC ? K - c * KC : KC;
    return w + c * KC * N + p * kc * NB;
}

static long chunk_len(long K, long c) { return K - c * KC < KC ? K - c * KC : KC; }

/* Spreads prefetches of `lines` cache lines evenly over the panel's tiles * kc steps. */
typedef struct { const char* next; long lines, done, acc, steps; } Prefetch;

static inline void prefetch_step(Prefetch* pf) {
    if (!pf->next) return;
    pf->acc += pf->lines;
    while (pf->acc >= pf->steps && pf->done < pf->lines) {
        _mm_prefetch(pf->next + pf->done * 64, _MM_HINT_T1);
        pf->done++;
        pf->acc -= pf->steps;
    }
}

/* acc (MT x NB, in memory between chunks) += a (kc x MT) . b (kc x NB) */
static void tile(const float* a, long kc, const float* b, float* acc_io, int first, Prefetch* pf) {
    __m512 acc[MT][2];
    for (int r = 0; r < MT; ++r) {
        acc[r][0] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_io + r * NB);
        acc[r][1] = first ? _mm512_setzero_ps() : _mm512_load_ps(acc_io + r * NB + 16);
    }
    for (long k = 0; k < kc; ++k) {
        __m512 b0 = _mm512_load_ps(b + k * NB), b1 = _mm512_load_ps(b + k * NB + 16);
        const float* ak = a + k * MT;
#pragma GCC unroll 12
        for (int r = 0; r < MT; ++r) {
            __m512 av = _mm512_set1_ps(ak[r]);
            acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
        }
        prefetch_step(pf);
    }
    for (int r = 0; r < MT; ++r) {
        _mm512_store_ps(acc_io + r * NB, acc[r][0]);
        _mm512_store_ps(acc_io + r * NB + 16, acc[r][1]);
    }
}

/* exp for |x| <= 88 (clamped outside), Cephes-style polynomial, ~1 ulp */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* GELU, tanh approximation: x * sigmoid(2u) = 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3) */
static inline __m512 gelu16(__m512 x) {
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* y (M, N) = x (M, K) . w.T + bias, optionally GELU; threads split the panels. */
void af_sgemm(const float* x, long M, long K, const float* w, long N, const float* bias, float* y, int gelu,
              int threads) {
    long tiles = (M + MT - 1) / MT, panels = N / NB, chunks = (K + KC - 1) / KC;
    /* rows -> tiles [tile][k][MT], zero rows past M: every tile takes the full-size path */
    float* xt = aligned_alloc(64, ((size_t)(tiles * K * MT) * 4 + 63) / 64 * 64);
    for (long t = 0; t < tiles; ++t)
        for (long r = 0; r < MT; ++r) {
            long m = t * MT + r;
            for (long k = 0; k < K; ++k) xt[(t * K + k) * MT + r] = m < M ? x[m * K + k] : 0.0f;
        }
#pragma omp parallel num_threads(threads)
    {
        long nt = omp_get_num_threads(), id = omp_get_thread_num();
        long p0 = panels * id / nt, p1 = panels * (id + 1) / nt;
        float* acc = aligned_alloc(64, (size_t)((p1 > p0 ? p1 - p0 : 1) * tiles * MT * NB) * 4);
        for (long c = 0; c < chunks; ++c) {
            long kc = chunk_len(K, c);
            for (long p = p0; p < p1; ++p) {
                /* this thread's next chunk-panel: the next panel, or the first panel of the next chunk */
                Prefetch pf = {0, 0, 0, 0, tiles * kc};
                if (p + 1 < p1) {
                    pf.next = (const char*)chunk_panel(w, K, N, c, p + 1);
                    pf.lines = kc * NB * 4 / 64;
                } else if (c + 1 < chunks) {
                    pf.next = (const char*)chunk_panel(w, K, N, c + 1, p0);
                    pf.lines = chunk_len(K, c + 1) * NB * 4 / 64;
                }
                const float* b = chunk_panel(w, K, N, c, p);
                for (long t = 0; t < tiles; ++t)
                    tile(xt + (t * K + c * KC) * MT, kc, b, acc + ((p - p0) * tiles + t) * MT * NB, c == 0, &pf);
            }
        }
        for (long p = p0; p < p1; ++p)
            for (long t = 0; t < tiles; ++t) {
                const float* a = acc + ((p - p0) * tiles + t) * MT * NB;
                long rows = M - t * MT < MT ? M - t * MT : MT;
                for (long r = 0; r < rows; ++r)
                    for (int v = 0; v < 2; ++v) {
                        __m512 o = _mm512_load_ps(a + r * NB + 16 * v);
                        if (bias) o = _mm512_add_ps(o, _mm512_loadu_ps(bias + p * NB + 16 * v));
                        if (gelu) o = gelu16(o);
                        _mm512_storeu_ps(y + (t * MT + r) * N + p * NB + 16 * v, o);
                    }
            }
        free(acc);
    }
    free(xt);
}
"""

_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")

_lib: ctypes.CDLL | None = None
_state: str | None = None  # None: not tried; "ok"; otherwise why it is unavailable


def _kernel_dir() -> Path:
    default = Path.home() / ".cache" / "avatar_forcing" / "kernels"
    return Path(os.environ.get("AVATAR_FORCING_KERNEL_DIR", default))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, version]).encode()).hexdigest()[:16]
    return _kernel_dir() / f"af_small_gemm_{digest}.so"


def build() -> Path:
    """Compile the kernel into the cache (if not there yet); returns the library's path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (set CC)")
    target = _library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "small_gemm.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)], capture_output=True, check=True)
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


def _openmp_runtimes() -> set[str]:
    """Distinct OpenMP runtime files mapped into this process."""
    names = ("libgomp", "libiomp", "libomp")
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if any(n in line for n in names)}
    return {os.path.realpath(p) for p in paths}


def _load() -> str:
    global _lib
    if os.environ.get("AVATAR_FORCING_SMALL_GEMM", "1") == "0":
        return "disabled by AVATAR_FORCING_SMALL_GEMM=0"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "needs Linux on x86-64"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return f"needs AVX-512 (cpu capability {torch.backends.cpu.get_cpu_capability()})"
    before = _openmp_runtimes()
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        return f"build or load failed: {exc}"
    # Two OpenMP runtimes would each keep a thread pool: then torch and this kernel fight for cores.
    if len(_openmp_runtimes() | before) > 1 or lib.af_abi() != ABI:
        return "the kernel did not share torch's OpenMP runtime"
    lib.af_sgemm.restype = None
    lib.af_sgemm.argtypes = [
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    _lib = lib
    return "ok"


def available() -> bool:
    global _state
    if _state is None:
        _state = _load()
    return _state == "ok"


def status() -> str:
    """'ok', or why the kernel is not used."""
    available()
    assert _state is not None
    return _state


def supports(out_features: int) -> bool:
    return out_features % PANEL == 0


def pack(weight: Tensor) -> Tensor:
    """(N, K) float32 -> the kernel's layout [K chunk][N panel][k][32], flat and 64-byte aligned."""
    N, K = weight.shape
    if not supports(N):
        raise ValueError(f"pack: out features {N} are not a multiple of {PANEL}")
    w = weight.detach().float()
    chunks = [
        w[:, c : c + K_CHUNK].reshape(N // PANEL, PANEL, -1).transpose(1, 2).reshape(-1) for c in range(0, K, K_CHUNK)
    ]
    packed = torch.cat(chunks)
    if packed.data_ptr() % 64:  # torch's CPU allocations are 64-byte aligned; the kernel relies on it
        raise RuntimeError("pack: unaligned allocation")
    return packed


def matmul(x: Tensor, packed: Tensor, bias: Tensor | None, out_features: int, gelu: bool = False) -> Tensor:
    """x (M, K) float32 -> x @ w.T + bias (M, N), then GELU if asked; `packed` from `pack(w)`."""
    if not available():
        raise RuntimeError(f"small_gemm: {status()}")
    assert _lib is not None
    x = x.contiguous()
    M, K = x.shape
    if packed.numel() != out_features * K:
        raise ValueError(f"matmul: packed weights hold {packed.numel()} values, expected {out_features} x {K}")
    y = torch.empty(M, out_features, dtype=torch.float32)
    b = None if bias is None else bias.detach().contiguous()  # held until the call returns
    # ctypes releases the GIL for the call; the kernel reads the tensors in place.
    _lib.af_sgemm(
        x.data_ptr(),
        M,
        K,
        packed.data_ptr(),
        out_features,
        None if b is None else b.data_ptr(),
        y.data_ptr(),
        int(gelu),
        torch.get_num_threads(),
    )
    return y


if __name__ == "__main__":
    print(build() if available() else status())
