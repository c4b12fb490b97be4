"""The n-way top-k accuracy (exact and sampled), the pixel / perceptual / distribution metrics, the
bootstrap summaries and the classifier loader."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import timm
import torch
from torch import nn

from dreamdiffusion.core.compat import SCIPY_RNG
from dreamdiffusion.core.errors import CheckpointError, ConfigError
from dreamdiffusion.evaluation.metrics import (
    LPIPS,
    bootstrap_ci,
    distribution_metrics,
    mse,
    n_way_top_k_accuracy,
    pcc,
    retrieval_accuracy,
    ssim,
    summarize,
)
from dreamdiffusion.models.classifier import load_classifier, save_local_classifier


def _ranked_probs(n_classes: int, ref: int, n_lower: int) -> torch.Tensor:
    """Probabilities where `ref` has exactly `n_lower` other classes below it (all distinct)."""
    others = [c for c in range(n_classes) if c != ref]
    order = torch.randperm(len(others), generator=torch.Generator().manual_seed(1))  # classes in random places
    ranks = torch.empty(n_classes, dtype=torch.float64)
    for position, idx in enumerate(order.tolist()):
        ranks[others[idx]] = position if position < n_lower else position + 1
    ranks[ref] = n_lower
    return (ranks / 10).softmax(0)


@pytest.mark.parametrize("n_lower", [48, 49, 500, 900, 990, 998, 999])
def test_exact_n_way_is_the_closed_form(n_lower):
    probs = _ranked_probs(1000, ref=123, n_lower=n_lower)
    acc = n_way_top_k_accuracy(probs[None], torch.tensor([123]), n_way=50)
    assert float(acc) == pytest.approx(math.comb(n_lower, 49) / math.comb(999, 49), rel=1e-12)


def test_ties_count_against_the_reference():
    probs = torch.full((1, 10), 0.1)  # everything tied: every distractor "beats" the reference
    assert float(n_way_top_k_accuracy(probs, 3, n_way=5)) == 0.0
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # one tie, two lower
    # hit unless the tied class is drawn: C(2, 2) / C(3, 2) = 1/3
    assert float(n_way_top_k_accuracy(probs, 0, n_way=3)) == pytest.approx(1 / 3)


def test_sampled_estimate_converges_to_the_exact_value():
    probs = torch.stack([_ranked_probs(1000, ref=7, n_lower=r) for r in (960, 975, 990)])
    ref = torch.tensor([7, 7, 7])
    exact = n_way_top_k_accuracy(probs, ref)
    trials = 4000
    sampled = n_way_top_k_accuracy(probs, ref, trials=trials, generator=torch.Generator().manual_seed(0))
    sigma = torch.sqrt(exact * (1 - exact) / trials)
    assert torch.all((sampled - exact).abs() < 4 * sigma), (sampled, exact)
    again = n_way_top_k_accuracy(probs, ref, trials=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, n_way_top_k_accuracy(probs, ref, trials=50, generator=torch.Generator().manual_seed(3)))


def _brute_force(probs: torch.Tensor, ref: int, n_way: int, top_k: int) -> float:
    others = [c for c in range(len(probs)) if c != ref]
    hits = []
    for drawn in itertools.combinations(others, n_way - 1):
        n_higher = sum(bool(probs[c] >= probs[ref]) for c in drawn)
        hits.append(n_higher < top_k)
    return sum(hits) / len(hits)


def test_top_k_on_a_hand_checked_case():
    # 5 classes; the reference (class 0) has 2 classes above it and 2 below; 3-way: 2 distractors of 4.
    probs = torch.tensor([0.2, 0.4, 0.3, 0.06, 0.04])
    # top-1: both distractors must be lower: 1 of the 6 pairs; top-2: fail only on the pair {1, 2}
    assert float(n_way_top_k_accuracy(probs, 0, n_way=3, top_k=1)) == pytest.approx(1 / 6)
    assert float(n_way_top_k_accuracy(probs, 0, n_way=3, top_k=2)) == pytest.approx(5 / 6)
    assert float(n_way_top_k_accuracy(probs, 0, n_way=3, top_k=3)) == 1.0
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.rand(9, generator=rng)
        for n_way, top_k in ((2, 1), (4, 2), (6, 3), (9, 5)):
            assert float(n_way_top_k_accuracy(p, 4, n_way, top_k)) == pytest.approx(_brute_force(p, 4, n_way, top_k))


@pytest.mark.parametrize("kwargs", [dict(n_way=1), dict(n_way=11), dict(top_k=0), dict(top_k=4, n_way=3),
                                    dict(trials=0)])
def test_n_way_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        n_way_top_k_accuracy(torch.rand(2, 10), torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ConfigError):
        n_way_top_k_accuracy(torch.rand(2, 10), torch.tensor([0, 10]))


def test_pixel_metrics_on_known_images():
    black = np.zeros((1, 8, 8, 3), np.uint8)
    white = np.full((1, 8, 8, 3), 255, np.uint8)
    red = black.copy()
    red[..., 0] = 255
    green = black.copy()
    green[..., 1] = 255
    assert mse(black, white)[0] == pytest.approx(1.0)
    assert mse(red, green)[0] == pytest.approx(2 / 3)
    ramp = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    assert pcc(ramp, ramp // 2 + 10)[0] == pytest.approx(1.0, abs=1e-3)
    assert pcc(ramp, 200 - ramp)[0] == pytest.approx(-1.0)
    assert pcc(black, ramp)[0] == 0.0  # constant image: defined as 0
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert ssim(noise, noise) == pytest.approx([1.0, 1.0])
    assert ssim(noise, noise[::-1]).max() < 0.2


def test_bootstrap_and_summary():
    rng = np.random.default_rng(0)
    values = rng.random((40, 5))
    values[:, 2] += 0.5
    s = summarize(values, n_bootstrap=200, seed=1)
    assert s["per_slot"] == pytest.approx(values.mean(0).tolist())
    assert s["mean"] == pytest.approx(values.mean())
    assert s["best_slot_index"] == 2 and s["best_slot"] == pytest.approx(values[:, 2].mean())
    assert s["mean_ci95"][0] < s["mean"] < s["mean_ci95"][1]
    assert summarize(values, 200, seed=1) == s  # seeded
    assert bootstrap_ci(values[:1], lambda v: v.mean())[0] == (values[0].mean(),) * 2
    assert s["best_slot_ci95_method"] == "BCa"


def _percentile_bootstrap_by_hand(values, statistic, n_samples, seed, level=0.95):
    """The percentile bootstrap as this project computed it before adopting scipy's: one draw of
    len(values) rows per resample from numpy's generator, numpy's percentiles of the statistic."""
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n_samples)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


@pytest.mark.parametrize("n_trials", [2, 7, 40, 201])
def test_percentile_intervals_are_the_hand_written_bootstraps_to_the_bit(n_trials):
    """scipy.stats.bootstrap draws the same resamples; the percentile interval is the same float, and
    scipy's own quantile of them agrees to rounding."""
    rng = np.random.default_rng(n_trials)
    accuracies = (rng.random((n_trials, 4)) < 0.3).astype(float)
    scores = rng.random((n_trials, 4))
    for values in (accuracies, scores):
        for statistic in (lambda v: v.mean(), lambda v: v.mean(axis=0).max(), lambda v: v.mean(axis=0).min()):
            for n_samples, seed in ((1, 0), (333, 5), (1000, 2022)):
                ci, method = bootstrap_ci(values, statistic, n_samples, seed)
                assert ci == _percentile_bootstrap_by_hand(values, statistic, n_samples, seed) and method == "percentile"
                if n_samples > 1:  # (scipy's standard error of one resample warns)
                    by_scipy = scipy.stats.bootstrap(
                        (np.arange(n_trials),), lambda rows, v=values, f=statistic: f(v[rows]), n_resamples=n_samples,
                        vectorized=False, method="percentile", **{SCIPY_RNG: np.random.default_rng(seed)}).confidence_interval
                    assert ci == pytest.approx(tuple(by_scipy), rel=1e-12, abs=1e-15)


def test_best_slot_interval_is_scipys_bca_and_says_when_it_cannot_be():
    rng = np.random.default_rng(0)
    values = rng.random((30, 4))
    values[:, 1] += 0.2
    best = lambda v: v.mean(axis=0).max()  # noqa: E731
    ci, method = bootstrap_ci(values, best, 500, 3, method="BCa")
    by_scipy = scipy.stats.bootstrap((np.arange(30),), lambda rows: best(values[rows]), n_resamples=500,
                                     vectorized=False, method="BCa", **{SCIPY_RNG: np.random.default_rng(3)}).confidence_interval
    assert ci == (by_scipy.low, by_scipy.high) and method == "BCa"
    assert ci != bootstrap_ci(values, best, 500, 3)[0]  # not the percentile interval
    assert summarize(values, 500, seed=3)["best_slot_ci95"] == ci
    # every trial a hit: every resample gives 1.0, BCa is undefined, the interval is the point
    ci, method = bootstrap_ci(np.ones((10, 4)), best, 100, 0, method="BCa")
    assert ci == (1.0, 1.0) and method.startswith("percentile (BCa is undefined here: the resamples all give one value")


def test_best_slot_follows_the_metrics_direction():
    """For MSE (lower is better) the best slot is the lowest per-slot mean, not the highest."""
    errors = np.array([[0.30, 0.10, 0.50], [0.20, 0.12, 0.40]])  # slot 1 is best, slot 2 worst
    s = summarize(errors, n_bootstrap=50, lower_is_better=True)
    assert s["best_slot_index"] == 1 and s["best_slot"] == pytest.approx(0.11)
    assert s["worst_slot"] == pytest.approx(0.45) and s["lower_is_better"] is True
    low, high = s["best_slot_ci95"]
    assert low <= 0.11 <= high and high < 0.3  # the interval is of the minimum, not the maximum
    accuracy = summarize(1 - errors, n_bootstrap=50)
    assert accuracy["best_slot_index"] == 1 and accuracy["best_slot"] == pytest.approx(0.89)
    from dreamdiffusion.evaluation.metrics import LOWER_IS_BETTER

    assert {"mse", "lpips", "fid", "kid"} == LOWER_IS_BETTER


def test_retrieval_accuracy_exact():
    images = torch.eye(4)
    # trial 0's EEG embedding sits on its own image; trial 1's is closer to image 2 than to its own
    eeg = torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 1, 0], [0, 0, 1, 0], [0.1, 0.2, 0.3, 1]])
    acc, used = retrieval_accuracy(eeg, images, ["a", "b", "c", "d"], n_way=3)
    assert used == 3
    # trial 1: own score 0.5/|.| beats images 0 and 3, loses to image 2: C(2, 2) / C(3, 2) = 1/3
    assert acc == pytest.approx([1.0, 1 / 3, 1.0, 1.0])
    acc, used = retrieval_accuracy(eeg, images, ["a", "b", "c", "d"], n_way=50)
    assert used == 4  # capped at the number of distinct images


class _MeanColour(nn.Module):
    """A tiny feature network on uint8 images: the mean and std of each channel."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_is_kid_with_a_custom_feature_network():
    rng = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (12, 3, 16, 16), generator=rng, dtype=torch.uint8)
    same = distribution_metrics(real, real, _MeanColour(), kid_subset_size=6)
    dark = (real // 4).to(torch.uint8)
    shifted = distribution_metrics(dark, real, _MeanColour(), kid_subset_size=6)
    assert abs(same["fid"]) < 1e-4 and shifted["fid"] > 0.01
    assert shifted["kid_mean"] > same["kid_mean"]
    assert set(same) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "n_generated", "n_reference"}
    assert same["n_generated"] == same["n_reference"] == 12


def test_lpips_is_torchmetrics_public_metric_on_a_local_alexnet(tmp_path):
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    path = tmp_path / "alexnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    lpips = LPIPS(path)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-6)
    ours = lpips(x, y)
    # the library's own metric, loading the same AlexNet file from torch.hub's cache itself
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(path.read_bytes())
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    finally:
        torch.hub.set_dir(previous)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(float(reference(x[i:i + 1], y[i:i + 1])), rel=1e-5)
        reference.reset()
    with pytest.raises(CheckpointError):
        LPIPS(tmp_path / "missing.pth")


def _images(n, size=(32, 32), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_local_classifier_folder_uses_timms_transform(tmp_path):
    from timm.data import create_transform

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=7, img_size=32).eval()
    save_local_classifier(model, tmp_path / "clf", "test_vit", {"num_classes": 7, "img_size": 32}, 32,
                          [0.5] * 3, [0.5] * 3, [f"class {i}" for i in range(7)])
    classifier = load_classifier(str(tmp_path / "clf"))
    images = _images(3) + _images(2, size=(50, 70), seed=1)
    transform = create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=1.0,
                                 mean=(0.5,) * 3, std=(0.5,) * 3, is_training=False)
    with torch.no_grad():
        expected = model(torch.stack([transform(img) for img in images])).softmax(-1)
    assert torch.allclose(classifier.classify(images), expected, atol=1e-6)
    assert classifier.class_names[3] == "class 3" and classifier.n_classes == 7


def test_timm_spec_uses_its_resolved_data_config(tmp_path):
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()  # timm:<name> builds the default (ImageNet) head
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    classifier = load_classifier("timm:test_resnet", tmp_path / "w.safetensors")
    assert classifier.n_classes == model.num_classes
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    images = _images(2, size=(60, 40))
    with torch.no_grad():
        expected = model(torch.stack([transform(img) for img in images])).softmax(-1)
    assert torch.allclose(classifier.classify(images), expected, atol=1e-6)


def test_classifier_specs(tmp_path, monkeypatch):
    import torchvision

    with pytest.raises(CheckpointError, match="vit_h_14_swag"):
        load_classifier("torchvision:vit_h_14")  # offline, no file
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier("torchvision:vit_h_14", tmp_path / "missing.pth")
    with pytest.raises(ConfigError):
        load_classifier(str(tmp_path / "no_such_folder"))
    path = tmp_path / "squeezenet.pth"
    torch.manual_seed(0)
    network = torchvision.models.squeezenet1_0(weights=None).eval()
    torch.save(network.state_dict(), path)
    clf = load_classifier("torchvision:squeezenet1_0", path)
    assert len(clf.class_names) == 1000
    # torchvision's own preprocessing of its weights (weights.transforms()), on PIL images of any size
    transform = torchvision.models.SqueezeNet1_0_Weights.DEFAULT.transforms()
    images = _images(2, size=(300, 260))
    with torch.no_grad():
        expected = network(torch.stack([transform(img) for img in images])).softmax(-1)
    assert torch.allclose(clf.classify(images), expected, atol=1e-6)
    with pytest.raises(CheckpointError, match="do not match"):
        load_classifier("torchvision:squeezenet1_1", path)


def test_vit_h_14_is_the_swag_end_to_end_weights_at_518():
    from dreamdiffusion.models.classifier import torchvision_weights

    weights = torchvision_weights("vit_h_14")
    assert weights.name == "IMAGENET1K_SWAG_E2E_V1"
    assert weights.transforms().crop_size == [518] and weights.meta["min_size"] == (518, 518)
