"""Split hygiene (data/split_hygiene.py): the data checks name the stimuli that occur on both sides of a
split, a stage refuses a split repeating stimuli between train and test unless told otherwise, and the
block design's relation of test trials to training blocks is stated from what the file records."""

import io

import pytest

from dreamdiffusion.config import STAGES
from dreamdiffusion.core import fidelity
from dreamdiffusion.core.errors import DataError, run_cli
from dreamdiffusion.data.imagenet_eeg import ImageNetEEGDataset, check
from dreamdiffusion.data.synthetic import write_synthetic_imagenet_eeg
from dreamdiffusion.data.synthetic_things_eeg2 import write_synthetic_things_eeg2
from dreamdiffusion.data.things_eeg2 import ThingsEEG2Dataset
from dreamdiffusion.data.things_eeg2 import check as things_check
from dreamdiffusion.data.things_eeg2 import main as things_main
from dreamdiffusion.evaluation.stage3 import main as stage3_main  # what code/stage3_generate_eval.py calls


@pytest.fixture(scope="module")
def split_by_trial(tmp_path_factory):
    """A tiny ImageNet-EEG whose "all" split file is split by trial: an image's trials by different
    subjects fall in different splits (repeated stimuli); its "single" file is by image."""
    return write_synthetic_imagenet_eeg(tmp_path_factory.mktemp("by_trial"), n_classes=4, images_per_class=5,
                                        n_subjects=3, n_channels=8, image_size=16, out_of_range_fraction=0,
                                        split_unit="trial")


def test_the_check_names_the_images_repeated_between_train_and_test(split_by_trial):
    out = io.StringIO()
    problems = check(split_by_trial["eeg_path"], split_by_trial["splits_all_path"], subject=0, out=out)
    text = out.getvalue()
    dataset = ImageNetEEGDataset(split_by_trial["eeg_path"], split_by_trial["splits_all_path"], subject=0,
                                 split="test", allow_repeated_stimuli=True)
    repeated = next(o for o in dataset.hygiene.overlaps if o.sides == ("train", "test"))
    assert repeated.kind == "image" and repeated.names == sorted(repeated.names)
    # every repeated image is named, in the report and in the problem
    assert f"{len(repeated.names)} image(s) in both train and test: " + ", ".join(repeated.names) in text
    assert len(problems) == 1 and "repeats stimuli between train and test" in problems[0]
    test_images = set(dataset.image_names)
    train = ImageNetEEGDataset(split_by_trial["eeg_path"], split_by_trial["splits_all_path"], subject=0,
                               split="train", allow_repeated_stimuli=True)
    assert set(repeated.names) == test_images & set(train.image_names)


def test_a_stage_refuses_a_split_with_repeats_unless_allowed(split_by_trial, tmp_path, capsys):
    with pytest.raises(DataError, match=r"repeats stimuli between train and test - \d+ image\(s\).*"
                                        r"data\.allow_repeated_stimuli=true"):
        ImageNetEEGDataset(split_by_trial["eeg_path"], split_by_trial["splits_all_path"], subject=0, split="train")
    # stage 3 reads the split before it writes or loads anything else: exit code 2 with the sentence
    args = [f"data.eeg_path={split_by_trial['eeg_path']}", f"data.splits_path={split_by_trial['splits_all_path']}",
            f"data.image_dir={split_by_trial['image_dir']}", "data.subject=0", f"model={tmp_path}",
            f"output_dir={tmp_path / 'out'}", "metrics=[mse]", "device=cpu", "progress_bar=false"]
    assert run_cli(stage3_main, ["phase=generate", *args]) == 2
    assert "repeats stimuli between train and test" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()
    # allowed, the run lists it among its deviations
    cfg = STAGES["stage3"].build_config([], [*args, "data.allow_repeated_stimuli=true"])
    assert "repeated_stimuli" in [d["id"] for d in fidelity.deviation_records("stage3", cfg)]
    default = STAGES["stage2"].build_config()
    assert "repeated_stimuli" not in [d["id"] for d in fidelity.deviation_records("stage2", default)]


def test_a_split_by_image_repeats_nothing_and_every_test_trial_shares_a_block(split_by_trial):
    dataset = ImageNetEEGDataset(split_by_trial["eeg_path"], split_by_trial["splits_path"], subject=2, split="test")
    assert dataset.hygiene.overlaps == []
    block = dataset.hygiene.block_design
    # a split by image within each class: every test trial's class has training trials of its subject
    assert block["test_trials_sharing_a_block_with_training"] == block["test_trials"] == len(dataset)
    assert block["presentation_order_recorded"] is False
    assert block["subject_classes_contiguous_in_file_order"] == 4  # the synthetic file keeps the block order
    out = io.StringIO()
    assert check(split_by_trial["eeg_path"], split_by_trial["splits_path"], subject=2, out=out) == []
    assert "no stimulus occurs in more than one split" in out.getvalue()


def test_things_eeg2_names_repeated_images_and_concepts(tmp_path, capsys):
    paths = write_synthetic_things_eeg2(tmp_path, n_train_concepts=6, images_per_concept=2, n_train_reps=2,
                                        n_test_concepts=4, n_test_reps=2, repeated_test_concepts=2)
    with pytest.raises(DataError, match=r"2 image\(s\) in both train and test: .*2 concept\(s\) in both train and "
                                        r"test"):
        ThingsEEG2Dataset(paths["eeg_dir"], paths["image_dir"], split="test", load_images=False)
    allowed = ThingsEEG2Dataset(paths["eeg_dir"], paths["image_dir"], split="test", load_images=False,
                                allow_repeated_stimuli=True)
    concepts = next(o for o in allowed.hygiene.overlaps if o.kind == "concept").names
    # the per-partition number of a concept folder is not part of the concept
    assert len(concepts) == 2 and all(not c[0].isdigit() for c in concepts)
    things_check(paths["eeg_dir"], paths["image_dir"], out=(out := io.StringIO()))
    assert "2 concept(s) in both train and test: " + ", ".join(concepts) in out.getvalue()
    assert run_cli(things_main, ["check", "--eeg-dir", str(paths["eeg_dir"]), "--images",
                                 str(paths["image_dir"])]) == 2
    assert "repeats stimuli between train and test" in capsys.readouterr().err
    clean = write_synthetic_things_eeg2(tmp_path / "clean", n_train_concepts=6, images_per_concept=2,
                                        n_train_reps=2, n_test_concepts=4, n_test_reps=2)
    assert ThingsEEG2Dataset(clean["eeg_dir"], clean["image_dir"], split="test", load_images=False,
                             val_concepts=2).hygiene.overlaps == []
