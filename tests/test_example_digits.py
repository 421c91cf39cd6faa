"""examples/train_digits.py runs, learns, and the two optimizers' curves overlap."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def test_train_digits_example(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plot = tmp_path / "loss.png"
    results = module.run(epochs=4, plot=str(plot), out=lambda *_: None)
    assert results["fastopt"]["accuracy"] > 0.85
    assert abs(results["fastopt"]["accuracy"] - results["torch"]["accuracy"]) < 0.02
    assert results["max_loss_gap"] < 1e-3
    assert plot.read_bytes()[:4] == b"\x89PNG"
