"""The three stages in one registry: each stage's config schema, defaults file, entry script and runner.

The stage scripts in `code/` are `STAGES[name].main(argv)`; the demo, the paper-table runner and the
tests use the same entries, so there is one place that says how a stage is configured and run:

    from dreamdiffusion.stages import STAGES
    STAGES["stage2"].main(["fidelity=authors_code", "epochs=10"])
    cfg = STAGES["stage3"].build_config(files, overrides)   # what the script would run, without running it
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .config import REPO_ROOT, Stage1Config, Stage2Config, Stage3Config, build_config, parse_args


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    schema: type
    defaults: str  # the stage's defaults file, relative to the repository root
    script: str  # the entry script, relative to the repository root
    runner: str  # "module:function" taking the config

    @property
    def defaults_path(self) -> Path:
        return REPO_ROOT / self.defaults

    @property
    def script_path(self) -> Path:
        return REPO_ROOT / self.script

    def build_config(self, config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
        """The config the script would run with these `--config` files and `key=value` overrides."""
        return build_config(self.schema, config_files, overrides, default_file=self.defaults_path)

    def run(self, cfg: DictConfig) -> Any:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)(cfg)

    def main(self, argv: Sequence[str] | None = None) -> Any:
        """The command line: `[--config FILE]... [--print-config] [key=value]...`, then the run."""
        cfg = parse_args(self.schema, argv, default_file=self.defaults_path, description=self.title,
                         prog=Path(self.script).name)
        if cfg is None:  # --print-config
            return None
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return self.run(cfg)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("stage1", "Stage 1: pretrain the EEG masked autoencoder on unpaired EEG", Stage1Config,
              "configs/stage1_pretrain.yaml", "code/stage1_pretrain_eeg.py", "dreamdiffusion.pretrain:run_pretraining"),
        Stage("stage2", "Stage 2: fine-tune Stable Diffusion 1.5 on EEG with CLIP alignment", Stage2Config,
              "configs/stage2_finetune.yaml", "code/stage2_finetune_sd.py", "dreamdiffusion.finetune:run_finetuning"),
        Stage("stage3", "Stage 3: generate images from EEG and score them with the paper's protocol", Stage3Config,
              "configs/stage3_eval.yaml", "code/stage3_generate_eval.py", "dreamdiffusion.evaluate:run_stage3"),
    )
}
