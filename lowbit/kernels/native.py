"""Small C kernels compiled at first use with the system C compiler and called through ``ctypes``.

:func:`native_library` builds ``source`` once per (source, CPU feature set) into lowbit's cache
(``-O3 -march=native``, OpenMP when the compiler has it), loads it and declares each function's
argument types. When no compiler is present, or the build fails, it returns ``None`` with the
reason (logged once), and the caller takes its torch fallback. ``ctypes`` releases the GIL for the
duration of a call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# C helpers that several kernel sources paste in (after their own #includes; AVX-512 builds only).
EXP512_C = r"""
#if defined(__AVX512F__)
/* exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in a 16-bit-exact head and a tail),
   exp(r) by its degree-7 Taylor polynomial (truncation < 1.1e-8 relative), times 2^n by vscalefps. */
static inline __m512 lb_exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif
"""

_libs: dict[str, tuple[ctypes.CDLL | None, str]] = {}


def cpu_key() -> str:
    """Identify the CPU feature set: the libraries are built with -march=native."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(name: str, source: str, path: Path, cflags: tuple[str, ...]) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.c"
        src.write_text(source)
        out = Path(tmp) / f"{name}.so"
        base = [cc, "-O3", "-march=native", *cflags, "-shared", "-fPIC", str(src), "-o", str(out)]
        for extra in (["-fopenmp"], []):  # OpenMP if the compiler has it, else one thread
            res = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
            if res.returncode == 0:
                break
        else:
            raise OSError(f"compiling the {name} kernel failed: {res.stderr.strip()[:300]}")
        from lowbit.models._cache import atomic_write_file

        atomic_write_file(path, lambda tmp_path: shutil.copyfile(out, tmp_path))


def native_library(name: str, source: str, signatures: dict[str, list], cflags: tuple[str, ...] = ()
                   ) -> tuple[ctypes.CDLL | None, str]:
    """The compiled library for ``source`` (built on first use, cached by source, flags and CPU), or
    ``(None, why)``. ``signatures`` maps each exported function to its ctypes argument types."""
    if name in _libs:
        return _libs[name]
    try:
        from lowbit.models._cache import cache_dir

        key = hashlib.sha256((source + " ".join(cflags) + cpu_key()).encode()).hexdigest()[:16]
        path = cache_dir() / "kernels" / f"{name}-{key}.so"
        if not path.is_file():
            log.info("building the %s kernel -> %s", name, path)
            _build(name, source, path, cflags)
        lib = ctypes.CDLL(str(path))
        for fn, argtypes in signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = None
        _libs[name] = (lib, "")
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        _libs[name] = (None, str(exc))
        log.warning("native %s kernel unavailable (%s): using the torch fallback", name, exc)
    return _libs[name]
