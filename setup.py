"""Build the C core, pcasurgery._C, from csrc/*.c.

BLAS/LAPACKE come from one of two places, chosen by PCASURGERY_BLAS:
  scipy-openblas32 (default)  the OpenBLAS wheel that NumPy and SciPy ship,
                              pinned in pyproject.toml; symbols carry a
                              `scipy_` prefix. Found at run time through an
                              rpath into the sibling site-packages folder, and
                              by `import scipy_openblas32` before `_C` loads.
  system                      an OpenBLAS with LAPACKE found by pkg-config
                              (PCASURGERY_BLAS_PKG, default "openblas"; also
                              "lapacke" when pkg-config knows it).
Build switches:
  PCASURGERY_SANITIZE=1       AddressSanitizer + UndefinedBehaviorSanitizer.
  PCASURGERY_DEBUG=1          -O0 -g, assertions on.
"""
import os
import shlex
import subprocess
import sys
from glob import glob

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class always_build_ext(build_ext):
    """Rebuild every time: the build directory does not record which BLAS or
    which sanitizer flags an old object was built with, and the core is a
    few small C files that build in seconds."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.force = True


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"PCASURGERY_BLAS=system: `pkg-config {' '.join(args)}` failed ({e}); "
                 "install OpenBLAS with LAPACKE and pkg-config "
                 "(Debian: apt-get install libopenblas-dev liblapacke-dev pkg-config)")
    return shlex.split(out)


def blas_options() -> dict:
    mode = os.environ.get("PCASURGERY_BLAS", "scipy-openblas32")
    if mode == "system":
        pkgs = os.environ.get("PCASURGERY_BLAS_PKG", "openblas").split()
        if subprocess.run(["pkg-config", "--exists", "lapacke"]).returncode == 0:
            pkgs.append("lapacke")
        return {
            "define_macros": [("PCS_BLAS_PREFIX", "")],
            "extra_compile_args": _pkg_config("--cflags", *pkgs),
            "extra_link_args": _pkg_config("--libs", *pkgs),
        }
    if mode != "scipy-openblas32":
        sys.exit(f"PCASURGERY_BLAS must be 'scipy-openblas32' or 'system', got {mode!r}")
    import scipy_openblas32 as sob

    return {
        "define_macros": [("PCS_BLAS_PREFIX", "scipy_")],
        "library_dirs": [sob.get_lib_dir()],
        "libraries": [sob.get_library()],
        # site-packages/pcasurgery/_C*.so -> site-packages/scipy_openblas32/lib
        "extra_link_args": ["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib"],
    }


def build_flags() -> tuple[list[str], list[str]]:
    cflags = ["-std=c11", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter",
              "-Wno-missing-field-initializers", "-fno-math-errno"]
    ldflags: list[str] = ["-pthread"]
    if os.environ.get("PCASURGERY_DEBUG") == "1":
        cflags += ["-O0", "-g", "-UNDEBUG"]
    else:
        cflags += ["-O2"]
    if os.environ.get("PCASURGERY_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-g"]
        cflags += san
        ldflags += san
    return cflags, ldflags


opts = blas_options()
cflags, ldflags = build_flags()
ext = Extension(
    "pcasurgery._C",
    sources=sorted(glob("csrc/*.c")),
    depends=sorted(glob("csrc/*.h")),
    include_dirs=[numpy.get_include(), "csrc"],
    define_macros=opts.get("define_macros", []),
    library_dirs=opts.get("library_dirs", []),
    libraries=opts.get("libraries", []),
    extra_compile_args=cflags + opts.get("extra_compile_args", []),
    extra_link_args=ldflags + opts.get("extra_link_args", []),
)

setup(ext_modules=[ext], cmdclass={"build_ext": always_build_ext})
