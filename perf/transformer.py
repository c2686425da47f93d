"""A spiking-transformer encoder block beside spikingjelly 2.0.0: bytes, launches, saved bytes.

Spiking transformers (Spikformer, Zhou et al. ICLR 2023; Spike-driven Transformer, Yao et al.
NeurIPS 2023; QKFormer, Zhou et al. 2024) normalise token-major activations ``[T, B, L, D]``
(L tokens of D features) with a BatchNorm1d over D: the official code transposes to
``[T·B, D, L]``, runs ``nn.BatchNorm1d`` and transposes back before a multi-step LIF. LLM-style
spiking models (SpikeGPT, Zhu et al. 2023) put a LayerNorm before the neuron instead. Blocks,
training, multi-step, each library in its own idiom on the same input:

* ``bn_lif`` / ``ln_lif``: Linear → norm → LIF, one unit (the norm BN1d on tokens, or LayerNorm);
* ``encoder_bn`` / ``encoder_ln``: an encoder block of such units: q, k, v units; spike-driven
  self-attention (SDSA, Spike-driven Transformer: ``q ⊙ LIF_θ=0.5(Σ_L k ⊙ v)``); an output
  projection unit with a residual; an MLP of two units (D → 4D → D) with a residual.

**snnorm**: ``snnorm.layer.BatchNorm1d(step_mode="m")`` on the transposed view (no copy) or
``snnorm.layer.LayerNorm``, ``snnorm.neuron.LIFNode``; each norm → LIF pair fused
(``functional.fuse_norm_neurons``), ``set_backend(net, "triton")``.
**spikingjelly**: the official Spikformer idiom, torch's ``nn.BatchNorm1d`` / ``nn.LayerNorm`` on
``[T·B, …]`` with the transposes and the ``.contiguous()`` its code does, and spikingjelly's own
Triton LIF kernels (:class:`perf.compare.SpikingjellyTritonLIF`, run under the interpreter on a CPU).
Linear layers and the attention's products are the same torch operations on both sides.

Measured exactly as :mod:`perf.compare` measures (its :func:`~perf.compare.measure`): bytes per
element-step of the input (kernels' loads and stores plus eager torch operations), launches,
bytes saved for backward. On CUDA it times a training step instead (``--time``).

Run: ``python -m perf.transformer [--shape T B L D] [--out CSV]``; ``perf.report`` puts the table in
``perf/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf import compare  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA before triton loads)
from perf import tools  # noqa: E402

#: the issue's shape: T=4, B=8, L=64 tokens, D=256 features
DEFAULT_SHAPE = (4, 8, 64, 256)
BLOCKS = ("bn_lif", "ln_lif", "encoder_bn", "encoder_ln")
CSV_NAME = "transformer.csv"
#: the attention neuron's threshold in Spikformer and the Spike-driven Transformer
ATTENTION_THRESHOLD = 0.5


class Transpose(nn.Module):
    """``x.transpose(-1, -2)``: token-major ``[…, L, D]`` ↔ feature-major ``[…, D, L]`` (a view)."""

    def __init__(self, contiguous: bool = False) -> None:
        super().__init__()
        self.contiguous = contiguous  # spikingjelly's Spikformer code copies after transposing back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(-1, -2)
        return y.contiguous() if self.contiguous else y


def fold_steps(library: str, module: nn.Module) -> nn.Module:
    """``module`` run on ``[T·B, …]`` (T folded into the batch): ``library``'s ``SeqToANNContainer``,
    as Spikformer's ``x.flatten(0, 1)`` does."""
    if library == "snnorm":
        from snnorm.layer import SeqToANNContainer
    else:
        from spikingjelly.activation_based.layer import SeqToANNContainer
    return SeqToANNContainer(module)


def _lif(library: str, threshold: float = 1.0) -> nn.Module:
    if library == "snnorm":
        from snnorm import neuron

        return neuron.LIFNode(v_threshold=threshold, step_mode="m")
    return compare.SpikingjellyTritonLIF(v_threshold=threshold)


def unit(library: str, norm: str, d_in: int, d_out: int) -> nn.Sequential:
    """Linear → norm → LIF on ``[T, B, L, d_in]`` → spikes ``[T, B, L, d_out]`` in ``library``'s idiom."""
    linear = fold_steps(library, nn.Linear(d_in, d_out))
    if library == "snnorm":
        from snnorm import layer

        if norm == "bn":  # BN over the features of the transposed view, the neuron on it, and back
            return nn.Sequential(linear, Transpose(), layer.BatchNorm1d(d_out, step_mode="m"), _lif(library),
                                 Transpose())
        return nn.Sequential(linear, layer.LayerNorm(d_out, step_mode="m"), _lif(library))
    if norm == "bn":
        return nn.Sequential(linear, Transpose(), fold_steps(library, nn.BatchNorm1d(d_out)), Transpose(contiguous=True),
                             _lif(library))
    return nn.Sequential(linear, fold_steps(library, nn.LayerNorm(d_out)), _lif(library))


class EncoderBlock(nn.Module):
    """A spike-driven transformer encoder block (module docstring) built of :func:`unit`."""

    def __init__(self, library: str, norm: str, dim: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (unit(library, norm, dim, dim) for _ in range(3))
        self.attention_lif = _lif(library, ATTENTION_THRESHOLD)
        self.proj = unit(library, norm, dim, dim)
        self.mlp = nn.Sequential(unit(library, norm, dim, 4 * dim), unit(library, norm, 4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        kv = self.attention_lif((k * v).sum(dim=-2, keepdim=True))  # SDSA: Σ over tokens, then fire
        x = x + self.proj(q * kv)
        return x + self.mlp(x)


def build(block: str, library: str, shape) -> tuple[nn.Module, str]:
    """The block as ``library`` runs it, in training, with the note for its row."""
    dim = shape[3]
    norm = "bn" if block.endswith("bn") or block.startswith("bn") else "ln"
    net = (unit(library, norm, dim, dim) if block.endswith("_lif") else EncoderBlock(library, norm, dim)).train()
    if library != "snnorm":
        return net, f"torch {'BatchNorm1d' if norm == 'bn' else 'LayerNorm'} + spikingjelly's Triton LIF"
    from snnorm import functional
    from snnorm.fusion import fused_block

    functional.fuse_norm_neurons(net)
    with warnings.catch_warnings():  # set_backend warns naming the layers that keep torch (Linear)
        warnings.simplefilter("ignore")
        functional.set_backend(net, "triton")
    norms = [m for m in net.modules() if type(m).__name__ in ("BatchNorm1d", "LayerNorm")]
    fused = sum(1 for m in norms if fused_block(m) is not None and fused_block(m).fused_kernel_applies())
    return net, f"triton, {fused} of {len(norms)} norm → LIF pairs fused"


def run(shape=DEFAULT_SHAPE, blocks=BLOCKS, log: Callable[[str], None] = print, timing: bool | None = None,
        device: str | None = None, reps: int = 20) -> list[dict]:
    """Rows (:data:`perf.compare.COLUMNS`) for every block and library on one ``[T, B, L, D]`` input,
    measured as :func:`perf.compare.run` measures its blocks."""
    return compare.measure_blocks(build, blocks, shape, tool="perf.transformer", log=log, timing=timing,
                                  device=device, reps=reps)


def section(results_dir: Path) -> list[str]:
    """The RESULTS.md section for ``results_dir/transformer.csv`` (empty if there is none)."""
    path = Path(results_dir) / CSV_NAME
    if not path.exists():
        return []
    lines = compare.markdown(path, blocks=BLOCKS)
    shape = next(iter(compare.read_rows(path).values()))["shape"]
    return [
        "## A spiking-transformer block beside spikingjelly 2.0.0 (counted under the Triton interpreter)",
        "",
        f"Generated by `python -m perf.transformer` (what each block is: its docstring): training, fp32, "
        f"[T, B, L, D] = {shape.replace('x', ', ')}, per element-step of the block's input, counted as "
        "the side-by-side table above counts. spikingjelly's side is the official Spikformer idiom: "
        "torch norms on transposed copies and its own Triton LIF kernels.",
        "",
        *lines,
        "",
    ]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=list(DEFAULT_SHAPE), metavar=("T", "B", "L", "D"))
    p.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=BLOCKS)
    p.add_argument("--out", default=None, help="CSV (default: perf/results/transformer.csv, or "
                                               "transformer_time.csv timing)")
    p.add_argument("--time", action="store_true", help="time training steps instead of counting (default on CUDA)")
    args = p.parse_args(argv)
    timing = args.time or torch.cuda.is_available()
    rows = run(tuple(args.shape), args.blocks, timing=timing)
    out = Path(args.out) if args.out else (tools.results_path(tools.environment(), "transformer_time") if timing
                                           else tools.RESULTS_DIR / CSV_NAME)
    compare.write_csv(rows, out)
    if not timing:
        print("\n".join(compare.markdown(out, blocks=args.blocks)))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
