"""pcasurgery: PCA surgery on the attention weights of Llama-family models.

The numeric core is C (``pcasurgery._C``, OpenBLAS + LAPACKE); this package
orchestrates. Public API:

- :class:`StackedPCA`: scikit-learn-shaped PCA of row-stacked matrices.
- :class:`LlamaModel`, :class:`LlamaConfig`: a Llama-family decoder whose
  forward pass runs in C (loading Hugging Face folders, model ids from the
  local cache, llama2.c checkpoints and the embedded demo model).
- :mod:`pcasurgery.surgery`, :mod:`pcasurgery.evaluate`,
  :mod:`pcasurgery.experiment`: the surgery, its measurement, and the
  experiments the CLI (``python -m pcasurgery``) runs.
- :func:`set_num_threads`, :func:`get_num_threads`, :func:`max_threads`,
  :func:`blas_info`, :func:`blas_library`: pcasurgery's own OpenBLAS thread
  pool.
"""
try:
    from . import _C  # noqa: F401  (loads the compiled core, or fails clearly)
except ImportError as _e:  # pragma: no cover - depends on the install layout
    # _C finds libscipy_openblas.so through an rpath into the sibling
    # site-packages/scipy_openblas32; where that does not hold (an editable
    # install, an unusual layout) load the library into the process first.
    try:
        import scipy_openblas32 as _scipy_openblas32  # noqa: F401

        from . import _C  # noqa: F401
    except ImportError:
        import os as _os

        raise ImportError(
            f"pcasurgery's compiled core (pcasurgery._C) cannot be loaded: {_e}. "
            f"If {_os.path.dirname(__file__)} is a source checkout, build it first "
            "(`pip install .` and run from another folder, or "
            "`python setup.py build_ext --inplace`)."
        ) from _e

from .config import LlamaConfig  # noqa: E402
from .model import LlamaModel  # noqa: E402
from .pca import StackedPCA  # noqa: E402
from .threads import (  # noqa: E402
    blas_info,
    blas_library,
    get_num_threads,
    max_threads,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "StackedPCA",
    "set_num_threads",
    "get_num_threads",
    "max_threads",
    "blas_info",
    "blas_library",
    "__version__",
]
