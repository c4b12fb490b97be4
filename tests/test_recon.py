"""The brain-to-image reconstruction metrics and the retrieval table, against independent computations."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy.spatial.distance import correlation
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from dreamdiffusion import recon as R
from dreamdiffusion.errors import CheckpointError
from dreamdiffusion.scoring import MetricNetworks, Scorer


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_pixcorr_and_grey_ssim_match_a_direct_computation():
    gen, ref = _images(3, seed=1), _images(3, seed=2)
    ref[0] = gen[0]  # one identical pair
    up = lambda a: np.asarray(Image.fromarray(a).resize((425, 425), Image.BILINEAR), np.float64) / 255  # noqa: E731
    want_corr = [np.corrcoef(up(g).ravel(), up(r).ravel())[0, 1] for g, r in zip(gen, ref)]
    assert R.pixcorr(gen, ref) == pytest.approx(want_corr)
    assert R.pixcorr(gen, ref)[0] == pytest.approx(1.0)
    want_ssim = [structural_similarity(rgb2gray(up(g)), rgb2gray(up(r)), gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=1.0) for g, r in zip(gen, ref)]
    assert R.ssim_gray(gen, ref) == pytest.approx(want_ssim)


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


def test_feature_networks_load_torchvision_files_strictly(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    torch.save(net.state_dict(), tmp_path / "alexnet.pth")
    layer2 = R.FeatureNetwork("alexnet2", tmp_path / "alexnet.pth")
    images = _images(2, size=64)
    feats = layer2(images)
    # independent: torchvision's own module up to features.4 on the same preprocessing
    x = torchvision.transforms.v2.functional.resize(torch.from_numpy(images).permute(0, 3, 1, 2), 256,
                                                    antialias=True).float() / 255
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
    assert net(_images(1, size=64)).shape == (1, 2048)
    del state["module.conv1.weight"]
    torch.save(state, tmp_path / "broken.pth.tar")
    with pytest.raises(CheckpointError, match="not a SwAV ResNet-50"):
        R.FeatureNetwork("swav", tmp_path / "broken.pth.tar")


class _Mean(torch.nn.Module):
    def forward(self, images):  # uint8 [N, H, W, 3] -> per-channel mean and a coarse 2x2 layout
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).numpy()


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
    ref_feats = _Mean()(np.stack([np.asarray(r) for r in refs]))
    gen_feats = _Mean()(np.stack([np.asarray(g[1]) for g in gens]))
    assert res["alexnet2"]["per_slot"][1] == pytest.approx(_mindeye_two_way(ref_feats, gen_feats).mean(), abs=1e-3)


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
