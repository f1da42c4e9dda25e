"""Encoder-decoders map to MT5 / MBart / SwitchTransformers with fp32 logits within 1e-4 (eager
attention), both ways: our random model exported, and a random transformers model imported.

Shape legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.config import ModelConfig, MoEConfig

transformers = pytest.importorskip("transformers")

from checkpoints_tools.adapters import adapter_for, from_hf, to_hf  # noqa: E402
from tests.twins import hf_model as load_twin  # noqa: E402
from tests.twins import randomised, tiny_encdec  # noqa: E402

VOCAB = 80
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ATOL = 1e-4

_COMMON = {"vocab_size": VOCAB, "max_seq_len": 32}
MT5 = tiny_encdec("mt5", **_COMMON, num_decoder_layers=3, ffn_hidden_size=40)
MBART = tiny_encdec("mbart", **_COMMON, num_decoder_layers=2, ffn_hidden_size=48)
SWITCH = tiny_encdec("switch", **_COMMON, ffn_hidden_size=40)
NLLB = tiny_encdec("nllb", **_COMMON, ffn_hidden_size=48, num_layers=4, num_decoder_layers=4)


def _batch(pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded source and target rows with their ids, masks and document ids."""
    gen = torch.Generator().manual_seed(7)
    src_BS = torch.randint(2, VOCAB, (2, 11), generator=gen)
    tgt_BT = torch.randint(2, VOCAB, (2, 7), generator=gen)
    src_mask_BS = torch.ones_like(src_BS)
    src_mask_BS[1, 8:] = 0
    tgt_mask_BT = torch.ones_like(tgt_BT)
    tgt_mask_BT[1, 5:] = 0
    src_BS = src_BS.masked_fill(src_mask_BS == 0, pad)
    tgt_BT = tgt_BT.masked_fill(tgt_mask_BT == 0, pad)
    return src_BS, tgt_BT, src_mask_BS, tgt_mask_BT


def _compare(ours, theirs, cfg: ModelConfig) -> None:
    """Logits of ours and theirs on unpadded rows and on right-padded rows (real positions)."""
    pad = cfg.pad_token_id
    src_BS, tgt_BT, src_mask_BS, tgt_mask_BT = _batch(pad)
    with torch.no_grad():
        ours_BTV = ours(src_BS[:1], tgt_BT[:1])
        theirs_BTV = theirs(input_ids=src_BS[:1], decoder_input_ids=tgt_BT[:1]).logits
        assert ours_BTV.shape == theirs_BTV.shape
        assert (ours_BTV - theirs_BTV).abs().max().item() < ATOL
        assert ours_BTV.abs().max().item() > 1e-2  # a non-trivial comparison
        padded_BTV = ours(
            src_BS,
            tgt_BT,
            document_ids_BS=torch.where(src_mask_BS.bool(), 0, -1),
            decoder_document_ids_BT=torch.where(tgt_mask_BT.bool(), 0, -1),
        )
        hf_padded_BTV = theirs(
            input_ids=src_BS,
            attention_mask=src_mask_BS,
            decoder_input_ids=tgt_BT,
            decoder_attention_mask=tgt_mask_BT,
        ).logits
    real_BT = tgt_mask_BT.bool()
    assert (padded_BTV[real_BT] - hf_padded_BTV[real_BT]).abs().max().item() < ATOL


def _check_export(
    cfg: ModelConfig, *, expected_class: str, tmp_path, through_files: bool = False
) -> None:
    model = randomised(cfg)
    assert adapter_for(cfg).hf_architecture == expected_class
    state_dict = model.state_dict()
    hf_state_dict, hf_config = to_hf(state_dict, cfg)
    assert hf_config.architectures == [expected_class]
    hf_model = load_twin(hf_state_dict, hf_config)
    _compare(model, hf_model, cfg)

    # Back from what transformers holds, and from a config.json dict: bit-exact.
    for config_form in (hf_model.config, hf_model.config.to_dict()):
        back, cfg_back = from_hf(hf_model.state_dict(), config_form)
        assert back.keys() == state_dict.keys()
        for key, tensor in state_dict.items():
            assert torch.equal(back[key], tensor), key
        assert cfg_back == cfg

    if not through_files:
        return
    # Through the files: from_pretrained must keep our head (the MT5 tie trap) and logits.
    hf_model.save_pretrained(str(tmp_path))
    cls = getattr(transformers, expected_class)
    reloaded = cls.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    _compare(model, reloaded, cfg)


def test_dense_relative_matches_mt5_untied(tmp_path) -> None:
    _check_export(
        MT5, expected_class="MT5ForConditionalGeneration", tmp_path=tmp_path, through_files=True
    )


@pytest.mark.parametrize("mlp", ["relu", "gelu"])
def test_mt5_non_gated_feed_forwards(mlp: str, tmp_path) -> None:
    cfg = dataclasses.replace(MT5, mlp=mlp)
    _check_export(cfg, expected_class="MT5ForConditionalGeneration", tmp_path=tmp_path)


def test_mt5_export_config_is_untied_with_both_keys() -> None:
    hf_state_dict, hf_config = to_hf(randomised(MT5).state_dict(), MT5)
    assert hf_config.tie_word_embeddings is False
    assert hf_config.decoder_start_token_id == 0
    assert not torch.equal(hf_state_dict["lm_head.weight"], hf_state_dict["shared.weight"])
    assert torch.equal(hf_state_dict["encoder.embed_tokens.weight"], hf_state_dict["shared.weight"])


@pytest.mark.parametrize("tied", [True, False])
def test_learned_positions_match_mbart(tied: bool, tmp_path) -> None:
    cfg = dataclasses.replace(MBART, tie_embeddings=tied)
    _check_export(cfg, expected_class="MBartForConditionalGeneration", tmp_path=tmp_path)


def test_mbart_export_writes_scale_embedding_and_offset_positions() -> None:
    for scale in (True, False):
        cfg = dataclasses.replace(MBART, scale_embeddings=scale)
        hf_state_dict, hf_config = to_hf(randomised(cfg).state_dict(), cfg)
        assert hf_config.to_dict()["scale_embedding"] is scale
    pos = hf_state_dict["model.encoder.embed_positions.weight"]
    assert pos.shape == (cfg.max_seq_len + 2, cfg.hidden_size)
    assert not pos[:2].any()
    assert hf_state_dict["final_logits_bias"].shape == (1, VOCAB)


@pytest.mark.parametrize("tied", [False, True])
def test_switch_top1_matches_switch_transformers(tied: bool, tmp_path) -> None:
    cfg = dataclasses.replace(SWITCH, tie_embeddings=tied, scale_output=tied)
    _check_export(
        cfg,
        expected_class="SwitchTransformersForConditionalGeneration",
        tmp_path=tmp_path,
        through_files=not tied,  # untied: both embed_tokens untie too
    )


def test_switch_sparse_layers_and_capacity_in_export() -> None:
    hf_state_dict, hf_config = to_hf(randomised(SWITCH).state_dict(), SWITCH)
    hf_model = load_twin(hf_state_dict, hf_config)
    sparse = [
        i
        for i, block in enumerate(hf_model.encoder.block)
        if getattr(block.layer[-1], "is_sparse", False)
    ]
    assert sparse == [1, 3]
    assert hf_config.expert_capacity >= SWITCH.max_seq_len
    assert hf_config.decoder_start_token_id == 0
    assert hf_config.tie_word_embeddings is False


def test_switch_router_equals_ours() -> None:
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersTop1Router,
    )

    model = randomised(SWITCH)
    ours = model.encoder.layers["1"].moe.router
    hf_config = to_hf(model.state_dict(), SWITCH)[1]
    theirs = SwitchTransformersTop1Router(hf_config).eval()
    with torch.no_grad():
        theirs.classifier.weight.copy_(ours.gate.weight)
    x_ND = torch.randn(64, SWITCH.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routing = ours(x_ND)
        onehot_NE, gate_N1, logits_NE = theirs(x_ND[None])
    assert torch.equal(onehot_NE[0].argmax(-1), routing.experts_NK[:, 0])
    assert (gate_N1[0, :, 0] - routing.gates_NK[:, 0]).abs().max().item() < 1e-6
    assert (logits_NE[0] - routing.logits_NE).abs().max().item() < 1e-5


def _random_hf(cls_name: str, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name == "final_logits_bias":
                buf.normal_(0.0, 0.1, generator=gen)
        # an untied T5-family config unties both embed_tokens too; released files share them
        shared = model.get_input_embeddings().weight
        for stack in (model.get_encoder(), model.get_decoder()):
            stack.embed_tokens.weight.copy_(shared)
    return model.eval()


def test_import_random_mt5() -> None:
    config = transformers.MT5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    config.tie_word_embeddings = False
    theirs = _random_hf("MT5ForConditionalGeneration", config)
    state, cfg = from_hf(theirs.state_dict(), theirs.config)
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    _compare(ours, theirs, cfg)


def test_import_random_mbart() -> None:
    config = transformers.MBartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_position_embeddings=24,
        scale_embedding=True,
    )
    theirs = _random_hf("MBartForConditionalGeneration", config)
    state, cfg = from_hf(theirs.state_dict(), theirs.config)
    assert cfg.tie_embeddings and cfg.final_logits_bias and cfg.scale_embeddings
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    _compare(ours, theirs, cfg)


def test_import_random_switch() -> None:
    config = transformers.SwitchTransformersConfig(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=4,
        num_experts=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        expert_capacity=64,
        relative_attention_num_buckets=8,
        dense_act_fn="gelu",
        tie_word_embeddings=False,
    )
    theirs = _random_hf("SwitchTransformersForConditionalGeneration", config)
    state, cfg = from_hf(theirs.state_dict(), theirs.config)
    assert sorted(build_model(cfg).moe_layers()) == [
        "decoder.layers.1.moe",
        "decoder.layers.3.moe",
        "encoder.layers.1.moe",
        "encoder.layers.3.moe",
    ]
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    _compare(ours, theirs, cfg)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            dataclasses.replace(MT5, tie_embeddings=True),
            r"^model\.tie_embeddings \(True\) must be False to export to "
            r"MT5ForConditionalGeneration: transformers' T5-family heads differ between "
            r"versions when tied$",
        ),
        (
            dataclasses.replace(SWITCH, tie_embeddings=True),
            r"^model\.scale_output \(False\) must be True with model\.tie_embeddings=True to "
            r"export to SwitchTransformersForConditionalGeneration \(it rescales",
        ),
        (
            dataclasses.replace(
                SWITCH,
                mlp="swiglu",
                moe=MoEConfig(num_experts=4, top_k=2, router="gshard", every=2, offset=1),
            ),
            r"^model\.moe\.top_k \(2\) must be 1 to export an MoE encoder-decoder with "
            r"model\.position=relative \(SwitchTransformersForConditionalGeneration\); top-2 "
            r"exports with position=sinusoidal \(NllbMoeForConditionalGeneration\)$",
        ),
        (
            dataclasses.replace(NLLB, pad_token_id=None),
            r"^model\.pad_token_id \(None\) must be set to export to "
            r"NllbMoeForConditionalGeneration \(its positions skip padding tokens\)$",
        ),
        (
            dataclasses.replace(MBART, embedding_norm=False),
            r"^model\.embedding_norm \(False\) must be True to export to "
            r"MBartForConditionalGeneration$",
        ),
        (
            dataclasses.replace(SWITCH, moe=dataclasses.replace(SWITCH.moe, every=2, offset=0)),
            r"^model\.moe\.offset \(0\) must be 1 \(0 with model\.moe\.every 1\)",
        ),
    ],
)
def test_unrepresentable_encoder_decoders_refuse(cfg: ModelConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_hf(build_model(cfg).state_dict(), cfg)


def test_import_refuses_embed_tokens_that_differ_from_shared() -> None:
    hf_state_dict, hf_config = to_hf(randomised(MT5).state_dict(), MT5)
    hf_state_dict["decoder.embed_tokens.weight"] = hf_state_dict["shared.weight"] + 1.0
    with pytest.raises(ValueError, match=r"^transformers weights have embed_tokens that differ"):
        from_hf(hf_state_dict, hf_config)


def _distinct_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize(
    ("preset", "hf_class", "hf_kwargs", "approx"),
    [
        (
            "mt5_base.yaml",
            "MT5ForConditionalGeneration",
            {"feed_forward_proj": "gated-gelu", "vocab_size": 250112, "d_ff": 2048},
            582e6,
        ),
        (
            "switch_base_8.yaml",
            "SwitchTransformersForConditionalGeneration",
            {
                "vocab_size": 32128,
                "d_ff": 3072,
                "num_experts": 8,
                "num_sparse_encoder_layers": 6,
                "num_sparse_decoder_layers": 6,
                "tie_word_embeddings": True,
            },
            619e6,
        ),
    ],
)
def test_base_presets_count_their_twins_parameters(preset, hf_class, hf_kwargs, approx) -> None:
    from pretrain.config import load_config
    from pretrain.models.parallel_plan import param_counts

    cfg = load_config(CONFIGS / preset).model
    shape = {"d_model": 768, "d_kv": 64, "num_layers": 12, "num_decoder_layers": 12}
    cls = getattr(transformers, hf_class)
    config = getattr(transformers, hf_class.replace("ForConditionalGeneration", "Config"))(
        **shape, num_heads=12, **hf_kwargs
    )
    with torch.device("meta"):
        theirs = _distinct_params(cls(config))  # MT5 in memory: shared, embed_tokens, lm_head tied
        ours_model = build_model(cfg)
    if hf_class.startswith("MT5"):
        theirs += config.vocab_size * config.d_model  # the untied head of the released mT5
    ours = param_counts(ours_model)["params_total"]
    assert abs(ours - theirs) <= 0.02 * theirs
    assert abs(theirs - approx) <= 0.01 * approx
    adapter_for(cfg).check(cfg)  # and the preset exports to that class
    assert adapter_for(cfg).hf_architecture == hf_class


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    from checkpoints_tools.testing import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("encdec_tok"))


CLI_PRESETS = {
    "mt5": ("tiny_encdec.yaml", "MT5ForConditionalGeneration"),
    "mbart": ("tiny_mbart.yaml", "MBartForConditionalGeneration"),
    "switch": ("tiny_encdec_moe.yaml", "SwitchTransformersForConditionalGeneration"),
}


def _tiny_checkpoint(preset: str, *, tokenizer_dir, run_dir, extra: tuple[str, ...] = ()):
    from checkpoints_tools.testing import encdec_config, save_family_checkpoint

    cfg = encdec_config(
        preset, tokenizer=tokenizer_dir, run_dir=run_dir, max_seq_len=32, extra=extra
    )
    return save_family_checkpoint(cfg)


@pytest.mark.parametrize("shape", sorted(CLI_PRESETS))
def test_cli_export_verify_and_import_round_trip(shape: str, tokenizer_dir, tmp_path, capsys):
    import json

    from checkpoints_tools.cli import main
    from checkpoints_tools.dcp_io import open_checkpoint

    preset, architecture = CLI_PRESETS[shape]
    ckpt = _tiny_checkpoint(preset, tokenizer_dir=tokenizer_dir, run_dir=tmp_path / "run")
    out, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export-hf", str(ckpt), "--out", str(out), "--verify"]) == 0
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["architectures"] == [architecture]
    assert generation["decoder_start_token_id"] == config["decoder_start_token_id"]
    if shape != "mbart":
        assert config["decoder_start_token_id"] == config["pad_token_id"] == 0
    if shape == "switch":
        assert "routes dropless" in capsys.readouterr().err  # the capacity warning
    assert main(["import-hf", str(out), "--out", str(back)]) == 0
    original = open_checkpoint(ckpt).load_model_state()
    imported = open_checkpoint(back).load_model_state()
    assert set(imported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(imported[key], tensor), key


# ---------------------------------------------------------------------------------------------
# NLLB-MoE (GShard top-2): its sparse MLP mis-dispatches in transformers 5.24. The router, the
# blocks and (with that MLP patched to a correct top-2) the whole model are compared; the defect
# itself is pinned, so that a fixed transformers turns these tests red.

NLLB_DEFECT_FIXED = (
    "transformers' NllbMoeSparseMLP now sends each token to its top-2 experts: the upstream "
    "defect is fixed, so drop the NLLB-MoE export warning (NllbMoeAdapter.export_warning "
    "should already return None) and the correct_nllb_dispatch patch of the twin tests"
)


def _nllb_config(**overrides):
    kwargs = {
        "vocab_size": VOCAB,
        "d_model": 16,
        "encoder_layers": 4,
        "decoder_layers": 4,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 24,
        "decoder_ffn_dim": 24,
        "num_experts": 4,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "moe_token_dropout": 0.0,
        "activation_function": "gelu",
        "second_expert_policy": "all",
        "normalize_router_prob_before_dropping": False,
        "batch_prioritized_routing": False,
        "moe_eval_capacity_token_fraction": 1.0,
        "router_dtype": "float32",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
    }
    kwargs.update(overrides)
    return transformers.NllbMoeConfig(**kwargs)


def _nllb_sparse_mlp():
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    torch.manual_seed(0)
    return NllbMoeSparseMLP(_nllb_config(), ffn_dim=24).eval()


def _tokens_ND(num: int, dim: int = 16) -> torch.Tensor:
    return torch.randn(num, dim, generator=torch.Generator().manual_seed(11))


def _correct_top2(mlp, x_ND: torch.Tensor) -> torch.Tensor:
    """Each token through its two experts, weighted by the router's combine weights."""
    _, combine_NE, _ = mlp.router(x_ND)
    out_ND = torch.zeros_like(x_ND)
    for e in range(combine_NE.shape[1]):
        out_ND += combine_NE[:, e : e + 1] * mlp.experts[f"expert_{e}"](x_ND)
    return out_ND


def test_nllb_moe_top2_dispatch_defect_is_still_there() -> None:
    mlp = _nllb_sparse_mlp()
    calls = {e: 0 for e in range(4)}
    for e in range(4):
        mlp.experts[f"expert_{e}"].register_forward_hook(
            lambda _m, args, _out, e=e: calls.__setitem__(e, calls[e] + args[0].shape[0])
        )
    x_ND = _tokens_ND(10)
    with torch.no_grad():
        theirs_ND = mlp(x_ND[None])[0]
        counts = dict(calls)
        reference_ND = _correct_top2(mlp, x_ND)
    if (theirs_ND - reference_ND).abs().max() < 1e-5:
        pytest.fail(NLLB_DEFECT_FIXED)
    # expert 0 gets every (token, non-top-1 expert) pair, expert 1 the top-1 pairs
    assert counts == {0: 30, 1: 10, 2: 0, 3: 0}, NLLB_DEFECT_FIXED
    assert (theirs_ND - reference_ND).abs().max() > 1e-3, NLLB_DEFECT_FIXED


def _gshard_cfg(**moe) -> ModelConfig:
    return dataclasses.replace(
        MBART,
        hidden_size=16,
        num_layers=4,
        num_decoder_layers=4,
        ffn_hidden_size=24,
        mlp="gelu",
        moe=MoEConfig(num_experts=4, top_k=2, router="gshard", every=2, **moe),
    )


def test_gshard_router_equals_nllb_route_tokens() -> None:
    from pretrain.models.moe import TopKRouter

    mlp = _nllb_sparse_mlp()
    ours = TopKRouter(_gshard_cfg()).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(mlp.router.classifier.weight)
        x_ND = _tokens_ND(64)
        routing = ours(x_ND)
        top1_NE, combine_NE, logits_NE = mlp.router(x_ND)
    ours_NE = torch.zeros_like(combine_NE).scatter_add(1, routing.experts_NK, routing.gates_NK)
    assert torch.equal(top1_NE.argmax(-1), routing.experts_NK[:, 0])
    assert (ours_NE - combine_NE).abs().max().item() < 1e-6
    assert (logits_NE - routing.logits_NE).abs().max().item() < 1e-5


def test_gshard_moe_equals_a_correct_top2_of_nllb_experts() -> None:
    from pretrain.models.moe import MoE

    mlp = _nllb_sparse_mlp()
    ours = MoE(_gshard_cfg(dropless=True)).eval()
    experts = [mlp.experts[f"expert_{e}"] for e in range(4)]
    with torch.no_grad():
        ours.router.gate.weight.copy_(mlp.router.classifier.weight)
        ours.experts.w1.copy_(torch.stack([x.fc1.weight for x in experts]))
        ours.experts.b1.copy_(torch.stack([x.fc1.bias for x in experts]))
        ours.experts.w2.copy_(torch.stack([x.fc2.weight for x in experts]))
        ours.experts.b2.copy_(torch.stack([x.fc2.bias for x in experts]))
        x_ND = _tokens_ND(10)
        diff = ours(x_ND[None])[0] - _correct_top2(mlp, x_ND)
    assert diff.abs().max().item() < 1e-5


def test_nllb_sparse_layers_follow_the_every_rule() -> None:
    from pretrain.models.encoder_decoder import is_encdec_moe_layer

    with torch.device("meta"):
        theirs = transformers.NllbMoeForConditionalGeneration(_nllb_config())
    sparse = [i for i, layer in enumerate(theirs.model.encoder.layers) if layer.is_sparse]
    cfg = _gshard_cfg()
    assert sparse == [i for i in range(4) if is_encdec_moe_layer(cfg, layer=i)] == [1, 3]


def _block_pairs(ours, theirs, *, decoder: bool) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(our module, transformers module) for every linear and norm of a dense block."""
    pairs = []
    attention = [("attention", "self_attn")]
    norms = [("attention_norm", "self_attn_layer_norm"), ("ffn_norm", "ff_layer_norm")]
    if decoder:
        attention.append(("cross_attention", "cross_attention"))
        norms.append(("cross_attention_norm", "cross_attention_layer_norm"))
    for mine, their in attention:
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "out_proj")):
            pairs.append((getattr(getattr(ours, mine), a), getattr(getattr(theirs, their), b)))
    pairs += [(getattr(ours, mine), getattr(theirs, their)) for mine, their in norms]
    pairs += [(ours.feed_forward.w1, theirs.ffn.fc1), (ours.feed_forward.w2, theirs.ffn.fc2)]
    return pairs


@pytest.mark.parametrize("decoder", [False, True])
def test_nllb_dense_blocks_equal_ours(decoder: bool) -> None:
    from transformers.models.nllb_moe.modeling_nllb_moe import (
        NllbMoeDecoderLayer,
        NllbMoeEncoderLayer,
    )

    from pretrain.models.encoder_decoder import EncDecBlock

    config = _nllb_config(activation_function="relu")
    config._attn_implementation = "eager"
    theirs = (NllbMoeDecoderLayer if decoder else NllbMoeEncoderLayer)(config).eval()
    cfg = dataclasses.replace(_gshard_cfg(), mlp="relu", moe=MoEConfig())
    ours = EncDecBlock(cfg, layer=1, cross=decoder).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mine, their in _block_pairs(ours, theirs, decoder=decoder):
            for name in ("weight", "bias"):
                value = 0.3 * torch.randn(getattr(mine, name).shape, generator=gen)
                getattr(mine, name).copy_(value)
                getattr(their, name).copy_(value)
        x_BTD = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
        memory_BSD = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
        if decoder:
            causal_TT = torch.ones(6, 6, dtype=torch.bool).tril()
            additive = torch.zeros(6, 6).masked_fill(~causal_TT, torch.finfo(torch.float32).min)
            theirs_BTD = theirs(
                x_BTD, attention_mask=additive[None, None], encoder_hidden_states=memory_BSD
            )
            ours_BTD, _ = ours(
                x_BTD,
                self_mask=None,
                position_bias=None,
                num_tokens=6,
                is_causal=True,
                memory_BSD=memory_BSD,
            )
        else:
            theirs_BTD = theirs(x_BTD, attention_mask=None)
            ours_BTD, _ = ours(
                x_BTD, self_mask=None, position_bias=None, num_tokens=6, is_causal=False
            )
    assert (ours_BTD - theirs_BTD).abs().max().item() < 1e-5
    assert (ours_BTD - x_BTD).abs().max().item() > 1e-2


def _correct_sparse_forward(self, hidden_states, padding_mask=None):
    """NllbMoeSparseMLP.forward as a correct top-2 MoE: each token through its two experts."""
    batch, seq, dim = hidden_states.shape
    x_ND = hidden_states.reshape(-1, dim)
    _, combine_NE, _ = self.router(x_ND, padding_mask)
    out_ND = sum(
        combine_NE[:, e : e + 1] * self.experts[f"expert_{e}"](x_ND)
        for e in range(self.num_experts)
    )
    return out_ND.reshape(batch, seq, dim)


@pytest.fixture
def correct_nllb_dispatch(monkeypatch):
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    monkeypatch.setattr(NllbMoeSparseMLP, "forward", _correct_sparse_forward)


@pytest.mark.parametrize("tied", [True, False])
def test_gshard_top2_exports_to_nllb_moe_exactly_but_for_its_dispatch(
    tied: bool, correct_nllb_dispatch, tmp_path
) -> None:
    cfg = dataclasses.replace(NLLB, tie_embeddings=tied)
    _check_export(cfg, expected_class="NllbMoeForConditionalGeneration", tmp_path=tmp_path)


def test_nllb_moe_export_is_off_with_the_installed_dispatch() -> None:
    from checkpoints_tools.adapters.encoder_decoder import NllbMoeAdapter

    model = randomised(NLLB)
    hf_model = load_twin(*to_hf(model.state_dict(), NLLB))
    src_BS, tgt_BT, _, _ = _batch(NLLB.pad_token_id)
    with torch.no_grad():
        diff = model(src_BS, tgt_BT) - hf_model(input_ids=src_BS, decoder_input_ids=tgt_BT).logits
    assert diff.abs().max().item() > 1e-3, NLLB_DEFECT_FIXED
    warning = NllbMoeAdapter.export_warning(NLLB)
    assert warning is not None and "experts 0 and 1 only" in warning, NLLB_DEFECT_FIXED
    assert NllbMoeAdapter.export_warning(dataclasses.replace(NLLB, moe=MoEConfig())) is None


def test_dense_sinusoidal_matches_nllb_moe_without_sparse_layers(tmp_path) -> None:
    cfg = dataclasses.replace(NLLB, moe=MoEConfig())
    _check_export(cfg, expected_class="NllbMoeForConditionalGeneration", tmp_path=tmp_path)


def test_import_random_nllb_moe(correct_nllb_dispatch) -> None:
    config = _nllb_config(
        vocab_size=VOCAB, d_model=32, encoder_ffn_dim=40, decoder_ffn_dim=40, decoder_layers=2
    )
    config.decoder_sparse_step = 2
    theirs = _random_hf("NllbMoeForConditionalGeneration", config)
    state, cfg = from_hf(theirs.state_dict(), theirs.config)
    assert cfg.moe.num_experts == 4 and cfg.moe.router == "gshard" and cfg.position == "sinusoidal"
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    _compare(ours, theirs, cfg)


def test_sinusoidal_positions_equal_nllbs_table() -> None:
    from transformers.models.nllb_moe.modeling_nllb_moe import (
        NllbMoeSinusoidalPositionalEmbedding,
    )

    from pretrain.models.encoder_decoder import sinusoidal_positions

    for dim in (16, 17):
        table = NllbMoeSinusoidalPositionalEmbedding.get_embedding(300, dim, padding_idx=None)
        ours = sinusoidal_positions(torch.arange(300)[None], dim=dim)[0]
        assert (ours - table).abs().max().item() < 1e-5


def test_cli_nllb_moe_export_warns_verify_refuses_import_round_trips(
    tokenizer_dir, tmp_path, capsys
):
    from checkpoints_tools.cli import main
    from checkpoints_tools.dcp_io import open_checkpoint

    extra = (
        "model.position=sinusoidal",
        "model.embedding_norm=false",
        "model.final_logits_bias=false",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.router=gshard",
        "model.moe.every=2",
        "model.moe.dropless=true",
    )
    ckpt = _tiny_checkpoint(
        "tiny_mbart.yaml", tokenizer_dir=tokenizer_dir, run_dir=tmp_path / "run", extra=extra
    )
    out, back = tmp_path / "hf", tmp_path / "back"
    assert main(["export-hf", str(ckpt), "--out", str(tmp_path / "v"), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --verify cannot pass: NllbMoeForConditionalGeneration in ")
    assert not (tmp_path / "v").exists()
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 0
    assert "experts 0 and 1 only" in capsys.readouterr().err
    assert main(["import-hf", str(out), "--out", str(back)]) == 0
    original = open_checkpoint(ckpt).load_model_state()
    imported = open_checkpoint(back).load_model_state()
    assert set(imported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(imported[key], tensor), key
