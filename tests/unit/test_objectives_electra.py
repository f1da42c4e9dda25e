"""ELECTRA (``objective.weights={electra: 1}``): the generator beside the encoder, the sampler
(its draws follow the softmax, row by row whatever the batch), the discriminator's labels, the
loss (the generator's masked-LM sum, the discriminator's BCE over the real tokens times the
weight) against the formula written out here, no gradient through the sampling, and the
config rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.transforms import IGNORE_INDEX, MaskingConfig
from pretrain.batches import model_inputs
from pretrain.models import build_model
from pretrain.models.config import generator_config
from pretrain.objectives import OBJECTIVES, ObjectiveMix
from tests.objective_checks import encoder_config

ELECTRA = "objective.weights={electra: 1}"


def test_config_rules() -> None:
    cfg = encoder_config(ELECTRA)
    assert cfg.model.generator_fraction == 0.25
    gen = generator_config(cfg.model)
    assert (gen.hidden_size, gen.num_heads, gen.ffn_hidden_size) == (16, 1, 64)
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert transform == "mlm" and masking.mono_kinds == (("electra", 1.0),)
    assert masking.tlm_share == 0.0
    # mixed row by row with the other masked objectives: their rows train the generator
    cfg = encoder_config("objective.weights={mlm: 1, tlm: 0.5, electra: 1}")
    mix = ObjectiveMix.from_config(cfg)
    assert mix.scorer.name == "electra" and mix.names == ["mlm", "tlm", "electra"]
    _, masking = mix.loader_settings(cfg.objective)
    assert masking.mono_kinds == (("mlm", 1.0), ("electra", 1.0)) and masking.tlm_share == 0.2
    with pytest.raises(
        ValueError, match=r"electra mixes with mlm, span and tlm .* not with spanbert"
    ):
        encoder_config("objective.weights={electra: 1, spanbert: 1}")
    with pytest.raises(ValueError, match=r"model.generator_fraction \(0.25\) builds ELECTRA"):
        encoder_config("model.generator_fraction=0.25")
    with pytest.raises(ValueError, match=r"generator width \(8\) that is not a multiple of"):
        encoder_config(ELECTRA, "model.generator_fraction=0.125")
    with pytest.raises(ValueError, match=r"objective.electra.disc_weight \(-1.0\) must be >= 0"):
        encoder_config(ELECTRA, "objective.electra.disc_weight=-1")
    with pytest.raises(ValueError, match=r"objective.weights.electra needs parallel.pp 1"):
        encoder_config(ELECTRA, "parallel.pp=2", "model.tie_embeddings=false",
                       "parallel.dp_shard=1")  # fmt: skip
    # a fraction the user set stays
    assert encoder_config(ELECTRA, "model.generator_fraction=0.5").model.generator_fraction == 0.5


def test_draws_follow_the_softmax_and_depend_on_the_row_only() -> None:
    electra = OBJECTIVES["electra"]()
    electra.temperature = 2.0
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    rows = torch.arange(4000 * 8).reshape(4000, 8) % 977  # distinct rows
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[:, 3] = 1
    sample = electra.sampler(rows, labels)
    drawn = sample(logits.expand(4000, 5))
    freq = torch.bincount(drawn, minlength=5).double() / 4000
    want = torch.softmax(logits.double() / 2.0, -1)
    # 4000 draws: each frequency within 4 standard errors
    assert torch.all((freq - want).abs() < 4 * (want * (1 - want) / 4000).sqrt()), (freq, want)
    # a row draws the same in any batch: the second half alone, its own draws
    half = electra.sampler(rows[2000:], labels[2000:])(logits.expand(2000, 5))
    assert torch.equal(half, drawn[2000:])
    # a near-zero temperature: the argmax
    electra.temperature = 1e-4
    assert bool((electra.sampler(rows, labels)(logits.expand(4000, 5)) == 2).all())


def _batch(shards):
    data = DataConfig(manifest=str(shards["shards"]), seq_len=64, batch_size=4)
    masking = MaskingConfig(replace_prob=0.85, random_prob=0.0, mono_kinds=(("electra", 1.0),))
    loader = build_loader(data, dp_rank=0, dp_world_size=1, objective="mlm", masking=masking,
                          seed=3)  # fmt: skip
    return next(iter(loader))


def test_the_loss_follows_the_formula(shards) -> None:
    cfg = encoder_config(ELECTRA, "model.dropout=0.0", "objective.electra.disc_weight=7")
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = _batch(shards)
    mix = ObjectiveMix.from_config(cfg)
    groups_n = mix.num_groups(4)
    assert groups_n == 4 + 2
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    labels = mix.targets(batch["labels"])
    groups = mix.target_groups(batch["lang_ids"], batch["attention_mask"], num_languages=4,
                               row_transform_B=batch["row_transform"])  # fmt: skip
    options = mix.model_options(batch)
    hidden, scored = mix.split_outputs(
        model(batch["input_ids"], return_hidden=True, **kwargs, **options)
    )
    weight, bias = model.output_projection()
    loss, sums, counts = mix.loss(hidden, weight, bias, labels, groups, num_groups=groups_n)
    row_loss = mix.row_loss(scored, batch, sums, counts)
    # the formula written out: the generator's logits (a plain call), the masked LM sum
    chosen = batch["labels"] != IGNORE_INDEX
    target = batch["labels"][chosen].long()
    gen_logits = model(batch["input_ids"], **kwargs)
    mlm = F.cross_entropy(gen_logits[chosen], target, reduction="sum")
    torch.testing.assert_close(loss, mlm, rtol=1e-5, atol=1e-4)
    # the replacements: the sampler on the generator's logits at the masked positions
    sampled = OBJECTIVES["electra"]().sampler(batch["input_ids"], batch["labels"])(
        gen_logits[chosen].detach()
    )
    corrupted = batch["input_ids"].clone()
    corrupted[chosen] = sampled.to(corrupted.dtype)
    original = torch.where(chosen, batch["labels"], batch["input_ids"])
    replaced = corrupted != original
    assert torch.equal(scored[1], replaced)
    # the generator at init is near uniform: almost every draw replaces its token
    assert float(replaced[chosen].float().mean()) > 0.9 and not bool(replaced[~chosen].any())
    disc = model(corrupted, return_discriminator=True, **kwargs)
    real = batch["attention_mask"].bool()
    bce = F.binary_cross_entropy_with_logits(disc[real], replaced[real].float(), reduction="sum")
    torch.testing.assert_close(row_loss, 7.0 * bce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums[-2], bce.detach(), rtol=1e-5, atol=1e-4)
    assert float(counts[-1]) == float(real.sum()) == float(mix.num_rows(batch))
    correct = ((disc[real] > 0) == replaced[real]).sum()
    assert float(sums[-1]) == float(correct)
    metrics = mix.group_metrics(sums.double(), counts.double(), ["de", "en", "ja", "ru"])
    assert metrics["rtd_loss"]["electra"] == pytest.approx(
        float(bce.detach()) / float(real.sum()), rel=1e-5
    )
    assert metrics["loss_per_objective"]["electra"] == pytest.approx(
        float(mlm.detach()) / float(chosen.sum()), rel=1e-5
    )


def test_no_gradient_through_the_sampling(shards) -> None:
    """The discriminator's loss trains the stack, its head and the shared embeddings, never
    the generator (the replacements are drawn without gradient); the generator's loss trains
    the generator and the embeddings, never the discriminator."""
    cfg = encoder_config(ELECTRA, "model.dropout=0.0")
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = _batch(shards)
    mix = ObjectiveMix.from_config(cfg)
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    gen_logits, scored = mix.split_outputs(model(batch["input_ids"], **kwargs,
                                                 **mix.model_options(batch)))  # fmt: skip
    sums = torch.zeros(mix.num_groups(4))
    mix.row_loss(scored, batch, sums, sums.clone()).backward(retain_graph=True)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("generator.")), [
        n for n, g in grads.items() if n.startswith("generator.") and g is not None
    ]
    for name in ("discriminator.dense.weight", "layers.0.attention.wq.weight",
                 "tok_embeddings.weight"):  # fmt: skip
        assert float(grads[name].abs().sum()) > 0, name
    model.zero_grad(set_to_none=True)
    chosen = batch["labels"] != IGNORE_INDEX
    F.cross_entropy(gen_logits[chosen], batch["labels"][chosen].long()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert (
        grads["discriminator.dense.weight"] is None
        and grads["layers.0.attention.wq.weight"] is None
    )
    assert float(grads["generator.layers.0.attention.wq.weight"].abs().sum()) > 0
    assert float(grads["tok_embeddings.weight"].abs().sum()) > 0


def test_a_pre_norm_generator_ends_in_a_norm() -> None:
    cfg = encoder_config(ELECTRA, "model.norm_position=pre")
    model = build_model(cfg.model)
    assert model.generator.norm is not None and model.generator.project is not None
    model.init_weights(0)
    out = model(torch.randint(5, 2000, (2, 16)))
    assert out.shape == (2, 16, 2000) and bool(torch.isfinite(out).all())


def test_the_base_preset_has_electra_base_parameter_counts() -> None:
    """``configs/electra_base.yaml`` against the released shapes built by transformers: the
    discriminator (everything but the generator and the generator's output bias) as
    ``ElectraForPreTraining`` of electra-base, the generator with the shared embeddings as
    ``ElectraForMaskedLM`` of electra-base-generator."""
    from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

    from pretrain.config import load_config
    from tests.sample_data import REPO

    cfg = load_config(REPO / "configs" / "electra_base.yaml", ["train.run_dir=unused"]).model
    shapes = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
              "embedding_size": 768}  # fmt: skip
    generator = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024,
                 "embedding_size": 768}  # fmt: skip
    with torch.device("meta"):
        ours = build_model(cfg)
        disc = ElectraForPreTraining(ElectraConfig(**shapes))
        gen = ElectraForMaskedLM(ElectraConfig(**generator))

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    shared = sum(count(getattr(ours, k)) for k in ("tok_embeddings", "pos_embeddings",
                                                  "type_embeddings", "embed_norm"))  # fmt: skip
    generator_only = count(ours.generator) + ours.output_bias.numel()
    assert count(ours) - generator_only == count(disc) == 109_483_009
    assert generator_only + shared == count(gen)


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.type_vocab_size=2", "model.tie_embeddings=false")],
    ids=["tied-no-segments", "untied-segments"],
)
def test_exports_match_their_transformers_twins(overrides) -> None:
    """The discriminator as ``ElectraForPreTraining`` and the generator as
    ``ElectraForMaskedLM``: the same logits from every parameter perturbed."""
    from checkpoints_tools.adapters import adapter_for
    from checkpoints_tools.adapters.electra import ElectraAdapter
    from tests.twins import hf_model, randomised

    cfg = encoder_config(ELECTRA, "model.dropout=0.0", *overrides)
    model = randomised(cfg.model, seed=3)
    assert adapter_for(cfg.model) is ElectraAdapter
    state = model.state_dict()
    tokens = torch.randint(
        0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    segments = torch.zeros_like(tokens)
    segments[:, 12:] = 1 if cfg.model.type_vocab_size else 0
    extra = {"token_type_ids_BT": segments} if cfg.model.type_vocab_size else {}
    theirs_extra = {"token_type_ids": segments} if cfg.model.type_vocab_size else {}
    with torch.no_grad():
        disc = model(tokens, return_discriminator=True, **extra)
        gen = model(tokens, **extra)
        hf_disc = hf_model(*ElectraAdapter.to_hf(state, cfg.model))
        hf_gen = hf_model(*ElectraAdapter.generator_to_hf(state, cfg.model))
        torch.testing.assert_close(hf_disc(tokens, **theirs_extra).logits, disc, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_gen(tokens, **theirs_extra).logits, gen, rtol=0, atol=1e-5)
    # the streaming plans give the same tensors (less the tied head, which transformers ties)
    from checkpoints_tools.convert import export_items

    streamed = {i.name for i in export_items(cfg.model)}
    assert streamed == set(ElectraAdapter.to_hf(state, cfg.model)[0])
    generator = {i.name for i in ElectraAdapter.generator_export_items(cfg.model)}
    want = set(ElectraAdapter.generator_to_hf(state, cfg.model)[0])
    if cfg.model.tie_embeddings:
        want.discard("generator_lm_head.weight")
    assert generator == want


def test_export_refuses_what_electra_cannot_hold() -> None:
    """A pre-norm body, and an MoE discriminator (it trains: ``tests/distributed``; transformers
    has no MoE ELECTRA class to export it to)."""
    from checkpoints_tools.adapters.electra import ElectraAdapter

    moe = encoder_config(ELECTRA, "model.moe.num_experts=4", "model.moe.top_k=2")
    with pytest.raises(ValueError, match=r"model.moe.num_experts \(4\) must be 0 to export"):
        ElectraAdapter.check(moe.model)

    cfg = encoder_config(ELECTRA, "model.norm_position=pre")
    with pytest.raises(
        ValueError,
        match=r"model.norm_position \('pre'\) must be 'post' to export to ElectraForPreTraining",
    ):
        ElectraAdapter.check(cfg.model)


def test_mixed_with_mlm_and_tlm_the_shares_follow_the_weights(shards) -> None:
    """``{mlm: 1, tlm: 0.5, electra: 1}``: each objective's share of the global rows (2 ranks x
    16 rows, 8 steps) within a point of its weight; the discriminator scores the real tokens of
    ELECTRA's rows only."""
    from data_pipeline.transforms import ROW_TRANSFORMS

    cfg = encoder_config("objective.weights={mlm: 1, tlm: 0.5, electra: 1}")
    mix = ObjectiveMix.from_config(cfg)
    transform, masking = mix.loader_settings(cfg.objective)
    data = DataConfig(manifest=str(shards["shards"]), seq_len=64, batch_size=16)
    iters = [
        iter(build_loader(data, dp_rank=r, dp_world_size=2, objective=transform,
                          masking=masking, seed=4))
        for r in range(2)
    ]  # fmt: skip
    kinds = []
    for _ in range(8):
        for it in iters:
            batch = next(it)
            kinds.append(batch["row_transform"].numpy())
            electra = batch["row_transform"] == ROW_TRANSFORMS.index("electra")
            real = batch["attention_mask"].bool() & electra[:, None]
            assert int(mix.num_rows(batch)) == int(real.sum())
    kinds = np.concatenate(kinds)
    shares = np.bincount(kinds, minlength=len(ROW_TRANSFORMS)) / len(kinds)
    for kind, share in (("pair", 0.2), ("mlm", 0.4), ("electra", 0.4)):
        assert abs(shares[ROW_TRANSFORMS.index(kind)] - share) <= 0.01, shares
