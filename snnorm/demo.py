"""End-to-end demo: a small convolutional SNN on scikit-learn's handwritten digits.

Run ``python -m snnorm.demo`` (one to three minutes on a 2-core CPU; ``--help`` lists
the options). It needs the ``demo`` extra: ``pip install 'snnorm[demo]'`` (scikit-learn,
tqdm, matplotlib). The data set (``sklearn.datasets.load_digits``, 1797 grey 8x8
images) ships with scikit-learn, so nothing is downloaded.

What it shows, stage by stage:

1. **Training.** Each image is fed unchanged at every one of T timesteps (direct
   encoding) through two blocks ::

       Conv2d -> TEBN (or tdBN, or TAB) -> MPBN-LIF -> MaxPool2d

   then ``Flatten -> Linear``; the logits are the mean over T of the readout. TEBN
   (Duan et al., NeurIPS 2022) normalises the synaptic current with statistics shared
   over T and scales timestep t by a learnt p[t]; tdBN (Zheng et al., AAAI 2021) is
   the multi-step BN with γ initialised to α·V_th; TAB (Jiang et al., ICLR 2024,
   ``--norm tab``) normalises step t with the statistics of steps 0..t. The MPBN-LIF
   neuron (Guo et al., ICCV 2023) normalises its membrane potential again before firing. The state of
   every neuron is reset after each batch (``snnorm.functional.reset_net``).
2. **Threshold folding.** ``re_parameterize_v_threshold()`` folds each neuron's
   membrane BN into a per-channel threshold,
   Ṽ_th = μ + (V_th − β)·√(σ² + ε)/γ. The fold is exact in real arithmetic; in
   floating point a spike can flip only where the membrane is within a few ulps of the
   threshold. The demo counts the test predictions that change (0 in its runs).
3. **Test-time threshold modulation** (Zhao et al., arXiv 2505.05375). On a corrupted
   copy of the test set (Gaussian noise plus a brightness shift) the folded model is
   evaluated as is, then its neurons alone are put in training mode with
   ``running_stats=True``: one pass without gradients over the corrupted images
   re-estimates μ, σ² (an exponential average whose momentum decays every step), which
   moves the thresholds to the new input statistics. Nothing else is trained. For
   comparison, a copy adapts with each batch's own statistics (``running_stats=False``).
4. **Plot.** Training curves, the fold check (the folded model's logits against the
   unfolded model's, predictions changed, max |Δlogit|), the spike rate of each
   MPBN-LIF layer (recorded with forward hooks; axes from 0) and the accuracy under the
   input shift without and with each adaptation (axis from 0; "online" = the
   predictions made during the adaptation pass, "after" = the adapted model evaluated
   again) are written to ``--out`` (default ``./demo_out/demo.png``).

``--backend triton`` runs the MPBN-LIF neurons and TEBN layers on the fused Triton
kernels (on a CUDA device, or slowly on CPU through the Triton interpreter).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional, layer
from .neuron import MPBNBaseNode, MPBNLIFNode

__all__ = ["DemoConfig", "DigitsSNN", "MissingDemoExtra", "main", "parse_args"]

NUM_CLASSES = 10

#: import name -> distribution of the ``demo`` extra (pyproject.toml)
DEMO_EXTRA = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class MissingDemoExtra(ImportError):
    """The demo's own dependencies (the ``demo`` extra) are not installed."""


def require_demo_extra() -> None:
    """Raise :class:`MissingDemoExtra` naming what is missing and how to install it."""
    missing = []
    for module, distribution in DEMO_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise MissingDemoExtra(
            f"the snnorm demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed. Install the demo extra: pip install 'snnorm[demo]' "
            f"(from a checkout: pip install -e '.[demo]')"
        )


# -- configuration -------------------------------------------------------------------------
@dataclasses.dataclass
class DemoConfig:
    epochs: int = 30
    T: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    backend: str = "torch"
    device: str = "cpu"
    threads: int = 1  # torch CPU threads during the run (restored afterwards)
    norm: str = "tebn"
    out: str = "./demo_out/demo.png"
    channels: tuple[int, int] = (16, 32)
    train_subset: int | None = None  # use only this many training images (--quick)
    test_subset: int | None = None  # ... and test images (tests)
    noise_std: float = 0.3  # corruption: Gaussian noise on images in [0, 1] ...
    brightness: float = 0.25  # ... plus a constant brightness shift
    progress: bool = True


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(
        prog="python -m snnorm.demo",
        description="Train a small convolutional SNN (TEBN/tdBN + MPBN-LIF) on sklearn digits, "
        "fold the MPBN thresholds, and adapt them at test time on corrupted digits.",
    )
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--T", type=int, default=defaults.T, help="timesteps (direct encoding)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--backend", choices=("torch", "triton"), default=defaults.backend)
    p.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch CPU threads; the tensors are tiny, so one thread is fastest")
    p.add_argument("--norm", choices=("tebn", "tdbn", "tab"), default=defaults.norm,
                   help="the BN-like layer after each convolution")
    p.add_argument("--out", default=defaults.out, help="where to write the PNG plot")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (2 epochs, 384 training images, T=2) for smoke tests")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm progress bars (they are drawn only on a terminal anyway)")
    a = p.parse_args(argv)
    for name in ("epochs", "T", "batch_size", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    cfg = DemoConfig(
        epochs=a.epochs, T=a.T, batch_size=a.batch_size, lr=a.lr, seed=a.seed, backend=a.backend,
        device=a.device, threads=a.threads, norm=a.norm, out=a.out, progress=not a.no_progress,
    )
    if a.quick:
        cfg = dataclasses.replace(cfg, epochs=2, T=2, batch_size=32, channels=(8, 16), train_subset=384)
    return cfg


# -- data ------------------------------------------------------------------------------------
def load_data(cfg: DemoConfig, device: torch.device):
    """sklearn digits as float images in [0, 1], shape [N, 1, 8, 8]; a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=cfg.seed, stratify=digits.target
    )
    if cfg.train_subset is not None:
        idx_train = idx_train[: cfg.train_subset]
    if cfg.test_subset is not None:
        idx_test = idx_test[: cfg.test_subset]
    return (x[idx_train].to(device), y[idx_train].to(device),
            x[idx_test].to(device), y[idx_test].to(device))


def corrupt(images: torch.Tensor, noise_std: float, brightness: float, seed: int) -> torch.Tensor:
    """A shifted copy of the test set: x + brightness + N(0, noise_std²), clipped to [0, 1]."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    noise = torch.randn(images.shape, generator=g).to(images.device) * noise_std
    return (images + brightness + noise).clamp(0.0, 1.0)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Yield (x, y) mini-batches; shuffled when a generator is given."""
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else torch.arange(n, device=x.device)
    for start in range(0, n, batch_size):
        i = order[start : start + batch_size]
        yield x[i], y[i]


# -- the network -------------------------------------------------------------------------------
def make_norm(kind: str, T: int, channels: int) -> nn.Module:
    """The BN-like layer between a convolution and its MPBN-LIF neurons."""
    if kind == "tebn":
        return layer.TemporalEffectiveBatchNorm2d(T, channels, step_mode="m")
    if kind == "tdbn":
        # α·V_th with V_th = 1, the MPBN neuron's threshold
        return layer.ThresholdDependentBatchNorm2d(1.0, 1.0, channels, step_mode="m")
    if kind == "tab":  # statistics accumulated over steps 0..t (Jiang et al., ICLR 2024)
        return layer.TemporalAccumulatedBatchNorm2d(T, channels, step_mode="m")
    raise ValueError(f"norm must be 'tebn', 'tdbn' or 'tab', got {kind!r}")


class DigitsSNN(nn.Module):
    """Two conv blocks (Conv → TEBN/tdBN → MPBN-LIF → MaxPool) and a linear readout.

    Input ``[N, 1, 8, 8]`` images; they are repeated over T (direct encoding) and the
    logits are the readout averaged over T, shape ``[N, 10]``.
    """

    def __init__(self, T: int, norm: str = "tebn", channels: tuple[int, int] = (16, 32)):
        super().__init__()
        self.T = T
        c1, c2 = channels
        self.features = nn.Sequential(
            layer.Conv2d(1, c1, kernel_size=3, padding=1, bias=False, step_mode="m"),
            make_norm(norm, T, c1),
            MPBNLIFNode(out_channels=c1, step_mode="m"),
            layer.MaxPool2d(2, step_mode="m"),  # 8x8 -> 4x4
            layer.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False, step_mode="m"),
            make_norm(norm, T, c2),
            MPBNLIFNode(out_channels=c2, step_mode="m"),
            layer.MaxPool2d(2, step_mode="m"),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            layer.Flatten(step_mode="m"),
            layer.Linear(c2 * 2 * 2, NUM_CLASSES, step_mode="m"),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x_seq = images.unsqueeze(0).expand(self.T, *images.shape)  # [T, N, 1, 8, 8]
        return self.classifier(self.features(x_seq)).mean(dim=0)

    def neurons(self) -> list[tuple[str, MPBNBaseNode]]:
        """The MPBN neurons, named ``lif1``, ``lif2``... in network order."""
        nodes = [m for m in self.modules() if isinstance(m, MPBNBaseNode)]
        return [(f"lif{i + 1}", m) for i, m in enumerate(nodes)]


# -- spike-rate hooks -------------------------------------------------------------------------
class SpikeRateRecorder:
    """Forward hooks on the MPBN neurons that count spikes: ``rates()`` = spikes / outputs."""

    def __init__(self, model: DigitsSNN):
        self.spikes = {name: 0.0 for name, _ in model.neurons()}
        self.count = {name: 0 for name, _ in model.neurons()}
        self._handles = [node.register_forward_hook(self._hook(name)) for name, node in model.neurons()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.spikes[name] += float(output.detach().sum())
            self.count[name] += output.numel()
        return hook

    def rates(self) -> dict[str, float]:
        return {name: self.spikes[name] / max(self.count[name], 1) for name in self.spikes}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def record_spike_rates(model: DigitsSNN):
    recorder = SpikeRateRecorder(model)
    try:
        yield recorder
    finally:
        recorder.remove()


# -- building blocks: train, predict, fold, adapt, plot ---------------------------------------
def train_one_epoch(model, optimizer, x, y, cfg: DemoConfig, generator: torch.Generator, epoch: int):
    """One pass over the training set; returns (mean loss, accuracy, per-batch losses)."""
    from tqdm import tqdm

    model.train()
    losses, correct, seen = [], 0, 0
    n_batches = math.ceil(len(y) / cfg.batch_size)
    # disable=None: tqdm draws only when its stream (stderr) is a terminal, so output
    # redirected to a file or a CI log holds the epoch lines, not carriage-return frames
    bar = tqdm(batches(x, y, cfg.batch_size, generator), total=n_batches, leave=False,
               desc=f"epoch {epoch}/{cfg.epochs}", disable=None if cfg.progress else True)
    for xb, yb in bar:
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        functional.reset_net(model)  # membranes start from v_reset for the next batch
        losses.append(loss.item())
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(yb)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return sum(losses) / len(losses), correct / seen, losses


@torch.no_grad()
def predict(model, x, batch_size: int) -> torch.Tensor:
    """Logits of ``x`` in batches (the model's train/eval modes are left as they are)."""
    out = []
    for start in range(0, len(x), batch_size):
        out.append(model(x[start : start + batch_size]))
        functional.reset_net(model)
    return torch.cat(out)


def evaluate(model, x, y, batch_size: int):
    """Eval-mode accuracy, logits and spike rate per MPBN layer."""
    model.eval()
    with record_spike_rates(model) as rec:
        logits = predict(model, x, batch_size)
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, logits, rec.rates()


def fold_thresholds(model: DigitsSNN) -> None:
    """Fold every neuron's membrane BN into its per-channel threshold."""
    for _, node in model.neurons():
        node.re_parameterize_v_threshold()


@torch.no_grad()
def adapt_thresholds(model: DigitsSNN, x, y, batch_size: int, running_stats: bool = True) -> float:
    """Test-time threshold modulation: one pass over ``x`` with only the neurons training.

    The folded neurons re-estimate μ, σ² (hence their thresholds) from the data: with a
    decaying-momentum running average (``running_stats=True``), or from each batch
    alone (``running_stats=False``). Every other layer stays in eval and no weight
    changes. Returns the online accuracy (predictions made during the pass).
    """
    model.eval()
    for _, node in model.neurons():
        node.running_stats = running_stats
        node.train()
    logits = predict(model, x, batch_size)
    model.eval()
    return (logits.argmax(1) == y).float().mean().item()


def _accuracy_limits(values, margin: float = 0.03) -> tuple[float, float]:
    """Accuracy axis limits that hold every value (none clipped), within [0, 1 + margin/3]."""
    low = min(values)
    return max(0.0, math.floor((low - margin) * 20) / 20), 1.0 + margin / 3


#: the adaptation panel's bars: (tick label, results["tta"] key, legend text explaining it)
ADAPTATION_BARS = (
    ("clean", "acc_clean", "clean: the folded model on the clean test set"),
    ("corrupted", "acc_corrupted_before", "corrupted: same model, noisy + brighter inputs, no adaptation"),
    ("running stats\nonline", "acc_online",
     "running stats, online: the predictions made during the one adaptation pass, "
     "as μ, σ² move (a running average)"),
    ("running stats\nafter", "acc_corrupted_after",
     "running stats, after: the adapted model evaluated again, thresholds frozen"),
    ("per-batch stats\nonline", "acc_online_batch_stats",
     "per-batch stats, online: each batch normalised with its own μ, σ² during the pass"),
)


def _draw_fold_check(ax, fold: dict, logits: dict | None) -> None:
    """The fold check: the folded model's logits against the unfolded model's, and the counts."""
    if logits is not None:
        before = logits["eval"].detach().flatten().cpu()
        after = logits["folded"].detach().flatten().cpu()
        ax.scatter(before, after, s=4, alpha=0.4, color="C0", label=f"{len(before)} logits (test set)")
        lo, hi = float(min(before.min(), after.min())), float(max(before.max(), after.max()))
        ax.plot([lo, hi], [lo, hi], color="C3", lw=0.8, ls="--", label="folded = unfolded")
        ax.set(xlabel="logit, membrane BN (eval)", ylabel="logit, thresholds folded")
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.set_axis_off()
    same = "unchanged" if fold["acc_before"] == fold["acc_after"] else "changed"
    ax.text(0.03, 0.97,
            f"predictions changed: {fold['changed']} of {fold['n']}\n"
            f"max |Δlogit|: {fold['max_logit_diff']:.1e}\n"
            f"test accuracy {fold['acc_before']:.3f} → {fold['acc_after']:.3f} ({same})",
            transform=ax.transAxes, va="top", ha="left", fontsize=10,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.9))
    ax.set_title(f"fold check: predictions changed {fold['changed']} of {fold['n']}\n"
                 f"max |logit difference| {fold['max_logit_diff']:.1e}", fontsize=10)


def _draw_adaptation(ax, tta: dict):
    """Accuracy under the input shift: no adaptation and the three adaptation readings, from 0.

    Returns the bars, for the figure's legend that explains each of them."""
    values = [tta[key] for _, key, _ in ADAPTATION_BARS]
    best = max(range(2, len(values)), key=lambda i: values[i])  # the best adaptation
    bars = ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    bars[best].set_edgecolor("black")
    bars[best].set_linewidth(1.5)
    ax.set_xticks(range(len(values)), [label for label, _, _ in ADAPTATION_BARS], fontsize=8)
    for i, (bar, value) in enumerate(zip(bars, values)):
        ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                    fontsize=10 if i == best else 8, fontweight="bold" if i == best else "normal")
    ax.set(ylabel="test accuracy", ylim=(0.0, 1.08), yticks=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    best_name = ADAPTATION_BARS[best][2].split(":")[0]
    ax.set_title(f"test-time threshold modulation, corrupted inputs\n"
                 f"best: {values[best]:.3f} ({best_name}); no adaptation: {values[1]:.3f}", fontsize=10)
    return bars


def make_figure(history: dict, results: dict):
    """The demo's figure (six panels); returned open, for :func:`plot_results` to save.

    Top: training loss; accuracy per epoch (every epoch, no point clipped); the fold check
    (the folded model's logits against the unfolded model's when ``results["logits"]`` holds
    them, predictions changed and the max |Δlogit|). Bottom: spike rate per MPBN layer over
    epochs and under the input shift (axes from 0); accuracy under the shift (axis from 0)
    without adaptation and with each adaptation, explained in a legend under the panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(1, len(history["train_loss"]) + 1))
    fold, tta = results["fold"], results["tta"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))

    ax = axes[0, 0]
    steps = history["batch_loss"]
    per_epoch = len(steps) / max(len(epochs), 1)
    ax.plot([(i + 1) / per_epoch for i in range(len(steps))], steps, lw=0.6, alpha=0.5, label="batch")
    ax.plot(epochs, history["train_loss"], "o-", label="epoch mean")
    ax.set(title="training loss (cross entropy)", xlabel="epoch", ylabel="loss")
    ax.legend()

    ax = axes[0, 1]
    ax.plot(epochs, history["train_acc"], "o-", label=f"train (last {history['train_acc'][-1]:.3f})")
    ax.plot(epochs, history["test_acc"], "s-", label=f"test, eval (last {history['test_acc'][-1]:.3f})")
    ax.axhline(fold["acc_after"], color="C2", ls="--", lw=1, label=f"test, thresholds folded ({fold['acc_after']:.3f})")
    ax.set(title=f"accuracy per epoch (all {len(epochs)})", xlabel="epoch", ylabel="accuracy",
           ylim=_accuracy_limits(history["train_acc"] + history["test_acc"] + [fold["acc_after"]]))
    ax.legend(loc="lower right")

    _draw_fold_check(axes[0, 2], fold, results.get("logits"))

    ax = axes[1, 0]
    for name in history["spike_rate"][0]:
        ax.plot(epochs, [r[name] for r in history["spike_rate"]], "o-", label=name)
    ax.set(title="spike rate per MPBN-LIF layer (test set, eval)", xlabel="epoch", ylabel="spikes / neuron / step")
    ax.set_ylim(bottom=0)
    ax.legend()

    ax = axes[1, 1]
    cases = [("clean", tta["rates_clean"]), ("corrupted", tta["rates_corrupted_before"]),
             ("corrupted, adapted (running stats)", tta["rates_corrupted_after"])]
    names = list(tta["rates_clean"])
    width = 0.8 / len(cases)
    for k, (label, rates) in enumerate(cases):
        ax.bar([i + k * width for i in range(len(names))], [rates[n] for n in names], width, label=label)
    ax.set_xticks([i + width * (len(cases) - 1) / 2 for i in range(len(names))], names)
    ax.set(title="folded model: spike rates under the input shift", ylabel="spikes / neuron / step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    bars = _draw_adaptation(axes[1, 2], tta)
    fig.legend(handles=list(bars), labels=[text for _, _, text in ADAPTATION_BARS], ncol=2, fontsize=9,
               loc="lower center", bbox_to_anchor=(0.5, 0.0), frameon=False,
               title="the bars of the test-time threshold modulation panel (bottom right)", title_fontsize=9)

    fig.suptitle(f"snnorm demo: sklearn digits, {results['config']['norm'].upper()} + MPBN-LIF, "
                 f"T={results['config']['T']}")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.17, top=0.91, wspace=0.25, hspace=0.38)
    return fig


def plot_results(history: dict, results: dict, path: Path) -> None:
    """Write :func:`make_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = make_figure(history, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run: one function per stage -------------------------------------------------------
def _setup(cfg: DemoConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
    if cfg.backend == "triton" and cfg.device == "cpu" and "triton" not in sys.modules:
        # Triton kernels run on CPU tensors only through its interpreter (slow).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.device(cfg.device)


def build_model(cfg: DemoConfig, device: torch.device) -> DigitsSNN:
    """The network on ``device``, its neurons (and TEBN) on ``cfg.backend``."""
    model = DigitsSNN(cfg.T, cfg.norm, cfg.channels).to(device)
    if cfg.backend != "torch":
        # the MPBN-LIF neurons and TEBN have fused kernels; the other layers are torch's own
        kernel_norms = (layer.TemporalEffectiveBatchNorm2d, layer.TemporalAccumulatedBatchNorm2d)
        functional.set_backend(model, cfg.backend, instance=(MPBNBaseNode, *kernel_norms))
        on_backend = [name for name, m in model.named_modules() if getattr(m, "backend", None) == cfg.backend]
        print(f"modules on the {cfg.backend} backend: {', '.join(on_backend)}")
    return model


def train(model: DigitsSNN, cfg: DemoConfig, x_train, y_train, x_test, y_test) -> dict:
    """Stage 1: Adam with a cosine schedule; evaluates on the test set after every epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    shuffle = torch.Generator(device="cpu").manual_seed(cfg.seed)
    history = {"train_loss": [], "train_acc": [], "test_acc": [], "batch_loss": [], "spike_rate": []}
    for epoch in range(1, cfg.epochs + 1):
        loss, train_acc, batch_losses = train_one_epoch(model, optimizer, x_train, y_train, cfg, shuffle, epoch)
        scheduler.step()
        test_acc, _, rates = evaluate(model, x_test, y_test, cfg.batch_size * 4)
        for key, value in (("train_loss", loss), ("train_acc", train_acc), ("test_acc", test_acc),
                           ("spike_rate", rates)):
            history[key].append(value)
        history["batch_loss"].extend(batch_losses)
        rate_text = ", ".join(f"{k} {v:.3f}" for k, v in rates.items())
        print(f"epoch {epoch:2d}/{cfg.epochs}: train loss {loss:.4f}  train acc {train_acc:.4f}  "
              f"test acc {test_acc:.4f}  spike rate {rate_text}")
    return history


def fold_and_compare(model: DigitsSNN, cfg: DemoConfig, x_test, y_test) -> dict:
    """Stage 2: fold the thresholds; the eval network is the same, so are its predictions."""
    acc_before, logits_before, _ = evaluate(model, x_test, y_test, cfg.batch_size * 4)
    fold_thresholds(model)
    acc_after, logits_after, rates = evaluate(model, x_test, y_test, cfg.batch_size * 4)
    changed = int((logits_before.argmax(1) != logits_after.argmax(1)).sum())
    max_diff = (logits_before - logits_after).abs().max().item()
    print(f"threshold folding: eval test acc before {acc_before:.4f}, after {acc_after:.4f}; "
          f"predictions changed: {changed} of {len(y_test)}; max |logit difference| {max_diff:.2e}")
    return {"acc_before": acc_before, "acc_after": acc_after, "changed": changed, "n": len(y_test),
            "max_logit_diff": max_diff, "rates": rates, "logits": {"eval": logits_before, "folded": logits_after}}


def adapt_to_corruption(model: DigitsSNN, cfg: DemoConfig, x_test, y_test) -> dict:
    """Stage 3: the folded model on corrupted digits, before and after threshold modulation."""
    x_corrupt = corrupt(x_test, cfg.noise_std, cfg.brightness, cfg.seed)
    acc_before, _, rates_before = evaluate(model, x_corrupt, y_test, cfg.batch_size * 4)
    # for comparison, a copy that uses each batch's own statistics (running_stats=False)
    acc_online_batch = adapt_thresholds(copy.deepcopy(model), x_corrupt, y_test, cfg.batch_size, running_stats=False)
    acc_online = adapt_thresholds(model, x_corrupt, y_test, cfg.batch_size, running_stats=True)
    acc_after, _, rates_after = evaluate(model, x_corrupt, y_test, cfg.batch_size * 4)
    rows = [("no adaptation", acc_before),
            ("running statistics, online (predictions made during the pass)", acc_online),
            ("running statistics, after the pass (thresholds frozen)", acc_after),
            ("per-batch statistics, online", acc_online_batch)]
    best = max(rows[1:], key=lambda row: row[1])
    print(f"corrupted test set (noise std {cfg.noise_std}, brightness +{cfg.brightness}), folded model, "
          f"test accuracy:")
    for label, acc in rows:
        print(f"  {label:<64s} {acc:.4f}{'  <- best' if (label, acc) == best else ''}")
    return {"acc_corrupted_before": acc_before, "acc_online": acc_online, "acc_corrupted_after": acc_after,
            "acc_online_batch_stats": acc_online_batch,
            "rates_corrupted_before": rates_before, "rates_corrupted_after": rates_after}


def _run(cfg: DemoConfig) -> dict:
    start = time.perf_counter()
    device = _setup(cfg)
    x_train, y_train, x_test, y_test = load_data(cfg, device)
    print(f"sklearn digits: {len(y_train)} train / {len(y_test)} test images 8x8, T={cfg.T}, "
          f"norm={cfg.norm}, backend={cfg.backend}, device={cfg.device}, seed={cfg.seed}")
    model = build_model(cfg, device)

    history = train(model, cfg, x_train, y_train, x_test, y_test)
    fold = fold_and_compare(model, cfg, x_test, y_test)
    tta = adapt_to_corruption(model, cfg, x_test, y_test)
    tta.update(acc_clean=fold["acc_after"], rates_clean=fold.pop("rates"))
    logits = fold.pop("logits")  # tensors: for the figure, kept apart from the numbers
    results = {"config": dataclasses.asdict(cfg), "history": history, "fold": fold, "tta": tta, "logits": logits}

    out = Path(cfg.out)  # stage 4
    plot_results(history, results, out)
    results["plot"] = str(out)
    results["wall_s"] = time.perf_counter() - start
    print(f"plot written to {out.resolve()}  (total {results['wall_s']:.1f} s)")
    return results


def main(argv: list[str] | None = None, cfg: DemoConfig | None = None) -> dict:
    """Run every stage; print the accuracies and return them (with the history) as a dict."""
    if cfg is None:
        cfg = parse_args(argv)
    require_demo_extra()
    threads = torch.get_num_threads()
    # Splitting each tiny op over cores costs more than it saves (3x slower on 2 cores).
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    try:
        main()
    except MissingDemoExtra as missing:
        sys.exit(f"python -m snnorm.demo: {missing}")
