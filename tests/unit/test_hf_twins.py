"""Each family maps to its transformers twin with fp32 logits within 1e-4, and back bit-exactly.

Shape legend: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.config import ModelConfig, MoEConfig

transformers = pytest.importorskip("transformers")

from checkpoints_tools.adapters import adapter_for, from_hf, to_hf  # noqa: E402 - after the importorskip
from tests.twins import randomised  # noqa: E402

VOCAB = 96


def _tokens(cfg: ModelConfig, *, avoid: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    tokens_BT = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen)
    if avoid is not None:
        tokens_BT[tokens_BT == avoid] = avoid + 1
    return tokens_BT


def _hf_model(hf_state_dict, hf_config) -> torch.nn.Module:
    cls = getattr(transformers, hf_config.architectures[0])
    model = cls(hf_config).eval()
    model.load_state_dict(hf_state_dict, strict=True)
    return model


def _check_twin(cfg: ModelConfig, *, expected_class: str, avoid_token: int | None = None) -> None:
    model = randomised(cfg)
    assert adapter_for(cfg).hf_architecture == expected_class
    state_dict = model.state_dict()
    hf_state_dict, hf_config = to_hf(state_dict, cfg)
    assert hf_config.architectures == [expected_class]
    hf_model = _hf_model(hf_state_dict, hf_config)

    tokens_BT = _tokens(cfg, avoid=avoid_token)
    with torch.no_grad():
        ours_BTV = model(tokens_BT)
        theirs_BTV = hf_model(input_ids=tokens_BT).logits
    assert ours_BTV.shape == theirs_BTV.shape
    assert (ours_BTV - theirs_BTV).abs().max().item() < 1e-4
    assert ours_BTV.abs().max().item() > 1e-2  # a non-trivial comparison

    # Back from what transformers holds (as after from_pretrained), and from a config.json dict.
    for config_form in (hf_model.config, hf_model.config.to_dict()):
        back, cfg_back = from_hf(hf_model.state_dict(), config_form)
        assert back.keys() == state_dict.keys()
        for key, tensor in state_dict.items():
            assert torch.equal(back[key], tensor), key
        again = build_model(cfg_back).eval()
        again.load_state_dict(back, strict=True)
        with torch.no_grad():
            assert torch.equal(again(tokens_BT), ours_BTV)


DECODER = ModelConfig(
    family="decoder",
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    ffn_hidden_size=48,
    max_seq_len=64,
    rope_theta=500.0,
    norm_eps=1e-5,
    init_std=0.1,
)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_decoder_matches_llama(tied: bool) -> None:
    _check_twin(
        dataclasses.replace(DECODER, tie_embeddings=tied), expected_class="LlamaForCausalLM"
    )


def test_moe_decoder_top2_matches_mixtral() -> None:
    moe = MoEConfig(
        num_experts=4, top_k=2, router="gshard", expert_ffn_hidden_size=32, dropless=True
    )
    _check_twin(dataclasses.replace(DECODER, moe=moe), expected_class="MixtralForCausalLM")


def test_switch_decoder_matches_qwen3_moe() -> None:
    moe = MoEConfig(
        num_experts=4, top_k=1, router="switch", every=2, expert_ffn_hidden_size=32, dropless=True
    )
    cfg = dataclasses.replace(DECODER, num_layers=4, qk_norm=True, moe=moe)
    _check_twin(cfg, expected_class="Qwen3MoeForCausalLM")


ENCODER = ModelConfig(
    family="encoder",
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    ffn_hidden_size=64,
    max_seq_len=40,
    position="learned",
    norm="layernorm",
    norm_eps=1e-5,
    norm_position="post",
    mlp="gelu",
    bias=True,
    tie_embeddings=True,
    init_std=0.1,
    pad_token_id=1,
)


@pytest.mark.parametrize("tied", [True, False])
def test_encoder_matches_xlm_roberta(tied: bool) -> None:
    _check_twin(
        dataclasses.replace(ENCODER, tie_embeddings=tied),
        expected_class="XLMRobertaForMaskedLM",
        avoid_token=1,
    )


def test_xlm_roberta_token_type_row_is_folded_into_positions() -> None:
    cfg = ENCODER
    model = randomised(cfg)
    hf_state_dict, hf_config = to_hf(model.state_dict(), cfg)
    hf_state_dict["roberta.embeddings.token_type_embeddings.weight"] = 0.1 * torch.randn(
        1, cfg.hidden_size, generator=torch.Generator().manual_seed(3)
    )
    hf_model = _hf_model(hf_state_dict, hf_config)
    back, cfg_back = from_hf(hf_model.state_dict(), hf_model.config)
    ours = build_model(cfg_back).eval()
    ours.load_state_dict(back)
    tokens_BT = _tokens(cfg, avoid=1)
    with torch.no_grad():
        diff = ours(tokens_BT) - hf_model(input_ids=tokens_BT).logits
    assert diff.abs().max().item() < 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_nsp_encoder_matches_bert_for_pretraining(tied: bool) -> None:
    """Segment embeddings, the pooler and the pair classifier: ``BertForPreTraining``'s MLM and
    ``seq_relationship`` logits on a padded batch of two-segment rows, and back bit-exactly."""
    cfg = dataclasses.replace(ENCODER, tie_embeddings=tied, type_vocab_size=2, pair_head=True,
                              pad_token_id=0)  # fmt: skip
    assert adapter_for(cfg).hf_architecture == "BertForPreTraining"
    model = randomised(cfg)
    state_dict = model.state_dict()
    hf_state_dict, hf_config = to_hf(state_dict, cfg)
    hf_model = _hf_model(hf_state_dict, hf_config)
    tokens_BT = _tokens(cfg, avoid=0)
    types_BT = torch.zeros_like(tokens_BT)
    types_BT[:, 5:] = 1
    mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
    mask_BT[1, 9:] = False  # row 1 padded
    with torch.no_grad():
        ours_BTV, pair_B2 = model(
            tokens_BT, document_ids_BT=torch.where(mask_BT, 0, -1), token_type_ids_BT=types_BT,
            position_ids_BT=torch.arange(12).expand(2, 12), return_pair_logits=True,
        )  # fmt: skip
        theirs = hf_model(input_ids=tokens_BT, token_type_ids=types_BT,
                          attention_mask=mask_BT.long())  # fmt: skip
    diff = (ours_BTV - theirs.prediction_logits)[mask_BT]
    assert diff.abs().max().item() < 1e-4
    assert (pair_B2 - theirs.seq_relationship_logits).abs().max().item() < 1e-5
    assert pair_B2.abs().max().item() > 1e-2 and ours_BTV.abs().max().item() > 1e-2
    back, cfg_back = from_hf(hf_model.state_dict(), hf_model.config.to_dict())
    assert cfg_back.type_vocab_size == 2 and cfg_back.pair_head
    assert back.keys() == state_dict.keys()
    for key, tensor in state_dict.items():
        assert torch.equal(back[key], tensor), key


def test_xlm_roberta_refuses_the_pair_head() -> None:
    from checkpoints_tools.adapters import XLMRobertaAdapter

    cfg = dataclasses.replace(ENCODER, type_vocab_size=2, pair_head=True)
    with pytest.raises(ValueError, match=r"^model\.type_vocab_size \(2\) must be 0 to export "
                                         r"to XLMRobertaForMaskedLM$"):  # fmt: skip
        XLMRobertaAdapter.check(cfg)


def test_moe_encoder_export_refuses_in_one_line() -> None:
    cfg = dataclasses.replace(ENCODER, moe=MoEConfig(num_experts=4, top_k=2))
    model = build_model(cfg)
    with pytest.raises(
        ValueError,
        match=r"^model\.moe\.num_experts \(4\) must be 0 to export an "
        r"encoder: transformers has no MoE masked-LM encoder class$",
    ):
        to_hf(model.state_dict(), cfg)


def test_unnormalised_gate_without_qk_norm_refuses() -> None:
    cfg = dataclasses.replace(
        DECODER, moe=MoEConfig(num_experts=4, top_k=1, router="switch", dropless=True)
    )
    with pytest.raises(
        ValueError,
        match=r"^model\.qk_norm \(False\) must be True to export to "
        r"Qwen3MoeForCausalLM$",
    ):
        to_hf(build_model(cfg).state_dict(), cfg)


def test_unrepresentable_dense_decoder_refuses() -> None:
    cfg = dataclasses.replace(DECODER, position="learned")
    with pytest.raises(
        ValueError,
        match=r"^model\.position \('learned'\) must be 'rope' to "
        r"export to LlamaForCausalLM$",
    ):
        to_hf(build_model(cfg).state_dict(), cfg)


def test_import_refuses_unknown_model_type() -> None:
    with pytest.raises(ValueError, match=r"^model_type \('gpt2'\) must be one of"):
        from_hf({}, {"model_type": "gpt2"})


@pytest.mark.parametrize("family", ["mixtral", "xlm-roberta"])
def test_save_pretrained_and_reload_keeps_the_logits(family: str, tmp_path) -> None:
    if family == "mixtral":
        moe = MoEConfig(num_experts=4, top_k=2, router="gshard", dropless=True)
        cfg, avoid = dataclasses.replace(DECODER, tie_embeddings=True, moe=moe), None
    else:
        cfg, avoid = ENCODER, 1
    model = randomised(cfg)
    hf_model = _hf_model(*to_hf(model.state_dict(), cfg))
    hf_model.save_pretrained(tmp_path)
    cls = getattr(transformers, hf_model.config.architectures[0])
    reloaded = cls.from_pretrained(tmp_path).eval()
    back, _ = from_hf(reloaded.state_dict(), reloaded.config)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back[key], tensor), key
    tokens_BT = _tokens(cfg, avoid=avoid)
    with torch.no_grad():
        assert (model(tokens_BT) - reloaded(input_ids=tokens_BT).logits).abs().max() < 1e-4
