"""The brain-to-image reconstruction metrics and the retrieval table, against independent computations."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.spatial.distance import correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from dreamdiffusion.core.errors import CheckpointError
from dreamdiffusion.evaluation import recon as R
from dreamdiffusion.evaluation.scoring import MetricNetworks, Scorer


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _mindeye_view(images, size):
    """MindEye's notebook: float images in [0, 1], Resize((256, 256)) then Resize(size), with the
    transforms classes (not the functional calls recon.py uses)."""
    from torchvision import transforms

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = transforms.Resize((256, 256), antialias=True)(x)
    return transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)(x)


def test_pixcorr_and_grey_ssim_follow_mindeyes_computation():
    gen, ref = _images(3, seed=1), _images(3, seed=2)
    ref[0] = gen[0]  # one identical pair
    g, r = _mindeye_view(gen, 425), _mindeye_view(ref, 425)
    want_corr = [np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1] for a, b in zip(g, r)]
    base_gen, base_ref = R.to_base(gen), R.to_base(ref)
    assert R.pixcorr(base_gen, base_ref) == pytest.approx(want_corr, abs=1e-6)
    assert R.pixcorr(base_gen, base_ref)[0] == pytest.approx(1.0)
    # MindEye: ssim(rec, im, multichannel=True, ...) on 2-D grey images = columns as channels
    gray = lambda x: rgb2gray(x.permute(0, 2, 3, 1).double().numpy())  # noqa: E731
    want_ssim = [structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0) for a, b in zip(gray(g), gray(r))]
    assert R.ssim_gray(base_gen, base_ref) == pytest.approx(want_ssim, abs=1e-6)


def _mindeye_two_way(reals, preds):
    """MindEye's formulation, written from np.corrcoef."""
    r = np.corrcoef(reals, preds)[: len(reals), len(reals):]
    success = r < np.diag(r)
    return success.sum(0) / (len(reals) - 1)


def test_two_way_identification_and_correlation_distance_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    reals = rng.normal(size=(12, 40))
    preds = reals + rng.normal(scale=1.5, size=reals.shape)
    assert R.two_way_identification(reals, preds) == pytest.approx(_mindeye_two_way(reals, preds))
    assert R.two_way_identification(reals, reals).tolist() == [1.0] * 12  # own ground truth always wins
    assert R.correlation_distance(reals, preds) == pytest.approx([correlation(a, b) for a, b in zip(reals, preds)])


def test_trials_of_the_same_image_are_not_compared_with_their_own_copy():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 30))
    trials = np.repeat(np.arange(4), 2)  # every image shown twice
    preds = images[trials] + 0.01 * rng.normal(size=(8, 30))  # near-perfect generations
    # MindEye's formula over the 8 trials counts the copy as a tie that fails: 6 / 7
    assert _mindeye_two_way(images[trials], preds) == pytest.approx([6 / 7] * 8)
    assert R.two_way_identification(images, preds, own=trials).tolist() == [1.0] * 8


def test_feature_networks_load_torchvision_files_strictly(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    torch.save(net.state_dict(), tmp_path / "alexnet.pth")
    layer2 = R.FeatureNetwork("alexnet2", tmp_path / "alexnet.pth")
    images = _images(2, size=64)
    feats = layer2(R.to_base(images))
    # independent: torchvision's own module up to features.4 on MindEye's preprocessing
    x = _mindeye_view(images, 256)
    x = (x - torch.tensor(R.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(R.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net.eval().features[:5](x).flatten(1).numpy()
    assert feats == pytest.approx(want, rel=1e-4, abs=1e-5)
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not a torchvision alexnet"):
        R.FeatureNetwork("alexnet5", tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="expected alexnet-owt"):
        R.FeatureNetwork("alexnet5", tmp_path / "absent.pth")


def test_swav_release_keys_are_mapped_and_checked(tmp_path):
    backbone = torchvision.models.resnet50(weights=None)
    state = {f"module.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "swav.pth.tar")
    net = R.FeatureNetwork("swav", tmp_path / "swav.pth.tar")
    assert net(R.to_base(_images(1, size=64))).shape == (1, 2048)
    del state["module.conv1.weight"]
    torch.save(state, tmp_path / "broken.pth.tar")
    with pytest.raises(CheckpointError, match="not a SwAV ResNet-50"):
        R.FeatureNetwork("swav", tmp_path / "broken.pth.tar")


class _Mean(torch.nn.Module):
    def forward(self, images):  # float [N, 3, 256, 256] -> per-channel means of a coarse 2x2 layout
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1).numpy()


def test_scorer_reports_recon_metrics_per_slot():
    refs = [Image.fromarray(a) for a in _images(6, seed=3)]
    gens = [[r, Image.fromarray(a)] for r, a in zip(refs, _images(6, seed=4))]  # slot 0 = the truth itself
    scorer = Scorer(["pixcorr", "alexnet2", "effnet"], MetricNetworks(features={"alexnet2": _Mean(), "effnet": _Mean()}))
    scorer.add_trials(refs[:4], gens[:4])
    scorer.add_trials(refs[4:], gens[4:])
    res = scorer.compute(n_bootstrap=10)
    assert res["alexnet2"]["per_slot"][0] == pytest.approx(1.0)  # identical images identify themselves
    assert res["pixcorr"]["per_slot"][0] == pytest.approx(1.0)
    assert res["effnet"]["per_slot"][0] == pytest.approx(0.0, abs=1e-6) and res["effnet"]["lower_is_better"]
    ref_feats = _Mean()(R.to_base(np.stack([np.asarray(r) for r in refs])))
    gen_feats = _Mean()(R.to_base(np.stack([np.asarray(g[1]) for g in gens])))
    assert res["alexnet2"]["per_slot"][1] == pytest.approx(_mindeye_two_way(ref_feats, gen_feats).mean(), abs=1e-6)


def test_one_distinct_image_skips_two_way_with_the_reason():
    refs = [Image.fromarray(a) for a in _images(2, seed=5)]
    scorer = Scorer(["alexnet2", "pixcorr"], MetricNetworks(features={"alexnet2": _Mean()}))
    scorer.add_trials(refs, [[r] for r in refs], ids=["same image", "same image"])
    res = scorer.compute(n_bootstrap=5)
    assert "alexnet2" not in res and "pixcorr" in res
    assert "at least 2 distinct images" in scorer.late_skipped["alexnet2"]


def test_retrieval_table_holds_every_way_up_to_the_number_of_images():
    rng = torch.Generator().manual_seed(0)
    images = torch.randn(10, 16, generator=rng)
    eeg = images + 0.8 * torch.randn(10, 16, generator=rng)
    scorer = Scorer(["retrieval"], MetricNetworks(), n_way=10, top_k=1, retrieval_ways=[2, 4, 10, 50],
                    retrieval_top_ks=[1, 5])
    scorer.add_retrieval(eeg, images, [f"img{i}" for i in range(10)])
    res = scorer.compute(n_bootstrap=10)
    table = res["retrieval_table"]
    assert sorted(table) == ["10-way", "2-way", "4-way"]  # 50 > the 10 distinct images
    assert sorted(table["10-way"]) == ["top1", "top5"] and sorted(table["2-way"]) == ["top1"]
    # independent: 10-way top-1 is the plain arg-max hit rate over all 10 candidates
    sims = torch.nn.functional.normalize(eeg, dim=1) @ torch.nn.functional.normalize(images, dim=1).T
    assert table["10-way"]["top1"]["mean"] == pytest.approx((sims.argmax(1) == torch.arange(10)).float().mean().item())
    rank = (sims > sims.diag()[:, None]).sum(1)  # others strictly closer
    assert table["10-way"]["top5"]["mean"] == pytest.approx((rank < 5).float().mean().item())
    # 2-way: the expected fraction of the 9 others that score below the own image
    assert table["2-way"]["top1"]["mean"] == pytest.approx(((sims < sims.diag()[:, None]).sum(1) / 9).mean().item())
    assert res["retrieval"]["n_way"] == 10 and table["2-way"]["top1"]["chance"] == 0.5
