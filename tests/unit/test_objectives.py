"""Objectives as classes (``pretrain.objectives``): the registry, the one way to say the mix
(deprecated keys resolved with a warning), targets, loss groups and losses against formulas
written here, and the trainer's collaborators that replaced inline code (checkpoint policy,
pipeline stage layout)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint import CheckpointPolicy
from pretrain.config import load_config, validate_config
from pretrain.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    Objective,
    ObjectiveMix,
    TokenPrediction,
    objective_weights,
    register,
)
from pretrain.stages import stage_layer_keys
from tests.sample_data import REPO

DECODER = REPO / "configs" / "tiny_decoder.yaml"
ENCODER = REPO / "configs" / "tiny_encoder.yaml"


def _validated(path, overrides):
    cfg = load_config(path, ["train.run_dir=unused", *overrides])
    validate_config(cfg)
    return cfg


# -- the mix: one way to say it ---------------------------------------------------------------


def test_presets_get_their_family_default_objective():
    assert _validated(DECODER, []).objective.weights == {"clm": 1.0}
    assert _validated(ENCODER, []).objective.weights == {"mlm": 1.0}


@pytest.mark.parametrize(
    ("overrides", "weights", "said"),
    [
        (["objective.name=tlm"], {"tlm": 1.0}, "objective.name is deprecated: write "
         "objective.weights={tlm: 1} instead"),
        (["objective.tlm_share=0.25"], {"mlm": 0.75, "tlm": 0.25}, "objective.tlm_share is "
         "deprecated: write objective.weights={mlm: 0.75, tlm: 0.25} instead"),
        (["objective.name=mlm", "objective.tlm_share=1.0"], {"tlm": 1.0}, "objective.name and "
         "objective.tlm_share are deprecated: write objective.weights={tlm: 1} instead"),
        # tlm_share overrides the weights' MLM/TLM split, as it always did.
        (["objective.weights={mlm: 1.0, tlm: 1.0}", "objective.tlm_share=0.5"],
         {"mlm": 0.5, "tlm": 0.5}, "objective.tlm_share is deprecated: write "
         "objective.weights={mlm: 0.5, tlm: 0.5} instead"),
    ],
)  # fmt: skip
def test_deprecated_keys_become_the_weights_with_a_warning(overrides, weights, said):
    with pytest.warns(FutureWarning) as record:
        cfg = _validated(ENCODER, overrides)
    assert [str(w.message) for w in record] == [said]
    assert cfg.objective.weights == weights
    # Resolved: the saved config says it one way, and validating it again is silent.
    assert cfg.objective.name is None and cfg.objective.tlm_share is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(cfg)


def test_weights_alone_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = _validated(ENCODER, ["objective.weights={mlm: 3, tlm: 1}"])
    assert cfg.objective.weights == {"mlm": 3.0, "tlm": 1.0}


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        (DECODER, ["objective.weights={mlm: 1.0}"],
         "objective.weights.mlm ('mlm') needs model.family in encoder (got 'decoder')"),
        (ENCODER, ["objective.weights={clm: 1.0}"],
         "objective.weights.clm ('clm') needs model.family in decoder (got 'encoder')"),
        (ENCODER, ["objective.weights={mlm: 1.0}", "objective.name=tlm"],
         "objective.name ('tlm') and objective.weights ({'mlm': 1.0}) both set the objectives; "
         "objective.name is deprecated: set objective.weights only"),
        (ENCODER, ["objective.tlm_share=1.5"], "objective.tlm_share (1.5) must be in [0, 1]"),
        (ENCODER, ["objective.weights={mlm: 0.0}"],
         "objective.weights ({'mlm': 0.0}) must have a positive sum"),
        (ENCODER, ["objective.weights={ctc: 1.0}"],
         "objective.weights.ctc: unknown objective; must be one of clm, mlm, tlm, span, "
         "btmlm, nsp, sop, spanbert, electra, simcse, xlco, t5, bart, prefix_lm, translation"),
    ],
)  # fmt: skip
def test_bad_objective_configs_get_one_line(path, overrides, message):
    with pytest.raises(ValueError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _validated(path, overrides)
    assert str(err.value) == message


def test_validation_asks_each_registered_objective_for_its_families():
    # An objective added to the registry is checked by its own families: nothing else to edit.
    @register
    class DecoderOnlyToy(TokenPrediction):
        name = "toy_lm"
        families = ("decoder",)
        transform = "clm"
        shift_targets = True

    try:
        cfg = _validated(DECODER, ["objective.weights={toy_lm: 1.0}"])
        assert cfg.objective.weights == {"toy_lm": 1.0}
        with pytest.raises(ValueError, match=r"toy_lm \('toy_lm'\) needs model.family in decoder"):
            _validated(ENCODER, ["objective.weights={toy_lm: 1.0}"])
        # A mix whose objectives need different batch transforms is refused.
        with pytest.raises(ValueError, match="ask for different batch transforms"):
            ObjectiveMix({"toy_lm": 1.0, "mlm": 1.0})

        # An objective with a loss of its own cannot share a batch's token-prediction loss.
        @register
        class OwnLoss(Objective):
            name = "own_loss"
            families = ("decoder",)
            transform = "clm"

        with pytest.raises(ValueError, match="score one batch differently"):
            ObjectiveMix({"toy_lm": 1.0, "own_loss": 1.0})
    finally:
        OBJECTIVES.pop("toy_lm", None)
        OBJECTIVES.pop("own_loss", None)


def test_loader_settings_give_tlm_its_share_of_rows():
    cfg = _validated(ENCODER, ["objective.weights={mlm: 3, tlm: 1}", "objective.mask_prob=0.2"])
    transform, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert transform == "mlm"
    assert masking.tlm_share == 0.25 and masking.mask_prob == 0.2
    transform, masking = ObjectiveMix({"clm": 1.0}).loader_settings(cfg.objective)
    assert transform == "clm" and masking.tlm_share == 0.0


def test_objective_weights_reads_any_config_shape():
    class Old:  # a config saved before the weights were the one spelling
        weights: dict = {}
        name = "mlm"
        tlm_share = 0.5

    with pytest.warns(FutureWarning):
        assert objective_weights(Old(), family="encoder") == (
            {"mlm": 0.5, "tlm": 0.5},
            "objective.name",
        )


# -- targets, groups and losses ---------------------------------------------------------------


def _batch():
    # Row 0: one language (mono). Row 1: a pair (languages 1 then 2), the last position padding.
    lang_ids = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[5, IGNORE_INDEX, 7, IGNORE_INDEX], [IGNORE_INDEX, 3, 4, IGNORE_INDEX]])
    return lang_ids, mask, labels


def test_masked_mix_groups_rows_by_objective_and_tokens_by_language():
    lang_ids, mask, labels = _batch()
    mix = ObjectiveMix({"mlm": 3.0, "tlm": 1.0})
    groups = mix.target_groups(lang_ids, mask, num_languages=3)
    # mlm is objective 0, tlm objective 1: group = objective * 3 + language.
    assert groups.tolist() == [[0, 0, 0, 0], [4, 4, 5, 5]]
    assert torch.equal(mix.targets(labels), labels)
    assert int(mix.num_targets(labels)) == 4


def test_clm_shifts_targets_and_puts_every_row_in_its_group():
    lang_ids, mask, labels = _batch()
    mix = ObjectiveMix({"clm": 1.0})
    assert mix.targets(labels).tolist() == [
        [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX],
        [3, 4, IGNORE_INDEX, IGNORE_INDEX],
    ]
    # The target at t is token t + 1: its language is that token's.
    assert mix.target_groups(lang_ids, mask, num_languages=3).tolist() == [
        [0, 0, 0, 0],
        [1, 2, 2, 2],
    ]
    assert int(mix.num_targets(labels)) == 3  # the first position predicts nothing


@pytest.mark.parametrize("weights", [{"mlm": 1.0, "tlm": 1.0}, {"clm": 1.0}])
def test_losses_equal_cross_entropy_summed_per_group(weights):
    torch.manual_seed(0)
    lang_ids, mask, labels = _batch()
    mix = ObjectiveMix(weights, chunk_tokens=3)
    hidden = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    targets = mix.targets(labels)
    groups = mix.target_groups(lang_ids, mask, num_languages=3)
    num_groups = mix.num_groups(3)
    loss, sums, counts = mix.loss(hidden, weight, bias, targets, groups, num_groups=num_groups)
    # The formula: per-token cross-entropy, summed over the targets of each group.
    logits = hidden @ weight.T + bias
    want_sums = torch.zeros(num_groups, dtype=torch.float64)
    want_counts = torch.zeros(num_groups, dtype=torch.float64)
    for b in range(2):
        for t in range(4):
            if targets[b, t] != IGNORE_INDEX:
                token = F.cross_entropy(logits[b, t][None], targets[b, t][None])
                want_sums[groups[b, t]] += token.detach()
                want_counts[groups[b, t]] += 1
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-6)
    assert counts.tolist() == want_counts.tolist()
    torch.testing.assert_close(loss.double(), want_sums.sum(), rtol=1e-6, atol=1e-6)
    # The logits path (tensor parallel) gives the same numbers.
    loss2, sums2, counts2 = mix.loss_from_logits(logits, targets, groups, num_groups=num_groups)
    torch.testing.assert_close(loss2.double(), loss.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums2.double(), sums.double(), rtol=1e-6, atol=1e-6)
    assert counts2.tolist() == counts.tolist()


def test_group_metrics_are_token_weighted_means():
    mix = ObjectiveMix({"mlm": 1.0, "tlm": 1.0})
    # Groups [mlm-en, mlm-de, tlm-en, tlm-de].
    sums = torch.tensor([2.0, 0.0, 3.0, 9.0], dtype=torch.float64)
    counts = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    out = mix.group_metrics(sums, counts, ["en", "de"])
    assert out["loss_per_lang"] == {"en": 5.0 / 3.0, "de": 3.0}
    assert out["loss_per_objective"] == {"mlm": 2.0, "tlm": 12.0 / 5.0}


# -- collaborators of the loop ----------------------------------------------------------------


def test_checkpoint_policy_saves_periodically_while_finite_and_once_at_the_end():
    policy = CheckpointPolicy(every=2)
    policy.saved(0)
    finite = {1: True, 2: True, 3: False, 4: False, 5: True, 6: True}
    saved = []
    for step in range(1, 7):
        ending = step == 6
        assert policy.due(step, ending=ending) == (step % 2 == 0 or ending)
        if policy.should_save(step, ending=ending, finite=finite[step]):
            saved.append(step)
            policy.saved(step)
    # Step 4 is periodic but its loss was not finite; 6 is periodic and the end: one save.
    assert saved == [2, 6]
    assert not policy.should_save(6, ending=True, finite=True)
    # The end saves even after a NaN (the trainer then refuses and stops with exit 3).
    assert CheckpointPolicy(every=0).should_save(3, ending=True, finite=False)


def test_stage_layout_from_the_config_or_the_even_split():
    even = load_config(DECODER, ["model.num_layers=5", "train.run_dir=unused"])
    assert stage_layer_keys(even, num_stages=2) == [["0", "1"], ["2", "3", "4"]]
    set_by_hand = load_config(
        DECODER, ["model.num_layers=5", "parallel.stage_layers=[1,4]", "train.run_dir=unused"]
    )
    assert stage_layer_keys(set_by_hand, num_stages=2) == [["0"], ["1", "2", "3", "4"]]
