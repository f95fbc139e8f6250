"""Ending a multi-process run cleanly.

Under `accelerate launch` the DDP-wrapped model keeps the gloo/NCCL process group alive after `trainer.train()`;
`trainer.end()` unregisters the group but the wrapper still owns it, so its threads live until the interpreter shuts
down, and one of them freeing a tensor then can abort the process ("terminate called without an active exception")
after training has succeeded. `end_training` drops those owners first, then destroys the group.
"""

from __future__ import annotations

import gc

import torch.distributed as dist
from transformers import Trainer


def _process_group_alive() -> bool:
    return dist.is_available() and dist.is_initialized()


def _drop_wrapped_model(trainer: Trainer) -> None:
    """Forget everything that may hold the process group: the accelerator's prepared objects, the wrapped model
    (DDP, DeepSpeed engine) and the optimizer built over it. `trainer.model`, the unwrapped model, stays usable."""
    trainer.accelerator.free_memory()  # empties the accelerator's lists of models, optimizers, schedulers, loaders
    trainer.model_wrapped = trainer.model
    for name in ("deepspeed", "optimizer", "lr_scheduler"):
        if getattr(trainer, name, None) is not None:
            setattr(trainer, name, None)


def end_training(trainer: Trainer) -> None:
    """End `trainer`'s run: wait for every process, free the wrapped model and destroy the process group.

    Call it at the very end of a script, after `train`, `evaluate`, `save_model` and `push_to_hub` (they all talk to
    the other processes); the trainer cannot train afterwards. It also finishes the trackers (`trainer.end()`), and
    is harmless in a single process and when called twice. With DDP, `trainer.model` (unwrapped) stays usable on
    this process. With FSDP the sharded model is `trainer.model` itself and keeps its reference to the group; only
    the group's registration is destroyed.

    Example:

    ```python
    trainer.train()
    trainer.save_model(args.output_dir)
    end_training(trainer)
    ```
    """
    if _process_group_alive():
        dist.barrier()  # no process may lose its peers while another still communicates
    _drop_wrapped_model(trainer)
    gc.collect()  # if the wrapper sits in a reference cycle, free it now rather than at exit
    # Both finish the trackers and destroy the group through `PartialState.destroy_process_group` (accelerate >= 1.4,
    # our floor), which leaves the group of a fork-launched `notebook_launcher` child to its launcher.
    end = getattr(trainer, "end", None)  # `Trainer.end` is recent in transformers
    if callable(end):
        end()
    else:
        trainer.accelerator.end_training()
