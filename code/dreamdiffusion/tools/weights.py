"""Fetch the pretrained weights a real run needs into pretrains/, or say exactly what to place where.

    python code/download_weights.py                 # everything (about 13 GB), when online
    python code/download_weights.py --only sd15 --only classifier
    python code/download_weights.py --check         # offline: which files are present / missing

Files (the paths are the defaults of configs/*.yaml and dreamdiffusion/config.py):
  sd15        pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt      Stage2Config.sd_path, Stage3Config.oracle_sd_path
  clip        pretrains/clip-vit-large-patch14/                     Stage2Config.clip_path, Stage3Config.clip_path
  classifier  pretrains/classifiers/vit_h_14_swag_e2e_v1.pth        Stage3Config.classifier_weights
  lpips       pretrains/metrics/alexnet-owt-7be5be79.pth            Stage3Config.lpips_weights (optional)
  fid         pretrains/metrics/weights-inception-2015-12-05-6726825d.pth   Stage3Config.fid_feature_weights (optional)

Verification: Hugging Face files against the size and SHA-256 that the hub publishes for them (read
at download time); torchvision files against the SHA-256 prefix in their names (torch.hub's rule).
The FID Inception file's name carries a hash too, but we have not confirmed it is a SHA-256 prefix,
so its digest is only recorded. Every verified download is recorded in pretrains/manifest.json
(size, SHA-256, source), which `--check` then compares the local files against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamdiffusion.config import REPO_ROOT
from dreamdiffusion.core.compat import is_offline_mode
from dreamdiffusion.core.errors import CheckpointError, ConfigError, DataError
from dreamdiffusion.core.files import atomic_write_json


@dataclass(frozen=True)
class Weight:
    key: str
    path: str  # relative to the repository root
    source: str  # "hf:<repo>" or a URL
    files: tuple[str, ...] = ()  # for a hub folder: the files to fetch
    hash_prefix: str | None = None  # torchvision's SHA-256 prefix (from the file name)
    what: str = ""


SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the SD1.5 weights as runwayml published them
CLIP_REPO = "openai/clip-vit-large-patch14"
WEIGHTS = {
    w.key: w
    for w in (
        Weight("sd15", "pretrains/stable-diffusion-v1-5/v1-5-pruned.ckpt", f"hf:{SD15_REPO}",
               ("v1-5-pruned.ckpt",), what="Stable Diffusion 1.5, CompVis single file (non-EMA + EMA weights)"),
        Weight("clip", "pretrains/clip-vit-large-patch14", f"hf:{CLIP_REPO}",
               ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"),
               what="CLIP ViT-L/14 (image target of stage 2; text tower for the class-name oracle)"),
        Weight("classifier", "pretrains/classifiers/vit_h_14_swag_e2e_v1.pth",
               "https://download.pytorch.org/models/vit_h_14_swag-80465313.pth", hash_prefix="80465313",
               what="torchvision ViT-H/14 IMAGENET1K_SWAG_E2E_V1 (the paper's 50-way classifier)"),
        Weight("lpips", "pretrains/metrics/alexnet-owt-7be5be79.pth",
               "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", hash_prefix="7be5be79",
               what="torchvision AlexNet (LPIPS backbone; optional metric)"),
        Weight("fid", "pretrains/metrics/weights-inception-2015-12-05-6726825d.pth",
               "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth",
               what="FID Inception (torch-fidelity's inception-v3-compat; needs `pip install torch-fidelity`)"),
        # the reconstruction metrics of dreamdiffusion.evaluation.recon (THINGS-EEG2; alexnet2/5 use the `lpips` file)
        Weight("inception", "pretrains/metrics/inception_v3_google-0cc3c7bd.pth",
               "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", hash_prefix="0cc3c7bd",
               what="torchvision Inception v3 (two-way identification, stage 3 inception_weights; optional)"),
        Weight("effnet", "pretrains/metrics/efficientnet_b1-c27df63c.pth",
               "https://download.pytorch.org/models/efficientnet_b1-c27df63c.pth", hash_prefix="c27df63c",
               what="torchvision EfficientNet-B1 (EffNet distance, stage 3 effnet_weights; optional)"),
        Weight("swav", "pretrains/metrics/swav_800ep_pretrain.pth.tar",
               "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
               what="SwAV ResNet-50 (SwAV distance, stage 3 swav_weights; optional; SHA-256 recorded only)"),
    )
}
MANIFEST = "pretrains/manifest.json"


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _local_files(w: Weight, root: Path) -> list[Path]:
    base = root / w.path
    return [base / f for f in w.files] if w.source.startswith("hf:") and len(w.files) > 1 else [base]


def instructions(w: Weight, root: Path) -> str:
    where = root / w.path
    if w.source.startswith("hf:"):
        repo = w.source[3:]
        if len(w.files) > 1:
            return (f"{w.key}: {w.what}\n    put the files {', '.join(w.files)} of https://huggingface.co/{repo}\n"
                    f"    into {where}/  (e.g. `huggingface-cli download {repo} --local-dir {where}`)")
        return (f"{w.key}: {w.what}\n    put {w.files[0]} of https://huggingface.co/{repo} at {where}")
    return f"{w.key}: {w.what}\n    download {w.source}\n    and save it as {where}"


def _hub_download(w: Weight, root: Path) -> dict[str, dict]:
    # imported here, not at the top - the hub client's network half, only when downloading
    from huggingface_hub import HfApi, hf_hub_download

    repo = w.source[3:]
    target = root / w.path
    folder = target if len(w.files) > 1 else target.parent
    folder.mkdir(parents=True, exist_ok=True)
    infos = {i.path: i for i in HfApi().get_paths_info(repo, list(w.files), expand=True)}
    records = {}
    for name in w.files:
        local = Path(hf_hub_download(repo, name, local_dir=folder))
        info = infos.get(name)
        size = local.stat().st_size
        if info is not None and info.size is not None and size != info.size:
            raise CheckpointError(f"{local}: {size} bytes, the hub says {info.size}; delete it and retry")
        digest = sha256(local)
        lfs_sha = getattr(getattr(info, "lfs", None), "sha256", None)
        if lfs_sha and digest != lfs_sha:
            raise CheckpointError(f"{local}: SHA-256 {digest} differs from the hub's {lfs_sha}; delete it and retry")
        records[str(local.relative_to(root))] = {"bytes": size, "sha256": digest, "source": f"{repo}/{name}",
                                                 "verified": "hub size + sha256" if lfs_sha else "hub size"}
    return records


def _url_download(w: Weight, root: Path) -> dict[str, dict]:

    target = root / w.path
    target.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub checks the SHA-256 prefix and writes to a temporary file first
    torch.hub.download_url_to_file(w.source, str(target), hash_prefix=w.hash_prefix, progress=True)
    return {w.path: {"bytes": target.stat().st_size, "sha256": sha256(target), "source": w.source,
                     "verified": f"sha256 prefix {w.hash_prefix}" if w.hash_prefix else "not verified (recorded)"}}


def read_manifest(path: Path) -> dict[str, Any]:
    """The download manifest (file -> size, sha256, source), {} when there is none yet."""
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it and fetch again to rebuild it") from err
    if not isinstance(manifest, dict):
        raise DataError(f"{path} must be a JSON object (file -> record), got a {type(manifest).__name__}")
    return manifest


def check(keys: Sequence[str], root: Path) -> list[str]:
    """Print the state of each file; returns the keys with something missing or mismatched."""
    manifest_path = root / MANIFEST
    manifest = read_manifest(manifest_path)
    bad = []
    for key in keys:
        w = WEIGHTS[key]
        problems = []
        for f in _local_files(w, root):
            rel = str(f.relative_to(root))
            if not f.is_file():
                problems.append(f"missing {rel}")
            elif rel in manifest and manifest[rel]["bytes"] != f.stat().st_size:
                problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {manifest[rel]['bytes']}")
        print(f"[{'ok' if not problems else 'MISSING'}] {key}: {root / w.path}")
        if problems:
            bad.append(key)
            print("    " + "; ".join(problems))
            print("    " + instructions(w, root).replace("\n", "\n    "))
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of code/download_weights.py."""

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(WEIGHTS), help="fetch only these (repeatable)")
    parser.add_argument("--check", action="store_true", help="do not download; report what is present or missing")
    parser.add_argument("--root", default=str(REPO_ROOT), help="repository root the paths are relative to")
    args = parser.parse_args(list(argv) if argv is not None else None)
    root = Path(args.root)
    keys = args.only or list(WEIGHTS)
    if args.check:
        bad = check(keys, root)
        if bad:
            raise ConfigError(f"missing or mismatched weights: {', '.join(bad)} (see the instructions above)")
        return 0
    if is_offline_mode():
        print("Offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set): nothing is downloaded.")
        bad = check(keys, root)
        if bad:
            raise ConfigError(f"weights missing offline: {', '.join(bad)}")
        return 0
    manifest_path = root / MANIFEST
    manifest = read_manifest(manifest_path)
    for key in keys:
        w = WEIGHTS[key]
        print(f"fetching {key}: {w.what}")
        try:
            records = _hub_download(w, root) if w.source.startswith("hf:") else _url_download(w, root)
        except CheckpointError:
            raise
        except Exception as err:  # network errors of either client
            raise CheckpointError(f"could not download {key} ({err}); place it by hand:\n"
                                  + instructions(w, root)) from err
        manifest.update(records)
        atomic_write_json(manifest_path, manifest)
        for rel, rec in records.items():
            print(f"    {rel}: {rec['bytes']:,} bytes, sha256 {rec['sha256']} ({rec['verified']})")
    return 0

