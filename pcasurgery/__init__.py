"""pcasurgery: PCA surgery on the attention weights of Llama-family models.

The numeric core is C (``pcasurgery._C``, OpenBLAS + LAPACKE); this package
orchestrates. Public API so far:

- :class:`StackedPCA`: scikit-learn-shaped PCA of row-stacked matrices.
- :func:`set_num_threads`, :func:`get_num_threads`, :func:`blas_info`:
  pcasurgery's own OpenBLAS thread pool.
"""
try:
    # Load the OpenBLAS that _C links against (libscipy_openblas.so) into the
    # process before _C itself, so the dynamic loader finds it even where the
    # rpath does not point at it (editable installs, unusual layouts).
    import scipy_openblas32 as _scipy_openblas32  # noqa: F401
except ImportError:  # built with PCASURGERY_BLAS=system
    pass

from . import _C  # noqa: E402
from .pca import StackedPCA  # noqa: E402
from .threads import blas_info, get_num_threads, set_num_threads  # noqa: E402

__version__ = "0.1.0"

__all__ = ["StackedPCA", "set_num_threads", "get_num_threads", "blas_info", "__version__"]
