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

from ..errors import AdapterError
from ..state import state_of
from ..distributed import is_sharded, reshard_, shard, unwrap, world_size
from ..io import CONFIG_NAME, FORMAT, WEIGHTS_NAME, load_adapters, save_adapters

__all__ = ["PeftcompileTrainer", "is_adapter_checkpoint"]

# file names as transformers.trainer writes them
TRAINING_ARGS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME = "training_args.bin", "optimizer.pt", "scheduler.pt"


def _atomic_torch_save(obj, file: Path) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, file)


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

    def __init__(self, model=None, args: TrainingArguments | None = None, *rest, fsdp2: bool = False,
                 **kwargs) -> None:
        """Same arguments as ``Trainer``, plus ``fsdp2=True``: shard the model with FSDP2 (``fully_shard``
        per decoder layer + root, :func:`peftcompile.distributed.shard`) instead of DDP under torchrun.
        That path needs no accelerate FSDP plugin, so it runs on CPU/gloo as on GPU/nccl."""
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
        if fsdp2 and world_size() < 2:
            raise AdapterError("PeftcompileTrainer(fsdp2=True) needs a process group of several ranks; launch with "
                               "torchrun --nproc-per-node N (or accelerate launch)")
        super().__init__(model, args, *rest, **kwargs)
        if fsdp2 and not is_sharded(self.model):
            shard(self.model, device=self.args.device)
        if is_sharded(self.model) and not self.is_fsdp_enabled:
            # Sharded by us (or by the user with fully_shard): use Trainer's path for models sharded at
            # load time (no DDP wrap, no second sharding, gradient reduction left to FSDP2). This trainer
            # checkpoints their optimizer state itself (_save_optimizer_and_scheduler), so resuming works.
            self.is_distributed_loading_by_transformers = True
        if state_of(self.model) is None:
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
        load_adapters(model, resume_from_checkpoint, is_trainable=True)

    # Optimizer state as one full state dict keyed by parameter name (torch.distributed.checkpoint
    # helpers): written once by rank 0, loadable with any world size, plain or FSDP2-sharded.
    # Accelerate's own FSDP / DeepSpeed paths keep Trainer's formats.
    def _named_optimizer_format(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under AcceleratedOptimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._named_optimizer_format():
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # collective for sharded states: every rank calls, rank 0 receives the full dict
        full = get_optimizer_state_dict(reshard_(unwrap(self.model)), self._torch_optimizer(),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            _atomic_torch_save(full, Path(output_dir) / OPTIMIZER_NAME)
            _atomic_torch_save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._named_optimizer_format():
            return super()._load_optimizer_and_scheduler(checkpoint)
        opt, sch = Path(checkpoint) / OPTIMIZER_NAME, Path(checkpoint) / SCHEDULER_NAME
        if not (opt.is_file() and sch.is_file()):
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state = torch.load(opt, map_location="cpu", weights_only=True)  # every rank reads the full state
        set_optimizer_state_dict(reshard_(unwrap(self.model)), self._torch_optimizer(), optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        self.lr_scheduler.load_state_dict(torch.load(sch, map_location="cpu", weights_only=True))

    def _load_best_model(self) -> None:
        load_adapters(self.model, self.state.best_model_checkpoint)
