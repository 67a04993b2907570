"""The tiny language-model demo runs (a 10-second version), uses cet.linear_cross_entropy,
reports consistent numbers and writes a PNG."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import crossent.torch as cet

DEMO = Path(__file__).resolve().parents[2] / "examples" / "tiny_lm.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("crossent_tiny_lm_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_lm_demo_short_run(tmp_path, monkeypatch, capsys):
    demo = _load_demo()
    calls = []
    real = cet.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(cet, "linear_cross_entropy", counting)
    plot = tmp_path / "curve.png"
    result = demo.main([
        "--epochs", "2", "--steps-per-epoch", "6", "--dim", "32", "--layers", "1",
        "--batch-size", "8", "--context", "32", "--max-bytes", "60000",
        "--held-out-bytes", "4096", "--plot", str(plot),
    ])
    out = capsys.readouterr().out
    history = result["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert len(calls) >= 12  # every training step's loss goes through linear_cross_entropy
    for row in history:
        assert math.isclose(row["perplexity"], math.exp(row["held_out_loss"]), rel_tol=1e-12)
        assert math.isclose(row["bits_per_byte"], row["held_out_loss"] / math.log(2), rel_tol=1e-12)
        assert f"perplexity {row['perplexity']:.3f}" in out
        assert f"{row['bits_per_byte']:.3f} bits/byte" in out
    # Twelve steps already beat the uniform byte model (8 bits/byte, loss ln 256).
    assert history[-1]["bits_per_byte"] < 8.0
    assert 0 < result["unigram_bits_per_byte"] < 8.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
