"""Hugging Face ``Trainer`` with adapter-only checkpoints, the way PEFT integrates.

``Trainer`` saves ``model.safetensors`` (the whole model) for anything that is not a
``PeftModel``; for a 7B model that is ~14 GB per checkpoint instead of the adapter's
megabytes, and resuming from it cannot restore the adapters. :class:`PeftcompileTrainer`
overrides the three places Trainer reads or writes model weights (``save_model``,
``_load_from_checkpoint``, ``_load_best_model``); everything else (optimizer, scheduler,
RNG, ``trainer_state.json``, rotation, DDP / FSDP2 through accelerate, ``torch_compile``)
is Trainer's own code::

    from peftcompile.integrations.transformers import PeftcompileTrainer
    pc.adapt(model, spec)
    trainer = PeftcompileTrainer(model=model, args=TrainingArguments(..., save_steps=100,
                                 torch_compile=True, torch_compile_backend="peftcompile"), ...)
    trainer.train()                                    # checkpoint-N/adapter_model.safetensors + config
    trainer.train(resume_from_checkpoint=True)          # adapters, optimizer, scheduler and step restored
    trainer.save_model("out")                           # the adapter only

Under ``torchrun`` / ``accelerate launch`` every rank calls ``save_model`` (Trainer does so for
checkpoints): adapter shards are gathered and rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..api import AdapterError, _state
from ..io import CONFIG_NAME, FORMAT, WEIGHTS_NAME, load_adapters, save_adapters

__all__ = ["PeftcompileTrainer", "is_adapter_checkpoint"]

TRAINING_ARGS_NAME = "training_args.bin"  # as transformers.trainer writes it


def is_adapter_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a peftcompile adapter (``adapter_config.json`` in our format)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


class PeftcompileTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold the adapter only.

    The model must be adapted (``peftcompile.adapt`` / ``load_adapters``) before it is passed in.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest, **kwargs) -> None:
        #: True when ``args.torch_compile_backend == "peftcompile"``: accelerate's TorchDynamoPlugin
        #: only accepts its built-in backend names, so this trainer compiles the (wrapped) model
        #: itself in ``compute_loss`` and gives accelerate a copy of ``args`` with compile off.
        self.compile_with_peftcompile = bool(args is not None and args.torch_compile
                                             and args.torch_compile_backend == "peftcompile")
        self._compile_mode = getattr(args, "torch_compile_mode", None)
        if self.compile_with_peftcompile:
            args = copy.copy(args)
            args.torch_compile, args.torch_compile_backend, args.torch_compile_mode = False, None, None
        self._compiled: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        super().__init__(model, args, *rest, **kwargs)
        if _state(self.model) is None:
            raise AdapterError(
                f"PeftcompileTrainer got a {type(self.model).__name__} without peftcompile adapters; call "
                f"peftcompile.adapt(model, spec) (or load_adapters) before building the trainer"
            )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Trainer's loss, through ``torch.compile(model, backend="peftcompile")`` when asked for.

        ``model`` is what Trainer runs (the DDP wrapper under torchrun: dynamo splits the graph
        at DDP's buckets), compiled once and reused."""
        if self.compile_with_peftcompile:
            key = id(model)
            if key not in self._compiled:  # keep `model` alive with its compiled twin: ids stay unique
                self._compiled[key] = (model, torch.compile(model, backend="peftcompile", mode=self._compile_mode))
            model = self._compiled[key][1]
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (and the tokenizer and
        training arguments) to ``output_dir``. Call it on every rank."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # every rank: shards are gathered collectively, rank 0 writes, all learn the outcome
        save_adapters(self.model, output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Adapter save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Adapters from an adapter checkpoint (onto shards if the model is sharded)."""
        model = model if model is not None else self.model
        if not is_adapter_checkpoint(resume_from_checkpoint):
            raise AdapterError(
                f"cannot resume from {resume_from_checkpoint}: it has no peftcompile {CONFIG_NAME} + {WEIGHTS_NAME} "
                f"(PeftcompileTrainer writes those at every save_steps); pass a checkpoint-N folder it wrote"
            )
        load_adapters(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapters(self.model, self.state.best_model_checkpoint)
