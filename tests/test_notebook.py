"""The notebook executes, so it cannot rot."""
from __future__ import annotations

import pytest
from conftest import ROOT

NB = ROOT / "notebooks" / "surgery.ipynb"


def test_notebook_executes_on_the_default_model(monkeypatch, tmp_path):
    """As on a fresh machine: an empty Hugging Face cache, so "auto" is the
    embedded demo model and no data is needed."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    nb = nbformat.read(NB, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NB.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 4
    text = "".join(o.get("text", "") for o in outputs)
    assert "of the KV cache: best" in text and "rank reduction alone (16-bit latents) beats quantising" in text
    assert text.startswith("model: pcasurgery's embedded demo model")
