"""Norm → spiking neuron fusion (DESIGN.md §8): the block every SNN is built of, in one op.

:func:`fuse_norm_neurons` finds each batch-statistics norm (multi-step BatchNorm1d/2d/3d,
tdBN, TEBN, BNTT in spikingjelly's and snntorch's layouts, TAB) whose output feeds an
IF/LIF neuron and nothing else, and marks the pair *in place*: both modules stay where
they are, with their types, parameters, buffers and memories, and one :class:`FusedBlock`
object (not a module: it adds no name) is installed as an instance-level ``forward`` of
each:

* the norm's ``forward`` is :meth:`FusedBlock.run`, ``s = neuron(norm(x))``, so calling
  the norm returns the neuron's spikes;
* the neuron's ``forward`` is :meth:`FusedBlock.pass_on`, which returns the spikes its
  norm just made (and refuses any other tensor).

So ``named_parameters()``, ``named_buffers()``, ``named_modules()`` and ``state_dict()``
read exactly as before fusing (an optimiser's parameter groups built by name, EMA,
clipping and pruning by name keep working), ``isinstance`` checks hold, and
``reset_net``, ``set_step_mode``, ``set_backend``, ``deepcopy`` and pickling act on the
pair. :func:`unfuse_norm_neurons` removes the two instance attributes, which restores
the modules exactly. The norm and neuron refer to each other only through the block
(a reference cycle the garbage collector frees, as for any module with a bound hook).

What a fused block computes is what the pair computes: on the torch backend (or while a
step mode, a backend or an option the fused kernel lacks is in force) it runs the
composition ``neuron(norm(x))`` of the classes' own forwards, which is the reference. On
the triton backend, multi-step, it runs one statistics pipeline whose apply stage
charges, fires and resets the neuron (:func:`snnorm.backends.triton_backend.norm_lif`):
spikes and the final membrane are all it writes, and backward recomputes the neuron
from x instead of saving h. Hooks registered on the norm run around the whole block;
hooks on the neuron see the spikes pass.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn as nn

from . import neuron as neuron_mod
from ._fx import _trace

__all__ = ["FusedBlock", "fused_block", "fuse_norm_neurons", "unfuse_norm_neurons", "fusable_norm"]


def fusable_norm(module: nn.Module) -> bool:
    """A batch-statistics norm the statistics pipeline runs: it gives a
    :class:`snnorm._bn_state.NormPlan` for a sequence (``statistics_plan``)."""
    return callable(getattr(module, "statistics_plan", None))


def _neuron_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be the neuron of a fused block (None: it can)."""
    if type(module) not in (neuron_mod.LIFNode, neuron_mod.IFNode):
        return f"{type(module).__name__} is not an IF/LIF neuron"
    if module.store_v_seq:
        return "store_v_seq=True keeps every step's membrane, which the fused kernel does not write"
    return None


# -- the block: the pair's two forwards ----------------------------------------------------------


class FusedBlock:
    """A fused norm → neuron pair, ``s = neuron(norm(x))`` as one block.

    Not a module: it is reached only through the instance-level ``forward`` it installs
    on the norm (:meth:`run`) and on the neuron (:meth:`pass_on`), so it adds no name
    to the network. Runs the fused kernel when both modules are multi-step on the
    triton backend and the neuron's options have a kernel; otherwise the composition
    (exact: the two classes' own forwards, called in order). Running statistics are
    updated once either way.
    """

    def __init__(self, norm: nn.Module, neuron: nn.Module) -> None:
        self.norm = norm
        self.neuron = neuron
        self._pending: Optional[torch.Tensor] = None  # the spikes run() made, until pass_on takes them

    def __getstate__(self) -> dict:
        """deepcopy / pickling: the pending spikes are a transient of one call (and may
        carry autograd history, which deepcopy refuses), so a copy starts without them."""
        state = self.__dict__.copy()
        state["_pending"] = None
        return state

    def fused_kernel_applies(self) -> bool:
        """Whether a call runs the fused triton op now (else the composition): both modules
        multi-step on the triton backend, the neuron's surrogate has a kernel and it keeps
        no per-step membrane, and the norm is one the pipeline runs as it stands (a BNTT
        whose steps all have the same ε). A norm synchronised across ranks stays fused: its
        statistics gather in the op."""
        norm, neuron = self.norm, self.neuron
        if not (norm.step_mode == neuron.step_mode == "m" and norm.backend == neuron.backend == "triton"):
            return False
        if neuron.store_v_seq:
            return False
        bns = norm._bns() if hasattr(norm, "_bns") else (norm,)
        if len({float(bn.eps) for bn in bns}) > 1:
            return False
        return neuron.ops.norm_lif_kernel(neuron.lif_parameters) is not None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's ``forward`` while fused: the neuron's spikes of ``norm(x)``."""
        norm, neuron = self.norm, self.neuron
        if self.fused_kernel_applies():
            spikes = self._fused(x)
        else:
            spikes = type(neuron).forward(neuron, type(norm).forward(norm, x))
        self._pending = spikes
        return spikes

    def pass_on(self, spikes: torch.Tensor) -> torch.Tensor:
        """The neuron's ``forward`` while fused: the spikes its norm just made.

        :raises RuntimeError: ``spikes`` is not the tensor the fused norm returned last.
        """
        pending, self._pending = self._pending, None
        if spikes is not pending:
            raise RuntimeError(
                f"{type(self.neuron).__name__} is fused with the {type(self.norm).__name__} before it "
                "(fuse_norm_neurons), but was called on a tensor that norm did not just produce; call "
                "snnorm.functional.unfuse_norm_neurons(net) to run the modules apart"
            )
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

    def __repr__(self) -> str:
        return f"FusedBlock({type(self.norm).__name__} → {type(self.neuron).__name__})"


def fused_block(module: nn.Module) -> Optional[FusedBlock]:
    """The :class:`FusedBlock` that ``module`` (a norm or a neuron) is part of; None when
    it is not fused."""
    forward = module.__dict__.get("forward")
    block = getattr(forward, "__self__", None)
    return block if isinstance(block, FusedBlock) and (module is block.norm or module is block.neuron) else None


def _mark(block: FusedBlock) -> None:
    block.norm.__dict__["forward"] = block.run
    block.neuron.__dict__["forward"] = block.pass_on


def _unmark(block: FusedBlock) -> None:
    for module in (block.norm, block.neuron):
        if fused_block(module) is block:
            del module.__dict__["forward"]


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


def _instance_forward_problem(module: nn.Module, partner: nn.Module) -> Optional[str]:
    """Why ``module``'s own instance-level ``forward`` stops it fusing with ``partner`` (None: it does not)."""
    if "forward" not in module.__dict__:
        return None
    block = fused_block(module)
    if block is None:
        return f"{type(module).__name__} has an instance-level forward of its own"
    if partner is not block.norm and partner is not block.neuron:
        return f"{type(module).__name__} is already fused with another module"
    return None


def fuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Pair every batch-statistics norm with the IF/LIF neuron that alone consumes its
    output, in place (module docstring), and return ``net``. Every parameter, buffer and
    module keeps its name and object.

    Pairs are found in the graph torch.fx traces (step modules are leaves), or, where
    ``net`` cannot be traced, between adjacent modules of its ``nn.Sequential``\\ s. A pair
    that cannot fuse is left alone with a warning saying why: a norm whose output has
    other users, a module called at several places, a neuron option the fused kernel
    lacks (``store_v_seq``), a neuron that is not IF/LIF, a module with an instance-level
    ``forward`` of its own. Fusing a fused network changes nothing.

    :raises TypeError: ``net`` is not an ``nn.Module``.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"fuse_norm_neurons expects an nn.Module, got {type(net).__name__}")
    found = _graph_pairs(net)
    if found is None:
        found = _sequential_pairs(net)
    reasons = []
    for norm_name, neuron_name, why in found:
        norm, neuron = net.get_submodule(norm_name), net.get_submodule(neuron_name)
        block = fused_block(norm)
        if block is not None and block is fused_block(neuron):
            continue  # fused already
        why = why or _neuron_problem(neuron) or _instance_forward_problem(norm, neuron) \
            or _instance_forward_problem(neuron, norm)
        if why is not None:
            reasons.append(f"{norm_name} → {neuron_name}: {why}")
            continue
        _mark(FusedBlock(norm, neuron))
    if reasons:
        warnings.warn("fuse_norm_neurons left these pairs unfused: " + "; ".join(reasons), stacklevel=2)
    return net


def unfuse_norm_neurons(net: nn.Module) -> nn.Module:
    """Run every fused norm and neuron of ``net`` apart again, in place; return ``net``.

    Removes the instance-level ``forward`` :func:`fuse_norm_neurons` installed on both
    modules of each pair (also on a partner outside ``net``), which leaves them exactly
    as they were before fusing.

    :raises TypeError: ``net`` is not an ``nn.Module``.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"unfuse_norm_neurons expects an nn.Module, got {type(net).__name__}")
    for module in net.modules():
        block = fused_block(module)
        if block is not None:
            _unmark(block)
    return net
