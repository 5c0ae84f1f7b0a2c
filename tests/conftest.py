"""Shared fixtures and matrix generators for the test suite.

Data that tests read from ../shared (models, tokenizers, texts) is found
through PCASURGERY_SHARED, default: the `shared` folder next to the project.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PCASURGERY_SHARED", ROOT.parent / "shared"))
# calibrations the tests compute are cached here, never in the user's ~/.cache
os.environ.setdefault("PCASURGERY_CACHE", tempfile.mkdtemp(prefix="pcasurgery-test-cache-"))


def pytest_sessionstart(session):
    """Locally, tests that need ../shared skip without it; in CI (CI=true) a
    missing ../shared is an error, so that those tests cannot vanish."""
    if os.environ.get("CI", "").lower() in ("1", "true") and not (SHARED / "models").is_dir():
        raise pytest.UsageError(
            f"CI=true but the shared test data is missing: {SHARED} (set PCASURGERY_SHARED)"
        )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)


def with_spectrum(rng: np.random.Generator, n: int, d: int, sv: np.ndarray) -> np.ndarray:
    """An (n, d) float32 matrix U diag(sv) Vᵀ with random orthonormal U, V,
    plus a non-zero column mean (so that centering matters)."""
    r = len(sv)
    U, _ = np.linalg.qr(rng.standard_normal((n, r)))
    V, _ = np.linalg.qr(rng.standard_normal((d, r)))
    X = (U * sv) @ V.T + rng.standard_normal(d) * sv[0] / np.sqrt(n)
    return X.astype(np.float32)


def make_matrix(kind: str, rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Test matrices with the spectra PCA surgery meets:
    random  -- Gaussian entries, a flat Marchenko-Pastur spectrum;
    decay   -- singular values falling over 4 decades (eigenvalues over 8),
               like trained weights with a heavy head and a long tail;
    lowrank -- rank 5 (rank-deficient: most eigenvalues are zero);
    """
    r = min(n, d)
    if kind == "random":
        return (rng.standard_normal((n, d)) + 0.5).astype(np.float32)
    if kind == "decay":
        return with_spectrum(rng, n, d, 10.0 ** (-4.0 * np.arange(r) / r))
    if kind == "lowrank":
        return with_spectrum(rng, n, d, np.array([5.0, 3.0, 2.0, 1.0, 0.5]))
    raise ValueError(kind)


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """python -m pcasurgery ARGS; env: variables set on top of ours."""
    # `python -m` puts the working folder on sys.path: run outside the source
    # tree, so that the installed package (with its compiled core) is used
    return subprocess.run([sys.executable, "-m", "pcasurgery", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or tempfile.gettempdir(),
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


_REPORT: list[str] = []


@pytest.fixture
def report():
    """report(line): a measured number to print in the test run's summary."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)
