"""The encoder-decoder objectives (span corruption, denoising, translation): registry, config
rules pinned by message, what they ask of the loader, loss groups of seq2seq batches, and the
loss on decoder positions (no shift) against per-token cross-entropy of the model's logits."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pretrain.batches import batch_tokens, model_inputs, target_side
from pretrain.config import load_config, validate_config
from pretrain.objectives import DEFAULT_OBJECTIVE, IGNORE_INDEX, OBJECTIVES, ObjectiveMix
from tests.sample_data import REPO

ENCDEC = REPO / "configs" / "tiny_encdec.yaml"
DECODER = REPO / "configs" / "tiny_decoder.yaml"


def _validated(path, overrides):
    cfg = load_config(path, ["train.run_dir=unused", *overrides])
    validate_config(cfg)
    return cfg


def test_registry_and_family_default():
    for name in ("t5", "bart", "translation"):
        objective = OBJECTIVES[name]
        assert objective.families == ("encoder_decoder",)
        assert objective.transform == "seq2seq"
        assert not objective.shift_targets and not objective.sparse_targets
    assert DEFAULT_OBJECTIVE["encoder_decoder"] == "t5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _validated(ENCDEC, [])
    assert cfg.objective.weights == {"t5": 1.0}


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (DECODER, ["objective.weights={translation: 1.0}"],
         "objective.weights.translation ('translation') needs model.family in encoder_decoder "
         "(got 'decoder')"),
        (ENCDEC, ["objective.weights={t5: 1, bart: 1}"],
         "objective.weights (t5, bart) all take the mono rows of a batch; "
         "one run's batch has one objective per kind of row: keep one"),
        (ENCDEC, ["parallel.pp=2", "model.tie_embeddings=true"],
         "model.tie_embeddings (True) must be false with parallel.pp (2) > 1: the embedding "
         "table and the output projection are on different pipeline stages"),
        (ENCDEC, ["objective.decoder_len=20"],
         "objective.decoder_len (20) must be >= the span corruption targets (29 for "
         "data.seq_len 128)"),
        (ENCDEC, ["objective.decoder_len=300"],
         "objective.decoder_len (300) must be <= model.max_seq_len (256)"),
        (ENCDEC, ["objective.t5.noise_density=1.5"],
         "objective.t5.noise_density (1.5) must be in (0, 1)"),
        (ENCDEC, ["objective.bart.mask_ratio=2"],
         "objective.bart.mask_ratio (2.0) must be in [0, 1]"),
        (ENCDEC, ["objective.bart.poisson_lambda=0"],
         "objective.bart.poisson_lambda (0.0) must be > 0"),
    ],
)  # fmt: skip
def test_bad_seq2seq_configs_get_one_line(path, overrides, message):
    with pytest.raises(ValueError) as err:
        _validated(path, overrides)
    assert str(err.value) == message


def test_loader_settings_carry_the_shares_and_options():
    cfg = _validated(
        ENCDEC,
        [
            "objective.weights={bart: 3, translation: 1}",
            "objective.bart.mask_ratio=0.35",
            "objective.bart.language_token=true",
            "objective.decoder_len=100",
        ],
    )
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert transform == "seq2seq"
    assert masking.tlm_share == 0.25 and masking.denoise_share == 0.75
    assert masking.seq2seq.denoising.mask_ratio == 0.35 and masking.seq2seq.language_token
    assert masking.seq2seq.decoder_len == 100
    cfg = _validated(ENCDEC, ["objective.weights={t5: 3, translation: 1}"])
    _, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert masking.tlm_share == 0.25 and masking.denoise_share == 0.0
    assert (masking.seq2seq.noise_density, masking.seq2seq.mean_span) == (0.15, 3.0)


def _seq2seq_batch() -> dict:
    # Row 0 a translation row (target language 2, then padding), row 1 a T5 row (language 0).
    dec_lang = torch.tensor([[2, 2, 2, 0], [0, 0, 0, 0]], dtype=torch.int32)
    dec_doc = torch.tensor([[0, 0, 1, -1], [0, 0, 0, 0]], dtype=torch.int32)
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [8, 9, 10, 11]], dtype=torch.int32)
    return {
        "input_ids": torch.randint(4, 20, (2, 5), dtype=torch.int32),
        "doc_ids": torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, 0, 0]], dtype=torch.int32),
        "lang_ids": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.int32),
        "attention_mask": torch.ones(2, 5, dtype=torch.bool),
        "decoder_input_ids": torch.randint(4, 20, (2, 4), dtype=torch.int32),
        "labels": labels,
        "decoder_doc_ids": dec_doc,
        "decoder_lang_ids": dec_lang,
        "decoder_attention_mask": dec_doc >= 0,
        "pair_rows": torch.tensor([True, False]),
    }


def test_groups_follow_the_rows_kind_and_the_target_language():
    batch = _seq2seq_batch()
    mix = ObjectiveMix({"t5": 3.0, "translation": 1.0})
    lang_ids, mask, pair_rows = target_side(batch)
    groups = mix.target_groups(lang_ids, mask, num_languages=3, pair_rows_B=pair_rows)
    # span_corruption objective 0, translation 1: group = objective * 3 + target language.
    assert groups.tolist() == [[5, 5, 5, 3], [0, 0, 0, 0]]
    # Labels sit on the decoder positions: no shift, every real position a target.
    assert torch.equal(mix.targets(batch["labels"]), batch["labels"].long())
    assert int(mix.num_targets(batch["labels"])) == 7
    assert batch_tokens(batch) == 2 * 5 + 2 * 4


def test_model_inputs_of_a_seq2seq_batch():
    cfg = load_config(ENCDEC, ["train.run_dir=unused"])
    batch = _seq2seq_batch()
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    assert set(kwargs) == {"decoder_tokens_BT", "document_ids_BS", "decoder_document_ids_BT"}
    assert torch.equal(kwargs["document_ids_BS"], batch["doc_ids"])


def test_the_loss_is_cross_entropy_of_the_decoder_logits_at_the_labels():
    from pretrain.models import build_model

    cfg = load_config(ENCDEC, ["train.run_dir=unused", "model.vocab_size=32"])
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = _seq2seq_batch()
    mix = ObjectiveMix({"t5": 3.0, "translation": 1.0}, chunk_tokens=3)
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
    weight, bias = model.output_projection()
    labels = mix.targets(batch["labels"])
    lang_ids, mask, pair_rows = target_side(batch)
    groups = mix.target_groups(lang_ids, mask, num_languages=3, pair_rows_B=pair_rows)
    loss, sums, counts = mix.loss(hidden, weight, bias, labels, groups, num_groups=6)
    # Reference: the model's own logits, cross-entropy at each labelled decoder position.
    logits = model(batch["input_ids"], **kwargs)
    want = torch.zeros(6)
    want_counts = torch.zeros(6)
    for b in range(2):
        for t in range(4):
            if labels[b, t] != IGNORE_INDEX:
                want[groups[b, t]] += F.cross_entropy(logits[b, t][None], labels[b, t][None])
                want_counts[groups[b, t]] += 1
    torch.testing.assert_close(loss, want.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums, want.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, want_counts)


@pytest.mark.parametrize(
    ("preset", "overrides", "masking"),
    [
        ("tiny_encdec.yaml", [], {}),
        (
            "tiny_mbart.yaml",
            ["objective.bart.language_token=true", "objective.bart.mask_ratio=0.35"],
            {"denoise_share": 1.0},
        ),
    ],
    ids=["mt5-span-corruption", "mbart-denoising"],
)
def test_the_loss_is_the_hf_twins_own_training_loss(shards, preset, overrides, masking):
    """The loader's decoder inputs and labels are what transformers trains on: the exported
    twin, handed only the labels (it builds its decoder inputs itself: MT5's ``_shift_right``
    behind pad, mBART's ``shift_tokens_right``), gives the objective's mean loss."""
    from dataclasses import replace

    import transformers

    from checkpoints_tools.adapters import to_hf
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_loader
    from pretrain.models import build_model

    cfg = load_config(
        REPO / "configs" / preset, ["train.run_dir=unused", "model.vocab_size=2000", *overrides]
    )
    _, settings = ObjectiveMix({"t5": 1.0}).loader_settings(cfg.objective)
    data = DataConfig(manifest=str(shards["shards"]), seq_len=32, batch_size=4)
    batch = next(iter(build_loader(data, dp_rank=0, dp_world_size=1, objective="seq2seq",
                                   masking=replace(settings, **masking), seed=1)))  # fmt: skip
    model = build_model(cfg.model)
    model.init_weights(0)
    model.eval()
    mix = ObjectiveMix({"bart" if masking else "t5": 1.0})
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    labels = mix.targets(batch["labels"])
    lang_ids, mask, pair_rows = target_side(batch)
    groups = mix.target_groups(lang_ids, mask, num_languages=4, pair_rows_B=pair_rows)
    with torch.no_grad():
        hidden = model(batch["input_ids"], return_hidden=True, **kwargs)
        weight, bias = model.output_projection()
        loss, _, _ = mix.loss(hidden, weight, bias, labels, groups, num_groups=4)
    ours = float(loss / mix.num_targets(batch["labels"]))

    hf_state, hf_config = to_hf(model.state_dict(), cfg.model)
    hf_config._attn_implementation = "eager"
    hf = getattr(
        transformers, type(hf_config).__name__.replace("Config", "ForConditionalGeneration")
    )
    twin = hf(hf_config).eval()
    missing, unexpected = twin.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("embed_tokens" in k or "lm_head" in k for k in missing)
    with torch.no_grad():
        theirs = twin(
            input_ids=batch["input_ids"].long(),
            attention_mask=batch["attention_mask"].long(),
            labels=labels,
        ).loss
    assert ours == pytest.approx(float(theirs), rel=1e-4)
