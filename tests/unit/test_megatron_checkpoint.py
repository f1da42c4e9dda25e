"""checkpoints_tools.megatron_import: a Megatron torch_dist checkpoint of a tiny Llama, written
here with plain DCP from a random ``LlamaForCausalLM`` (q/k/v interleaved per query group, gate
and up concatenated, vocabulary padded with junk rows; stacked and per-layer keys, TE and local
norm names, tied and untied heads), imported and compared with that model's logits; a
``.metadata`` pickle naming any other global is refused and nothing is written.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


from checkpoints_tools.dcp_io import open_checkpoint  # noqa: E402
from checkpoints_tools.megatron_import import (  # noqa: E402
    import_megatron,
    open_megatron,
    read_dcp_metadata,
)
from pretrain.models import build_model  # noqa: E402
from tests.megatron_checkpoints import (  # noqa: E402
    EPS,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    OVERRIDES,
    PADDED,
    ROPE_THETA,
    VOCAB,
    llama,
    megatron_state,
    write_megatron,
)


def our_logits(ckpt: Path, tokens_BT: torch.Tensor) -> torch.Tensor:
    opened = open_checkpoint(ckpt)
    model = build_model(opened.model_cfg).float()
    model.load_state_dict(opened.load_model_state(), strict=True)
    with torch.no_grad():
        return model.eval()(tokens_BT)


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


CASES = {
    "stacked-te-untied": (True, True, False),
    "stacked-local-tied": (True, False, True),
    "per_layer-local-untied": (False, False, False),
    "per_layer-te-tied": (False, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_llama_logits(tmp_path: Path, case: str):
    stacked, te, tied = CASES[case]
    reference = llama(tied=tied)
    run = write_megatron(tmp_path / "megatron", megatron_state(reference, stacked=stacked, te=te))
    result = import_megatron(run, out=tmp_path / "ckpt", overrides=OVERRIDES)
    assert result["layout"] == ("stacked" if stacked else "per-layer")
    assert result["padded_vocab"] == PADDED
    model = result["model"]
    assert (model["vocab_size"], model["num_layers"], model["hidden_size"]) == (
        VOCAB,
        LAYERS,
        HIDDEN,
    )
    assert (model["num_kv_heads"], model["head_dim"], model["ffn_hidden_size"]) == (
        KV_HEADS,
        HEAD_DIM,
        FFN,
    )
    assert model["tie_embeddings"] is tied
    assert model["rope_theta"] == ROPE_THETA and model["norm_eps"] == EPS
    tokens_BT = _tokens()
    with torch.no_grad():
        expected_BTV = reference(input_ids=tokens_BT).logits
    ours_BTV = our_logits(tmp_path / "ckpt", tokens_BT)
    assert ours_BTV.shape == expected_BTV.shape == (2, 12, VOCAB)
    torch.testing.assert_close(ours_BTV, expected_BTV, atol=1e-5, rtol=0)
    # a fresh optimizer state at step 0, as import-hf writes
    opened = open_checkpoint(tmp_path / "ckpt")
    assert opened.step() == 0 and opened.has_optimizer()


def test_iteration_dir_and_untrimmed_vocab(tmp_path: Path):
    """An iter_NNNNNNN directory is accepted as such; without a tokenizer or a vocab_size the
    padded rows are kept (they then predict junk, but the real ones match)."""
    reference = llama(tied=False, seed=1)
    write_megatron(tmp_path / "m", megatron_state(reference, stacked=True, te=True), iteration=3)
    overrides = [o for o in OVERRIDES if not o.startswith("model.vocab_size")]
    result = import_megatron(
        tmp_path / "m" / "iter_0000003", out=tmp_path / "c", overrides=overrides
    )
    assert result["model"]["vocab_size"] == PADDED
    tokens_BT = _tokens()
    with torch.no_grad():
        expected_BTV = reference(input_ids=tokens_BT).logits
    torch.testing.assert_close(
        our_logits(tmp_path / "c", tokens_BT)[..., :VOCAB], expected_BTV, atol=1e-5, rtol=0
    )


def test_split_layout_is_megatrons():
    """split_qkv against megatron-core's view/split written out: query group g owns rows
    g*(H/G+2)*Hd ...; its first H/G*Hd rows are its query heads, then one key, one value."""
    from checkpoints_tools.megatron_import import split_qkv

    per_group = HEADS // KV_HEADS
    rows = KV_HEADS * (per_group + 2) * HEAD_DIM
    qkv = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 3)
    wq, wk, wv = split_qkv(qkv, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    block = (per_group + 2) * HEAD_DIM
    q_rows = [g * block + r for g in range(KV_HEADS) for r in range(per_group * HEAD_DIM)]
    k_rows = [
        g * block + per_group * HEAD_DIM + r for g in range(KV_HEADS) for r in range(HEAD_DIM)
    ]
    v_rows = [
        g * block + (per_group + 1) * HEAD_DIM + r for g in range(KV_HEADS) for r in range(HEAD_DIM)
    ]  # noqa: E501
    assert wq[:, 0].tolist() == q_rows
    assert wk[:, 0].tolist() == k_rows
    assert wv[:, 0].tolist() == v_rows


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_with_other_global_is_refused(tmp_path: Path):
    run = write_megatron(tmp_path / "m", megatron_state(llama(tied=True), stacked=True, te=True))
    it = run / "iter_0000020"
    metadata = read_dcp_metadata(it)  # the genuine file passes the whitelist
    marker = tmp_path / "ran"
    metadata.planner_data = {"x": _Evil(marker)}
    (it / ".metadata").write_bytes(pickle.dumps(metadata))
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match=r"system.*refusing to unpickle") as err:
        import_megatron(run, out=out, overrides=OVERRIDES)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def test_metadata_not_a_pickle_of_metadata(tmp_path: Path):
    run = write_megatron(tmp_path / "m", megatron_state(llama(tied=True), stacked=True, te=True))
    (run / "iter_0000020" / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not DCP Metadata"):
        open_megatron(run)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], r"model.num_heads is not stored in a Megatron checkpoint"),
        (["model.num_heads=3"], r"model.num_heads \(3\) must divide linear_proj"),
        (["model.num_heads=4", "model.hidden_size=64"], r"model.hidden_size \(64\) disagrees"),
        (["model.num_heads=4", "model.num_kv_heads=4"], r"model.num_kv_heads \(4\) disagrees"),
        (["model.num_heads=4", "model.vocab_size=200"], r"vocabulary of 200 is larger"),
        (["model.num_heads=4", "model.norm=layernorm"], r"model.norm \('layernorm'\) must be"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path: Path, overrides, message):
    run = write_megatron(tmp_path / "m", megatron_state(llama(tied=False), stacked=True, te=True))
    with pytest.raises(ValueError, match=message) as err:
        import_megatron(run, out=tmp_path / "ckpt", overrides=overrides)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_unmapped_tensor_and_bad_backend_are_refused(tmp_path: Path):
    state = megatron_state(llama(tied=False), stacked=False, te=False)
    state["decoder.layers.0.self_attention.linear_proj.bias"] = torch.zeros(HIDDEN)
    run = write_megatron(tmp_path / "m", state)
    with pytest.raises(ValueError, match=r"linear_proj.bias' has no place"):
        import_megatron(run, out=tmp_path / "ckpt", overrides=OVERRIDES)
    (run / "iter_0000020" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ValueError, match=r"sharded_backend \('zarr'\) must be 'torch_dist'"):
        open_megatron(run)
    assert not (tmp_path / "ckpt").exists()


def test_config_file_gives_the_rest_and_is_checked(tmp_path: Path):
    """--config: its model section gives what the weights do not hold, its other sections go
    into config.yaml, and a shape it states that the weights contradict is refused."""
    import yaml

    reference = llama(tied=True, seed=2)
    run = write_megatron(tmp_path / "m", megatron_state(reference, stacked=False, te=True))
    model = {
        "num_heads": HEADS,
        "num_kv_heads": KV_HEADS,
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "rope_theta": ROPE_THETA,
        "norm_eps": EPS,
        "max_seq_len": 64,
        "tie_embeddings": True,
    }
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"model": model, "optim": {"lr": 1.5e-4}}))
    result = import_megatron(run, out=tmp_path / "c", base_config=good)
    assert result["model"]["vocab_size"] == VOCAB
    assert open_checkpoint(tmp_path / "c").cfg.optim.lr == 1.5e-4
    tokens_BT = _tokens()
    with torch.no_grad():
        expected_BTV = reference(input_ids=tokens_BT).logits
    torch.testing.assert_close(
        our_logits(tmp_path / "c", tokens_BT), expected_BTV, atol=1e-5, rtol=0
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {**model, "tie_embeddings": False}}))
    with pytest.raises(ValueError, match=r"model.tie_embeddings \(False\) disagrees .*\(True\)"):
        import_megatron(run, out=tmp_path / "c2", base_config=bad)
    assert not (tmp_path / "c2").exists()
