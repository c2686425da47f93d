r"""torch.fx helpers shared by the network rewrites (conv-BN folding in
:mod:`snnorm.folding`, norm→neuron fusion in :mod:`snnorm.fusion`).

:func:`_trace` traces a network with step modules (snnorm's and spikingjelly's, and any
class with ``traced_as_leaf = True``) as leaves, so a pair inside a ``SeqToANNContainer``
is left alone, as in spikingjelly; :func:`_conv_bn_pairs` finds every ``bn(conv(x))`` whose
conv output feeds nothing else; :func:`_replace_pairs` rewrites them. For a module that
declares its step modes, :func:`_supported_step_modes` says which.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.fx
import torch.nn as nn

from . import base


def _supported_step_modes(module: nn.Module) -> tuple[str, ...] | None:
    """What the module declares (snnorm's attribute or spikingjelly's method); None if nothing."""
    if isinstance(module, base.StepModule):
        return tuple(module.supported_step_modes)
    declared = getattr(module, "supported_step_mode", None)
    if callable(declared):
        return tuple(declared())
    return None


class _StepModuleLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, base.StepModule) or _is_foreign_step_module(m) or getattr(type(m), "traced_as_leaf", False):
            return True
        return super().is_leaf_module(m, qualified_name)


def _is_foreign_step_module(m: nn.Module) -> bool:
    sj_base = sys.modules.get("spikingjelly.activation_based.base")
    return sj_base is not None and isinstance(m, sj_base.StepModule)


def _conv_bn_pairs(graph_module: torch.fx.GraphModule, is_pair: Callable[[nn.Module, nn.Module], bool]):
    """``(conv target, bn target, [(conv node, bn node), ...])`` for each conv module whose
    every call is ``bn(conv(x))`` with the same BN module and no other user of the conv's
    output: a conv called at several sites (``self.bn(self.conv(x))`` twice) is rewritten
    once for all of them. A conv that feeds two different BNs, or whose output (at any
    call) has another user, is left alone: one module cannot be rewritten for some of its
    call sites only. The BN may have other calls; they keep the BN module."""
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites: dict[str, list] = {}  # conv target -> [(conv node, bn node)]
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module" or len(conv_node.users) != 1:
            continue
        if is_pair(modules[conv_node.target], modules[node.target]):
            sites.setdefault(conv_node.target, []).append((conv_node, node))
    groups = []
    for conv_target, pairs in sites.items():
        bn_targets = {bn_node.target for _, bn_node in pairs}
        if len(bn_targets) == 1 and len(pairs) == calls[conv_target]:
            groups.append((conv_target, bn_targets.pop(), pairs))
    return groups


def _trace(net: nn.Module) -> torch.fx.GraphModule:
    tracer = _StepModuleLeafTracer()
    graph = tracer.trace(net)
    return torch.fx.GraphModule(tracer.root, graph)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _replace_pairs(graph_module: torch.fx.GraphModule, groups, make: Callable[[nn.Module, nn.Module], nn.Module]):
    """Replace each group's conv module by ``make(conv, bn)`` and drop its BN calls: every
    call site of the conv now calls the new module, whose output stands for the BN's."""
    for conv_target, bn_target, pairs in groups:
        conv = graph_module.get_submodule(conv_target)
        bn = graph_module.get_submodule(bn_target)
        _set_submodule(graph_module, conv_target, make(conv, bn))
        for conv_node, bn_node in pairs:
            bn_node.replace_all_uses_with(conv_node)
            graph_module.graph.erase_node(bn_node)
        if not any(n.op == "call_module" and n.target == bn_target for n in graph_module.graph.nodes):
            # by name: a packed BN is still reachable through the pack, so the sweep below keeps it
            graph_module.delete_submodule(bn_target)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module
