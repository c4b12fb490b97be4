"""Linear and k-NN probes of the frozen EEG encoder, checked against independent computations."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.dataset import ImageNetEEGDataset
from dreamdiffusion.evaluation import probe
from dreamdiffusion.models.mae import EEGEncoder, save_eeg_encoder

TINY = dict(n_channels=8, n_times=64, patch_size=4, embed_dim=16, depth=1, num_heads=2)
# The encoder the command is run with (the brief's tiny 128-channel, 512-sample encoder).
CLI_ENCODER = dict(n_channels=128, n_times=512, patch_size=4, embed_dim=32, depth=1, num_heads=2)
Z_975 = 1.959963984540054  # the standard normal's 97.5% quantile


def one_hot_clusters(n_per_class, n_classes=4, n_noise=4, scale=6.0, seed=0):
    """Features [N, n_classes + n_noise]: class k adds `scale` to feature k, unit noise everywhere."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = rng.normal(size=(len(labels), n_classes + n_noise))
    x[np.arange(len(labels)), labels] += scale
    return x, labels


def splits(n_train, n_val, n_test, **kwargs):
    """(train_x, train_y, val_x, val_y, test_x, test_y), each split drawn with its own seed."""
    out = ()
    for seed, n in enumerate((n_train, n_val, n_test)):
        out += one_hot_clusters(n, seed=seed, **kwargs)
    return out


def wilson_by_hand(k, n, z=Z_975):
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


# ---------------------------------------------------------------------------------------------
# The probes on hand-made features


@pytest.mark.parametrize("run", [probe.linear_probe, probe.knn_probe])
def test_separable_classes_are_classified_perfectly(run):
    data = splits(30, 10, 25)
    result = run(*data)
    assert result["val"]["accuracy"] == 1.0 and result["test"]["accuracy"] == 1.0
    assert result["test"]["n"] == 100 and result["test"]["n_correct"] == 100
    assert (result["n_train"], result["n_features"], result["n_classes"], result["chance"]) == (120, 8, 4, 0.25)


@pytest.mark.parametrize("run", [probe.linear_probe, probe.knn_probe])
def test_shuffled_labels_give_chance(run):
    train_x, train_y, val_x, val_y, test_x, test_y = splits(60, 20, 100)
    rng = np.random.default_rng(1)
    result = run(train_x, rng.permutation(train_y), val_x, rng.permutation(val_y), test_x, rng.permutation(test_y))
    # 400 test trials at chance 1/4: the binomial's standard deviation is 2.2 points; allow 4 of them
    bound = 4 * math.sqrt(0.25 * 0.75 / 400)
    assert abs(result["test"]["accuracy"] - 0.25) < bound
    low, high = result["test"]["ci95"]
    assert low < 0.25 + bound and high > 0.25 - bound


# Weak signal, few trials, so that the val accuracy depends on C. These draws have their best val
# accuracy tied at the smallest C, tied over three inner Cs, and alone at C = 1.
@pytest.mark.parametrize("n_per_class, n_noise, scale", [(8, 30, 1.0), (12, 30, 1.5), (20, 10, 1.5)])
def test_chosen_C_is_the_best_on_val(n_per_class, n_noise, scale):
    train_x, train_y, val_x, val_y, test_x, test_y = splits(n_per_class, 40, 40, n_noise=n_noise, scale=scale)
    result = probe.linear_probe(train_x, train_y, val_x, val_y, test_x, test_y)
    by_hand = {C: make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(train_x, train_y)
               for C in probe.LINEAR_PROBE_CS}
    val_acc = {C: (m.predict(val_x) == val_y).mean() for C, m in by_hand.items()}
    assert len(set(val_acc.values())) > 1, "the check needs C to matter"
    best = min(C for C, acc in val_acc.items() if acc == max(val_acc.values()))  # ties -> smaller C
    assert result["chosen"] == best
    assert result["val_accuracy_by_choice"] == pytest.approx({str(C): a for C, a in val_acc.items()}, abs=1e-9)
    assert result["test"]["accuracy"] == pytest.approx((by_hand[best].predict(test_x) == test_y).mean())
    assert result["not_converged"] == []


def test_chosen_k_is_the_best_on_val():
    train_x, train_y, val_x, val_y, test_x, test_y = splits(8, 40, 40, n_noise=30, scale=2.0)
    result = probe.knn_probe(train_x, train_y, val_x, val_y, test_x, test_y)
    usable = [k for k in probe.KNN_KS if k <= len(train_y)]  # 50 > 32 training trials is skipped
    assert usable == [1, 3, 5, 10, 20]
    models = {k: make_pipeline(StandardScaler(), KNeighborsClassifier(k, metric="cosine")).fit(train_x, train_y)
              for k in usable}
    val_acc = {k: (m.predict(val_x) == val_y).mean() for k, m in models.items()}
    assert len(set(val_acc.values())) > 1
    best = max(k for k, acc in val_acc.items() if acc == max(val_acc.values()))  # ties -> larger k
    assert result["chosen"] == best
    assert result["val_accuracy_by_choice"] == pytest.approx({str(k): a for k, a in val_acc.items()})
    assert result["test"]["accuracy"] == pytest.approx((models[best].predict(test_x) == test_y).mean())


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1), (450, 1000)])
def test_wilson_interval_matches_the_formula(k, n):
    assert probe.wilson_interval(k, n) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def test_probe_intervals_are_wilson_of_the_counts():
    result = probe.linear_probe(*splits(8, 40, 40, n_noise=30, scale=1.0))
    for split in ("val", "test"):
        scored = result[split]
        assert scored["accuracy"] == scored["n_correct"] / scored["n"]
        assert scored["ci95"] == pytest.approx(wilson_by_hand(scored["n_correct"], scored["n"]), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Features


def test_raw_eeg_features_pool_time_per_channel():
    eeg = np.random.default_rng(0).normal(size=(5, 128, 512)).astype(np.float32)
    features = probe.raw_eeg_features(eeg, n_features=1024)  # 1024 / 128 channels -> 8 bins of 64 samples
    assert features.shape == (5, 1024) and features.dtype == np.float32
    assert np.allclose(features, eeg.reshape(5, 128, 8, 64).mean(axis=-1).reshape(5, 1024), atol=1e-6)
    assert np.allclose(features[2, 3 * 8 + 5], eeg[2, 3, 5 * 64:6 * 64].mean(), atol=1e-6)  # c * B + b
    assert probe.raw_eeg_features(eeg, n_features=32).shape == (5, 128)  # at least one bin per channel


def test_raw_eeg_features_uneven_bins_and_datasets():
    eeg = np.random.default_rng(1).normal(size=(3, 4, 10)).astype(np.float32)
    features = probe.raw_eeg_features(eeg, n_features=12)  # 3 bins over 10 samples
    T, B = 10, 3
    bins = [(math.floor(b * T / B), math.ceil((b + 1) * T / B)) for b in range(B)]
    assert bins == [(0, 4), (3, 7), (6, 10)]
    by_hand = np.stack([eeg[:, :, lo:hi].mean(axis=-1) for lo, hi in bins], axis=-1).reshape(3, 12)
    assert np.allclose(features, by_hand, atol=1e-6)
    dataset = [{"eeg": torch.from_numpy(e), "label": 0} for e in eeg]
    assert np.array_equal(probe.raw_eeg_features(dataset, 12, batch_size=2), features)


def test_encoder_features_are_mean_pooled_tokens_and_keep_the_mode():
    torch.manual_seed(0)
    encoder = EEGEncoder(**TINY).train()
    eeg = torch.randn(7, 8, 64)
    features = probe.encoder_features(encoder, eeg, batch_size=3)
    assert encoder.training  # put back as it was
    with torch.no_grad():
        expected = encoder.eval()(eeg).mean(dim=1).numpy()
    assert features.shape == (7, 16) and features.dtype == np.float32
    assert np.allclose(features, expected, atol=1e-5)
    dataset = [{"eeg": e, "label": i % 2} for i, e in enumerate(eeg)]
    assert np.allclose(probe.encoder_features(encoder, dataset, batch_size=4), expected, atol=1e-5)


def test_random_encoder_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a, b = probe.random_encoder_like(TINY, seed=0), probe.random_encoder_like(TINY, seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(probe.random_encoder_like(TINY, seed=1).blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)


def test_quick_probe_is_deterministic_and_is_the_linear_probe():
    torch.manual_seed(0)
    encoder = EEGEncoder(**TINY).train()
    labels = np.repeat(np.arange(3), 12)
    eeg = torch.randn(36, 8, 64) + torch.from_numpy(labels).float()[:, None, None]  # class shifts the level
    train = [{"eeg": e, "label": int(y)} for e, y in zip(eeg[::2], labels[::2])]
    val_eeg, val_y = eeg[1::2], labels[1::2]
    first = probe.quick_probe(encoder, train, val_eeg, val_labels=val_y)
    assert probe.quick_probe(encoder, train, val_eeg, val_labels=val_y) == first
    assert encoder.training
    expected = probe.linear_probe(probe.encoder_features(encoder, train), labels[::2],
                                  probe.encoder_features(encoder, val_eeg), val_y, Cs=probe.QUICK_PROBE_CS)
    assert first == expected["val"]["accuracy"] and first > 1 / 3


def test_probe_encoder_without_an_encoder_probes_random_and_raw():
    rng = np.random.default_rng(0)
    datasets = {}
    for split, n in (("train", 24), ("val", 12)):
        labels = np.arange(n) % 3
        eeg = rng.normal(size=(n, 8, 64)) + 2.0 * labels[:, None, None]
        datasets[split] = [{"eeg": torch.from_numpy(e).float(), "label": int(y)} for e, y in zip(eeg, labels)]
    report = probe.probe_encoder(None, datasets, random_config=TINY, n_raw_features=32)
    assert [(r["features"], r["probe"]) for r in report["rows"]] == [
        ("random_encoder", "linear"), ("random_encoder", "knn"), ("raw_eeg", "linear"), ("raw_eeg", "knn")]
    assert report["raw_eeg_time_bins"] == 4 and report["rows"][2]["n_features"] == 32
    assert report["n_trials"] == {"train": 24, "val": 12} and all("test" not in r for r in report["rows"])
    assert report["rows"][2]["val"]["accuracy"] == 1.0  # the class sets the EEG's level
    assert "| raw_eeg | 32 | linear | C=" in probe.probe_markdown(report)


# ---------------------------------------------------------------------------------------------
# The command on synthetic ImageNet-EEG files


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg

    root = tmp_path_factory.mktemp("probe")
    paths = write_synthetic_imagenet_eeg(root / "data", n_classes=8, images_per_class=20, n_subjects=1,
                                         image_size=16, out_of_range_fraction=0.05, split_fractions=(0.6, 0.2, 0.2))
    torch.manual_seed(1)  # not the random encoder's seed 0, so that the two rows differ
    save_eeg_encoder(EEGEncoder(**CLI_ENCODER), root / "encoder")
    return root, paths


def test_command_writes_the_report(probe_inputs, capsys):
    root, paths = probe_inputs
    argv = ["--encoder", str(root / "encoder"), "--eeg", str(paths["eeg_path"]), "--splits",
            str(paths["splits_path"]), "--subject", "1", "--out", str(root / "out"), "--device", "cpu"]
    assert run_cli(probe.main, argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((root / "out" / "probe.json").read_text())
    markdown = (root / "out" / "probe.md").read_text()
    assert markdown in printed and "| features | dim | probe |" in markdown

    sizes = {s: len(ImageNetEEGDataset(paths["eeg_path"], paths["splits_path"], split=s, subject=1))
             for s in probe.SPLITS}
    assert report["n_trials"] == sizes and report["n_classes"] == 8 and report["chance"] == 1 / 8
    rows = {(r["features"], r["probe"]): r for r in report["rows"]}
    assert set(rows) == {(f, p) for f in probe.FEATURE_KINDS for p in ("linear", "knn")}
    assert rows[("encoder", "linear")]["n_features"] == 32 and rows[("raw_eeg", "linear")]["n_features"] == 128
    assert rows[("encoder", "knn")]["val"] != rows[("random_encoder", "knn")]["val"] or \
        rows[("encoder", "linear")]["val"] != rows[("random_encoder", "linear")]["val"]
    for row in report["rows"]:
        assert row["test"]["n"] == sizes["test"] and row["val"]["n"] == sizes["val"]
        assert f"| {row['features']} | {row['n_features']} | {row['probe']} |" in markdown
    assert report["encoder_config"] == CLI_ENCODER | {"mlp_ratio": 1.0}


def test_command_exits_2_for_a_missing_encoder(probe_inputs, tmp_path):
    _, paths = probe_inputs
    proc = subprocess.run([sys.executable, "-m", "dreamdiffusion.evaluation.probe", "--encoder", str(tmp_path / "nothing"),
                           "--eeg", str(paths["eeg_path"]), "--splits", str(paths["splits_path"])],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "EEG encoder not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "probe").exists()
