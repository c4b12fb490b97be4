"""Stage 3 end to end on tiny real models and the synthetic ImageNet-EEG files: the two phases, the
files they write, seeded reproducibility, resume, hand-computed scores, the authors' checkpoint
format, controls, and bad input. (Resume after SIGKILL and 2-process sharding: test_stage3_scale.py.)"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel

from dreamdiffusion.core.errors import run_cli
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg
from dreamdiffusion.evaluation import stage3
from dreamdiffusion.evaluation.scoring import MetricNetworks, Scorer
from dreamdiffusion.models.classifier import ImageClassifier, save_local_classifier
from dreamdiffusion.models.original_formats import write_generation_checkpoint
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline
from dreamdiffusion.tools.standins import byte_tokenizer
from stage2_tiny import ENCODER, tiny_model, tiny_sd, tiny_sd_configs, write_config_dir

N_SLOTS = 2


def tiny_clip_folder(path):
    """A CLIPModel folder (text width 32 = the tiny UNet's cross-attention; projection 16 = the
    tiny CLIP head) with a byte-level tokenizer that needs no vocabulary download."""
    vocab_size = byte_tokenizer(path, 77)
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(text_config=dict(vocab_size=vocab_size, max_position_embeddings=77, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    return path


def build_world(root):
    """Data, a tiny model (ours and in the authors' layout), a base SD, a CLIP folder, a classifier,
    and the stage-3 arguments that use them."""
    data = write_synthetic_imagenet_eeg(root / "data", n_classes=4, images_per_class=4, n_subjects=1,
                                        image_size=32, split_fractions=(0.5, 0.2, 0.3))
    model = tiny_model(seed=0, clip=None)
    DreamDiffusionPipeline.from_model(model).save_pretrained(root / "model")
    (root / "model" / "selection.json").write_text(json.dumps({"split": "val", "metric": "val n-way", "epoch": 3}))
    write_generation_checkpoint(model, root / "authors" / "checkpoint.pth")
    write_config_dir(root / "sd_config", *tiny_sd_configs())
    base = tiny_sd(seed=5, time_cond=False)
    for name in ("unet", "vae"):
        getattr(base, name).save_pretrained(root / "base_sd" / name)
    base.noise_scheduler.save_pretrained(root / "base_sd" / "scheduler")
    tiny_clip_folder(root / "clip")
    torch.manual_seed(0)
    save_local_classifier(timm.create_model("test_vit", num_classes=10, img_size=32), root / "classifier",
                          "test_vit", {"num_classes": 10, "img_size": 32}, 32, [0.5] * 3, [0.5] * 3,
                          [f"class {i}" for i in range(10)])
    args = [
        f"model={root / 'model'}", f"data.eeg_path={data['eeg_path']}", f"data.splits_path={data['splits_path']}",
        f"data.image_dir={data['image_dir']}", "data.subject=1", f"data.n_times={ENCODER['n_times']}",
        f"classifier={root / 'classifier'}", "classifier_weights=null", f"clip_path={root / 'clip'}",
        f"num_images_per_eeg={N_SLOTS}", "num_inference_steps=2", "batch_size=3", "bootstrap_samples=50",
        "n_way=5", "n_grid_trials=2", f"sd_config_dir={root / 'sd_config'}", "progress_bar=false",
    ]
    return {"root": root, "data": data, "args": args, "model": model}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("stage3"))


def _run(world, out, *extra):
    return stage3.main([*world["args"], f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run_a(world):
    out = world["root"] / "run_a"
    return out, _run(world, out)


def _png(path):
    return np.asarray(Image.open(path)).astype(int)


def _scores(report):
    """Everything a score depends on: the summaries and the per-trial scores."""
    return json.dumps({"metrics": report["metrics"], "trials": report["trials"]}, sort_keys=True)


def test_end_to_end_writes_the_promised_files_and_is_seeded(world, run_a):
    out, report = run_a
    n = report["protocol"]["n_trials"]
    assert n >= 3 and report["protocol"]["n_generated_images"] == n * N_SLOTS
    for i in range(n):
        for k in range(N_SLOTS + 1):
            assert (out / "images" / f"test{i}-{k}.png").is_file()
        record = json.loads((out / "records" / f"test{i}.json").read_text())
        assert record["index"] == i and record["seed"] == 2022 + i and (out / "records" / f"test{i}.npy").is_file()
    lines = (out / "generation.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(n))
    header = json.loads((out / "generation.json").read_text())
    assert header["settings"]["sampler"] == "plms" and header["settings"]["num_images_per_eeg"] == N_SLOTS
    assert len(list((out / "grids").glob("grid-*.png"))) == -(-n // 2)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave nothing behind
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]) >= {"n_way", "top1_agreement", "mse", "pcc", "ssim", "clip_similarity", "retrieval"}
    assert saved["skipped"] == {}
    assert len(saved["metrics"]["n_way"]["per_slot"]) == N_SLOTS and len(saved["trials"]) == n
    per_trial = np.array([t["n_way"] for t in saved["trials"]])  # [n_trials, n_slots]
    assert saved["metrics"]["n_way"]["per_slot"] == pytest.approx(per_trial.mean(axis=0).tolist())
    assert saved["metrics"]["retrieval"]["n_way"] == min(5, len({t["image_name"] for t in saved["trials"]}))
    assert saved["metrics"]["retrieval"]["mean"] == pytest.approx(np.mean([t["retrieval"] for t in saved["trials"]]))
    assert "val" in saved["protocol"]["checkpoint_selection"]
    assert saved["protocol"]["clip_reference"].startswith("the original image files")
    md = (out / "results.md").read_text()
    assert "5-way top-1 (mean over 2 slots)" in md and "## Protocol" in md and "plms" in md
    assert "**subject**: 1" in md and "test (split_index 0" in md and "exact expectation" in md
    assert "## Deviations from the paper and the authors' code" in md and "n_way_trials null" in md
    # the split's hygiene as generation saw it: no image on two sides; every test trial shares its class's block
    block = saved["split_hygiene"]["block_design"]
    assert saved["split_hygiene"]["repeated"] == [] and block["test_trials_sharing_a_block_with_training"] == n
    assert "## Split hygiene" in md and "records no presentation order" in md
    assert (out / "config.yaml").read_text().startswith("# Deviations of this run")
    assert _png(out / "images" / "test0-0.png").shape == (16, 16, 3)  # the ground truth, at the model's size
    # same seed, different batching and a shorter run: the same images (to the last bit of a float)
    out_b = world["root"] / "run_b"
    _run(world, out_b, "batch_size=2", "max_trials=2", "metrics=[mse]")
    for i in range(2):
        for k in range(N_SLOTS + 1):
            assert np.abs(_png(out / "images" / f"test{i}-{k}.png") - _png(out_b / "images" / f"test{i}-{k}.png")).max() <= 1
    out_c = world["root"] / "run_c"
    _run(world, out_c, "seed=7", "max_trials=1", "metrics=[mse]")
    assert not np.array_equal(_png(out / "images" / "test0-1.png"), _png(out_c / "images" / "test0-1.png"))


def test_generate_then_score_and_a_copied_folder_give_the_same_numbers(world, run_a):
    out_all, report_all = run_a
    out = world["root"] / "two_phases"
    _run(world, out, "phase=generate")
    assert not (out / "metrics.json").exists() and (out / "generation.jsonl").is_file()
    report = _run(world, out, "phase=score")
    assert _scores(report) == _scores(report_all)
    for i in range(report["protocol"]["n_trials"]):  # the same bytes on disk
        assert (out / "images" / f"test{i}-1.png").read_bytes() == (out_all / "images" / f"test{i}-1.png").read_bytes()
    copy = world["root"] / "copied"
    shutil.copytree(out, copy)
    again = _run(world, world["root"] / "copied_scores", "phase=score", f"images_dir={copy / 'images'}")
    assert _scores(again) == _scores(report_all)


def test_a_folder_of_images_only_is_scored_without_the_model(world, run_a):
    """Another method's folder (no records): the image metrics match, retrieval is skipped with the
    reason, and CLIP compares with the k = 0 PNGs."""
    out_all, report_all = run_a
    foreign = world["root"] / "foreign" / "test_images"
    shutil.copytree(out_all / "images", foreign)
    (foreign / "notes.txt").write_text("not an image")
    report = _run(world, world["root"] / "foreign_scores", "phase=score", f"images_dir={foreign}",
                  "model=/nonexistent/never/loaded")
    for name in ("n_way", "mse", "pcc", "ssim", "top1_agreement"):
        assert report["metrics"][name] == report_all["metrics"][name], name
    assert "EEG embeddings" in report["skipped"]["retrieval"]
    assert report["protocol"]["clip_reference"] == "the k = 0 PNGs"
    assert "generation" in report["protocol"] and any("ignored" in n for n in report["notes"])
    md = (world["root"] / "foreign_scores" / "results.md").read_text()
    assert "## Skipped metrics" in md and "retrieval" in md


def _break(folder, how):
    if how == "no ground truth":
        (folder / "test0-0.png").unlink()
    elif how == "missing slot":
        (folder / "test1-2.png").unlink()
    elif how == "sizes differ":
        Image.new("RGB", (8, 8)).save(folder / "test1-1.png")
    elif how == "not an image":
        (folder / "test2-1.png").write_bytes(b"this is not a png")


@pytest.mark.parametrize("how, message", [
    ("no ground truth", "has no test0-0.png"),
    ("missing slot", "trial 1 lacks test1-2.png"),
    ("sizes differ", "the images of trial 1 differ in size"),
    ("not an image", "test2-1.png is not a readable image"),
])
def test_bad_folders_exit_2_with_a_sentence(world, run_a, tmp_path, capsys, how, message):
    folder = tmp_path / "images"
    shutil.copytree(run_a[0] / "images", folder)
    _break(folder, how)
    args = [*world["args"], f"output_dir={tmp_path / 'scores'}", "phase=score", f"images_dir={folder}"]
    assert run_cli(stage3.main, args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resume_skips_recorded_trials_and_rebuilds_the_same_bytes(world, run_a):
    out_all, report_all = run_a
    out = world["root"] / "resumed"
    shutil.copytree(out_all, out)
    for path in ("records/test1.json", "images/test2-2.png", "records/test2.json", "metrics.json", "generation.jsonl"):
        (out / path).unlink()
    kept = (out / "records" / "test0.json").stat().st_mtime_ns
    report = _run(world, out)
    assert (out / "records" / "test0.json").stat().st_mtime_ns == kept  # a recorded trial is not generated again
    for i in range(report["protocol"]["n_trials"]):
        for k in range(N_SLOTS + 1):
            assert (out / "images" / f"test{i}-{k}.png").read_bytes() == (out_all / "images" / f"test{i}-{k}.png").read_bytes()
    assert _scores(report) == _scores(report_all)


def test_a_changed_generation_setting_names_the_field(world, run_a, tmp_path, capsys):
    out = tmp_path / "changed"
    shutil.copytree(run_a[0], out)
    assert run_cli(stage3.main, [*world["args"], f"output_dir={out}", "num_inference_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "num_inference_steps=2" in err and "overwrite=true" in err
    report = _run(world, out, "num_inference_steps=3", "overwrite=true", "max_trials=2")
    assert report["protocol"]["num_inference_steps"] == 3 and not (out / "images" / "test2-0.png").exists()
    # a run that stopped before its first trial (only generation.json written) protects nothing
    early = tmp_path / "stopped_early"
    early.mkdir()
    shutil.copyfile(run_a[0] / "generation.json", early / "generation.json")
    assert _run(world, early, "num_inference_steps=3", "max_trials=1")["protocol"]["num_inference_steps"] == 3


class _ColourNet(nn.Module):
    """4 classes scored by an image's mean red, green, blue and a constant 0: a hand-checkable classifier."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, images):
        means = images.mean(dim=(2, 3))  # [B, 3] in [-1, 1]
        return torch.cat([means, torch.zeros(len(images), 1)], dim=1) * self.scale


def _colour_classifier():
    return ImageClassifier(_ColourNet(), lambda img: torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1))


def _solid(r, g, b, size=8):
    return Image.new("RGB", (size, size), tuple(int(round((v + 1) * 127.5)) for v in (r, g, b)))


def test_scoring_reproduces_hand_computed_numbers():
    red, green, mixed = _solid(1, -1, -1), _solid(-1, 1, -1), _solid(0.5, 0.6, -1)
    scorer = Scorer(["n_way", "mse"], MetricNetworks(classifier=_colour_classifier()), n_way=3)
    scorer.add_trials([red, red], [[red, green, mixed], [mixed, red, green]])
    res = scorer.compute(n_bootstrap=10)
    # 3-way = 2 distractors of the 3 other classes. red: all 3 below -> 1. green: green and the
    # constant above, blue tied (counts above) -> 0. mixed (191, 204, 0): 1 above, 2 below -> 1/3.
    assert scorer.per_image()["n_way"] == pytest.approx(np.array([[1, 0, 1 / 3], [1 / 3, 1, 0]]))
    assert res["n_way"]["per_slot"] == pytest.approx([2 / 3, 1 / 2, 1 / 6])
    assert res["n_way"]["mean"] == pytest.approx(4 / 9)
    assert res["n_way"]["best_slot"] == pytest.approx(2 / 3) and res["n_way"]["best_slot_index"] == 0
    assert res["top1_agreement"]["per_slot"] == pytest.approx([0.5, 0.5, 0.0])
    # MSE on the uint8 pixels scaled to [0, 1]: red vs green = (1 + 1 + 0) / 3; mixed is (191, 204, 0)
    mixed_mse = (64**2 + 204**2) / 3 / 255**2
    assert scorer.per_image()["mse"] == pytest.approx(np.array([[0, 2 / 3, mixed_mse], [mixed_mse, 0, 2 / 3]]))
    # lower is better for MSE: its best slot is slot 0 (mean 1/2 * (0 + mixed)), the lowest
    assert res["mse"]["best_slot_index"] == 0 and res["mse"]["best_slot"] == pytest.approx(mixed_mse / 2)


class _MeanColour(nn.Module):
    """A tiny FID/IS feature network on uint8 images: per-channel mean and std."""

    num_features = 6

    def forward(self, images):
        x = images.float() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_from_the_saved_pngs_is_the_frechet_distance_of_their_features(world, run_a):
    out = world["root"] / "run_fid"
    from dreamdiffusion.config import Stage3Config, build_config
    from dreamdiffusion.evaluation.stage3 import run_stage3

    cfg = build_config(Stage3Config, overrides=[*world["args"], f"output_dir={out}", "phase=score",
                                                f"images_dir={run_a[0] / 'images'}", "metrics=[fid,lpips]"])
    report = run_stage3(cfg, extra_networks={"fid_features": _MeanColour()})
    images = run_a[0] / "images"
    n = report["protocol"]["n_trials"]
    feature = _MeanColour()

    def features(paths):
        pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)
        return feature(pixels).double().numpy()

    fake = features([images / f"test{i}-{k}.png" for i in range(n) for k in range(1, N_SLOTS + 1)])
    real = features([images / f"test{i}-0.png" for i in range(n)])
    assert report["metrics"]["fid"]["fid"] == pytest.approx(_frechet(fake, real), rel=1e-3, abs=1e-6)
    assert report["metrics"]["fid"]["n_generated"] == n * N_SLOTS and report["metrics"]["fid"]["n_reference"] == n
    assert "lpips_weights" in report["skipped"]["lpips"]  # no weights: skipped with the reason, not a number


@pytest.mark.parametrize("scale_factor", [None, 0.25])
def test_authors_checkpoint_runs_through_stage3_and_its_scale_factor_is_used(world, run_a, scale_factor):
    extra = {} if scale_factor is None else {"scale_factor": torch.tensor(scale_factor)}
    path = write_generation_checkpoint(world["model"], world["root"] / f"authors_{scale_factor}.pth", extra=extra)
    out = world["root"] / f"run_authors_{scale_factor}"
    report = _run(world, out, f"model={path}", "max_trials=2", "metrics=[n_way,mse]")
    assert "authors" in report["protocol"]["model"] and "TEST split" in report["protocol"]["checkpoint_selection"]
    vae_scale = world["model"].vae.config.scaling_factor
    if scale_factor is None:
        assert report["protocol"]["latent_scale"] == f"{vae_scale:g} from the VAE config"
        # the same weights in the authors' layout generate the same images as our folder
        for i in range(2):
            assert np.abs(_png(out / "images" / f"test{i}-1.png") - _png(run_a[0] / "images" / f"test{i}-1.png")).max() <= 1
        assert report["trials"][0]["n_way"] == pytest.approx(run_a[1]["trials"][0]["n_way"], abs=1e-6)
    else:
        assert report["protocol"]["latent_scale"].startswith("0.25 from the checkpoint's scale_factor key")
        from dreamdiffusion.models.dreamdiffusion import DreamDiffusion

        assert DreamDiffusion.from_original_checkpoint(path, world["root"] / "sd_config").vae.config.scaling_factor == 0.25


def test_controls_shuffled_labels_and_class_oracle(world):
    out = world["root"] / "run_shuffled"
    report = _run(world, out, "shuffled_labels=true", "metrics=[n_way]")
    assert all(t["reference_wnid"] != t["wnid"] for t in report["trials"])
    assert "shuffled" in (out / "results.md").read_text()
    out = world["root"] / "run_oracle"
    report = _run(world, out, "class_oracle=true", f"oracle_sd_path={world['root'] / 'base_sd'}",
                  f"class_names_path={world['data']['class_names_path']}", "max_trials=2",
                  "metrics=[n_way,retrieval]", "guidance_scale=3", "null_condition=learned")
    assert "oracle" in report["protocol"]["method"] and "retrieval" in report["skipped"]
    assert (out / "images" / "test1-2.png").is_file()


def test_retrieval_only_run_writes_no_images(world):
    out = world["root"] / "run_retrieval"
    report = _run(world, out, "metrics=[retrieval]", "save_images=false")
    assert not (out / "images").exists() and 0 <= report["metrics"]["retrieval"]["mean"] <= 1


@pytest.mark.parametrize("extra", [
    ["model=/nonexistent/model"],
    ["sampler=euler"],
    ["metrics=[n_way,accuracy]"],
    ["no_such_key=1"],
    ["split=holdout"],
    ["phase=evaluate"],
    ["n_way=50"],  # the tiny classifier knows 10 classes
    ["null_condition=random"],
    ["class_oracle=true", "shuffled_labels=true"],
    ["classifier=timm_missing_folder"],
    ["data.eeg_path=/nonexistent/eeg.pth"],
    ["save_images=false"],  # with image metrics
])
def test_bad_input_exits_with_code_2(world, extra, capsys):
    out = world["root"] / "run_bad"
    assert run_cli(stage3.main, [*world["args"], f"output_dir={out}", *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_retrieval_against_a_clip_of_another_width_is_refused(world, run_a, tmp_path, capsys):
    """The CLIP head is only comparable with the CLIP it was trained against; a wrong one used to
    crash inside a matrix product."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=24)).save_pretrained(tmp_path / "clip24")
    args = [*world["args"], f"output_dir={tmp_path / 'scores'}", f"clip_path={tmp_path / 'clip24'}",
            "metrics=[retrieval]", "phase=score", f"images_dir={run_a[0] / 'images'}"]
    assert run_cli(stage3.main, args) == 2
    err = capsys.readouterr().err
    assert "retrieval" in err and "16" in err and "24" in err


def test_the_score_phase_does_not_import_the_generation_stack(world, run_a, tmp_path):
    """phase=score reads PNGs and records back from disk: diffusers is imported only to generate."""
    script = ("import sys\n"
              "from dreamdiffusion.evaluation.stage3 import main\n"
              "main(sys.argv[1:])\n"
              "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers')\n"
              "assert not loaded, f'phase=score imported {loaded[:3]}'\n"
              "import dreamdiffusion.evaluation.generation\n"
              "assert 'diffusers' in sys.modules  # the check above can see the generation stack\n")
    out = tmp_path / "scores"
    args = [*world["args"], f"output_dir={out}", "phase=score", f"images_dir={run_a[0] / 'images'}",
            "metrics=[n_way,mse,clip_similarity,retrieval]"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["metrics"]["n_way"]["mean"] >= 0


def test_wait_for_all_ends_with_a_sentence_when_a_rank_stops(tmp_path):
    from dreamdiffusion.core.errors import DreamDiffusionError
    from dreamdiffusion.evaluation.generation import wait_for_all

    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "test0.json").write_text("{}")
    with pytest.raises(DreamDiffusionError, match=r"1 trial\(s\) were not generated within rank_timeout_s=0.2 s "
                                                  r"\(e.g. trial 1\).*re-run the same command to resume"):
        wait_for_all(tmp_path, 2, timeout_s=0.2, poll_s=0.05, progress=False)
