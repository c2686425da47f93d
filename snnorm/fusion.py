"""Norm → spiking neuron fusion (DESIGN.md §8): the block every SNN is built of, in one op.

:func:`fuse_norm_neurons` finds each batch-statistics norm (multi-step BatchNorm1d/2d/3d,
tdBN, TEBN, BNTT in spikingjelly's and snntorch's layouts, TAB, and a torch BatchNorm at
the end of a ``SeqToANNContainer``) and each per-token norm of a spiking transformer
(snnorm's ``LayerNorm`` and ``RMSNorm``) whose output feeds an IF/LIF neuron and nothing else
(read by torch.fx, or by one run of an example input: :func:`fusion_report` says what was
found and why a pair stays apart), and marks the pair *in place*: both modules stay where
they are, with their types, parameters, buffers and memories, and one :class:`FusedBlock`
object (not a module: it adds no name) is installed as an instance-level ``forward`` of
each:

* the norm's ``forward`` is :meth:`FusedBlock.run`, ``s = neuron(norm(x))``, so calling
  the norm returns the neuron's spikes;
* the neuron's ``forward`` is :meth:`FusedBlock.pass_on`, which returns the spikes its
  norm just made (and refuses any other tensor).

A layout change that keeps T (dim 0) between the two, ``sn(bn(x.transpose(-1, -2)).transpose(-1,
-2))`` as Spikformer writes it, does not stop a pair: an elementwise neuron commutes with it. The
block records it (a :class:`snnorm._dataflow.Relayout`); the kernel runs in the norm's layout,
the neuron gets the same change of those spikes (a view), and the neuron's membrane keeps the
neuron's own shape (it is read and written through the inverse change, in place).

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
charges, fires and resets the neuron (:func:`snnorm.backends.triton_backend.norm_lif`), or
for a LayerNorm/RMSNorm one kernel that computes each row's statistics, normalises and runs
the neuron (``row_norm_lif``): spikes and the final membrane are all it writes, and backward
recomputes the neuron from x instead of saving h. Each kind of norm is one entry of
:data:`_KINDS` (whether the kernel applies to it, and the fused call). Hooks registered on
the norm run around the whole block; hooks on the neuron see the spikes pass.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx
import torch.nn as nn

from . import layer
from . import neuron as neuron_mod
from ._bn_state import NormPlan, check_bn_input, shared_statistics_plan
from ._dataflow import Relayout, record_handoffs, relayout_of
from ._fx import _StepModuleLeafTracer, _trace
from ._steps import seq_to_ann_forward

__all__ = [
    "FusedBlock", "FusionReport", "fused_block", "fuse_norm_neurons", "unfuse_norm_neurons", "fusion_report",
    "fusable_norm", "container_batch_norm",
]


def fusable_norm(module: nn.Module) -> bool:
    """A norm a fused block runs (:data:`_KINDS`): a batch-statistics norm the statistics
    pipeline runs (it gives a :class:`snnorm._bn_state.NormPlan` for a sequence,
    ``statistics_plan``, or it is a ``SeqToANNContainer`` that ends in a BatchNorm,
    :func:`container_batch_norm`), or a per-token norm (``LayerNorm``, ``RMSNorm``: it gives a
    :class:`snnorm.layer.token_norms.RowNormPlan`, ``row_norm_plan``)."""
    return _kind_of(module) is not None


# -- a BatchNorm in a SeqToANNContainer ----------------------------------------------------------

#: a BN that sees [T·N, C, *spatial] with T folded into the batch: torch's, or snnorm's single-step one
_FOLDED_BNS = {
    nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,),  # a sample's dims [N, C, *spatial]
}
_SNNORM_SINGLE_STEP_BNS = (
    layer.BatchNorm1d, layer.BatchNorm2d, layer.BatchNorm3d,
    layer.ThresholdDependentBatchNorm1d, layer.ThresholdDependentBatchNorm2d, layer.ThresholdDependentBatchNorm3d,
)


def _is_seq_to_ann(module: nn.Module) -> bool:
    if isinstance(module, layer.SeqToANNContainer):
        return True
    sj_layer = sys.modules.get("spikingjelly.activation_based.layer")
    return sj_layer is not None and isinstance(module, sj_layer.SeqToANNContainer)


def container_batch_norm(module: nn.Module) -> Optional[nn.Module]:
    """The BatchNorm that ends ``module`` when ``module`` is a ``SeqToANNContainer`` (snnorm's or
    spikingjelly's), else None. The container folds T into the batch, so the BN's statistics
    over T·N·spatial are exactly a multi-step BN's: ``SeqToANNContainer(Conv2d, BatchNorm2d)``
    and spikingjelly's Spikformer idiom ``SeqToANNContainer(Conv1d, BatchNorm1d)`` on
    ``[T, N, D, L]`` fuse with the neuron after them like a multi-step BN."""
    if not _is_seq_to_ann(module) or len(module) == 0:
        return None
    bn = module[-1]
    if type(bn) in _FOLDED_BNS or (isinstance(bn, _SNNORM_SINGLE_STEP_BNS) and bn.step_mode == "s"):
        return bn
    return None


def _folded_bn_plan(bn: nn.Module, x_seq: torch.Tensor) -> NormPlan:
    """The multi-step plan (rule ``batch_norm``) of a BN that runs on ``x_seq`` with T folded into
    the batch; every check a multi-step BN runs first (layout, channels, device, dtype, ε,
    momentum), the batch counted by ``commit``."""
    sample_ndims = next(d for cls, d in _FOLDED_BNS.items() if isinstance(bn, cls))
    check_bn_input(bn, x_seq, multi=True, sample_ndims=sample_ndims, num_features=bn.num_features)
    return shared_statistics_plan(bn, x_seq)


def _neuron_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be the neuron of a fused block (None: it can)."""
    if type(module) not in (neuron_mod.LIFNode, neuron_mod.IFNode):
        return f"{type(module).__name__} is not an IF/LIF neuron"
    if module.store_v_seq:
        return "store_v_seq=True keeps every step's membrane, which the fused kernel does not write"
    return None


# -- the kinds of norm: whether the fused kernel applies to the norm as it stands, and the fused call --


class _StatisticsNorm:
    """A batch-statistics norm: one statistics pipeline whose apply stage is the neuron
    (:func:`snnorm.backends.triton_backend.norm_lif`)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return callable(getattr(module, "statistics_plan", None)) or container_batch_norm(module) is not None

    @staticmethod
    def kernel_applies(norm: nn.Module) -> bool:
        """Multi-step on the triton backend (a container runs multi-step; its BN follows the
        neuron's backend), and one the pipeline runs as it stands (a BNTT whose steps all have
        the same ε). A norm synchronised across ranks stays fused: its statistics gather in the op."""
        folded = container_batch_norm(norm)
        if folded is None and not (norm.step_mode == "m" and norm.backend == "triton"):
            return False
        bns = (folded,) if folded is not None else norm._bns() if hasattr(norm, "_bns") else (norm,)
        return len({float(bn.eps) for bn in bns}) == 1

    @staticmethod
    def fused(norm: nn.Module, neuron: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # every check before any state moves: the neuron's and the norm's (its plan counts the batch on commit)
        folded = container_batch_norm(norm)
        if folded is not None:  # the container's other (stateless) modules first, T folded into the batch
            head = list(norm)[:-1]
            x = seq_to_ann_forward(x, head) if head else x
            plan = _folded_bn_plan(folded, x)
        neuron._check_input(x, multi_step=True)
        v = neuron.v if not isinstance(neuron.v, torch.Tensor) else neuron._initial_membrane(x[0])
        if folded is None:
            plan = norm.statistics_plan(x)
        spikes, neuron.v = neuron.ops.norm_lif(
            plan.rule, x, v, plan.weight, plan.bias, plan.p, plan.running_mean, plan.running_var,
            momentum=plan.momentum, eps=plan.eps, batch_stats=plan.batch_stats, threshold=neuron.v_threshold,
            neuron=neuron.lif_parameters, sync=plan.sync,
        )
        if plan.commit is not None:
            plan.commit()
        return spikes


class _RowNorm:
    """A per-token norm (LayerNorm, RMSNorm): each row's statistics in the kernel, per step, no
    state (:func:`snnorm.backends.triton_backend.row_norm_lif`)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return callable(getattr(module, "row_norm_plan", None))

    @staticmethod
    def kernel_applies(norm: nn.Module) -> bool:
        """On the triton backend, in either step mode: a row's statistics are its own, so the
        norm computes the same per step, and the input is the neuron's ``[T, N, ...]`` sequence."""
        return norm.backend == "triton"

    @staticmethod
    def fused(norm: nn.Module, neuron: nn.Module, x: torch.Tensor) -> torch.Tensor:
        plan = norm.row_norm_plan(x)  # every check first (a row norm holds no state to move)
        neuron._check_input(x, multi_step=True)
        v = neuron.v if not isinstance(neuron.v, torch.Tensor) else plan.rows(neuron._initial_membrane(x[0]))
        spikes, v_out = neuron.ops.row_norm_lif(
            plan.rows(x), v, plan.weight, plan.bias, eps=plan.eps, rms=plan.rms, threshold=neuron.v_threshold,
            neuron=neuron.lif_parameters,
        )
        neuron.v = plan.unrows(v_out)
        return plan.unrows(spikes)


#: the kinds of norm a block fuses, each with ``matches``, ``kernel_applies`` and ``fused``
_KINDS = (_StatisticsNorm, _RowNorm)


def _kind_of(module: Optional[nn.Module]):
    """The entry of :data:`_KINDS` that runs ``module``; None when it is no norm a block fuses."""
    return next((kind for kind in _KINDS if module is not None and kind.matches(module)), None)


# -- the block: the pair's two forwards ----------------------------------------------------------


class FusedBlock:
    """A fused norm → neuron pair, ``s = neuron(norm(x))`` as one block.

    Not a module: it is reached only through the instance-level ``forward`` it installs
    on the norm (:meth:`run`) and on the neuron (:meth:`pass_on`), so it adds no name
    to the network. Runs the fused kernel when the neuron is multi-step on the triton
    backend with options the kernel has, and the norm is as its kind needs
    (:meth:`fused_kernel_applies`); otherwise the composition (exact: the two classes' own
    forwards, called in order). Running statistics are updated once either way.
    """

    def __init__(self, norm: nn.Module, neuron: nn.Module, relayout: Optional[Relayout] = None) -> None:
        self.norm = norm
        self.neuron = neuron
        self.relayout = relayout  # the layout change between the two (None: the neuron reads the norm's output)
        self._pending: Optional[torch.Tensor] = None  # the spikes run() made, until pass_on takes them
        self._neuron_to_run = False  # run() left the neuron to pass_on (composition through a relayout)

    def __getstate__(self) -> dict:
        """deepcopy / pickling: the pending spikes are a transient of one call (and may
        carry autograd history, which deepcopy refuses), so a copy starts without them."""
        state = self.__dict__.copy()
        state["_pending"], state["_neuron_to_run"] = None, False
        return state

    @property
    def kind(self):
        """How the fused op runs this block's norm: its entry of :data:`_KINDS`."""
        return _kind_of(self.norm)

    def fused_kernel_applies(self) -> bool:
        """Whether a call runs the fused triton op now (else the composition): the neuron
        multi-step on the triton backend, with a kernel for its surrogate and no per-step
        membrane kept, and the norm as its kind needs (``kernel_applies`` of :data:`_KINDS`)."""
        neuron = self.neuron
        if neuron.step_mode != "m" or neuron.backend != "triton" or neuron.store_v_seq:
            return False
        if not self.kind.kernel_applies(self.norm):
            return False
        return neuron.ops.norm_lif_kernel(neuron.lif_parameters) is not None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's ``forward`` while fused: the neuron's spikes of ``norm(x)`` (in the norm's
        layout). Through a relayout, outside the fused kernel, it is ``norm(x)`` and the neuron
        runs in :meth:`pass_on`, on its own layout (exact in any step mode)."""
        norm, neuron, relayout = self.norm, self.neuron, self.relayout
        self._neuron_to_run = False
        if self.fused_kernel_applies() and (relayout is None or relayout.keeps_time(x.ndim)):
            out = self._fused(x)
        elif relayout is None:
            out = type(neuron).forward(neuron, type(norm).forward(norm, x))
        else:
            out = type(norm).forward(norm, x)
            self._neuron_to_run = True
        self._pending = out
        return out

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused op of the norm's kind, in the norm's layout: through a relayout, the
        neuron's membrane is read through the inverse change (a view, no copy) and kept in the
        neuron's own shape after (the change of the kernel's final membrane, again a view)."""
        neuron, relayout = self.neuron, self.relayout
        own_v = neuron.v
        if relayout is None or not isinstance(own_v, torch.Tensor):
            spikes = self.kind.fused(self.norm, neuron, x)
        else:
            neuron.v = relayout.apply_to_state(own_v, inverse=True) if own_v.ndim == x.ndim - 1 else own_v
            try:
                spikes = self.kind.fused(self.norm, neuron, x)
            except BaseException:
                neuron.v = own_v  # a refused call leaves the state as it was
                raise
        if relayout is not None:
            neuron.v = relayout.apply_to_state(neuron.v)
        return spikes

    def pass_on(self, spikes: torch.Tensor) -> torch.Tensor:
        """The neuron's ``forward`` while fused: the spikes its norm just made, or through a
        relayout the same change of them (a view of the same storage with the changed shape
        and strides).

        :raises RuntimeError: ``spikes`` is not what the fused norm returned last (through the relayout).
        """
        pending, self._pending = self._pending, None
        if not (self._relaid(spikes, pending) if self.relayout is not None else spikes is pending):
            expected = "" if self.relayout is None else f" (or its {self.relayout})"
            raise RuntimeError(
                f"{type(self.neuron).__name__} is fused with the {type(self.norm).__name__} before it "
                f"(fuse_norm_neurons), but was called on a tensor that norm did not just produce{expected}; "
                "call snnorm.functional.unfuse_norm_neurons(net) to run the modules apart"
            )
        if self._neuron_to_run:
            self._neuron_to_run = False
            return type(self.neuron).forward(self.neuron, spikes)
        return spikes

    def _relaid(self, spikes: Any, pending: Optional[torch.Tensor]) -> bool:
        """Whether ``spikes`` is the relayout of ``pending``: a view of the same tensor with the same
        shape and strides (``_base``, not ``data_ptr`` or the offset: torch.compile traces it)."""
        if pending is None or not isinstance(spikes, torch.Tensor):
            return False
        try:
            want = self.relayout.apply(pending)
        except (ValueError, RuntimeError):
            return False

        def base(t: torch.Tensor) -> torch.Tensor:
            return t if t._base is None else t._base

        return base(spikes) is base(pending) and (spikes.shape, spikes.stride()) == (want.shape, want.stride())

    def __repr__(self) -> str:
        through = "" if self.relayout is None else f" through {self.relayout}"
        return f"FusedBlock({type(self.norm).__name__} → {type(self.neuron).__name__}{through})"


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


@dataclass
class FusionReport:
    """What :func:`fuse_norm_neurons` does to a network (module names as in ``named_modules``).

    ``fused``: the norm → neuron pairs that run as one block; ``apart``: each norm whose output
    feeds a neuron but that stays apart from it, with why; ``unread``: each module whose forward
    neither torch.fx could trace nor a run of an example input read, so pairs inside it may be
    missing (its children's own forwards are still read); ``relayouts``: for a fused pair with a
    layout change between the two (a transpose that keeps T), that change.
    """

    fused: list[tuple[str, str]] = field(default_factory=list)
    apart: list[tuple[str, str, str]] = field(default_factory=list)
    unread: list[tuple[str, str]] = field(default_factory=list)
    relayouts: dict[tuple[str, str], Relayout] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.fused)} norm → neuron pair(s) fused"]
        lines += [f"  through {change}: {norm} → {neuron}" for (norm, neuron), change in self.relayouts.items()]
        lines += [f"  left apart: {norm} → {neuron}: {why}" for norm, neuron, why in self.apart]
        lines += [f"  not read: {name}: {why}" for name, why in self.unread]
        return "\n".join(lines)


#: a pair found: (norm, neuron, why it stays apart or None, the layout change between them or None)
_Pair = tuple[str, str, Optional[str], Optional[Relayout]]


def _handoff_problem(norm_calls: Optional[int], neuron_calls: Optional[int], shared: bool,
                     relayout: Optional[Relayout] = None, ndim: Optional[int] = None) -> Optional[str]:
    """Why a norm that hands its output to a neuron (through ``relayout``, of a tensor of
    ``ndim`` dims where known) cannot fuse with it, however the pair was found (None: it can)."""
    if norm_calls != 1 or neuron_calls != 1:
        return "a module of the pair is called at several places"
    if shared:
        return "the norm's output has other users"
    if relayout is not None and (relayout.moves_time() if ndim is None else not relayout.keeps_time(ndim)):
        return f"the {relayout} between them moves the time dim"
    return None


def _relayout_node(node: torch.fx.Node) -> Optional[Relayout]:
    """The layout change a traced node makes of its first argument (None: it makes none)."""
    if node.op == "call_function" and node.target is getattr:  # x.mT
        return relayout_of(node.args[1], (), {}) if node.args[1] == "mT" else None
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and node.target in (torch.transpose, torch.permute, torch.swapaxes):
        name = node.target.__name__
    else:
        return None
    return relayout_of(name, tuple(node.args[1:]), dict(node.kwargs))


def _traced_pairs(graph_module: torch.fx.GraphModule, prefix: str) -> list[_Pair]:
    """(norm, neuron, why not, relayout) for each neuron called on a norm's output in one traced
    graph, directly or through one layout change (:func:`_relayout_node`): ``why not`` is None
    when each is called once and the neuron is the only user of the norm's output."""
    modules = dict(graph_module.named_modules())
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
        norm_node, relayout, shared = node.args[0], _relayout_node(node.args[0]), False
        if relayout is not None and isinstance(norm_node.args[0], torch.fx.Node):  # look through it
            norm_node, shared = norm_node.args[0], len(norm_node.users) != 1
        if norm_node.op != "call_module" or not fusable_norm(modules.get(norm_node.target)):
            continue
        why = _handoff_problem(calls[norm_node.target], calls[node.target], shared or len(norm_node.users) != 1,
                               relayout)
        pairs.append((prefix + norm_node.target, prefix + node.target, why, relayout))
    return pairs


def _sequential_pairs(module: nn.Sequential, prefix: str) -> list[_Pair]:
    """(norm, neuron, None, None) for adjacent children of an nn.Sequential: it hands each output on
    alone. (A module between them that only transposes is not looked through: fx reads it, or a run.)"""
    children = list(module.named_children())
    return [(prefix + a_name, prefix + b_name, None, None) for (a_name, a), (b_name, b) in zip(children, children[1:])
            if fusable_norm(a) and isinstance(b, neuron_mod.BaseNode)]


def _read_pairs(net: nn.Module, report: FusionReport) -> list[_Pair]:
    """Pairs from torch.fx: the whole network's graph, or, where a forward cannot be traced
    (it branches on a tensor, as spikingjelly's attention does on ``x.ndim``), the graphs of its
    children, recursively; an untraceable nn.Sequential still gives its adjacent pairs."""
    leaf = _StepModuleLeafTracer()
    pairs: list[_Pair] = []

    def visit(module: nn.Module, prefix: str) -> None:
        try:
            pairs.extend(_traced_pairs(_trace(module), prefix))
            return
        except Exception as error:  # dynamic control flow and the like: fx cannot trace every forward
            report.unread.append((prefix.rstrip(".") or "(the network)", f"torch.fx cannot trace "
                                  f"{type(module).__name__}.forward ({type(error).__name__}); pass example_input= "
                                  "to fuse_norm_neurons to read it by a run"))
        if isinstance(module, nn.Sequential):
            pairs.extend(_sequential_pairs(module, prefix))
        for name, child in module.named_children():
            if not leaf.is_leaf_module(child, prefix + name):
                visit(child, f"{prefix}{name}.")

    visit(net, "")
    return pairs


def _run_pairs(net: nn.Module, example_input: Any) -> list[_Pair]:
    """Pairs from one run of ``example_input`` through a copy of ``net`` (:mod:`snnorm._dataflow`)."""
    handoffs = record_handoffs(net, example_input, watched=fusable_norm)
    modules = dict(net.named_modules())
    pairs = []
    for norm, consumer in handoffs.pairs:
        if not isinstance(modules[consumer], neuron_mod.BaseNode):
            continue
        relayout = handoffs.relayouts.get(norm)
        why = _handoff_problem(handoffs.calls.get(norm), handoffs.calls.get(consumer), norm in handoffs.other_users,
                               relayout, handoffs.ndims.get(norm))
        pairs.append((norm, consumer, why, relayout))
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


def fusion_report(net: nn.Module, example_input: Any = None) -> FusionReport:
    """What :func:`fuse_norm_neurons` finds in ``net`` (and leaves ``net`` as it is): the pairs
    it fuses or has fused, each norm → neuron it leaves apart and why, and the forwards it
    could not read. ``example_input`` (a tensor or a tuple of arguments): read the network by
    one run of it on a copy instead of by torch.fx.

    :raises TypeError: ``net`` is not an ``nn.Module``.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"fuse_norm_neurons expects an nn.Module, got {type(net).__name__}")
    report = FusionReport()
    found = _run_pairs(net, example_input) if example_input is not None else _read_pairs(net, report)
    places: dict[int, int] = {}
    for _, module in net.named_modules(remove_duplicate=False):
        places[id(module)] = places.get(id(module), 0) + 1
    seen = set()
    for norm_name, neuron_name, why, relayout in found:
        if (norm_name, neuron_name) in seen:
            continue
        seen.add((norm_name, neuron_name))
        norm, neuron = net.get_submodule(norm_name), net.get_submodule(neuron_name)
        block = fused_block(norm)
        if block is not None and block is fused_block(neuron):
            report.fused.append((norm_name, neuron_name))  # fused already
            if block.relayout is not None:
                report.relayouts[norm_name, neuron_name] = block.relayout
            continue
        if why is None and (places[id(norm)] > 1 or places[id(neuron)] > 1):
            why = "a module of the pair is registered at several places"
        why = why or _neuron_problem(neuron) or _instance_forward_problem(norm, neuron) \
            or _instance_forward_problem(neuron, norm)
        if why is None:
            report.fused.append((norm_name, neuron_name))
            if relayout is not None:
                report.relayouts[norm_name, neuron_name] = relayout
        else:
            report.apart.append((norm_name, neuron_name, why))
    return report


def fuse_norm_neurons(net: nn.Module, example_input: Any = None) -> nn.Module:
    """Pair every batch-statistics norm, LayerNorm and RMSNorm with the IF/LIF neuron that alone
    consumes its output, in place (module docstring), and return ``net``. Every parameter, buffer and
    module keeps its name and object.

    Pairs are found in the graph torch.fx traces (step modules are leaves; a forward it cannot
    trace is read through its children's), or, with ``example_input``, by one run of it
    through a copy of ``net`` (networks that branch on a tensor's shape, like spikingjelly's
    attention blocks). A ``SeqToANNContainer`` that ends in a BatchNorm counts as a multi-step
    BN (:func:`container_batch_norm`). A neuron that reads the norm's output through one layout
    change keeping T (``transpose``, ``permute``, ``swapaxes``, ``.mT``; not a module that only
    transposes) pairs too (module docstring). What stays apart is said in one warning: a norm whose
    output has other users, a module called or registered at several places, a neuron option
    the fused kernel lacks (``store_v_seq``), a neuron that is not IF/LIF, a module with an
    instance-level ``forward`` of its own, and forwards that could not be read.
    :func:`fusion_report` gives the same as a value. Fusing a fused network changes nothing.

    :raises TypeError: ``net`` is not an ``nn.Module``.
    """
    report = fusion_report(net, example_input)
    for norm_name, neuron_name in report.fused:
        norm, neuron = net.get_submodule(norm_name), net.get_submodule(neuron_name)
        if fused_block(norm) is None:
            _mark(FusedBlock(norm, neuron, report.relayouts.get((norm_name, neuron_name))))
    if report.apart or report.unread:
        warnings.warn(f"fuse_norm_neurons: {report}", stacklevel=2)
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
