"""perf's measuring tools, the one place that the sweeps (perf/*.py) and the tests share.

Import the public names from here (``from perf.tools import meter, run_ranks``); each is
loaded from its module on first use, so that importing one tool does not import triton or
torch.compile for another.

===================  ===========================================================================
module               public names
===================  ===========================================================================
traffic_meter        :func:`meter` (bytes and launches of Triton kernels, under the interpreter),
                     ``Traffic``, ``KernelTraffic``, ``TorchOpTraffic``, ``interpreting``
traffic              the traffic cases of snnorm's op table (``python -m perf.traffic``)
saved_meter          :func:`saved_tensor_bytes` (bytes autograd saves for backward)
ranks                :func:`run_ranks`, :func:`free_port` (gloo processes on the CPU)
compile_check        ahead-of-time compile check (``python -m perf.compile_check``):
                     ``spilling``, ``summary``, ``summary_markdown``; ``scenarios``,
                     ``run_scenario``, ``CaptureSync`` (one op-table call on meta tensors),
                     ``posing_as_cuda`` (meta tensors that report a CUDA device);
                     ``approximate_ops``, ``approximation_problem``, ``format_ops``,
                     ``SPIKE_MODULES``, ``STATISTICS_KERNELS`` (the PTX scan for approximate
                     division / sqrt)
tab_baseline         ``QuadraticTAB``, ``run_on_tncs``: the official O(T²) TAB algorithm
record               environment, rows, CSVs, provider names (``SNNORM_TORCH`` …)
agreement            ``TOLERANCES``, ``Tol``, ``compare``: does a provider agree before timing
timing               ``TimingBudget``, ``time_providers``, copy bandwidth, peak memory
runner               ``Runner``, ``ModuleRunner``, ``bench_case``: one grid point, every provider
sweep                ``run_sweep``: a timing sweep's command line and grid loop
===================  ===========================================================================
"""

from __future__ import annotations

import importlib

_MODULES = ("traffic_meter", "traffic", "saved_meter", "ranks", "compile_check", "tab_baseline", "record",
            "agreement", "timing", "runner", "sweep")

#: public name -> the module that defines it
_WHERE = {
    **dict.fromkeys(("meter", "Traffic", "KernelTraffic", "TorchOpTraffic", "interpreting"), "traffic_meter"),
    "saved_tensor_bytes": "saved_meter",
    **dict.fromkeys(("run_ranks", "free_port"), "ranks"),
    **dict.fromkeys(("spilling", "summary", "summary_markdown", "scenarios", "run_scenario", "CaptureSync",
                     "posing_as_cuda", "approximate_ops", "approximation_problem", "format_ops", "SPIKE_MODULES",
                     "STATISTICS_KERNELS"),
                    "compile_check"),
    **dict.fromkeys(("QuadraticTAB", "run_on_tncs"), "tab_baseline"),
    **dict.fromkeys(("COLUMNS", "SNNORM_TORCH", "SNNORM_COMPILE", "SNNORM_TRITON", "SPIKINGJELLY", "TORCH_COPY",
                     "PERF_DIR", "RESULTS_DIR", "DTYPES", "dtype_name", "slug", "Env", "environment", "Recorder",
                     "read_csv", "results_path", "shape_str", "short_error"), "record"),
    **dict.fromkeys(("Tol", "TOLERANCES", "compare"), "agreement"),
    **dict.fromkeys(("Timing", "TimingBudget", "time_providers", "copy_bandwidth_gbps", "peak_memory_bytes", "sync"),
                    "timing"),
    **dict.fromkeys(("Runner", "ModuleRunner", "bench_case", "reset_compiler", "compile_module", "seed_all",
                     "builders_for", "Modules", "Point", "start_point"), "runner"),
    **dict.fromkeys(("common_argparser", "selected", "csv_name", "apply_threads", "budget_for", "QUICK_COMPILE_NOTE",
                     "record_load", "grid_name", "triton_unavailable", "triton_skip_reason", "providers_for",
                     "compile_here", "Session", "start_session", "default_providers", "run_sweep"), "sweep"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE, *_MODULES})
