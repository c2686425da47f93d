"""Smoke tests of ``python -m snnorm.demo``: the --quick path end to end and its pieces.

The demo is run in-process through ``snnorm.demo.main`` with tiny configurations.
"""

import dataclasses
import io
import math
import sys

import pytest
import torch
from tolerances import DEMO_FOLD_MAX_LOGIT_DIFF, DEMO_LEARNED_MIN_TEST_ACC, DEMO_QUICK_MIN_TEST_ACC

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from snnorm import demo  # noqa: E402
from snnorm.neuron import MPBNBaseNode  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _accuracies(results):
    hist = results["history"]
    yield from hist["train_acc"]
    yield from hist["test_acc"]
    yield results["fold"]["acc_before"]
    yield results["fold"]["acc_after"]
    for key in ("acc_clean", "acc_corrupted_before", "acc_online", "acc_corrupted_after", "acc_online_batch_stats"):
        yield results["tta"][key]


@pytest.mark.slow  # the whole demo
def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "plots" / "demo.png"
    threads = torch.get_num_threads()
    results = demo.main(["--quick", "--no-progress", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the demo's --threads is undone

    # folding the MPBN thresholds leaves every eval prediction unchanged
    fold = results["fold"]
    assert fold["changed"] == 0
    assert fold["acc_before"] == fold["acc_after"]
    assert fold["max_logit_diff"] <= DEMO_FOLD_MAX_LOGIT_DIFF
    # ... and that check is not vacuous: both MPBN layers fire on the test set
    rates = results["tta"]["rates_clean"]
    assert set(rates) == {"lif1", "lif2"}
    assert all(0.0 < r < 1.0 for r in rates.values()), rates

    cfg = results["config"]
    assert len(results["history"]["train_loss"]) == cfg["epochs"] == 2
    assert all(math.isfinite(loss) for loss in results["history"]["batch_loss"])
    for acc in _accuracies(results):
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, acc
    # it learns: the loss falls and the held-out accuracy is above chance (1/10) after 2 epochs ...
    history = results["history"]
    assert history["train_loss"][-1] < history["train_loss"][0], history["train_loss"]
    assert history["test_acc"][-1] >= DEMO_QUICK_MIN_TEST_ACC > 1 / demo.NUM_CLASSES, history["test_acc"]

    assert results["logits"]["eval"].shape == results["logits"]["folded"].shape == (fold["n"], demo.NUM_CLASSES)
    assert out.is_file() and results["plot"] == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "predictions changed: 0 of" in printed
    assert printed.count("<- best") == 1  # the best adaptation, named on its own line
    assert str(out.resolve()) in printed

    # ... and the same configuration given 6 epochs classifies most held-out digits
    longer = dataclasses.replace(demo.parse_args(["--quick", "--no-progress", "--out", str(tmp_path / "six.png")]),
                                 epochs=6)
    learned = demo.main(cfg=longer)["history"]["test_acc"]
    assert learned[-1] >= DEMO_LEARNED_MIN_TEST_ACC, learned


@pytest.mark.slow  # the demo, twice
def test_same_seed_same_run(tmp_path):
    # tdBN here (the --quick run above uses TEBN), so both norms run end to end
    cfg = demo.DemoConfig(epochs=1, T=2, batch_size=64, channels=(4, 8), train_subset=128, test_subset=96,
                          norm="tdbn", progress=False, out=str(tmp_path / "a.png"))
    first = demo.main(cfg=cfg)
    second = demo.main(cfg=demo.DemoConfig(**{**vars(cfg), "out": str(tmp_path / "b.png")}))
    assert first["history"] == second["history"]
    assert first["fold"] == second["fold"]
    assert first["tta"] == second["tta"]
    assert len(first["history"]["batch_loss"]) == 2  # 128 images in batches of 64


def test_model_shapes_and_spike_hooks():
    torch.manual_seed(0)
    model = demo.DigitsSNN(T=3, norm="tdbn", channels=(4, 8))
    images = torch.rand(5, 1, 8, 8)
    with demo.record_spike_rates(model) as rec:
        logits = model(images)
    assert logits.shape == (5, demo.NUM_CLASSES)
    names = [name for name, _ in model.neurons()]
    assert names == ["lif1", "lif2"]
    for name, node in model.neurons():
        assert isinstance(node, MPBNBaseNode)
        assert node.v.shape[0] == 5  # the membrane kept the batch's state ...
        assert not node._forward_hooks  # ... and the recorder removed its hooks
        expected = rec.spikes[name] / rec.count[name]
        assert rec.rates()[name] == expected and 0.0 <= expected <= 1.0
    assert rec.count["lif1"] == 3 * 5 * 4 * 8 * 8  # T·N·C·H·W spikes counted
    demo.functional.reset_net(model)
    assert all(not isinstance(node.v, torch.Tensor) for _, node in model.neurons())


# what test-time adaptation moves: the folded neurons' statistics, θ′ and momentum
ADAPTED_STATE = ("mu", "sigma2", "folded_v_threshold", "adapt_momentum")


def test_adaptation_changes_only_neuron_statistics():
    torch.manual_seed(0)
    model = demo.DigitsSNN(T=2, norm="tebn", channels=(4, 8))
    images = torch.rand(64, 1, 8, 8)
    labels = torch.randint(0, 10, (64,))
    model.train()
    model(images)  # one training forward so the running statistics are not the defaults
    demo.functional.reset_net(model)
    demo.fold_thresholds(model)
    params = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[-1] not in ADAPTED_STATE}
    mus = [node.mu.clone() for _, node in model.neurons()]

    shifted = demo.corrupt(images, noise_std=0.3, brightness=0.25, seed=0)
    acc = demo.adapt_thresholds(model, shifted, labels, batch_size=16)

    assert 0.0 <= acc <= 1.0
    assert not any(m.training for m in model.modules())  # back in eval afterwards
    for k, v in model.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), f"{k} changed during test-time adaptation"
    for (_, node), mu in zip(model.neurons(), mus):
        assert node.running_stats
        assert not torch.equal(node.mu, mu)  # the thresholds moved


def test_corrupt_is_seeded_and_in_range():
    images = torch.rand(10, 1, 8, 8)
    a = demo.corrupt(images, 0.3, 0.25, seed=3)
    assert torch.equal(a, demo.corrupt(images, 0.3, 0.25, seed=3))
    assert not torch.equal(a, demo.corrupt(images, 0.3, 0.25, seed=4))
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.shape == images.shape
    assert a.mean() > images.mean()  # the brightness shift


def test_parse_args():
    quick = demo.parse_args(["--quick", "--norm", "tdbn", "--seed", "7"])
    assert (quick.epochs, quick.T, quick.norm, quick.seed) == (2, 2, "tdbn", 7)
    assert quick.train_subset is not None
    full = demo.parse_args([])
    assert (full.T, full.norm, full.backend, full.device) == (4, "tebn", "torch", "cpu")
    assert full.train_subset is None
    for bad in (["--epochs", "0"], ["--norm", "bntt"], ["--backend", "cuda"], ["--lr", "-1"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bar_only_on_a_terminal(terminal, monkeypatch, capsys):
    torch.manual_seed(0)
    cfg = demo.DemoConfig(epochs=1, T=2, batch_size=8, channels=(2, 4), progress=True)
    model = demo.DigitsSNN(cfg.T, cfg.norm, cfg.channels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stream = _FakeTerminal()
    if terminal:
        monkeypatch.setattr(sys, "stderr", stream)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    demo.train_one_epoch(model, optimizer, x, y, cfg, torch.Generator().manual_seed(0), epoch=1)
    drawn = stream.getvalue() if terminal else capsys.readouterr().err
    if terminal:
        assert "epoch 1/1" in drawn and "\r" in drawn
    else:  # redirected (pytest captures stderr): nothing but readable lines
        assert drawn == ""


def _synthetic_results(epochs: int = 30):
    # a first epoch far below the rest: the accuracy panel must show it, not clip it
    train_acc = [0.6] + [min(1.0, 0.9 + 0.01 * e) for e in range(1, epochs)]
    test_acc = [0.55] + [min(0.98, 0.88 + 0.01 * e) for e in range(1, epochs)]
    history = {"train_loss": [1.0 / (e + 1) for e in range(epochs)], "train_acc": train_acc, "test_acc": test_acc,
               "batch_loss": [1.2 / (i + 1) for i in range(2 * epochs)],
               "spike_rate": [{"lif1": 0.2, "lif2": 0.1}] * epochs}
    torch.manual_seed(0)
    logits = torch.randn(360, 10)
    results = {
        "config": {"norm": "tebn", "T": 4},
        "fold": {"acc_before": 0.94, "acc_after": 0.94, "changed": 0, "n": 360, "max_logit_diff": 3e-7},
        "tta": {"acc_clean": 0.94, "acc_corrupted_before": 0.5, "acc_corrupted_after": 0.56, "acc_online": 0.54,
                "acc_online_batch_stats": 0.64, "rates_clean": {"lif1": 0.2, "lif2": 0.1},
                "rates_corrupted_before": {"lif1": 0.25, "lif2": 0.12},
                "rates_corrupted_after": {"lif1": 0.21, "lif2": 0.11}},
        "logits": {"eval": logits, "folded": logits + 3e-7},
    }
    return history, results


def _panel(axes: dict, words: str):
    return next(ax for title, ax in axes.items() if words in title)


def test_figure_shows_every_epoch_the_fold_agreement_and_explained_adaptations():
    import matplotlib.pyplot as plt

    history, results = _synthetic_results()
    fig = demo.make_figure(history, results)
    try:
        axes = {ax.get_title(): ax for ax in fig.axes}
        # accuracy: every epoch, no point outside the axes (epoch 1 at 0.55 included), no claim of a zoom
        accuracy = _panel(axes, "accuracy per epoch")
        assert "zoom" not in accuracy.get_title() and "all 30" in accuracy.get_title()
        (y_low, y_high), (x_low, x_high) = accuracy.get_ylim(), accuracy.get_xlim()
        for line in accuracy.get_lines():
            xs, ys = line.get_xdata(), line.get_ydata()
            assert all(x_low <= x <= x_high for x in xs) and all(y_low <= y <= y_high for y in ys)
        assert len(accuracy.get_lines()[0].get_xdata()) == 30
        rates = [ax for title, ax in axes.items() if "spike rate" in title]
        assert len(rates) == 2 and all(ax.get_ylim()[0] == 0 for ax in rates)
        # fold check: the agreement (logits against logits, counts in words), not two equal bars
        fold = _panel(axes, "fold check")
        assert "predictions changed 0 of 360" in fold.get_title() and "3.0e-07" in fold.get_title()
        assert not fold.patches and len(fold.collections[0].get_offsets()) == 3600
        box = " ".join(t.get_text() for t in fold.texts)
        assert "predictions changed: 0 of 360" in box and "max |Δlogit|: 3.0e-07" in box
        # adaptation: an axis from 0, the best number in the title, every bar explained
        adaptation = _panel(axes, "threshold modulation")
        assert adaptation.get_ylim()[0] == 0 and adaptation.get_ylim()[1] >= 1.0
        labels = [t.get_text() for t in adaptation.get_xticklabels()]
        assert any("running stats" in t for t in labels) and any("per-batch" in t for t in labels)
        heights = sorted(round(p.get_height(), 6) for p in adaptation.patches)
        assert heights == sorted([0.94, 0.5, 0.56, 0.54, 0.64])
        assert "best: 0.640 (per-batch stats, online)" in adaptation.get_title()
        explained = " ".join(t.get_text() for legend in fig.legends for t in legend.get_texts())
        for word in ("online:", "after:", "corrupted:", "clean:", "per-batch stats, online:"):
            assert word in explained
    finally:
        plt.close(fig)


def test_figure_without_logits_still_draws_the_fold_counts():
    import matplotlib.pyplot as plt

    history, results = _synthetic_results(epochs=2)
    del results["logits"]
    fig = demo.make_figure(history, results)
    try:
        fold = _panel({ax.get_title(): ax for ax in fig.axes}, "fold check")
        assert "predictions changed: 0 of 360" in " ".join(t.get_text() for t in fold.texts)
    finally:
        plt.close(fig)
