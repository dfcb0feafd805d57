"""LightningModule: an unmodified HF backbone run under the configured attention pattern and loss.

Wiring only: the pattern object (`dlm.tensor.patterns`) gives the masks and the input layout, noise
comes from the DataModule's collate, the loss from `dlm.tensor.objective`. An autoregressive pattern
(`causal`) trains with the plain AR loss (the AR baseline and the tiny AR pretraining); every other
pattern with the masked-diffusion ELBO.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dlm.data.batch import TrainBatch
from dlm.models.backbone import Backbone, load_backbone
from dlm.models.lora import apply_lora, parameter_counts
from dlm.settings import ExperimentConfig
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs, resolve_backend
from dlm.tensor.objective import LossOutput, ar_loss, block_weights, diffusion_loss
from dlm.training.resume import rng_state, set_rng_state


def kernel_for(cfg: ExperimentConfig) -> str:
    """The attention kernel this run will use (flex on CUDA by default, sdpa on CPU)."""
    on_cuda = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return resolve_backend(cfg.attention.backend, patterns.of(cfg.attention),
                           "cuda" if on_cuda else "cpu")


class DiffusionLM(L.LightningModule):
    """Continued pretraining of an AR checkpoint as a block-diffusion LM (or AR, for `causal`)."""

    def __init__(self, cfg: ExperimentConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = cfg
        self.pattern = patterns.of(cfg.attention)
        backbone = backbone or load_backbone(cfg.model, attn_implementation=kernel_for(cfg))
        self.model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.mask_token_id = backbone.mask_token_id
        if cfg.model.lora.enabled:
            self.model = apply_lora(self.model, cfg.model.lora, self.mask_token_id)
        # from_pretrained returns eval mode; dropout (where configured) must be on
        self.model.train()
        self.kernel = kernel_for(cfg)
        # Masked-token accuracy: mean of per-token correctness over scored tokens (torchmetrics
        # syncs it in DDP).
        self.train_acc, self.val_acc = MeanMetric(), MeanMetric()
        # read by Lightning's ThroughputMonitor for MFU; set per batch in forward
        self.flops_per_batch = 0
        # before any sharding; once
        self._n_params = sum(p.numel() for p in self.model.parameters())
        # the diffusion objective's terms (diffusion, certainty, AR), per step
        self.loss_terms: dict[str, Tensor] = {}

    def configure_model(self) -> None:
        """`trainer.strategy: fsdp2` (Lightning's ModelParallelStrategy): shard per decoder layer
        with FSDP2."""
        if self.cfg.trainer.strategy == "fsdp2" and self._device_mesh is not None:
            from dlm.training.scaling import shard_per_layer

            shard_per_layer(self.model, self._device_mesh["data_parallel"], self.cfg)

    def on_fit_start(self) -> None:
        """Log how many parameters train (LoRA: adapters + [MASK] row, vs every weight in full
        training)."""
        trainable, total = parameter_counts(self.model)
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} "
                       f"({100 * trainable / total:.2f}%)")
        for logger in self.loggers:
            logger.log_hyperparams({"model/trainable_params": trainable,
                                    "model/total_params": total})

    def _training_flops(self, input_ids: Tensor) -> int:
        """PaLM estimate: 6N per token for the weights + 12 * layers * hidden * T for attention
        scores."""
        c = self.model.config
        attention = 12 * c.num_hidden_layers * c.hidden_size * input_ids.shape[1]
        per_token = 6 * self._n_params + attention
        return per_token * input_ids.numel()

    def forward(self, input_ids: Tensor, document_ids: Tensor | None = None,
                block_size: int | None = None) -> Tensor:
        """Logits of `input_ids`; `document_ids` `(B, L)` (data.document_mask) adds the
        same-document rule; `block_size` is the schedule's current stage (default
        `attention.block_size`)."""
        pattern = self.pattern.resized(block_size or self.pattern.block_size)
        seq_len = pattern.sequence_length(input_ids.shape[1])
        attn = build_attention_inputs(pattern, batch_size=input_ids.shape[0], seq_len=seq_len,
                                      backend=self.kernel, device=input_ids.device,
                                      dtype=self.model.dtype, document_ids=document_ids,
                                      restart_positions=self.cfg.data.restart_positions)
        self.flops_per_batch = self._training_flops(input_ids)
        return self.model(input_ids=input_ids, **attn.as_kwargs(), use_cache=False).logits

    def loss(self, batch: TrainBatch) -> LossOutput:
        objective = self.cfg.objective
        docs, block_size = batch.document_ids, batch.block_size or self.pattern.block_size
        if self.pattern.autoregressive:
            return ar_loss(self(batch.input_ids, docs), batch.input_ids, batch.eligible)
        noised, pattern = batch.noised_ids, self.pattern.resized(block_size)
        inputs = pattern.model_input(noised, batch.input_ids)
        weights = block_weights(batch.num_masked, batch.num_eligible, block_size,
                                objective.weighting)
        logits = self(inputs, docs, block_size)
        certainty_t = objective.certainty_temperature if objective.certainty_weight > 0 else None
        diffusion = diffusion_loss(logits, batch.input_ids, batch.mask, weights=weights,
                                   eligible=batch.eligible, pattern=pattern,
                                   seq_len=noised.shape[1], shift=objective.shift,
                                   certainty_temperature=certainty_t)
        self.loss_terms = {"diffusion_loss": diffusion.loss.detach()}
        total = objective.diffusion_weight * diffusion.loss
        if diffusion.certainty is not None:
            self.loss_terms["certainty"] = diffusion.certainty.detach()
            total = total + objective.certainty_weight * diffusion.certainty
        if objective.ar_weight > 0:
            total = total + self._ar_term(logits[:, noised.shape[1]:], batch)
        return diffusion._replace(loss=total)

    def _ar_term(self, clean_logits: Tensor, batch: TrainBatch) -> Tensor:
        """NLD's joint objective: the causal clean half's next-token loss on x_0, from the same
        forward as the diffusion loss; kept in `loss_terms` for logging (accuracy stays the masked
        tokens')."""
        ar = ar_loss(clean_logits, batch.input_ids, batch.eligible)
        self.loss_terms["ar_loss"] = ar.loss.detach()
        return self.cfg.objective.ar_weight * ar.loss

    def on_train_epoch_start(self) -> None:
        """A stream (`data.streaming`) reshuffles per epoch only when told the epoch (Lightning
        tells samplers)."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The global RNG (dropout) goes into every checkpoint: a resumed run redraws the same
        dropout masks."""
        checkpoint["dlm_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        set_rng_state(checkpoint.get("dlm_rng"))

    def training_step(self, batch: TrainBatch, batch_idx: int) -> Tensor:
        out = self.loss(batch)
        self.train_acc.update(out.correct[out.scored].float())
        rows = len(batch.input_ids)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=rows)
        # the objective's terms (diffusion; certainty and AR where weighted)
        for name, value in self.loss_terms.items():
            self.log(f"train/{name}", value, batch_size=rows)
        self.log("train/masked_acc", self.train_acc, prog_bar=True, batch_size=rows)
        # attention.block_size_schedule: the stage in force at this step
        if batch.block_size is not None:
            self._log_stage(batch.block_size)
        return out.loss

    def _log_stage(self, block_size: int) -> None:
        if block_size != getattr(self, "_stage", None):
            rank_zero_info(f"step {self.global_step}: training block size {block_size}")
            self._stage = block_size
        self.log("train/block_size", float(block_size))

    def validation_step(self, batch: TrainBatch, batch_idx: int) -> None:
        out = self.loss(batch)
        self.val_acc.update(out.correct[out.scored].float())
        rows = len(batch.input_ids)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=rows)
        self.log("val/masked_acc", self.val_acc, prog_bar=True, batch_size=rows)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and p.requires_grad]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2 and p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=tuple(optim.betas),
        )
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=optim.warmup_steps,
            num_training_steps=self.cfg.trainer.max_steps, min_lr_rate=optim.min_lr_ratio,
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
