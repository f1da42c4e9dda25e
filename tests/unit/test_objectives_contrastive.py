"""The contrastive objectives in the trainer's path: SimCSE (``{simcse: 1, mlm: 1}``: unmasked
rows, each fed twice) and XLCo (``{xlco: 1, mlm: 3}``: unmasked pair rows split into a source and
a target row), their batches laid out as the rule says, their loss through the mix against the
losses of ``pretrain.objectives.contrastive`` on the model's pooled states, and the config
rules."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.transforms import IGNORE_INDEX, ROW_TRANSFORMS
from pretrain.batches import model_inputs
from pretrain.models import build_model
from pretrain.objectives import ObjectiveMix
from pretrain.objectives.contrastive import pool, simcse_loss, translation_ranking_loss
from tests.objective_checks import encoder_config

PAIR, SIMCSE = ROW_TRANSFORMS.index("pair"), ROW_TRANSFORMS.index("simcse")


def _batch(shards, cfg):
    mix = ObjectiveMix.from_config(cfg)
    transform, masking = mix.loader_settings(cfg.objective)
    data = DataConfig(manifest=str(shards["shards"]), seq_len=64, batch_size=8)
    loader = build_loader(data, dp_rank=0, dp_world_size=1, objective=transform, masking=masking,
                          seed=3)  # fmt: skip
    return mix, next(iter(loader))


def test_config_rules() -> None:
    cfg = encoder_config("objective.weights={simcse: 1, mlm: 1}", "model.dropout=0.1")
    _, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert masking.mono_kinds == (("simcse", 1.0), ("mlm", 1.0)) and not masking.unmasked_pairs
    cfg = encoder_config("objective.weights={xlco: 1, mlm: 3}")
    _, masking = ObjectiveMix.from_config(cfg).loader_settings(cfg.objective)
    assert masking.tlm_share == 0.25 and masking.unmasked_pairs
    with pytest.raises(ValueError, match=r"simcse needs model.dropout > 0 \(got 0.0\)"):
        encoder_config("objective.weights={simcse: 1}", "model.dropout=0")
    with pytest.raises(ValueError, match=r"\(tlm, xlco\) all take the pair rows"):
        encoder_config("objective.weights={tlm: 1, xlco: 1}")
    with pytest.raises(ValueError, match=r"\(electra, simcse\) each score a loss of their own"):
        encoder_config("objective.weights={simcse: 1, electra: 1}", "model.dropout=0.1")
    with pytest.raises(ValueError, match=r"objective.contrastive.temperature \(0.0\) must be > 0"):
        encoder_config("objective.weights={xlco: 1}", "objective.contrastive.temperature=0")


def test_simcse_rows_are_unmasked_and_fed_twice(shards) -> None:
    cfg = encoder_config("objective.weights={simcse: 1, mlm: 1}", "model.dropout=0.1")
    mix, batch = _batch(shards, cfg)
    rows = (batch["row_transform"] == SIMCSE).nonzero().squeeze(1)
    assert 0 < len(rows) < 8
    assert bool((batch["labels"][rows] == IGNORE_INDEX).all())  # no token targets
    assert bool((batch["labels"][batch["row_transform"] != SIMCSE] != IGNORE_INDEX).any())
    out = mix.prepare(batch, logits_at=None)
    assert out["input_ids"].shape[0] == 8 + len(rows)
    assert torch.equal(out["contrast_a"], rows)
    for key in ("input_ids", "position_ids", "lang_ids", "attention_mask"):
        torch.testing.assert_close(out[key][out["contrast_b"]], batch[key][rows], rtol=0, atol=0)
    assert int(mix.num_rows(batch)) == len(rows)


def test_xlco_pairs_split_into_their_two_sides(shards) -> None:
    cfg = encoder_config("objective.weights={xlco: 1, mlm: 3}")
    mix, batch = _batch(shards, cfg)
    pairs = (batch["row_transform"] == PAIR).nonzero().squeeze(1).tolist()
    assert pairs and int(mix.num_rows(batch)) == len(pairs)
    out = mix.prepare(batch, logits_at=None)
    assert out["input_ids"].shape[0] == 8 + len(pairs)
    for index, row in enumerate(pairs):
        real = batch["attention_mask"][row]
        lang = batch["lang_ids"][row]
        ids = batch["input_ids"][row]
        assert bool((batch["labels"][row] == IGNORE_INDEX).all())  # left unmasked
        src, tgt = real & (lang == lang[0]), real & (lang != lang[0])
        a, b = out["contrast_a"][index], out["contrast_b"][index]
        assert int(a) == row
        assert torch.equal(out["input_ids"][a][out["attention_mask"][a]], ids[src])
        assert torch.equal(out["input_ids"][b][out["attention_mask"][b]], ids[tgt])
        n = int(tgt.sum())
        assert bool(out["attention_mask"][b][:n].all()) and not bool(
            out["attention_mask"][b][n:].any()
        )
        # the target's own positions from 0, its language throughout
        assert out["position_ids"][b][:n].tolist() == list(range(n))
        assert bool((out["lang_ids"][b][:n] == lang[tgt][0]).all())


@pytest.mark.parametrize(
    ("weights", "loss_fn"),
    [("{simcse: 1, mlm: 1}", simcse_loss), ("{xlco: 1, mlm: 3}", translation_ranking_loss)],
    ids=["simcse", "xlco"],
)
def test_the_loss_is_the_contrast_of_the_pooled_states(shards, weights, loss_fn) -> None:
    cfg = encoder_config(f"objective.weights={weights}", "model.dropout=0.1",
                         "objective.contrastive.temperature=0.1")  # fmt: skip
    cfg.model.dropout = 0.0  # the formula's states from a second call: no dropout here
    mix, batch = _batch(shards, cfg)
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = mix.prepare(batch, logits_at=None)
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    _, pooled = mix.split_outputs(
        model(batch["input_ids"], return_hidden=True, **kwargs, **mix.model_options(batch))
    )
    sums = torch.zeros(mix.num_groups(4))
    counts = torch.zeros(mix.num_groups(4))
    loss = mix.row_loss(pooled, batch, sums, counts)
    # the formula: mean of the final states (the MLM head's input) over each row's real tokens
    seen = {}
    handle = model.head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    model(batch["input_ids"], **kwargs)
    handle.remove()
    states = pool(seen["x"], batch["attention_mask"])
    want = loss_fn(states[batch["contrast_a"]], states[batch["contrast_b"]], temperature=0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert float(counts[-1]) == len(batch["contrast_a"]) and 0 <= float(sums[-1]) <= counts[-1]
    metrics = mix.group_metrics(sums.double(), counts.double(), ["de", "en", "ja", "ru"])
    name = weights[1:].split(":")[0]
    assert metrics["contrastive_loss"][name] == pytest.approx(
        float(want) / len(batch["contrast_a"]), rel=1e-5
    )
    loss.backward()  # the body trains from it
    assert float(model.layers["0"].attention.wq.weight.grad.abs().sum()) > 0


def test_the_export_gives_the_same_sentence_embeddings() -> None:
    """The encoder's export read as ``XLMRobertaModel`` (the body, for sentence embeddings):
    its mean-pooled last hidden states are our pooled states."""
    from transformers import XLMRobertaModel

    from checkpoints_tools.adapters import to_hf
    from tests.twins import randomised

    cfg = encoder_config("objective.weights={xlco: 1}", "model.dropout=0.0")
    model = randomised(cfg.model, seed=2)
    hf_state, hf_config = to_hf(model.state_dict(), cfg.model)
    body = XLMRobertaModel(hf_config, add_pooling_layer=False).eval()
    prefix = "roberta."
    body.load_state_dict(
        {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}, strict=True
    )  # fmt: skip
    tokens = torch.randint(
        5, cfg.model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1)
    )
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[1, 12:] = False
    pad = hf_config.pad_token_id
    padded = torch.where(real, tokens, pad)
    with torch.no_grad():
        _, ours = model(padded, document_ids_BT=torch.where(real, 0, -1), return_pooled_BT=real,
                        return_hidden=True)  # fmt: skip
        theirs = body(padded, attention_mask=real.long()).last_hidden_state
    torch.testing.assert_close(pool(theirs, real), ours, rtol=0, atol=1e-5)
