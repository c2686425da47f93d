"""Networks that mix snnorm with spikingjelly (and user) modules.

``reset_net`` / ``detach_net`` / ``set_step_mode`` / ``set_backend`` must reach every
module that has the attribute, not only snnorm's; spikingjelly 2.0.0's rule is to act
on foreign modules with a warning. Also spikingjelly's memory helpers in
``snnorm.base`` (``named_memories``, ``to_functional_forward``, ...).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import base as sj_base
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron

from snnorm import base, functional, layer, neuron


def _mixed_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        layer.Linear(4, 6),
        sj_neuron.IFNode(),  # spikingjelly's neuron between snnorm's layers
        sj_layer.Linear(6, 5),
        neuron.LIFNode(),
    )


def _sequence() -> torch.Tensor:
    return torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(1)) * 2


class _Counter(nn.Module):
    """A user's stateful module with reset()/detach() but no snnorm or spikingjelly base."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def forward(self, x):
        self.count += 1
        return x

    def reset(self):
        self.count = 0


# -- reset_net / detach_net ---------------------------------------------------------------


def test_reset_net_resets_a_spikingjelly_neuron_and_warns_once_naming_it():
    net = _mixed_net()
    functional.set_step_mode(net, "m")
    x = _sequence()
    first = net(x)
    assert isinstance(net[1].v, torch.Tensor) and net[1].v.abs().sum() > 0
    with pytest.warns(UserWarning, match=r"spikingjelly\.activation_based\.neuron.*IFNode.*not a snnorm MemoryModule") as record:
        functional.reset_net(net)
    assert len(record) == 1  # snnorm's own modules reset silently
    assert net[1].v == 0.0 and net[3].v == 0.0
    # the same sequence again gives the same output: no membrane carried over
    assert torch.equal(net(x), first)


def test_reset_net_resets_a_user_module_with_reset():
    counter = _Counter()
    net = nn.Sequential(neuron.IFNode(), counter)
    net(torch.rand(2, 3))
    assert counter.count == 1
    with pytest.warns(UserWarning, match="_Counter"):
        functional.reset_net(net)
    assert counter.count == 0


def test_detach_net_detaches_a_spikingjelly_neuron():
    net = _mixed_net()
    functional.set_step_mode(net, "m")
    x = _sequence().requires_grad_(True)
    net(x)
    assert net[1].v.grad_fn is not None and net[3].v.grad_fn is not None
    with pytest.warns(UserWarning, match="IFNode"):
        functional.detach_net(net)
    assert net[1].v.grad_fn is None and net[3].v.grad_fn is None


# -- set_step_mode ------------------------------------------------------------------------


def test_set_step_mode_reaches_spikingjelly_modules_but_not_container_children():
    inner = layer.BatchNorm1d(6)
    net = nn.Sequential(
        layer.Linear(4, 6),
        sj_layer.SeqToANNContainer(inner),  # runs its child on [T*N, ...]: child stays 's'
        sj_neuron.IFNode(),
        sj_layer.Linear(6, 5),
        neuron.LIFNode(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spikingjelly StepModules declare their modes: no warning
        functional.set_step_mode(net, "m")
    assert [net[i].step_mode for i in (0, 2, 3, 4)] == ["m"] * 4
    assert inner.step_mode == "s"
    assert net(_sequence()).shape == (5, 3, 5)


class _SingleOnly(nn.Module, sj_base.SingleStepModule):
    def __init__(self):
        super().__init__()
        self.step_mode = "s"

    def forward(self, x):
        return x


def test_set_step_mode_checks_spikingjelly_modules_before_changing_any():
    net = nn.Sequential(layer.Linear(4, 6), sj_neuron.IFNode(), _SingleOnly(), neuron.LIFNode())
    with pytest.raises(ValueError, match=r"'2'.*_SingleOnly.*'m'"):
        functional.set_step_mode(net, "m")
    assert [m.step_mode for m in net] == ["s"] * 4  # nothing changed


class _PlainStepMode(nn.Module):
    """A module with a step_mode attribute and no declared modes; rejects 'm' in its setter."""

    def __init__(self, accept_m: bool):
        super().__init__()
        self.accept_m = accept_m
        self._mode = "s"

    @property
    def step_mode(self):
        return self._mode

    @step_mode.setter
    def step_mode(self, value):
        if value == "m" and not self.accept_m:
            raise ValueError("_PlainStepMode cannot run multi-step")
        self._mode = value


def test_set_step_mode_sets_undeclared_modules_with_a_warning_and_rolls_back_on_rejection():
    ok = nn.Sequential(neuron.LIFNode(), _PlainStepMode(accept_m=True))
    with pytest.warns(UserWarning, match="_PlainStepMode"):
        functional.set_step_mode(ok, "m")
    assert ok[0].step_mode == "m" and ok[1].step_mode == "m"

    bad = nn.Sequential(neuron.LIFNode(), sj_neuron.IFNode(), _PlainStepMode(accept_m=False))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="cannot run multi-step"):
        functional.set_step_mode(bad, "m")
    assert [m.step_mode for m in bad] == ["s"] * 3  # the modules set before it were restored


# -- set_backend --------------------------------------------------------------------------


class _ForeignNode(nn.Module):
    """A non-snnorm module declaring backends (spikingjelly < 2.0 neurons look like this)."""

    def __init__(self, supported):
        super().__init__()
        self._supported = tuple(supported)
        self.backend = "torch"

    @property
    def supported_backends(self):
        return self._supported

    def forward(self, x):
        return x


def test_set_backend_reaches_foreign_modules_that_declare_backends():
    net = nn.Sequential(neuron.LIFNode(), _ForeignNode(("torch", "triton")), _ForeignNode(("torch",)))
    with pytest.warns(UserWarning, match=r"2 \(_ForeignNode\)") as record:
        functional.set_backend(net, "triton")
    assert net[0].backend == "triton" and net[1].backend == "triton"
    assert net[2].backend == "torch"
    assert "0 (" not in str(record[0].message) and "1 (" not in str(record[0].message)


def test_set_backend_with_a_backend_only_foreign_modules_know():
    net = nn.Sequential(neuron.LIFNode(), _ForeignNode(("torch", "cupy")))
    with pytest.warns(UserWarning, match=r"0 \(LIFNode\)"):
        functional.set_backend(net, "cupy")  # spikingjelly's CUDA backend: snnorm has none
    assert net[1].backend == "cupy" and net[0].backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        functional.set_backend(net, "nope")  # nobody declares it
    assert net[1].backend == "cupy"


# -- base: spikingjelly's memory helpers -------------------------------------------------


def test_named_memories_extract_and_load_round_trip():
    net = _mixed_net()
    functional.set_step_mode(net, "m")
    net(_sequence())
    names = [name for name, _ in base.named_memories(net)]
    assert names == ["3.v"]  # snnorm MemoryModules only (the spikingjelly neuron has its own helpers)
    saved = base.extract_memories(net)
    functional.reset_net(nn.Sequential(net[3]))
    assert net[3].v == 0.0
    base.load_memories(net, saved)
    assert net[3].v is saved[0]
    with pytest.raises(ValueError, match="1 memories but the list holds 2"):
        base.load_memories(net, saved + saved)


def test_to_functional_forward_equals_the_stateful_run_and_leaves_memories_alone():
    net = nn.Sequential(neuron.LIFNode(tau=2.0), layer.Linear(4, 4), neuron.IFNode())
    functional.set_step_mode(net, "m")
    x = _sequence()
    f = base.to_functional_forward(net)
    (y,), states = f((x,), (0.0, 0.0))
    assert all(m.v == 0.0 for m in (net[0], net[2]))  # the module's memories are untouched
    assert torch.equal(y, net(x))
    assert all(torch.equal(s, m.v) for s, m in zip(states, (net[0], net[2])))
    # chaining the returned states continues the sequence
    (y2,), _ = f((x,), states)
    assert torch.equal(y2, net(x))
    with pytest.raises(ValueError, match="expected 2 states, but got 1"):
        f((x,), (0.0,))


def test_module_functional_forward_and_reset_values():
    lif = neuron.LIFNode(step_mode="m")
    x = _sequence()
    (y,), (v,) = lif.functional_forward((x,), (0.0,))
    assert lif.v == 0.0 and torch.equal(y, lif(x)) and torch.equal(v, lif.v)
    assert "v" in dir(lif)
    lif.set_reset_value("v", 0.5)
    assert lif.get_reset_value("v") == 0.5
    lif.reset()
    assert lif.v == 0.5
    with pytest.raises(KeyError, match="'w' is not a registered memory"):
        lif.get_reset_value("w")
    with pytest.raises(ValueError, match="1 memories"):
        lif.functional_forward((x,), (0.0, 0.0))


def test_reset_net_warns_once_per_class_not_every_batch():
    net = nn.Sequential(sj_neuron.IFNode(), sj_neuron.IFNode(), sj_neuron.LIFNode(), neuron.LIFNode())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per message and call site
        for _ in range(3):  # three batches
            functional.reset_net(net)
    messages = sorted(str(w.message).split(" which")[0] for w in record)
    assert len(messages) == 2 and "IFNode" in messages[0] and "LIFNode" in messages[1]
    assert all(w.filename == __file__ for w in record)  # attributed to the caller's line


def test_spikingjelly_reset_helpers_exist_and_act_like_reset_net():
    net = _mixed_net()
    functional.invalidate_reset_cache(net)  # nothing cached in snnorm; harmless
    modules = functional.collect_reset_modules(net)
    assert modules == (net[1], net[3])
    net(torch.rand(3, 4))
    with pytest.warns(UserWarning, match="IFNode"):
        functional.reset_collected_modules(modules)
    assert net[1].v == 0.0 and net[3].v == 0.0


class _RefusingNode(_ForeignNode):
    """Declares triton but its own setter refuses it (e.g. needs a device it cannot find)."""

    def __setattr__(self, name, value):
        if name == "backend" and value == "triton":
            raise RuntimeError("_RefusingNode: no device for triton")
        super().__setattr__(name, value)


def test_set_backend_undoes_its_changes_when_a_foreign_setter_refuses():
    net = nn.Sequential(neuron.LIFNode(), _ForeignNode(("torch", "triton")), _RefusingNode(("torch", "triton")))
    with pytest.raises(RuntimeError, match="no device"):
        functional.set_backend(net, "triton")
    assert [m.backend for m in net] == ["torch", "torch", "torch"]
