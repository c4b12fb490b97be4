"""Stage 3, phase `generate`: images from the EEG of one split, resumable and sharded over processes.

For every trial i of the split (the first `max_trials`), `num_images_per_eeg` images seeded from
`seed + i`, written as uint8 PNGs in the authors' naming - `images/test{i}-0.png` the ground truth
at the model's output size, `test{i}-{k}.png` (k >= 1) the generated ones - and, once a trial's files
are all on disk, its record `records/test{i}.json` (image, reference image, seed, and the CLIP-head
embedding of its EEG in `records/test{i}.npy` for the retrieval score). Every file is written
atomically. `generation.json` holds the generation settings and what the model is.

Resume: a trial whose record exists is not generated again; a changed setting (GENERATION_SETTINGS)
is a ConfigError naming the field unless `overwrite=true`. Trials are generated in fixed batches
(batch b = trials [b * batch_size, (b + 1) * batch_size)), so a resumed or sharded run computes
exactly the batches an uninterrupted single-process run computes: the PNGs are byte-identical.

Several processes (Lightning Fabric, or torchrun): batch b goes to rank b mod world_size; each rank
writes its own trials; rank 0 then waits (at most `rank_timeout_s`) until every trial is recorded,
and writes `generation.jsonl` (all records, in order) for the score phase.

The phase, as `evaluation.stage3` runs it: `prepare_run` once before the processes start, then
`generate_images` in each process. Only this phase imports the generation stack (diffusers).
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from dreamdiffusion.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DreamDiffusionError,
    NonFiniteError,
)
from dreamdiffusion.core.files import atomic_path, atomic_write_json, atomic_write_text, read_own_json
from dreamdiffusion.core.images import to_uint8
from dreamdiffusion.core.precision import numerics_record
from dreamdiffusion.core.run_folder import check_export
from dreamdiffusion.dataset import paired_dataset
from dreamdiffusion.models.clip_embedder import check_clip_path
from dreamdiffusion.models.pipeline import DreamDiffusionPipeline, NonFiniteLatentsError
from dreamdiffusion.models.sampling import DEFAULT_STEPS
from dreamdiffusion.models.sd15 import load_sd15

logger = logging.getLogger(__name__)

# The settings an image depends on; a resumed run must agree on each (or pass overwrite=true).
GENERATION_SETTINGS = ("model", "class_oracle", "oracle_sd_path", "oracle_prompt", "shuffled_labels", "sampler",
                       "num_inference_steps", "eta", "guidance_scale", "null_condition", "seed",
                       "num_images_per_eeg", "split", "data.kind", "data.subject", "data.split_index", "data.eeg_path",
                       "data.splits_path", "data.things_eeg2", "max_trials", "batch_size", "precision", "save_images")
AUTHORS_SELECTION = ("chosen by the authors on the TEST split (best max-over-5-slots accuracy of the first "
                     "25 test trials; docs/method.md, \"Evaluation\") - not a held-out estimate")


# ---------------------------------------------------------------------------------------------
# The generate phase


def prepare_run(cfg: DictConfig, out_dir: Path) -> None:
    """Check an earlier generation in `out_dir` against these settings (or clear it, with
    `overwrite`) and record them in generation.json. Run once, before the other processes start, so
    that they find the settings agreed."""
    settings = generation_settings(cfg)
    prepare_output(out_dir, settings, cfg.overwrite)
    forget_damaged_trials(out_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "generation.json", {"settings": settings})


def generate_images(cfg: DictConfig, out_dir: Path, rank: int, world: int, device: torch.device,
                    dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    """This process's trials (cfg with resolved paths); rank 0 then waits for the others and writes
    generation.json and generation.jsonl. Returns this process's runtime figures (runtime.json)."""
    pipe, model_info, selection = load_generator(cfg)  # fp32 from the files; the UNet and VAE then in `dtype`
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)  # the EEG conditioner stays fp32 (it runs once per batch; stage 2 trained fp32 weights)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    dataset = paired_dataset(_data_at(cfg, pipe.image_size), cfg.split)
    if not cfg.class_oracle:
        check_eeg_fits(pipe, cfg, dataset)
    n_trials = len(dataset) if cfg.max_trials is None else min(cfg.max_trials, len(dataset))
    references = shuffled_references(dataset.labels, cfg.seed) if cfg.shuffled_labels else list(range(len(dataset)))
    notes: list[str] = []
    contexts, null_context = oracle_contexts(cfg, pipe, dataset.wnids, device, notes) if cfg.class_oracle else (None, None)
    steps = cfg.num_inference_steps or DEFAULT_STEPS[cfg.sampler]
    sampling = dict(num_images_per_eeg=cfg.num_images_per_eeg, num_inference_steps=steps, sampler=cfg.sampler,
                    eta=cfg.eta, guidance_scale=cfg.guidance_scale, null_condition=cfg.null_condition)
    job = GenerationJob(cfg, out_dir, pipe, dataset, references, contexts, sampling, null_context)
    started = time.perf_counter()
    generated = job.run(batches_of_rank(n_trials, cfg.batch_size, rank, world), progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runtime = _speed(cfg, time.perf_counter() - started, generated, steps, device)
    if rank == 0:
        if world > 1:
            wait_for_all(out_dir, n_trials, cfg.rank_timeout_s, progress=progress)
        header = generation_header(cfg, pipe, model_info, selection, n_trials, len(dataset), dtype, device)
        atomic_write_json(out_dir / "generation.json", {**header, "notes": notes, "world_size": world,
                                                         "split_hygiene": dataset.hygiene.record()})
        write_jsonl(out_dir, n_trials)
    return runtime


def _speed(cfg: DictConfig, seconds: float, generated: int, steps: int, device: torch.device) -> dict[str, Any]:
    """The generation's speed and the GPU's peak memory, for runtime.json."""
    calls = steps + 1 if cfg.sampler == "plms" else steps  # PLMS: one extra call in its first step
    images = generated * max(cfg.num_images_per_eeg, 1)
    out = {"generation_seconds": round(seconds, 2), "trials_generated": generated, "unet_calls_per_image": calls,
           "device": str(device), "seconds_per_step": round(seconds / (images * calls), 4) if generated else None}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def check_eeg_fits(pipe: DreamDiffusionPipeline, cfg: DictConfig, dataset) -> None:
    """The model's EEG encoder takes the split's EEG shape [n_channels, n_times], or a ConfigError."""
    expected = tuple(pipe.conditioner.encoder.config[k] for k in ("n_channels", "n_times"))
    if expected != (dataset.n_channels, dataset.n_times):
        fix = ("set data.n_times, or use the EEG file the model was trained on" if cfg.data.kind == "imagenet_eeg" else
               f"set data.things_eeg2.n_channels={expected[0]} data.things_eeg2.n_times={expected[1]} (null = the "
               "file's native size; configs/presets/things_eeg2_native.yaml)")
        raise ConfigError(f"the model's EEG encoder ({cfg.model}) expects [{expected[0]}, {expected[1]}] inputs but the "
                          f"{cfg.split} EEG is [{dataset.n_channels}, {dataset.n_times}]: {fix}")


def _data_at(cfg: DictConfig, image_size: int) -> DictConfig:
    """The data config with the model's image size (the ground truth is written at the output size)."""
    data = OmegaConf.to_container(cfg.data)
    return OmegaConf.create({**data, "image_size": image_size})


# ---------------------------------------------------------------------------------------------
# The class-name oracle: base SD1.5 conditioned on text


@dataclass
class TextCondition:
    context: torch.Tensor  # [B, 77, cross_attention_dim]: CLIP text states, as SD1.5 was trained
    time_embedding: torch.Tensor | None = None


@torch.no_grad()
def text_contexts(text_encoder_path: str, prompts: Sequence[str], device) -> torch.Tensor:
    """CLIP text states [n_prompts, max_length, width] (last hidden state, padded as SD1.5 does)."""


    source = check_clip_path(text_encoder_path)
    local = Path(source).exists()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=local)
        text_model = CLIPTextModel.from_pretrained(source, local_files_only=local).to(device).eval()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load the CLIP text encoder + tokenizer from {source}: {err}") from err
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    return text_model(tokens.input_ids.to(device)).last_hidden_state.float().cpu()


def class_names(path: str | None, wnids: Sequence[str]) -> tuple[list[str], str | None]:
    """Readable class names (json {wnid: name}) for the oracle's prompts, and a note when there are none."""
    if not path:
        return list(wnids), "no class_names_path given: oracle prompts use the WordNet ids"
    file = Path(path)
    if not file.is_file():
        raise DataError(f"class_names_path not found: {file} (expected a json {{wnid: name}})")
    try:
        names = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"class_names_path {file} is not valid JSON: {err}") from err
    missing = [w for w in wnids if w not in names]
    if missing:
        raise DataError(f"{file} has no name for {len(missing)} class(es), e.g. {missing[:3]}")
    return [names[w] for w in wnids], None


# ---------------------------------------------------------------------------------------------
# Loading the generator


def _selection_record(folder: Path) -> str:
    """How the checkpoint was chosen, from the model folder's metadata if it says."""
    for name, key in (("selection.json", None), ("dreamdiffusion.json", "selection")):
        path = folder / name
        if path.is_file():
            data = read_own_json(path, f"delete {folder} and rerun stage 2 with resume=true in {folder.parent} to "
                                       "export it again", CheckpointError)
            record = data if key is None or not isinstance(data, dict) else data.get(key)
            if record:
                return record if isinstance(record, str) else json.dumps(record, sort_keys=True)
    return "unknown: the model folder records no checkpoint selection (selection.json)"


def load_model(path: str | Path, sd_config_dir: str | None,
               dtype: torch.dtype | None = None) -> tuple[DreamDiffusionPipeline, str, str]:
    """(the pipeline in `dtype`, description of the checkpoint, how it was selected) from our folder
    (DreamDiffusionPipeline.save_pretrained's, or an earlier version's) or the authors' generation checkpoint."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"model not found: {source} (expected a stage-2 model folder with model_index.json, "
                              "or the authors' generation checkpoint .pth)")
    if source.is_dir():
        remedy = f"delete {source} and rerun stage 2 with resume=true in {source.parent} to export it again"
        check_export(source, "stage-2 model export", remedy)
        try:
            pipe = DreamDiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        except DreamDiffusionError as err:
            raise CheckpointError(f"{str(err).rstrip('.')}; {remedy}") from err
        # A damaged file of the folder fails in its library's own way (SafetensorError, JSONDecodeError,
        # KeyError, OSError, ...): each means the folder cannot be used as it is.
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"the model folder {source} could not be loaded ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); {remedy}") from err
        return pipe, f"our save_pretrained folder {source}", _selection_record(source)
    pipe = DreamDiffusionPipeline.from_original_checkpoint(source, sd_config=sd_config_dir, torch_dtype=dtype)
    return pipe, f"authors'-format generation checkpoint {source}", AUTHORS_SELECTION


def load_generator(cfg: DictConfig, dtype: torch.dtype | None = None) -> tuple[DreamDiffusionPipeline, str, str]:
    """(the pipeline, what it is, how its checkpoint was selected); for the class-name oracle, base
    SD1.5 without an EEG conditioner (each call passes the text states as its `condition`)."""
    if not cfg.class_oracle:
        return load_model(cfg.model, cfg.sd_config_dir, dtype)
    sd = load_sd15(cfg.oracle_sd_path, cfg.sd_config_dir)
    pipe = DreamDiffusionPipeline(conditioner=None, unet=sd.unet, vae=sd.vae, scheduler=sd.noise_scheduler)
    pipe.latent_scale_source = sd.latent_scale_source
    pipe = pipe if dtype is None else pipe.to(dtype=dtype)
    return pipe, f"base SD1.5 {cfg.oracle_sd_path} (no EEG)", "not applicable"


def oracle_contexts(cfg: DictConfig, pipe: DreamDiffusionPipeline, wnids: Sequence[str], device,
                    notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states [n_classes, 77, D] of the oracle prompt per class, and the empty prompt's [1, 77, D]
    (SD's own unconditional input: the null condition of guidance with null_condition="learned")."""
    names, note = class_names(cfg.class_names_path, wnids)
    if note:
        notes.append(note)
    prompts = [cfg.oracle_prompt.format(name) for name in names]
    contexts = text_contexts(cfg.oracle_text_encoder_path or cfg.clip_path, [*prompts, ""], device)
    if contexts.shape[-1] != pipe.unet.config.cross_attention_dim:
        raise ConfigError(f"the text encoder's width {contexts.shape[-1]} does not match the UNet's "
                          f"cross-attention dim {pipe.unet.config.cross_attention_dim}")
    return contexts[:-1], contexts[-1:]


def shuffled_references(labels: Sequence[int], seed: int) -> list[int]:
    """For each trial, a random trial of ANOTHER class (its image becomes the ground truth)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for label in labels:
        others = np.flatnonzero(labels != label)
        if len(others) == 0:
            raise DataError("shuffled_labels needs trials of at least two classes in the split")
        out.append(int(rng.choice(others)))
    return out


# ---------------------------------------------------------------------------------------------
# Settings and resume


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """The values of GENERATION_SETTINGS (the effective number of steps for a null one)."""

    out = {}
    for key in GENERATION_SETTINGS:
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        out[key] = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    out["num_inference_steps"] = cfg.num_inference_steps or DEFAULT_STEPS[cfg.sampler]
    # THINGS-EEG2's block only when it is the data, and only the fields that shape this split's items
    if cfg.data.kind != "things_eeg2":
        del out["data.things_eeg2"]
    else:
        unused = ("val_concepts", "seed", "average_repetitions_train") if cfg.split == "test" \
            else ("average_repetitions_test",)
        out["data.things_eeg2"] = {k: v for k, v in out["data.things_eeg2"].items() if k not in unused}
    return out


def prepare_output(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Check (or, with `overwrite`, clear) an earlier generation in `out_dir` before any work."""
    header = out_dir / "generation.json"
    if not header.is_file():
        return
    try:
        earlier = json.loads(header.read_text())["settings"]
    except (json.JSONDecodeError, KeyError) as err:
        raise DataError(f"{header} is damaged ({err}); delete {out_dir} or pass overwrite=true") from err
    # a setting the earlier run did not record (an older version's folder) is not compared
    changed = [k for k in settings if k in earlier and earlier[k] != settings[k]]
    # A run that stopped before its first trial (a bad input found after the settings were written)
    # left nothing to protect: its settings are simply replaced.
    if changed and not overwrite and done_trials(out_dir):
        k = changed[0]
        raise ConfigError(f"{out_dir} holds images generated with {k}={earlier.get(k)!r}, not {settings[k]!r}: use "
                          "another output_dir, the same settings to resume, or overwrite=true to start again")
    if changed:
        for sub in ("images", "records", "grids"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for name in ("generation.json", "generation.jsonl", "metrics.json", "results.md"):
            (out_dir / name).unlink(missing_ok=True)


PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _png_intact(path: Path) -> bool:
    """The file is a PNG written to its end (its signature first, its IEND chunk last): cheap, no decode."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(-len(PNG_END), 2)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def _trial_problem(out_dir: Path, i: int, cfg: DictConfig) -> str | None:
    """Why recorded trial i cannot be scored (a file missing or damaged), or None."""
    try:
        record = json.loads((out_dir / "records" / f"test{i}.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"records/test{i}.json is damaged"
    if not isinstance(record, dict) or record.get("index") != i:
        return f"records/test{i}.json is damaged"
    slots = range(cfg.num_images_per_eeg + 1) if cfg.save_images else ()
    broken = [k for k in slots if not _png_intact(out_dir / "images" / f"test{i}-{k}.png")]
    if broken:
        return f"images/test{i}-{broken[0]}.png is missing or damaged"
    if record.get("eeg_embedding"):
        try:
            np.load(out_dir / "records" / record["eeg_embedding"], allow_pickle=False)
        except (OSError, ValueError, EOFError, TypeError):
            return f"records/{record['eeg_embedding']} is missing or damaged"
    return None


def forget_damaged_trials(out_dir: Path, cfg: DictConfig) -> None:
    """Resume: a recorded trial whose record, PNGs or embedding is missing or damaged loses its record,
    so that this run generates it again (its batch is recomputed: the same bytes as before)."""
    forgotten = []
    for i in sorted(done_trials(out_dir)):
        problem = _trial_problem(out_dir, i, cfg)
        if problem:
            (out_dir / "records" / f"test{i}.json").unlink(missing_ok=True)
            forgotten.append(f"trial {i}: {problem}")
    if forgotten:
        (out_dir / "generation.jsonl").unlink(missing_ok=True)
        logger.warning("%s: %d recorded trial(s) will be generated again (%s)", out_dir, len(forgotten),
                       "; ".join(forgotten[:5]) + ("; ..." if len(forgotten) > 5 else ""))


def done_trials(out_dir: Path) -> set[int]:
    """Trials whose record is written (their PNGs and embedding were written before it)."""
    records = out_dir / "records"
    if not records.is_dir():
        return set()
    return {int(p.stem[4:]) for p in records.glob("test*.json") if p.stem[4:].isdigit()}


def batches_of_rank(n_trials: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Batch b (trials [b * batch_size, ...)) belongs to rank b mod world."""
    starts = range(0, n_trials, batch_size)
    return [list(range(s, min(s + batch_size, n_trials))) for b, s in enumerate(starts) if b % world == rank]


def wait_for_all(out_dir: Path, n_trials: int, timeout_s: float, poll_s: float = 1.0, progress: bool = True) -> None:
    """Rank 0: wait until every trial is recorded, or stop with a sentence after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    bar = tqdm(total=n_trials, desc="stage 3: all ranks", unit="trial", disable=not progress)
    try:
        while True:
            done = done_trials(out_dir)
            bar.update(len(done) - bar.n)
            if len(done) >= n_trials:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(n_trials)) - done)
                raise DreamDiffusionError(
                    f"{len(missing)} trial(s) were not generated within rank_timeout_s={timeout_s:g} s (e.g. trial "
                    f"{missing[0]}): another process has stopped or is far behind; re-run the same command to "
                    "resume (finished trials are kept)")
            time.sleep(poll_s)
    finally:
        bar.close()


def write_jsonl(out_dir: Path, n_trials: int) -> list[dict[str, Any]]:
    """`generation.jsonl`: every trial's record, in order (rank 0, once all are done)."""
    records = [read_own_json(out_dir / "records" / f"test{i}.json", "run the same command again: a resumed "
                             "generation writes a damaged trial again") for i in range(n_trials)]
    atomic_write_text(out_dir / "generation.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return records


# ---------------------------------------------------------------------------------------------
# Generating


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def ground_truth_uint8(image: torch.Tensor) -> np.ndarray:
    """A dataset image [3, S, S] in [-1, 1] -> uint8 [S, S, 3] (what test{i}-0.png holds)."""
    return to_uint8(image)


@dataclass
class GenerationJob:
    """What one process needs to generate its trials."""

    cfg: DictConfig  # resolved stage-3 config
    out_dir: Path
    pipe: DreamDiffusionPipeline
    dataset: Any  # ImageNetEEGDataset at the model's image size
    references: list[int]  # per trial: the trial whose image is the ground truth
    contexts: torch.Tensor | None  # the oracle's text states per class
    sampling: dict[str, Any]
    null_context: torch.Tensor | None = None  # the oracle's empty prompt [1, 77, D] (its learned null)

    def run(self, batches: list[list[int]], progress: bool = True) -> int:
        """Generate the unrecorded trials of `batches`; returns how many trials it generated."""
        done = done_trials(self.out_dir)
        todo = [b for b in batches if not set(b) <= done]
        n_mine = sum(len(b) for b in batches)
        bar = tqdm(total=n_mine, initial=n_mine - sum(len(b) for b in todo), desc="stage 3: generate",
                   unit="trial", disable=not progress)
        generated = 0
        for indices in todo:
            self._batch(indices, done)
            bar.update(sum(i not in done for i in indices))
            generated += sum(i not in done for i in indices)
        bar.close()
        return generated

    @torch.no_grad()
    def _batch(self, indices: list[int], done: set[int]) -> None:
        cfg, pipe = self.cfg, self.pipe
        items = [self.dataset[i] for i in indices]
        refs = [items[k] if self.references[i] == i else self.dataset[self.references[i]] for k, i in enumerate(indices)]
        # trial i's images depend only on seed + i (and on the batch it is computed in, which is fixed)
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in indices]
        if cfg.class_oracle:
            condition = TextCondition(self.contexts[[it["label"] for it in items]].to(pipe.device))
            null = (TextCondition(self.null_context.expand(len(items), -1, -1).to(pipe.device))
                    if cfg.null_condition == "learned" else None)
            images = self._generate(indices, generators, condition=condition, negative_condition=null)
            embeddings = None
        else:
            condition = pipe.encode_eeg(torch.stack([it["eeg"] for it in items]))
            embeddings = condition.clip_embedding.float().cpu().numpy()
            images = self._generate(indices, generators, condition=condition) if cfg.save_images else None
        for k, (i, item, ref) in enumerate(zip(indices, items, refs)):
            if i in done:
                continue
            self._write_trial(i, item, ref, None if images is None else images[k],
                              None if embeddings is None else embeddings[k])

    def _generate(self, indices: list[int], generators: list[torch.Generator], **condition: Any) -> np.ndarray:
        """The trials' images (uint8 [n, slots, H, W, 3]); latents with NaN/Inf stop the run naming the trial."""
        try:
            return self.pipe(generator=generators, output_type="np", **condition, **self.sampling).images
        except NonFiniteLatentsError as err:
            trial, slot = err.images[0]
            raise NonFiniteError(f"stage 3 stopped at trial {indices[trial]} (test{indices[trial]}-{slot + 1}.png, "
                                 f"precision={self.cfg.precision}): {err}. Nothing of its batch (trials {indices[0]}-"
                                 f"{indices[-1]}) was written; finished trials are kept") from err

    def _write_trial(self, i: int, item: dict, ref: dict, images: np.ndarray | None, embedding) -> None:
        folder = self.out_dir / "images"
        if images is not None:  # save_images=false: a retrieval-only run writes no images
            save_png(folder / f"test{i}-0.png", ground_truth_uint8(ref["image"]))
            for slot, image in enumerate(images, start=1):
                save_png(folder / f"test{i}-{slot}.png", image)
        if embedding is not None:
            with atomic_path(self.out_dir / "records" / f"test{i}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, embedding.astype(np.float32))
        record = {"index": i, "image_name": item["image_name"], "wnid": item["wnid"], "label": item["label"],
                  "reference_image": ref["image_name"], "reference_wnid": ref["wnid"],
                  "reference_path": str(self.dataset.image_path(self.references[i])), "seed": self.cfg.seed + i,
                  "eeg_embedding": f"test{i}.npy" if embedding is not None else None}
        atomic_write_json(self.out_dir / "records" / f"test{i}.json", record)  # last: the trial is done


def generation_header(cfg: DictConfig, pipe: DreamDiffusionPipeline, model_info: str, selection: str, n_trials: int,
                      n_in_split: int, dtype: torch.dtype, device) -> dict[str, Any]:
    """What `generation.json` holds: the settings (checked on resume) and what was generated with what."""
    return {
        "settings": generation_settings(cfg),
        "model": model_info,
        "checkpoint_selection": selection,
        "latent_scale": f"{float(pipe.vae.config.scaling_factor):g} from {pipe.latent_scale_source}",
        "image_size": pipe.image_size,
        "n_trials": n_trials,
        "n_trials_in_split": n_in_split,
        "precision": str(dtype).replace("torch.", "") + ("" if pipe.conditioner is None else " (EEG conditioner fp32)"),
        "device": str(device),
        "numerics": numerics_record(device),  # TF32 for the fp32 work, native bf16
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
