"""perf/compare.py: the side-by-side run with spikingjelly counts what it says it counts.

spikingjelly's Triton LIF runs here under the interpreter through the comparison's
adapter; it must compute what snnorm's LIF computes, or the bytes compare different work.
"""

from __future__ import annotations

import pytest
import torch

from perf import compare
from snnorm import neuron
from tolerances import PEER_KERNEL_FP32

SHAPE = (2, 2, 4, 4, 4)


def test_spikingjelly_triton_lif_computes_snnorms_lif():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(SHAPE, generator=g) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    spikes = compare.SpikingjellyTritonLIF()(x)
    ref = neuron.LIFNode(step_mode="m")(x_ref)  # same defaults: τ 2, decay_input, θ 1, v_r 0, Sigmoid(4)
    assert torch.equal(spikes, ref)
    grad = torch.randn(SHAPE, generator=g)
    spikes.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **PEER_KERNEL_FP32)


def test_adapter_restores_spikingjellys_cuda_check():
    from spikingjelly._ops.lif import triton as sj_triton

    compare.SpikingjellyTritonLIF()(torch.randn(SHAPE))
    assert sj_triton.torch is torch
    with pytest.raises(RuntimeError, match="CUDA"):
        sj_triton._forward_impl(torch.randn(SHAPE), torch.zeros(SHAPE[1:]), 2.0, True, 1.0, 0.0, False, 4.0, False, 0)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / compare.CSV_NAME
    rows = compare.run(SHAPE, log=lambda line: None)
    compare.write_csv(rows, out)
    return rows, out


@pytest.mark.slow  # the module's side-by-side run (~13 s)
def test_every_block_measured_for_both_libraries(rows):
    rows, _ = rows
    for block in compare.BLOCKS:
        for library in compare.LIBRARIES:
            metrics = {r["metric"]: r["value"] for r in rows if r["block"] == block and r["library"] == library}
            if block == "tab_lif" and library == "spikingjelly":
                assert set(metrics) == {"absent"}  # spikingjelly has no TAB
                continue
            assert set(metrics) == set(compare.METRICS), (block, library)
            assert all(float(v) > 0 for v in metrics.values()), (block, library, metrics)


@pytest.mark.slow  # the module's side-by-side run (~13 s)
def test_snnorm_moves_no_more_bytes_than_spikingjelly(rows):
    rows, _ = rows
    total = {}
    for r in rows:
        if r["metric"] in ("fwd_bytes", "bwd_bytes"):
            key = (r["block"], r["library"])
            total[key] = total.get(key, 0.0) + float(r["value"])
    for block in compare.BLOCKS:
        if (block, "spikingjelly") in total:
            assert total[(block, "snnorm")] <= total[(block, "spikingjelly")], (block, total)


@pytest.mark.slow  # the module's side-by-side run (~13 s)
def test_report_section_renders_the_table(rows):
    _, out = rows
    lines = compare.section(out.parent)
    assert lines[0].startswith("## Side by side with spikingjelly")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| block")]
    assert [line.split(" | ")[0][2:] for line in body] == list(compare.BLOCKS)


def test_timing_mode_times_every_library():
    rows = compare.run(SHAPE, blocks=("bn_lif",), log=lambda line: None, timing=True, reps=2)
    assert {r["library"] for r in rows} == set(compare.LIBRARIES)
    assert all(r["metric"] == "ms_step" and float(r["value"]) > 0 for r in rows)
