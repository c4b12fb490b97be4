"""Stages 2 and 3 on THINGS-EEG2 files in the real (official) layout, through the presets: an encoder
built for the native 17 x 100, the field's retrieval table, the protocol and published figures in
results.md, leave-one-subject-out, and the shuffled control."""

import json

import pytest
import torch

from dreamdiffusion.data.synthetic_things_eeg2 import write_synthetic_things_eeg2
from dreamdiffusion.evaluation.stage3 import main as stage3_main
from dreamdiffusion.models.mae import EEGEncoder, save_eeg_encoder
from dreamdiffusion.models.original_formats import save_compvis_checkpoint
from dreamdiffusion.train.stage2 import main as stage2_main
from stage2_tiny import CLIP_IMAGE_SIZE, IMAGE_SIZE, tiny_sd, tiny_sd_configs, write_config_dir
from test_stage3 import tiny_clip_folder

PRESETS = "configs/presets"
NATIVE = dict(n_channels=17, n_times=100, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("things_stages")
    things = write_synthetic_things_eeg2(root / "things", n_train_concepts=6, images_per_concept=2, n_train_reps=2,
                                         n_test_concepts=4, n_test_reps=3, n_subjects=2, image_size=IMAGE_SIZE)
    sd = tiny_sd(seed=0)
    sd_file = save_compvis_checkpoint(sd.unet, sd.vae, root / "sd" / "tiny-v1-5.safetensors")
    config_dir = write_config_dir(root / "sd_config", *tiny_sd_configs())
    tiny_clip_folder(root / "clip")
    data = [f"data.image_dir={things['image_dir']}", f"data.things_eeg2.eeg_dir={things['eeg_dir']}",
            f"data.image_size={IMAGE_SIZE}", f"data.clip_image_size={CLIP_IMAGE_SIZE}", "data.things_eeg2.val_concepts=2"]
    stage2 = [*data, f"sd_path={sd_file}",
              f"sd_config_dir={config_dir}", f"clip_path={root / 'clip'}", "batch_size=4", "epochs=1",
              "val_every_n_epochs=1", "sample_every_n_epochs=5", "n_val_samples=2", "val_inference_steps=2",
              "trainer.accelerator=cpu", "trainer.num_workers=0", "trainer.progress_bar=false",
              "trainer.limit_train_batches=2", "classifier=null"]
    stage3 = [*_presets("things_eeg2", "things_eeg2_native", "things_eeg2_eval"), *data,
              f"clip_path={root / 'clip'}", f"sd_config_dir={config_dir}", "num_inference_steps=2", "batch_size=2",
              "bootstrap_samples=20", "progress_bar=false", "device=cpu", "precision=fp32",
              "metrics=[retrieval,pixcorr,ssim_gray,clip_2way,alexnet2,swav]"]
    return {"root": root, "things": things, "stage2": stage2, "stage3": stage3}


def _presets(*names):
    return [item for name in names for item in ("--config", f"{PRESETS}/{name}.yaml")]


@pytest.fixture(scope="module")
def model(world):
    out = world["root"] / "stage2"
    stage2_main([*_presets("things_eeg2", "things_eeg2_native_official"), *world["stage2"],
                           *[f"encoder.{k}={v}" for k, v in NATIVE.items()], f"output_dir={out}"])
    return out / "model"


def test_stage2_trains_a_native_encoder_on_the_training_concepts(world, model):
    summary = json.loads((model.parent / "metrics.json").read_text())
    assert summary  # the run summary exists
    cfg = (model.parent / "config.yaml").read_text()
    assert "kind: things_eeg2" in cfg and "n_times: 100" in cfg
    assert json.loads((model / "conditioner" / "config.json").read_text())["encoder_config"]["n_channels"] == 17


def test_stage3_writes_the_fields_retrieval_table_protocol_and_skips(world, model):
    out = world["root"] / "stage3"
    report = stage3_main([*world["stage3"], f"model={model}", f"output_dir={out}"])
    table = report["metrics"]["retrieval_table"]
    assert sorted(table) == ["2-way", "4-way"]  # 4 unseen test concepts: 10..200-way do not exist here
    assert report["protocol"]["n_trials"] == 4  # repetitions averaged: one trial per test image
    assert report["skipped"]["alexnet2"].startswith("no alexnet_weights given")
    assert "swav" in report["skipped"] and "alexnet2" not in report["metrics"]
    for name in ("pixcorr", "ssim_gray", "clip_2way"):
        assert report["metrics"][name]["n_trials"] == 4
    text = (out / "results.md").read_text()
    assert "intra-subject (subject 1)" in text and "test repetitions averaged" in text
    # today's anchors, each with how its model was selected
    assert "| NICE | 15.6 / 42.8 | 6.2 / 21.4 | validation" in text and "| UBP | 50.9 / 79.7 | 12.4 / 33.4 |" in text
    assert "| ATM-S | 26.13 / 55.32 |" in text and "| BrainHiVE | 80.8 / 97 | 33.7 / 65.8 | not stated |" in text
    assert "test: the best epoch by test accuracy" in text
    # split hygiene: unseen test concepts, no block design
    assert report["split_hygiene"]["repeated"] == [] and "## Split hygiene" in text and "no block design" in text
    assert "| 4-way |" in text and "## Reconstruction metrics" in text


def test_shuffled_control_and_leave_one_subject_out(world, model):
    out = world["root"] / "shuffled"
    report = stage3_main([*world["stage3"], f"model={model}", f"output_dir={out}", "shuffled_labels=true",
                                    "metrics=[retrieval]"])
    refs = [t["reference_image"] for t in report["trials"]]
    assert len(set(refs)) > 1 and "shuffled-labels control" in report["protocol"]["method"]
    loso = stage3_main([*world["stage3"], f"model={model}", f"output_dir={world['root'] / 'loso'}",
                                  "--config", f"{PRESETS}/things_eeg2_loso.yaml", "data.things_eeg2.leave_out=2",
                                  "metrics=[retrieval]"])
    assert "inter-subject: trained on the other subjects, tested on subject 2" in (
        world["root"] / "loso" / "results.md").read_text()
    assert loso["protocol"]["n_trials"] == 4


def test_a_model_and_data_of_different_sizes_are_refused_by_name(world, model, capsys):
    from dreamdiffusion.core.errors import run_cli

    args = [*_presets("things_eeg2", "things_eeg2_eval"), *world["stage3"][6:], f"model={model}",
            f"output_dir={world['root'] / 'mismatch'}"]
    assert run_cli(stage3_main, args) == 2
    assert "expects [17, 100] inputs but the test EEG is [128, 512]" in capsys.readouterr().err


def test_adapted_eeg_fits_a_pretrained_128_x_512_encoder(world, tmp_path):
    torch.manual_seed(0)
    encoder = save_eeg_encoder(EEGEncoder(n_channels=128, n_times=512, patch_size=16, embed_dim=32, depth=1,
                                          num_heads=2), tmp_path / "enc")
    out = tmp_path / "adapted"
    stage2_main([*_presets("things_eeg2"), *world["stage2"], f"eeg_encoder_path={encoder}",
                           f"output_dir={out}"])
    assert "n_channels: 128" in (out / "config.yaml").read_text()
