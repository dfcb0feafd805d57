"""DiffusionLM: built from a config, the loss each pattern trains with, the block_clean forward, the optimizer."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dlm.data.batch import TrainBatch
from dlm.data.datamodule import DiffusionDataModule
from dlm.models.backbone import forward_logits
from dlm.settings import load_config
from dlm.tensor import patterns
from dlm.tensor.attention import build_attention_inputs
from dlm.training.module import DiffusionLM
from tests.conftest import make_backbone
from tests.helpers import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")
FROM_SCRATCH = {"model.name_or_path": "null", "model.tokenizer": "builtin:tiny"}


def _cfg(tmp_path, config="experiments/tiny.yaml", **kw):
    extra = FROM_SCRATCH if config.endswith("tiny.yaml") else {}
    return load_config(config, overrides=small_overrides(tmp_path, **(extra | kw)))


def _batch(module):
    """The first train batch of a real DataModule for `module`'s config (400 synthetic rows)."""
    data = DiffusionDataModule(module.cfg, module.tokenizer, module.mask_token_id)
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A block_clean module (block size 4, length 32) built from tiny.yaml, and one real batch."""
    torch.manual_seed(0)
    module = DiffusionLM(_cfg(tmp_path_factory.mktemp("clean"))).eval()
    return module, _batch(module)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    torch.manual_seed(0)
    module = DiffusionLM(_cfg(tmp_path_factory.mktemp("causal"), "experiments/tiny_ar.yaml")).eval()
    return module, _batch(module)


def test_built_from_config_has_the_configured_model_in_train_mode(tmp_path):
    module = DiffusionLM(_cfg(tmp_path))
    c = module.model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == ("qwen3", 32, 1, 2)
    assert module.model.training
    assert module.mask_token_id == module.tokenizer.mask_token_id == module.tokenizer.convert_tokens_to_ids("<|mask|>")
    assert module.kernel == "sdpa"  # CPU
    assert module.hparams["config"]["attention"] == {"pattern": "block_clean", "block_size": 4, "backend": "auto",
                                                     "clean_context": "block", "options": {},
                                                     "block_size_schedule": []}


def test_given_backbone_is_used_and_put_in_train_mode(tmp_path, tokenizer):
    backbone = make_backbone("llama", tokenizer)  # eval mode, as from_pretrained returns it
    module = DiffusionLM(_cfg(tmp_path), backbone)
    assert module.model is backbone.model and module.model.training
    assert module.tokenizer is tokenizer and module.mask_token_id == backbone.mask_token_id


def test_causal_pattern_uses_the_ar_loss_over_eligible_targets(causal):
    module, batch = causal
    ids = batch.input_ids
    eligible = batch.eligible.clone()
    eligible[:, :5] = False  # prompt tokens: never targets
    out = module.loss(TrainBatch(ids, eligible))
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits  # HF's own causal mask
    scored = eligible[:, 1:]  # row i predicts token i + 1
    expected = F.cross_entropy(logits[:, :-1][scored], ids[:, 1:][scored])
    assert_close(out.loss, expected)
    assert torch.equal(out.scored[:, 1:], scored) and not out.scored[:, 0].any()


def test_block_clean_forward_doubles_the_length(clean):
    module, batch = clean
    ids = batch.input_ids
    with torch.no_grad():
        logits = module(torch.cat([batch.noised_ids, ids], 1))
    assert logits.shape == (ids.shape[0], 2 * ids.shape[1], module.model.config.vocab_size)


def test_block_clean_forward_runs_the_clean_half_block_causally_at_the_noisy_positions(clean):
    """x_0 gets position ids 0..L-1 like x_t and sees only clean blocks up to its own: the `block` pattern on x_0."""
    module, batch = clean
    ids, noised = batch.input_ids, batch.noised_ids
    L = ids.shape[1]
    with torch.no_grad():
        both = module(torch.cat([noised, ids], 1))
        block = patterns.get("block", block_size=4)
        alone = forward_logits(module.model, ids, build_attention_inputs(block, batch_size=ids.shape[0], seq_len=L))
    assert_close(both[:, L:], alone)


def test_block_clean_noisy_block_sees_its_own_block_and_earlier_clean_blocks_only(clean):
    module, batch = clean
    ids, noised = batch.input_ids[:1], batch.noised_ids[:1]
    L = ids.shape[1]
    base = torch.cat([noised, ids], 1)
    clean_b1, noisy_b0 = base.clone(), base.clone()
    clean_b1[0, L + 5] = (clean_b1[0, L + 5] + 1) % 300  # a clean token in block 1
    # the last noisy token of block 0
    noisy_b0[0, 3] = module.mask_token_id if noisy_b0[0, 3] != module.mask_token_id else 7
    with torch.no_grad():
        ref, a, b = module(base), module(clean_b1), module(noisy_b0)
    assert_close(a[:, :8], ref[:, :8])  # noisy blocks 0 and 1 cannot see clean block 1
    assert not torch.allclose(a[:, 8:12], ref[:, 8:12])  # noisy block 2 does
    assert not torch.allclose(b[:, 0], ref[:, 0])  # bidirectional inside a block
    assert_close(b[:, 4:], ref[:, 4:])  # nothing else sees a noisy token


def test_block_clean_loss_is_the_weighted_nll_of_masked_noisy_rows(clean):
    module, batch = clean
    ids, mask, eligible = batch.input_ids, batch.mask, batch.eligible
    assert mask.any()
    L = ids.shape[1]
    with torch.no_grad():
        out = module.loss(batch)
        logits = module(torch.cat([batch.noised_ids, ids], 1))[:, :L]
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, L)
    per_block = batch.num_eligible.float() / batch.num_masked.clamp_min(1).float()  # ELBO weight n/k
    weights = per_block.repeat_interleave(4, dim=1)
    expected = (weights * nll)[mask].sum() / eligible.sum()
    assert_close(out.loss, expected)
    assert torch.equal(out.scored, mask)


def test_configure_optimizers_puts_no_weight_decay_on_1d_params_and_warms_up_then_decays(tmp_path):
    cfg = _cfg(tmp_path, "experiments/tiny_ar.yaml", **{"optim.warmup_steps": "2", "trainer.max_steps": "10"})
    module = DiffusionLM(cfg)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["params"]  # the norm weights
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters()) and len(set(grouped)) == len(grouped)
    assert opt.defaults["betas"] == (0.9, 0.95) and conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(cfg.optim.lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))  # cosine: never rises after warmup


def test_flops_per_batch_is_set_by_each_forward(clean):
    module, _ = clean
    c = module.model.config
    n_params = sum(p.numel() for p in module.model.parameters())
    for shape in [(2, 16), (3, 32)]:
        ids = torch.randint(5, 300, shape)
        with torch.no_grad():
            module(ids)
        per_token = 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * shape[1]
        assert module.flops_per_batch == per_token * shape[0] * shape[1]


@pytest.mark.parametrize("which", ["clean", "causal"])
def test_training_step_on_a_real_batch_returns_a_finite_scalar_loss_with_grad(request, which):
    module, batch = request.getfixturevalue(which)
    module.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")  # no Trainer attached
        loss = module.training_step(batch, 0)
    assert loss.shape == () and torch.isfinite(loss) and loss > 0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert module.model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert 0 <= module.train_acc.compute() <= 1
    module.zero_grad()


def test_document_mask_run_trains_under_the_per_row_document_mask(tmp_path):
    torch.manual_seed(0)
    module = DiffusionLM(_cfg(tmp_path, **{"data.document_mask": "true"})).eval()
    batch = _batch(module)
    docs, ids = batch.document_ids, torch.cat([batch.noised_ids, batch.input_ids], 1)
    with torch.no_grad():
        got = module(ids, docs)
        plain = module(ids)
    attn = build_attention_inputs(patterns.get("block_clean", block_size=4), batch_size=ids.shape[0], seq_len=32,
                                  document_ids=docs)
    assert_close(got, forward_logits(module.model, ids, attn))
    assert not torch.allclose(got, plain)  # rows of several documents see less under the document mask
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """A causal-clean-context block_clean module with the AR term only (diffusion weight 0), and one batch."""
    torch.manual_seed(0)
    cfg = _cfg(tmp_path_factory.mktemp("joint"), **{"attention.clean_context": "causal", "objective.ar_weight": 1.0,
                                                    "objective.diffusion_weight": 0.0})
    module = DiffusionLM(cfg).eval()
    return module, _batch(module)


def test_joint_ar_term_equals_hf_causal_lm_loss_on_x0(joint):
    module, batch = joint
    with torch.no_grad():
        got = module.loss(batch).loss
        labels = batch.input_ids.masked_fill(~batch.eligible, -100)  # prompt tokens are not scored
        expected = module.model(input_ids=batch.input_ids, labels=labels).loss  # HF's own loss, run causally
    assert not batch.eligible.all() and batch.eligible.any()
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_close(module.loss_terms["ar_loss"], expected, atol=1e-5, rtol=1e-5)


def test_joint_loss_is_the_weighted_sum_of_both_terms(joint):
    module, batch = joint
    cfg = module.cfg
    cfg.objective.ar_weight, cfg.objective.diffusion_weight = 1.0, 0.3
    try:
        with torch.no_grad():
            total = module.loss(batch).loss
    finally:
        cfg.objective.ar_weight, cfg.objective.diffusion_weight = 1.0, 0.0
    terms = module.loss_terms
    assert terms["diffusion_loss"] > 0 and terms["ar_loss"] > 0
    assert_close(total, 0.3 * terms["diffusion_loss"] + terms["ar_loss"])


def test_certainty_term_is_added_with_its_weight(tmp_path):
    """With the final norm zeroed every logit is 0: argmax is token 0, so masked targets of 0 are the
    correct predictions, each of entropy log V."""
    cfg = _cfg(tmp_path, **{"attention.clean_context": "causal", "objective.ar_weight": 1.0,
                            "objective.diffusion_weight": 0.3, "objective.certainty_weight": 2.0})
    module = DiffusionLM(cfg).eval()
    batch = _batch(module)
    batch = dataclasses.replace(batch, input_ids=batch.input_ids.masked_fill(batch.mask, 0))
    with torch.no_grad():
        module.model.model.norm.weight.zero_()
        total = module.loss(batch).loss
    terms = module.loss_terms
    assert terms["certainty"].item() == pytest.approx(math.log(module.model.config.vocab_size), rel=1e-5)
    assert_close(total, 0.3 * terms["diffusion_loss"] + 2.0 * terms["certainty"] + terms["ar_loss"])


def test_joint_training_step_logs_both_terms(tmp_path):
    import lightning as L

    cfg = _cfg(tmp_path, **{"attention.clean_context": "causal", "objective.ar_weight": 1.0,
                            "objective.diffusion_weight": 0.3})
    module = DiffusionLM(cfg)
    data = DiffusionDataModule(cfg, module.tokenizer, module.mask_token_id)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    assert {"train/ar_loss", "train/diffusion_loss", "train/loss"} <= set(logged)
    assert "train/certainty" not in logged  # off by default
    assert torch.isfinite(logged["train/ar_loss"]) and logged["train/ar_loss"] > 0
