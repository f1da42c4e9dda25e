"""Model forward, masking, initialisation, pipeline pruning and the TP plan.

Shape legend: B batch, T sequence, D width, V vocabulary, H heads, K kv heads, Hd head width.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import pytest
import torch

from pretrain.models import (
    TP_STYLES,
    build_model,
    pipeline_split_points,
    pipeline_stage_layers,
    prune_to_stage,
    tp_plan,
)
from pretrain.models.blocks import AttentionInputs, apply_rope, document_positions, rope_cos_sin
from pretrain.models.config import ModelConfig, MoEConfig
from pretrain.models.transformer import param_seed

V = 64
DECODER = ModelConfig(
    vocab_size=V,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=48,
    max_seq_len=32,
    init_std=0.1,
)
ENCODER = dataclasses.replace(
    DECODER,
    family="encoder",
    num_kv_heads=None,
    position="learned",
    norm="layernorm",
    norm_position="post",
    mlp="gelu",
    bias=True,
    tie_embeddings=True,
    pad_token_id=0,
)
MOE = dataclasses.replace(
    DECODER, moe=MoEConfig(num_experts=4, top_k=2, router="gshard", every=2, dropless=True)
)


def _model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(seed)
    return model.eval()


def _tokens(batch: int = 2, seq: int = 12, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_submodule_names_are_regular() -> None:
    names = dict(_model(MOE).named_modules())
    for name in (
        "tok_embeddings",
        "layers.0.attention.wq",
        "layers.0.attention.wo",
        "layers.0.feed_forward.w1",
        "layers.1.moe.router.gate",
        "layers.1.moe.experts",
        "layers.0.attention_norm",
        "layers.0.ffn_norm",
        "norm",
        "output",
    ):
        assert name in names, name
    encoder = dict(_model(ENCODER).named_modules())
    assert {"pos_embeddings", "embed_norm", "head.dense", "head.norm"} <= encoder.keys()
    assert "output" not in encoder  # tied: the projection reads tok_embeddings.weight


MOE_ENCODER = dataclasses.replace(
    ENCODER, moe=MoEConfig(num_experts=4, top_k=1, router="switch", dropless=True)
)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize(
    "cfg", [DECODER, ENCODER, MOE, MOE_ENCODER], ids=["decoder", "encoder", "moe", "moe-encoder"]
)
def test_document_masking_equals_separate_documents(cfg: ModelConfig, attention: str) -> None:
    model = _model(dataclasses.replace(cfg, attention=attention))
    docs = [_tokens(1, 5, seed=1), _tokens(1, 4, seed=2), _tokens(1, 3, seed=3)]
    packed_BT = torch.cat(docs, dim=1)
    document_ids_BT = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    with torch.no_grad():
        packed_BTV = model(packed_BT, document_ids_BT=document_ids_BT)
        separate_BTV = torch.cat([model(doc) for doc in docs], dim=1)
    torch.testing.assert_close(packed_BTV, separate_BTV, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [DECODER, ENCODER], ids=["decoder", "encoder"])
def test_flex_block_mask_equals_the_dense_document_mask(cfg: ModelConfig) -> None:
    # Rows of 300 tokens (three 128-token tiles, the last one partial) with documents that
    # cross tile edges and one spanning whole tiles: FlexAttention (compiled on the CPU,
    # forward only: it has no CPU backward) gives SDPA-with-the-dense-mask's logits, in fp32
    # and under bf16 autocast. "auto" keeps SDPA on the CPU.
    cfg = dataclasses.replace(cfg, max_seq_len=512)
    gen = torch.Generator().manual_seed(4)
    tokens_BT = torch.randint(1, V, (2, 300), generator=gen)
    lengths = [[7, 140, 1, 90, 62], [300]]
    document_ids_BT = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    )
    sdpa, flex = _model(cfg), _model(dataclasses.replace(cfg, attention="flex"))
    assert not _model(dataclasses.replace(cfg, attention="auto"))._uses_flex_attention(
        torch.device("cpu")
    )
    assert flex._uses_flex_attention(torch.device("cpu"))
    with torch.no_grad():
        want_BTV = sdpa(tokens_BT, document_ids_BT=document_ids_BT)
        got_BTV = flex(tokens_BT, document_ids_BT=document_ids_BT)
        torch.testing.assert_close(got_BTV, want_BTV, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = sdpa(tokens_BT, document_ids_BT=document_ids_BT).float()
            got_bf16 = flex(tokens_BT, document_ids_BT=document_ids_BT).float()
    torch.testing.assert_close(got_bf16, want_bf16, rtol=0.05, atol=0.05)
    torch.testing.assert_close(got_bf16, want_BTV, rtol=0.1, atol=0.1)


def test_a_new_document_mask_per_batch_does_not_recompile() -> None:
    # Every batch brings new document ids, so a new BlockMask (and mask_mod closure): the
    # compiled blocks must reuse one graph, or dynamo's recompile limit turns them eager.
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(dataclasses.replace(DECODER, attention="flex", max_seq_len=256))
    for block in model.layers.values():
        block.compile()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _ in range(3):
            tokens_BT = torch.randint(1, V, (2, 256), generator=gen)
            starts_BT = torch.rand(2, 256, generator=gen) < 0.03
            model(tokens_BT, document_ids_BT=starts_BT.long().cumsum(1))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.gpu
def test_flex_attention_trains_like_the_dense_mask_on_cuda() -> None:
    # On CUDA FlexAttention also runs backward: logits and every gradient of a bf16-autocast
    # decoder step match SDPA with the dense document mask.
    cfg = dataclasses.replace(DECODER, max_seq_len=1024, hidden_size=128, num_heads=4)
    gen = torch.Generator().manual_seed(5)
    tokens_BT = torch.randint(1, V, (2, 1024), generator=gen).cuda()
    lengths = [[100, 400, 3, 300, 221], [1024]]
    document_ids_BT = torch.stack(
        [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    ).cuda()
    results = []
    for attention in ("sdpa", "flex"):
        model = _model(dataclasses.replace(cfg, attention=attention)).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits_BTV = model(tokens_BT, document_ids_BT=document_ids_BT)
        logits_BTV.float().logsumexp(-1).mean().backward()
        grads = {name: p.grad.float().cpu() for name, p in model.named_parameters()}
        results.append((logits_BTV.float().cpu(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0.1, atol=1e-3, msg=name)


def test_document_positions_restart_at_each_document() -> None:
    document_ids_BT = torch.tensor([[3, 3, 3, 7, 7, 1], [0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(document_positions(document_ids_BT), expected)


def test_encoder_padding_as_its_own_document() -> None:
    model = _model(ENCODER)
    tokens_BT = _tokens(1, 9)
    padded_BT = torch.cat([tokens_BT, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    document_ids_BT = torch.tensor([[0] * 9 + [-1] * 3])
    with torch.no_grad():
        padded_BTV = model(padded_BT, document_ids_BT=document_ids_BT)
        alone_BTV = model(tokens_BT)
    torch.testing.assert_close(padded_BTV[:, :9], alone_BTV, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads() -> None:
    model = _model(DECODER)
    attention = model.layers["0"].attention
    x_BTD = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    position_ids_BT = torch.arange(6).expand(2, 6)
    rope = rope_cos_sin(position_ids_BT, head_dim=8, theta=DECODER.rope_theta, dtype=x_BTD.dtype)
    with torch.no_grad():
        y_BTD = attention(x_BTD, inputs=AttentionInputs(rope=rope, mask_B1TS=None, is_causal=True))
        q = apply_rope(
            attention.wq(x_BTD).view(2, 6, 4, 8), cos_BTHd=rope[0], sin_BTHd=rope[1]
        ).transpose(1, 2)
        k = apply_rope(
            attention.wk(x_BTD).view(2, 6, 2, 8), cos_BTHd=rope[0], sin_BTHd=rope[1]
        ).transpose(1, 2)
        v = attention.wv(x_BTD).view(2, 6, 2, 8).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32)
        ref_BTD = attention.wo(ref)
    torch.testing.assert_close(y_BTD, ref_BTD, rtol=1e-5, atol=1e-5)


def test_causal_decoder_ignores_the_future() -> None:
    model = _model(DECODER)
    tokens_BT = _tokens()
    changed_BT = tokens_BT.clone()
    changed_BT[:, 8:] = (changed_BT[:, 8:] + 1) % V
    with torch.no_grad():
        a, b = model(tokens_BT), model(changed_BT)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_language_embeddings_are_added() -> None:
    cfg = dataclasses.replace(ENCODER, num_languages=3)
    model = _model(cfg)
    tokens_BT = _tokens()
    with torch.no_grad():
        zero = model(tokens_BT, lang_ids_BT=torch.zeros_like(tokens_BT))
        two = model(tokens_BT, lang_ids_BT=torch.full_like(tokens_BT, 2))
    assert not torch.allclose(zero, two)
    assert "lang_embeddings" in dict(model.named_modules())


def test_init_is_deterministic_and_follows_the_reference_family() -> None:
    a, b, c = _model(ENCODER, 0), _model(ENCODER, 0), _model(ENCODER, 1)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if name.endswith("bias"):
            assert torch.all(pa == 0), name
        elif "norm" in name:
            assert torch.all(pa == 1), name
        else:
            assert not torch.equal(pa, pc), name
    emb = a.tok_embeddings.weight
    assert torch.all(emb[0] == 0)  # the padding row, as in XLM-R
    assert emb[1:].std().item() == pytest.approx(ENCODER.init_std, rel=0.05)


def test_init_after_meta_and_to_empty_equals_eager_init() -> None:
    with torch.device("meta"):
        meta_model = build_model(MOE)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(5)
    eager = _model(MOE, 5)
    for (name, p), q in zip(meta_model.named_parameters(), eager.parameters(), strict=True):
        assert torch.equal(p, q), name
    tokens_BT = _tokens()
    with torch.no_grad():
        assert torch.equal(meta_model.eval()(tokens_BT), eager(tokens_BT))


def test_init_with_a_generator_or_the_global_rng_is_repeatable() -> None:
    def draw(source) -> torch.Tensor:
        model = build_model(DECODER)
        if source is None:
            torch.manual_seed(4)
        model.init_weights(source)
        return torch.cat([p.flatten() for p in model.parameters()])

    gen_a = draw(torch.Generator().manual_seed(4))
    assert torch.equal(gen_a, draw(torch.Generator().manual_seed(4)))
    assert torch.equal(draw(None), draw(None))


def test_param_seed_ignores_wrapper_segments() -> None:
    assert param_seed(
        0, name="layers.1._checkpoint_wrapped_module.attention.wq.weight"
    ) == param_seed(0, name="layers.1.attention.wq.weight")
    assert param_seed(0, name="layers.1.attention.wq.weight") != param_seed(
        1, name="layers.1.attention.wq.weight"
    )


def test_pipeline_stages_chain_to_the_full_model() -> None:
    cfg = dataclasses.replace(MOE, num_layers=5)
    full = _model(cfg, 3)
    stages_layers = pipeline_stage_layers(cfg, num_stages=3)
    assert stages_layers == [["0"], ["1", "2"], ["3", "4"]]
    assert pipeline_split_points(cfg, num_stages=3) == ["layers.1", "layers.3"]
    stages = []
    for index, layer_keys in enumerate(stages_layers):
        with torch.device("meta"):
            stage = build_model(cfg)
        prune_to_stage(stage, layer_keys=layer_keys, first=index == 0, last=index == 2)
        stage.to_empty(device="cpu")
        stage.init_weights(3)  # per-parameter seeds: the same values as in the full model
        stages.append(stage.eval())
    assert stages[1].tok_embeddings is None and stages[1].output is None
    tokens_BT = _tokens()
    with torch.no_grad():
        x = tokens_BT
        for stage in stages:
            x = stage(x)
        torch.testing.assert_close(x, full(tokens_BT), rtol=0, atol=0)


def test_pipeline_refuses_more_stages_than_layers_and_tied_splits() -> None:
    with pytest.raises(ValueError, match=r"^pipeline stages \(4\) must be between 1 and "):
        pipeline_stage_layers(DECODER, num_stages=4)
    with torch.device("meta"):
        model = build_model(ENCODER)
    with pytest.raises(ValueError, match=r"^model\.tie_embeddings \(True\) cannot be split"):
        prune_to_stage(model, layer_keys=["0"], first=True, last=False)


@pytest.mark.parametrize(
    "cfg",
    [DECODER, ENCODER, MOE, dataclasses.replace(MOE, qk_norm=True, position="learned")],
    ids=["decoder", "encoder", "moe", "moe-qknorm-learned"],
)
def test_tp_plan_names_existing_modules_and_known_styles(cfg: ModelConfig) -> None:
    with torch.device("meta"):
        model = build_model(cfg)
    names = [name for name, _ in model.named_modules()]
    plan = tp_plan(cfg)
    for pattern, style in plan.items():
        assert style in TP_STYLES, style
        assert any(fnmatch.fnmatchcase(name, pattern) for name in names), pattern


def test_moe_metrics_and_aux_scale_are_exposed() -> None:
    model = _model(MOE)
    model(_tokens())
    metrics = model.moe_metrics()
    assert list(metrics) == ["layers.1.moe"]
    assert int(metrics["layers.1.moe"].tokens_per_expert_E.sum()) == 2 * 12 * 2
    model.set_moe_aux_loss_scale(0.25)
    assert model.layers["1"].moe.aux_loss_scale == 0.25


def test_moe_does_not_route_padding_documents() -> None:
    # Padding (document id -1) in trailing positions and a whole padding row: the real tokens'
    # logits and every MoE statistic equal those of the real tokens alone.
    cfg = dataclasses.replace(
        MOE, moe=dataclasses.replace(MOE.moe, aux_loss_coef=0.1, z_loss_coef=0.01)
    )
    real_BT = _tokens(2, 8)
    docs_BT = torch.tensor([[0] * 5 + [1] * 3, [0] * 8])
    tokens_BT = torch.cat([real_BT, _tokens(2, 4, seed=3)], dim=1)
    tokens_BT = torch.cat([tokens_BT, _tokens(1, 12, seed=4)])
    padded_docs_BT = torch.full((3, 12), -1)
    padded_docs_BT[:2, :8] = docs_BT
    ref, model = _model(cfg).train(), _model(cfg).train()
    with torch.no_grad():
        want_BTV = ref(real_BT, document_ids_BT=docs_BT)
        got_BTV = model(tokens_BT, document_ids_BT=padded_docs_BT)
    torch.testing.assert_close(got_BTV[:2, :8], want_BTV, rtol=1e-5, atol=1e-5)
    want, got = ref.moe_stats()["layers.1.moe"], model.moe_stats()["layers.1.moe"]
    assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E)
    assert int(got.num_routed) == 2 * 16
    assert got.aux_loss_sum.item() == pytest.approx(want.aux_loss_sum.item(), rel=1e-5)
    assert got.z_loss_sum.item() == pytest.approx(want.z_loss_sum.item(), rel=1e-5)


def test_moe_stats_are_keyed_by_global_layer_and_count_languages() -> None:
    cfg = dataclasses.replace(DECODER, num_layers=4, moe=dataclasses.replace(MOE.moe, every=2))
    model = _model(cfg).train()
    lang_BT = torch.tensor([[0] * 12, [1] * 6 + [7] * 6])  # 7: outside the tracked 2
    model(_tokens(), lang_ids_BT=lang_BT)
    untracked = model.moe_stats()
    assert len(untracked) == 2 and all(s.load_by_lang_LE is None for s in untracked.values())
    model.track_moe_languages(2)
    model(_tokens(), lang_ids_BT=lang_BT)
    model(_tokens(seed=1), lang_ids_BT=lang_BT)
    stats = model.moe_stats()
    assert list(stats) == ["layers.1.moe", "layers.3.moe"]
    for layer in stats.values():
        assert int(layer.num_forwards) == 2
        assert layer.load_by_lang_LE.shape == (2, 4)
        # Language 0: 12 tokens x 2 choices x 2 forwards; language 1: 6 x 2 x 2.
        assert layer.load_by_lang_LE.sum(1).tolist() == [48, 24]
        assert int(layer.tokens_per_expert_E.sum()) == 2 * 24 * 2
    assert model.moe_stats() == {}
    with pytest.raises(ValueError, match=r"^num_languages \(-1\) must be >= 0$"):
        model.track_moe_languages(-1)
