"""Norm → spiking neuron fusion (DESIGN.md §8): the block every SNN is built of, in one op.

:func:`fuse_norm_neurons` finds each batch-statistics norm (multi-step BatchNorm1d/2d/3d,
tdBN, TEBN, BNTT in spikingjelly's and snntorch's layouts, TAB) whose output feeds an
IF/LIF neuron and nothing else, and makes the pair one block:

* the norm's place holds a :class:`FusedNormNeuron` (the norm, and a reference to the
  neuron), which returns the neuron's spikes;
* the neuron's place holds a :class:`FusedNeuronSlot` (the neuron), which passes the
  spikes on.

Both wrappers are *transparent* to ``state_dict``: their keys are exactly the wrapped
module's at the wrapper's own prefix, so a fused network's checkpoint loads into the
unfused one and back. The modules themselves are unchanged and still in the tree, so
``reset_net``, ``set_step_mode``, ``set_backend``, ``deepcopy`` and the optimiser's
parameters behave as for the pair. :func:`unfuse_norm_neurons` puts them back.

What a fused block computes is what the pair computes: on the torch backend (or while a
step mode, a backend or an option the fused kernel lacks is in force) it runs the
composition ``neuron(norm(x))`` itself, which is the reference. On the triton backend,
multi-step, it runs one statistics pipeline whose apply stage charges, fires and resets
the neuron (:func:`snnorm.backends.triton_backend.norm_lif`): spikes and the final
membrane are all it writes, and backward recomputes the neuron from x instead of saving h.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn as nn

from . import neuron as neuron_mod
from .base import make_state_dict_transparent

__all__ = ["FusedNormNeuron", "FusedNeuronSlot", "fuse_norm_neurons", "unfuse_norm_neurons", "fusable_norm"]


def fusable_norm(module: nn.Module) -> bool:
    """A batch-statistics norm the statistics pipeline runs: it gives a
    :class:`snnorm.layer._bn_state.NormPlan` for a sequence (``statistics_plan``)."""
    return callable(getattr(module, "statistics_plan", None))


def _neuron_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be the neuron of a fused block (None: it can)."""
    if type(module) not in (neuron_mod.LIFNode, neuron_mod.IFNode):
        return f"{type(module).__name__} is not an IF/LIF neuron"
    if module.store_v_seq:
        return "store_v_seq=True keeps every step's membrane, which the fused kernel does not write"
    return None


# -- transparent wrappers ------------------------------------------------------------------


class _Transparent(nn.Module):
    """Holds one module under ``self.inner_name``, whose ``state_dict`` keys it shows at its own prefix."""

    inner_name: str
    traced_as_leaf = True  # torch.fx sees one call (snnorm.functional's tracer)

    def __init__(self) -> None:
        super().__init__()
        make_state_dict_transparent(self, self.inner_name)


class FusedNeuronSlot(_Transparent):
    """The neuron's place in a fused network: holds the neuron (its memories, parameters,
    step mode and backend) and passes on the spikes its :class:`FusedNormNeuron` made."""

    inner_name = "neuron"

    def __init__(self, neuron: nn.Module) -> None:
        super().__init__()
        self.neuron = neuron
        self._pending: Optional[torch.Tensor] = None

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if spikes is not pending:
            raise RuntimeError(
                f"{type(self.neuron).__name__} is fused with the norm before it (fuse_norm_neurons), but was "
                "called on a tensor that norm did not just produce; call snnorm.functional.unfuse_norm_neurons(net) "
                "to run the modules apart"
            )
        return spikes

    def extra_repr(self) -> str:
        return "passes on the spikes of the fused norm before it"


class FusedNormNeuron(_Transparent):
    """The norm's place in a fused network: ``neuron(norm(x))`` as one block.

    Runs the fused kernel when both modules are multi-step on the triton backend and the
    neuron's options have a kernel; otherwise the composition (exact: the same two
    modules called in order). Running statistics are updated once either way.
    """

    inner_name = "norm"

    def __init__(self, norm: nn.Module, slot: FusedNeuronSlot) -> None:
        super().__init__()
        self.norm = norm
        self._slot = (slot,)  # not a submodule: the slot is registered where the neuron was

    @property
    def neuron(self) -> nn.Module:
        return self._slot[0].neuron

    def fused_kernel_applies(self) -> bool:
        """Whether a call runs the fused triton op now (else the composition): both modules
        multi-step on the triton backend, the neuron's surrogate has a kernel, and the
        norm is one the pipeline runs as it stands (a BNTT whose steps all have the same
        ε). A norm synchronised across ranks stays fused: its statistics gather in the op."""
        norm, neuron = self.norm, self.neuron
        if not (norm.step_mode == neuron.step_mode == "m" and norm.backend == neuron.backend == "triton"):
            return False
        bns = norm._bns() if hasattr(norm, "_bns") else (norm,)
        if len({float(bn.eps) for bn in bns}) > 1:
            return False
        return neuron.ops.norm_lif_kernel(neuron.lif_parameters) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernel_applies():
            spikes = self._fused(x)
        else:
            spikes = self.neuron(self.norm(x))
        self._slot[0]._pending = spikes
        return spikes

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        norm, neuron = self.norm, self.neuron
        # every check before any state moves: the neuron's, then the norm's (its plan counts the batch)
        neuron._check_input(x, multi_step=True)
        v = neuron.v if not isinstance(neuron.v, torch.Tensor) else neuron._initial_membrane(x[0])
        plan = norm.statistics_plan(x)
        spikes, neuron.v = neuron.ops.norm_lif(
            plan.rule, x, v, plan.weight, plan.bias, plan.p, plan.running_mean, plan.running_var,
            momentum=plan.momentum, eps=plan.eps, batch_stats=plan.batch_stats, threshold=neuron.v_threshold,
            neuron=neuron.lif_parameters, sync=plan.sync,
        )
        if plan.commit is not None:
            plan.commit()
        return spikes

    def extra_repr(self) -> str:
        return f"fused with {type(self.neuron).__name__} (its place holds a FusedNeuronSlot)"


# -- finding the pairs -------------------------------------------------------------------------


def _sequential_pairs(net: nn.Module) -> list[tuple[str, str, None]]:
    """(norm, neuron, None) for adjacent modules of every nn.Sequential in ``net``."""
    pairs = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if fusable_norm(a) and isinstance(b, neuron_mod.BaseNode):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name, None))
    return pairs


def _graph_pairs(net: nn.Module) -> Optional[list[tuple[str, str, Optional[str]]]]:
    """(norm, neuron, why not) for each neuron called on a norm's output in the graph torch.fx
    traces: ``why not`` is None when each is called once and the neuron is the norm's only
    user. None when ``net`` cannot be traced."""
    from ._fx import _trace

    try:
        graph_module = _trace(net)
    except Exception:  # dynamic control flow and the like: fx cannot trace every forward
        return None
    modules = dict(net.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), neuron_mod.BaseNode):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        norm_node = node.args[0]
        if norm_node.op != "call_module" or not fusable_norm(modules.get(norm_node.target)):
            continue
        why = None
        if len(norm_node.users) != 1:
            why = "the norm's output has other users"
        elif calls[norm_node.target] != 1 or calls[node.target] != 1:
            why = "a module of the pair is called at several places"
        pairs.append((norm_node.target, node.target, why))
    return pairs


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def fuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Pair every batch-statistics norm with the IF/LIF neuron that alone consumes its
    output, in place (module docstring), and return ``net``.

    Pairs are found in the graph torch.fx traces (step modules are leaves), or, where
    ``net`` cannot be traced, between adjacent modules of its ``nn.Sequential``\\ s. A pair
    that cannot fuse is left alone with a warning saying why: a norm whose output has
    other users, a module called at several places, a neuron option the fused kernel
    lacks (``store_v_seq``), a neuron that is not IF/LIF. Fusing a fused network changes
    nothing.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"fuse_norm_neurons expects an nn.Module, got {type(net).__name__}")
    found = _graph_pairs(net)
    if found is None:
        found = _sequential_pairs(net)
    reasons = []
    for norm_name, neuron_name, why in found:
        neuron = net.get_submodule(neuron_name)
        why = why or _neuron_problem(neuron)
        if why is not None:
            reasons.append(f"{norm_name} → {neuron_name}: {why}")
            continue
        slot = FusedNeuronSlot(neuron)
        _set_submodule(net, norm_name, FusedNormNeuron(net.get_submodule(norm_name), slot))
        _set_submodule(net, neuron_name, slot)
    if reasons:
        warnings.warn("fuse_norm_neurons left these pairs unfused: " + "; ".join(reasons), stacklevel=2)
    return net


def unfuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Put every fused norm and neuron of ``net`` back in their places; return ``net``."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"unfuse_norm_neurons expects an nn.Module, got {type(net).__name__}")
    wrappers = [(name, m) for name, m in net.named_modules() if isinstance(m, _Transparent)]
    for name, module in wrappers:
        _set_submodule(net, name, getattr(module, module.inner_name))
    return net
