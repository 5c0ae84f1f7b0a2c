"""tools/fuzz.py itself: it must see what it is there to find (a crash, a
hang, an undocumented exception) and pass what it should pass."""
from __future__ import annotations

import ctypes
import random
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402


def fake_load(fmt, path):
    kind = path.read_bytes()
    if kind == b"crash":
        ctypes.string_at(0)  # SIGSEGV
    elif kind == b"hang":
        time.sleep(60)
    elif kind == b"type":
        raise TypeError("an undocumented exception")
    elif kind == b"value":
        raise ValueError("a documented one")


@pytest.mark.parametrize("batch", [1, 3])
def test_harness_classifies_every_outcome(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(fuzz, "load", fake_load)
    kinds = [b"ok", b"value", b"crash", b"ok", b"hang", b"type", b"value", b"ok"]
    path = tmp_path / "case"
    got = {}
    fuzz.run_cases("x", path, lambda i: kinds[i], len(kinds), timeout=2.0, batch=batch,
                   on_result=lambda i, o, d: got.setdefault(i, (o, d)))
    outcomes = [got[i][0] for i in range(len(kinds))]
    assert outcomes == ["ok", "expected", "crash", "ok", "hang", "unexpected", "expected", "ok"]
    assert "killed by signal" in got[2][1] and "TypeError: an undocumented exception" in got[5][1]


def test_mutations_are_reproducible_and_change_the_file():
    data = b'{"hidden_size": 32, "vocab_size": 300, "rope_theta": 10000.0}'
    a = [fuzz.mutate(data, random.Random(f"c/0/{i}"), "config.json", [b"xyz"]) for i in range(50)]
    b = [fuzz.mutate(data, random.Random(f"c/0/{i}"), "config.json", [b"xyz"]) for i in range(50)]
    assert a == b and sum(x != data for x in a) >= 45
    header_only = fuzz.mutate(b"H" * 100 + b"D" * 100, random.Random(1), "safetensors-header",
                              [], header_end=100)
    assert header_only.endswith(b"D" * 50)
