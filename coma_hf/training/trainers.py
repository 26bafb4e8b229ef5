"""The trainers of both stages, and what they share.

`CoMaCompressionTrainer` (stage 1) is a thin `transformers.Trainer` subclass (not trl's `SFTTrainer`: its
chat-template tokenization and completion masks would duplicate what `CoMaProcessor` already renders, compression
tokens included). The loss is the model's own `forward` loss, which Trainer normalises through `num_items_in_batch`;
everything `TrainingArguments` offers (bf16, accumulation, gradient checkpointing, evaluation, saving, resuming,
logging) is Trainer's. What the subclass adds: the collator by default, raw rows kept (`remove_unused_columns` off),
tokens/s logged, a loss-only evaluation, and the `objective` (`coma_hf.training.distillation.OBJECTIVES`): the
cross-entropy, token-level KL to a frozen teacher that reads the input directly (through trl's chunked divergence),
or their weighted sum.

`CoMaContrastiveTrainer` (stage 2) is a thin `SentenceTransformerTrainer` subclass; the loss is
`coma_hf.training.losses.CoMaContrastiveLoss`.

Both (`_CoMaTrainerMixin`): batch sizes logged, resuming from the last complete checkpoint, first/last step losses,
the non-finite loss guard, and `save_merged`, the one merge-and-save that ends either stage with a plain CoMa
checkpoint and its card. The collators are in `coma_hf.training.collators`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformerTrainer
from transformers import Trainer, TrainerCallback

from ..configuration_coma import POOLING_MODES
from ..constants_coma import IGNORE_INDEX, BatchKey
from ..hub import save_checkpoint, write_model_card
from ..masking import check_trainable_attention
from ..storage import safetensors_damage
from .collators import CoMaCompressionCollator, CoMaContrastiveCollator
from .distillation import answer_kl_sum, check_objective, frozen_teacher, uses_teacher
from .losses import check_loss_normalization, labelled_rows, per_sample_token_means
from .peft import NO_SHARDED_STAGE2, merge_lora, shards_parameters

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the batch's sample ids."""


NONFINITE_LOSS_MODES = ("stop", "skip")


class _CoMaTrainerMixin:
    """What both stages' trainers add to Trainer's loop: the batch sizes logged at the start, resuming from the last
    *complete* checkpoint, the loss of the first and the last optimizer step (`first_step_loss`, `last_step_loss`;
    Trainer logs only window means, which a run shorter than `logging_steps` never fills), and a guard against
    non-finite losses (`on_nonfinite_loss`: "stop" raises `NonFiniteLossError`; "skip" gives the batch zero gradients,
    counts it in `skipped_batches` and goes on), the rows the first optimizer step trained on over all processes
    (`first_step_rows`: the global batch as it happened, next to the arithmetic one `describe_batch_sizes` logs), and
    `save_merged`."""

    stage_name = "training"
    training_stage: int | None = None  # what `CoMaConfig.training_stage` records once this trainer has trained

    def _init_guard(self, on_nonfinite_loss: str) -> None:
        if on_nonfinite_loss not in NONFINITE_LOSS_MODES:
            raise ValueError(f"on_nonfinite_loss must be one of {NONFINITE_LOSS_MODES}, got {on_nonfinite_loss!r}")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_batches = []  # (step, sample ids) of the batches skipped for a non-finite loss
        self.first_step_loss: float | None = None  # the first optimizer step of this `train()`, mean over processes
        self.last_step_loss: float | None = None
        self.loss_steps: tuple[int, int] | None = None  # which steps those are (a resumed run starts after 1)
        self._step_losses: dict[int, torch.Tensor] = {}  # optimizer step → summed micro-batch losses, first and last
        self.first_step_rows: int | None = None  # rows of the first optimizer step, all processes together
        self._first_step_rows = 0  # this process's, counted as its micro-batches pass

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """As `Trainer.train`; `resume_from_checkpoint=True` (or "last" / "true" from a command line) resumes from
        the newest checkpoint in `output_dir` that was written to the end."""
        logger.info("%s: %s", self.stage_name, describe_batch_sizes(self.args))
        if resume_from_checkpoint in (True, "last", "true", "True"):
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            logger.info("Resuming from %s", resume_from_checkpoint or "the start (no complete checkpoint yet)")
        self._step_losses, self._first_step_rows = {}, 0
        if self.model is not None:  # every checkpoint of this run says which stage its weights were last trained by
            coma = self._coma_model_and_processor()[0]
            check_trainable_attention(coma.config.get_text_config()._attn_implementation, self.args.device)
            coma.config.training_stage = self.training_stage
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._record_first_and_last_step_loss()
        return output

    def training_step(self, model, inputs, *args, **kwargs):
        """As Trainer's; the micro-batch losses of one optimizer step are summed (each is already scaled for
        accumulation, as Trainer's logged loss), kept on the device for the first and the latest step only; the rows
        of the first step's micro-batches are counted."""
        rows = batch_rows(inputs)  # before the loss pops the sample ids
        loss = super().training_step(model, inputs, *args, **kwargs)
        step = self.state.global_step + 1  # Trainer counts a step once its optimizer step is done
        if step not in self._step_losses:
            first = min(self._step_losses, default=step)
            self._step_losses = {key: value for key, value in self._step_losses.items() if key == first}
            self._step_losses[step] = torch.zeros((), device=loss.device)
        self._step_losses[step] = self._step_losses[step] + loss.detach().float()
        if step == min(self._step_losses):
            self._first_step_rows += rows
        return loss

    def _record_first_and_last_step_loss(self) -> None:
        """`first_step_loss`, `last_step_loss` and `loss_steps` from the kept step sums, averaged over processes."""
        if not self._step_losses:
            return
        first, last = min(self._step_losses), max(self._step_losses)
        self.loss_steps = (first, last)
        pair = torch.stack([self._step_losses[first], self._step_losses[last]])
        pair = self.accelerator.reduce(pair, reduction="mean")  # every process gets here: collectives at the end
        self.first_step_loss, self.last_step_loss = (float(value) for value in pair)
        rows = torch.tensor(self._first_step_rows, device=pair.device)
        self.first_step_rows = int(self.accelerator.reduce(rows, reduction="sum"))

    def _checked_loss(self, model, result, sample_ids):
        """`result` (a loss, or `(loss, outputs)`) if its loss is finite; otherwise stop, or a zero loss that still
        touches every trainable parameter (so data-parallel gradient averaging sees the same parameters)."""
        loss = result[0] if isinstance(result, tuple) else result
        if not model.training or bool(torch.isfinite(loss.detach()).all()):
            return result
        where = f"step {self.state.global_step + 1}, samples {sample_ids}"
        if self.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"{self.stage_name}: the loss is {loss.detach().float().item()} at {where} "
                "(on_nonfinite_loss='skip' skips such batches)"
            )
        logger.warning("%s: skipping a batch whose loss is %s at %s", self.stage_name, loss.detach().item(), where)
        self.skipped_batches.append({"step": self.state.global_step + 1, "samples": sample_ids})
        zero = sum((parameter * 0).sum() for parameter in model.parameters() if parameter.requires_grad)
        return (zero, *result[1:]) if isinstance(result, tuple) else zero

    def save_merged(self, output_dir: str) -> Any:
        """Merge any LoRA into the weights and save a plain CoMa checkpoint with its processor and card
        (`coma_hf.hub.save_checkpoint`, in the main process only); returns the merged `CoMaModel`.

        With sharded parameters (FSDP, ZeRO-3) there are no full weights to merge into: a LoRA is refused, and
        all weights are saved by Trainer, which gathers the shards in the main process (stage 1 only; stage 2 saves
        through sentence-transformers, which does not gather them, see `check_sharding`). No process then holds a
        usable model (a sharded one runs only through its `forward`), so every process frees the trained model and
        its optimizer state (`_release_training_state`; the trainer cannot train again), then loads the saved
        checkpoint back onto its device in the run's precision (`reload_dtype`) and returns that."""
        model, processor = self._coma_model_and_processor()
        if shards_parameters(self.args):
            if hasattr(model, "peft_config"):
                raise ValueError(
                    "A LoRA cannot be merged into sharded (FSDP / ZeRO-3) weights; save the adapter "
                    "with `trainer.save_model()`, or train LoRA recipes with DDP or ZeRO-2."
                )
            self._save_gathered(output_dir)
            self.accelerator.wait_for_everyone()  # the main process has written the checkpoint
            model_class = unsharded_class(model)
            del model  # every process would otherwise hold its shards and a full copy at once
            self._release_training_state()
            saved = model_class.from_pretrained(output_dir, dtype=reload_dtype(self.args)).to(self.args.device)
            if processor is not None:
                saved.processor = processor
            return saved
        merged = merge_lora(model)
        self._prepare_merged(merged)
        self._use_merged(merged)
        if processor is not None:
            merged.processor = processor
        if self.args.should_save:
            save_checkpoint(merged, output_dir)
        return merged

    def save_merged_copy(self, output_dir: str) -> None:
        """Save what `save_merged` would, from a copy: training goes on untouched (e.g. to keep the best checkpoint
        of a run as it trains). Not with sharded parameters, which no process holds in full."""
        if shards_parameters(self.args):
            raise ValueError("save_merged_copy needs unsharded weights (DDP, ZeRO-2 or one process)")
        model, processor = self._coma_model_and_processor()
        merged = merge_lora(copy.deepcopy(model))
        self._prepare_merged(merged)
        if processor is not None:
            merged.processor = processor
        if self.args.should_save:
            save_checkpoint(merged, output_dir)

    def _release_training_state(self) -> None:
        """Drop every reference this trainer, its callbacks and its accelerator hold to the trained model, its
        optimizer and scheduler, then collect them and empty the device cache (accelerate's `free_memory`). The
        trainer cannot train or evaluate afterwards."""
        self.model = self.model_wrapped = self.deepspeed = None
        self.optimizer = self.lr_scheduler = None
        handler = self.callback_handler  # Trainer hands these to its callbacks too
        handler.model = handler.optimizer = handler.lr_scheduler = None
        self.accelerator.free_memory()

    def _coma_model_and_processor(self) -> tuple[Any, Any]:
        """The `CoMaModel` being trained (a `PeftModel` around it with LoRA) and the processor it is saved with."""
        raise NotImplementedError

    def _prepare_merged(self, merged) -> None:
        """Set what the saved checkpoint should record that training did not use (stage 2: the evaluation pooling)."""

    def _use_merged(self, merged) -> None:
        """Put the merged model where the adapter model was, where the caller goes on using it."""

    def _save_gathered(self, output_dir: str) -> None:
        """Save all weights of a run whose parameters are sharded."""
        raise ValueError(NO_SHARDED_STAGE2)


def reload_dtype(args) -> torch.dtype | str:
    """The dtype a checkpoint saved after training is loaded back in: bfloat16 for a bf16 run (whose sharded master
    weights, and so the saved ones, are float32: twice the memory, for no difference the run's own forward makes),
    else the saved dtype ("auto")."""
    return torch.bfloat16 if args.bf16 else "auto"


def unsharded_class(model: torch.nn.Module) -> type:
    """The class `model` was built as. FSDP2's `fully_shard` swaps a module's class, in place, for a subclass it
    creates (`FSDPCoMaModel`, defined in torch's own module); that subclass comes first in the MRO."""
    from torch.distributed.fsdp import FSDPModule

    return next(klass for klass in type(model).__mro__ if not issubclass(klass, FSDPModule))


@contextlib.contextmanager
def restored_class(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` as its own class (`unsharded_class`) for the duration of the block, for saving: `save_pretrained` of
    FSDP2's subclass would record torch's module as the checkpoint's `auto_map` class and copy torch's FSDP files into
    it instead of the remote code, so that the checkpoint no longer loads. Weights are not touched (Trainer passes
    the gathered state dict)."""
    swapped = type(model)
    model.__class__ = unsharded_class(model)
    try:
        yield model
    finally:
        model.__class__ = swapped


def share_tied_weights(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state_dict` with each weight that `model` ties to another (`all_tied_weights_keys`, e.g. a tied LM head) made
    the very tensor of the weight it is tied to. A state dict gathered from shards holds a separate copy per name,
    which `save_pretrained` would write twice (it drops a tied name only when both share storage)."""
    for tied, source in getattr(model, "all_tied_weights_keys", {}).items():
        if tied in state_dict and source in state_dict and model.get_parameter(tied) is model.get_parameter(source):
            state_dict[tied] = state_dict[source]
    return state_dict


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that was written to the end and is still whole, or None.

    Trainer writes `trainer_state.json` last (after weights, optimizer, scheduler and RNG states), so a checkpoint
    without a readable one was cut short by a kill; one whose safetensors files storage damaged since (a full disk, an
    interrupted copy: `coma_hf.storage.safetensors_damage`, from the headers alone) would crash the resume. Either is
    skipped with a warning, and the one before it is used.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = [path for path in folder.iterdir() if path.is_dir() and re.fullmatch(r"checkpoint-\d+", path.name)]
    for path in sorted(candidates, key=lambda path: int(path.name.split("-")[1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("Skipping %s: written only in part (no readable trainer_state.json)", path)
            continue
        if (damage := _weights_damage(path)) is None:
            return str(path)
        logger.warning("Skipping %s: %s", path, damage)
    return None


def _weights_damage(checkpoint: Path) -> str | None:
    """Which safetensors file of `checkpoint` is damaged and how (the first found), or None when all are whole."""
    for weights in sorted(checkpoint.rglob("*.safetensors")):
        if (damage := safetensors_damage(weights)) is not None:
            return f"{weights.relative_to(checkpoint).as_posix()} is damaged ({damage})"
    return None


class CoMaCompressionTrainer(_CoMaTrainerMixin, Trainer):
    """`Trainer` for CoMa's compression pre-training (stage 1).

    Args: as `Trainer`, plus `image_root` (resolves relative image paths in the rows), `max_turns` (QA turns kept
    per conversation; all by default), `on_nonfinite_loss` ("stop" or "skip", see `_CoMaTrainerMixin`) and the
    objective (`coma_hf.training.distillation`): `objective` ("ce", "kl" or "ce+kl"), `kl_weight` (the KL term's
    weight in "ce+kl": loss = ce + kl_weight · kl) and `teacher` (the frozen teacher of the KL objectives; by default
    `frozen_teacher(model)`, a copy of `model` as passed, which must then not carry a LoRA yet). Pass the
    `CoMaProcessor` as `processing_class`: it renders the batches and is saved with every checkpoint.
    `data_collator` defaults to a `CoMaCompressionCollator` (labels as the processor's `loss_on` places them).
    `loss_normalization` (`coma_hf.training.losses.LOSS_NORMALIZATIONS`): "tokens" (default; the model's loss, the
    summed token cross-entropy over the global batch's label tokens) or "per_sample_mean" (the released code's: each
    sample's mean token cross-entropy, averaged over the samples of the global batch — every micro-batch and process
    together —; for the "ce" objective).

    With a KL objective the logs carry the two terms of the loss as well (`ce`, `kl`: means over the logged steps,
    each normalised by the label tokens as the loss is).
    """

    stage_name = "Stage 1"
    training_stage = 1

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        processing_class=None,
        image_root=None,
        max_turns=None,
        on_nonfinite_loss: str = "stop",
        objective: str = "ce",
        kl_weight: float = 1.0,
        teacher=None,
        loss_normalization: str = "tokens",
        **kwargs,
    ):
        self._init_guard(on_nonfinite_loss)
        check_objective(objective, kl_weight)
        self.loss_normalization = check_loss_normalization(loss_normalization)
        if self.loss_normalization != "tokens" and objective != "ce":
            raise ValueError(
                f"loss_normalization {loss_normalization!r} is for the 'ce' objective; {objective!r} normalises by "
                "the label tokens"
            )
        self.objective, self.kl_weight = objective, kl_weight
        self.teacher = None
        if uses_teacher(objective):
            if teacher is None and model is None:
                raise ValueError(
                    f"objective {objective!r} needs the model (its frozen copy is the teacher) or `teacher`"
                )
            self.teacher = frozen_teacher(model) if teacher is None else teacher.requires_grad_(False).eval()
        elif teacher is not None:
            raise ValueError(f"A teacher is for the KL objectives; objective is {objective!r}")
        self._objective_terms: dict[str, list[torch.Tensor]] = {}  # "ce" / "kl" per micro-batch since the last log
        if args is not None:
            if args.remove_unused_columns:  # the collator needs the raw rows (images, conversations)
                args.remove_unused_columns = False
            if args.include_num_input_tokens_seen in (False, "no"):  # Trainer then logs tokens/s itself
                args.include_num_input_tokens_seen = "non_padding"
        if data_collator is None:
            if processing_class is None:
                raise ValueError("Pass the CoMaProcessor as `processing_class` (or a `data_collator`).")
            data_collator = CoMaCompressionCollator(processing_class, image_root, max_turns)
        super().__init__(
            model=model, args=args, data_collator=data_collator, processing_class=processing_class, **kwargs
        )
        self.dropped_turns = 0  # QA turns cut by max_length, summed over the batches this process trained on

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        dropped = inputs.pop(BatchKey.DROPPED_TURNS, None)
        sample_ids = inputs.pop(BatchKey.SAMPLE_IDS, None)
        if dropped is not None and model.training:
            self.dropped_turns += int(dropped)
        if self.teacher is not None:
            result = self._distillation_loss(model, inputs, return_outputs, num_items_in_batch)
        elif self.loss_normalization == "per_sample_mean":
            result = self._per_sample_mean_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._checked_loss(model, result, sample_ids)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """As Trainer's; with "per_sample_mean" the count that normalises the loss is of the samples with a label
        token in the optimizer step's micro-batches, summed over processes and divided, as Trainer divides its count of
        label tokens, by the ranks that share one batch (tensor, context and sequence parallel)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_normalization == "per_sample_mean" and num_items_in_batch is not None:
            count = sum(labelled_rows(batch[BatchKey.LABELS]).sum() for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                count = self.accelerator.gather(count).sum()
            # ranks that share one batch counted it once each: Trainer's divisor for its token count (5.24)
            num_items_in_batch = count / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
        return batch_samples, num_items_in_batch

    def _per_sample_mean_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        """The "per_sample_mean" loss of one micro-batch: its samples' mean token losses summed, divided by the
        samples of the global batch (`num_items_in_batch`, see `get_batch_samples`; this batch's when Trainer gives
        none) and scaled as Trainer scales a loss normalised over all processes (`_across_devices_scale`)."""
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        labels = inputs[BatchKey.LABELS]
        outputs = model(
            **{key: value for key, value in inputs.items() if key != BatchKey.LABELS}, output_last_hidden_state=True
        )
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        means = per_sample_token_means(outputs.last_hidden_state, labels, head)
        count = num_items_in_batch if num_items_in_batch is not None else labelled_rows(labels).sum()
        count = torch.as_tensor(count, device=means.device, dtype=torch.float32).clamp(min=1)
        loss = means.sum() / count * self._across_devices_scale(num_items_in_batch)
        outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

    def _across_devices_scale(self, num_items_in_batch) -> int:
        """What Trainer multiplies a loss by when it was normalised by a count over all processes (DDP then averages
        the gradients, which would otherwise divide the sum by the process count once more); tensor-parallel ranks
        share one batch, so the processes are counted per tensor-parallel group."""
        # Trainer's private rule (`Trainer.compute_loss`), as transformers 5.24 writes it.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def _distillation_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        """The "kl" / "ce+kl" loss of one micro-batch, normalised as Trainer normalises the model's own loss: by
        `num_items_in_batch` (label tokens of the global batch) when the model takes it, else by this batch's label
        tokens; scaled by the process count when Trainer averages tokens across devices (DDP then averages
        gradients)."""
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        labels = inputs[BatchKey.LABELS]
        with_ce = self.objective == "ce+kl"
        student_inputs = {key: value for key, value in inputs.items() if with_ce or key != BatchKey.LABELS}
        if with_ce and num_items_in_batch is not None:
            student_inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**student_inputs, output_last_hidden_state=True)
        hidden = outputs.last_hidden_state
        if next(self.teacher.parameters()).device != hidden.device:
            self.teacher.to(hidden.device)
        student_weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
        count = torch.as_tensor(count, device=hidden.device, dtype=torch.float32).clamp(min=1)
        kl = answer_kl_sum(hidden, labels, student_weight, self.teacher, inputs) / count
        scale = self._across_devices_scale(num_items_in_batch)
        loss = (outputs.loss + self.kl_weight * kl if with_ce else kl) * scale
        if model.training:
            self._objective_terms.setdefault("kl", []).append(kl.detach() * scale)
            if with_ce:
                self._objective_terms.setdefault("ce", []).append(outputs.loss.detach() * scale)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """As Trainer's; a training log of a KL objective also carries its terms (`kl`, and `ce` for "ce+kl"), each
        summed over a step's micro-batches and averaged over the steps since the last log (this process's)."""
        if "loss" in logs and self._objective_terms:
            steps = max(1, self.args.gradient_accumulation_steps)
            for name, values in self._objective_terms.items():
                logs[name] = round(float(torch.stack(values).sum()) * steps / len(values), 4)
            self._objective_terms = {}
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the loss only; embeddings are not gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _coma_model_and_processor(self) -> tuple[Any, Any]:
        return self.accelerator.unwrap_model(self.model), self.processing_class

    def _release_training_state(self) -> None:
        """As the mixin's, and the KL objectives' frozen teacher (a whole, unsharded model on every process)."""
        self.teacher = None
        super()._release_training_state()

    def _save_gathered(self, output_dir: str) -> None:
        self.save_model(output_dir)  # Trainer gathers the shards in the main process
        if self.args.should_save:
            write_model_card(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """As Trainer's (the final save of a sharded run and every `checkpoint-N`), with the model saved as its own
        class while FSDP2 has swapped it (see `restored_class`), and a gathered state dict's tied weights shared again
        (see `share_tied_weights`), so that the checkpoint is the one an unsharded run saves."""
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:
            state_dict = share_tied_weights(state_dict, model)
        with restored_class(model):
            super()._save(output_dir, state_dict)


class CoMaContrastiveTrainer(_CoMaTrainerMixin, SentenceTransformerTrainer):
    """`SentenceTransformerTrainer` for CoMa's contrastive matching (stage 2).

    Differences: the data collator defaults to `CoMaContrastiveCollator`, sentence-transformers' automatic model
    card is not tracked (it tokenizes raw dataset columns for statistics, which split text and image here; CoMa
    checkpoints carry their own card), `on_nonfinite_loss` ("stop" or "skip", see `_CoMaTrainerMixin`) and
    `eval_pooling` (`"mean"` / `"last"`, default: the model's pooling): the pooling of every evaluation during
    training and of the checkpoint `save_merged` writes — training itself pools as the model's config says (the
    released code trains on the mean of the K states and evaluates on the last one).
    """

    stage_name = "Stage 2"
    training_stage = 2

    def __init__(self, *args, on_nonfinite_loss: str = "stop", eval_pooling: str | None = None, **kwargs):
        self._init_guard(on_nonfinite_loss)
        if eval_pooling is not None and eval_pooling not in POOLING_MODES:
            raise ValueError(f"eval_pooling must be one of {POOLING_MODES}, got {eval_pooling!r}")
        self.eval_pooling = eval_pooling
        super().__init__(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        """As sentence-transformers' (loss and evaluator), with the embeddings pooled by `eval_pooling`."""
        with pooling_as(self._coma_model_and_processor()[0].config, self.eval_pooling):
            return super().evaluation_loop(*args, **kwargs)

    def _prepare_merged(self, merged) -> None:
        if self.eval_pooling is not None:
            merged.config.pooling = self.eval_pooling

    def compute_loss(self, model, inputs, *args, **kwargs):
        sample_ids = inputs.pop(BatchKey.SAMPLE_IDS, None)
        return self._checked_loss(model, super().compute_loss(model, inputs, *args, **kwargs), sample_ids)

    def get_data_collator(self, model, args, processing_class=None) -> CoMaContrastiveCollator:
        return CoMaContrastiveCollator(
            preprocess_fn=model.preprocess, router_mapping=args.router_mapping, prompts=args.prompts
        )

    def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
        pass

    def _coma_model_and_processor(self) -> tuple[Any, Any]:
        transformer = self.accelerator.unwrap_model(self.model)[0]
        return transformer.model, transformer.processor

    def _use_merged(self, merged) -> None:
        self.accelerator.unwrap_model(self.model)[0].model = merged


@contextlib.contextmanager
def pooling_as(config, pooling: str | None):
    """Within the block, `config.pooling` is `pooling` (unchanged when `None`); restored afterwards."""
    previous = config.pooling
    config.pooling = pooling or previous
    try:
        yield
    finally:
        config.pooling = previous


def batch_rows(inputs: dict[str, Any]) -> int:
    """Rows in a collated batch of either stage: its sample ids when it carries them, else the first `*input_ids`
    tensor's rows."""
    if BatchKey.SAMPLE_IDS in inputs:
        return len(inputs[BatchKey.SAMPLE_IDS])
    key = next(key for key in inputs if key.endswith(BatchKey.INPUT_IDS))
    return len(inputs[key])


def describe_batch_sizes(args) -> str:
    """'per-device batch 2 × accumulation 4 × 8 processes = global batch 64' for these `TrainingArguments`.

    The global batch is what one optimizer step sees; with `gather_across_devices`, each stage-2 anchor is scored
    against the candidates of per-device batch × processes rows. Both trainers log it at the start, since per-device
    and global sizes are easy to confuse once `accelerate launch` multiplies them."""
    per_device, accumulation, processes = (
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
    )
    return (
        f"per-device batch {per_device} × accumulation {accumulation} × {processes} processes = global batch "
        f"{per_device * accumulation * processes}"
    )


class KeepBestCheckpoint(TrainerCallback):
    """After each evaluation, save a merged copy of the model (`save_merged_copy`) to `output_dir` when `metric` (an
    evaluator metric, e.g. `dev_IND_precision@1`; Trainer's `eval_` prefix optional) is higher than at every earlier
    evaluation. `best` holds `{"metric", "step", "value", "path"}` of the copy kept. Trainer's own
    `load_best_model_at_end` keeps adapters, not a merged checkpoint, and replaces the final model."""

    def __init__(self, trainer: _CoMaTrainerMixin, metric: str, output_dir: str):
        self.trainer, self.metric, self.output_dir = trainer, metric, output_dir
        self.best: dict | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        value = metrics.get(self.metric, metrics.get(f"eval_{self.metric}"))
        if value is None:
            raise KeyError(f"KeepBestCheckpoint: no metric {self.metric!r} among {sorted(metrics)}")
        if self.best is None or value > self.best["value"]:
            self.trainer.save_merged_copy(self.output_dir)
            self.best = {"metric": self.metric, "step": state.global_step, "value": value, "path": self.output_dir}
            logger.info(
                "Best %s so far: %.4f at step %d, saved to %s", self.metric, value, state.global_step, self.output_dir
            )
