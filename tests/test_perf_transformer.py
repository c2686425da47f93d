"""perf/transformer.py: both libraries' spiking-transformer blocks compute the same function,
and the side-by-side run measures every block for both."""

from __future__ import annotations

import pytest
import torch

from perf import compare, transformer

SHAPE = (2, 2, 8, 16)  # [T, B, L, D]


@pytest.mark.parametrize("block", [b if b.endswith("_lif") else pytest.param(b, marks=pytest.mark.slow)
                                   for b in transformer.BLOCKS])
def test_both_idioms_compute_the_same_block(block):
    """Same seed, same weights: the spikingjelly idiom (torch norms on transposed copies, its
    Triton LIF) and snnorm's (fused norm → LIF on the view) give the same spikes, so the bytes
    compare the same work. Spikes may differ only where the two norms' rounding meets θ."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.5
    outputs = {}
    for library in compare.LIBRARIES:
        torch.manual_seed(0)
        net, note = transformer.build(block, library, SHAPE)
        outputs[library] = net(x)
        if library == "snnorm":
            assert note.startswith("triton, ") and "0 of" not in note, note
            fused, total = note.split(", ")[1].split(" norm")[0].split(" of ")
            assert fused == total, note  # every norm → LIF pair runs the fused kernel
    ours, theirs = outputs["snnorm"], outputs["spikingjelly"]
    assert ours.shape == theirs.shape
    differ = (ours != theirs).float().mean().item()
    assert differ <= 0.01, f"{block}: {differ:.2%} of outputs differ"


@pytest.mark.slow
def test_every_block_measured_for_both_libraries(tmp_path):
    rows = transformer.run(SHAPE, log=lambda line: None)
    out = tmp_path / transformer.CSV_NAME
    compare.write_csv(rows, out)
    for block in transformer.BLOCKS:
        for library in compare.LIBRARIES:
            metrics = {r["metric"]: float(r["value"]) for r in rows if r["block"] == block and r["library"] == library}
            assert set(metrics) == set(compare.METRICS), (block, library)
            assert all(v > 0 for v in metrics.values()), (block, library, metrics)
    body = transformer.section(tmp_path)[4:-1]
    assert [line.split(" | ")[0][2:] for line in body[2:]] == list(transformer.BLOCKS)
