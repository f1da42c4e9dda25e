"""BERT's next sentence prediction and ALBERT's sentence order prediction
(``objective.weights={nsp: 1}`` / ``{sop: 1}``): segment pairs on real tokens against a per-row
reimplementation of the rule, label balance and construction through the loader, the model's
segment embeddings and pooled pair logits against the formula, the loss (MLM mean + pair
mean), and the config rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
from data_pipeline.tokenizer import load_tokenizer
from data_pipeline.transforms import IGNORE_INDEX, MaskingConfig, Vocab, join_mono, segment_pairs
from pretrain.batches import model_inputs
from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.config import validate_model
from pretrain.objectives import OBJECTIVES, ObjectiveMix
from tests.objective_checks import assert_resumes, encoder_config
from tests.sample_data import REPO, SAMPLE, first_lines

LANGS = ("en", "de", "ja")
T = 48


@pytest.fixture(scope="module")
def raw(tok_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``([M, T - 3], [M])``: consecutive cuts of real documents (joined with eos) of en, de and
    ja, and each row's language index."""
    tok = load_tokenizer(str(tok_dir))
    rows, langs = [], []
    for index, lang in enumerate(LANGS):
        docs = tok.encode(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 40))
        flat = np.concatenate([np.array(d, dtype=np.int32) for d in docs])
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        ids, _ = join_mono(flat, offsets, eos_id=tok.special_ids["eos"])
        cut = len(ids) // (T - 3)
        rows.append(ids[: cut * (T - 3)].reshape(cut, T - 3).astype(np.int32))
        langs += [index] * cut
    return np.concatenate(rows), np.array(langs)


def _unmasked(out: dict) -> np.ndarray:
    return np.where(out["labels"] != IGNORE_INDEX, out["labels"], out["input_ids"])


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_rows_follow_the_rule(raw, vocab: Vocab, task: str) -> None:
    raw_MR, lang_M = raw
    M, n = raw_MR.shape
    out = segment_pairs(raw_MR, lang_M, task=task, seq_len=T, vocab=vocab, cfg=MaskingConfig(),
                        rng=np.random.default_rng(3))  # fmt: skip
    # The rule written out, row by row, with the generator's draws in the same order.
    rng = np.random.default_rng(3)
    ends = {vocab.eos_id} | set(np.flatnonzero(vocab.sentence_end_V).tolist())
    boundaries = [[p for p in range(1, n) if int(row[p - 1]) in ends] for row in raw_MR]
    picks = rng.integers(0, np.array([max(len(b), 1) for b in boundaries]))
    splits = [b[k] if b else n // 2 for b, k in zip(boundaries, picks)]
    labels = (rng.random(M) < 0.5).astype(int)
    same_lang = {lang: np.flatnonzero(lang_M == lang).tolist() for lang in set(lang_M.tolist())}
    got = _unmasked(out)
    for m in range(M):
        s = splits[m]
        first, second = raw_MR[m, :s].tolist(), raw_MR[m, s:].tolist()
        label = labels[m]
        if task == "nsp" and label:
            rows = same_lang[int(lang_M[m])]
            if len(rows) < 2:
                label = 0
            else:
                p = rows[(rows.index(m) + len(rows) // 2) % len(rows)]
                assert p != m
                second = raw_MR[p, splits[p] :].tolist()[: n - s]
        elif label:
            first, second = second, first
        want = [vocab.cls_id, *first, vocab.sep_id, *second, vocab.sep_id]
        types = [0] * (len(first) + 2) + [1] * (len(second) + 1)
        pad = T - len(want)
        assert out["split_M"][m] == s and out["pair_label"][m] == label
        assert got[m].tolist() == want + [vocab.pad_id] * pad
        assert out["token_type_ids"][m].tolist() == types + [0] * pad
        assert out["attention_mask"][m].tolist() == [True] * len(want) + [False] * pad
        assert out["doc_ids"][m].tolist() == [0] * len(want) + [-1] * pad
    # BERT masking over the segments only: never <cls>, <sep> or padding
    chosen = out["labels"] != IGNORE_INDEX
    assert not np.isin(out["labels"][chosen], [vocab.cls_id, vocab.sep_id, vocab.pad_id]).any()
    rate = chosen.sum() / (~vocab.special_mask_V()[got] & out["attention_mask"]).sum()
    assert 0.13 < rate < 0.17, rate


def test_a_language_alone_in_its_batch_takes_the_b_of_an_earlier_row(raw, vocab: Vocab) -> None:
    raw_MR, lang_M = raw
    rows = np.array([0, len(raw_MR) - 1])  # one en row, one ja row
    earlier = np.arange(100, 140, dtype=np.int32)  # an earlier batch's ja B
    common = dict(task="nsp", seq_len=T, vocab=vocab, cfg=MaskingConfig(replace_prob=0.0,
                  random_prob=0.0))  # fmt: skip
    labels = []
    for seed in range(40):
        out = segment_pairs(raw_MR[rows], lang_M[rows], rng=np.random.default_rng(seed),
                            previous={2: earlier}, **common)  # fmt: skip
        labels.append(out["pair_label"].tolist())
        en, ja = out["pair_label"].tolist()
        assert en == 0  # no other en row, no earlier one
        ids = _unmasked(out)[1]
        s = int(out["split_M"][1])
        if ja:  # B is the earlier segment, cut to the room left
            assert (
                ids[s + 2 : s + 2 + min(len(earlier), T - 3 - s)].tolist()
                == earlier[: T - 3 - s].tolist()
            )
        assert out["last_B"][2].tolist() == raw_MR[rows[1], s:].tolist()
    assert 0 < np.mean([ja for _, ja in labels]) < 1


def _loader(shards, task: str, **data):
    cfg = DataConfig(manifest=str(shards["shards"]), **{"seq_len": T, "batch_size": 16, **data})
    return build_loader(cfg, dp_rank=0, dp_world_size=1, objective=task, masking=MaskingConfig(),
                        seed=5)  # fmt: skip


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_labels_balance_and_segments_on_real_documents(shards, task: str) -> None:
    vocab = Vocab.from_tokenizer(str(shards["tok"]))
    batches = iter(_loader(shards, task))
    labels, rows = [], 0
    for _ in range(8):
        batch = next(batches)
        labels.append(batch["pair_label"].numpy())
        ids = np.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
        for row, types, real in zip(ids, batch["token_type_ids"], batch["attention_mask"]):
            row, types = row[real.numpy()], types[real.numpy()].numpy()
            assert row[0] == vocab.cls_id and row[-1] == vocab.sep_id
            seps = np.flatnonzero(row == vocab.sep_id)
            assert len(seps) == 2 and seps[0] >= 2 and seps[1] > seps[0] + 1  # A, B not empty
            assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 :] == 1).all()
            rows += 1
    labels = np.concatenate(labels)
    # half of the rows are negatives, within 4.5 binomial standard deviations
    assert abs(labels.mean() - 0.5) < 4.5 * np.sqrt(0.25 / rows), labels.mean()
    assert batch["token_type_ids"].dtype == torch.int32 and batch["pair_label"].dtype == torch.int64


def test_nsp_loader_resumes_exactly(shards) -> None:
    """The slot's last B per language (the negatives of a language alone in a batch) is part of
    the loader state: a resumed loader gives the same batches."""
    state = assert_resumes(lambda: _loader(shards, "nsp", batch_size=4), skip=3)
    assert state["slots"][0]["segments"]


def test_loader_refuses_rows_too_short(shards) -> None:
    with pytest.raises(ValueError, match=r"data.seq_len \(4\) must be >= 5 for nsp rows"):
        _loader(shards, "nsp", seq_len=4)
    with pytest.raises(ValueError, match=r"segment task \('nsp2'\) must be one of nsp, sop"):
        segment_pairs(np.zeros((1, 5), dtype=np.int32), np.zeros(1), task="nsp2", seq_len=8,
                      vocab=Vocab.from_tokenizer(str(shards["tok"])), cfg=MaskingConfig(),
                      rng=np.random.default_rng(0))  # fmt: skip


def test_config_sets_what_the_objective_needs() -> None:
    assert OBJECTIVES["nsp"].families == OBJECTIVES["sop"].families == ("encoder",)
    plain = encoder_config()
    assert plain.model.type_vocab_size == 0 and plain.model.pair_head is False
    cfg = encoder_config("objective.weights={nsp: 1}")
    assert cfg.model.type_vocab_size == 2 and cfg.model.pair_head is True
    three = encoder_config("objective.weights={sop: 1}", "model.type_vocab_size=3")
    assert three.model.type_vocab_size == 3
    with pytest.raises(ValueError, match=r"objective.weights.nsp needs parallel.pp 1 \(got 2\)"):
        encoder_config(
            "objective.weights={nsp: 1}",
            "parallel.pp=2",
            "model.tie_embeddings=false",
            "parallel.dp_shard=1",
        )
    with pytest.raises(ValueError, match=r"different batch transforms \(mlm, nsp\)"):
        encoder_config("objective.weights={nsp: 1, mlm: 1}")
    decoder = load_config(REPO / "configs" / "tiny_decoder.yaml",
                          ["train.run_dir=unused", "model.type_vocab_size=2"])  # fmt: skip
    with pytest.raises(ValueError, match=r"model.type_vocab_size \(2\) needs model.family encoder"):
        validate_model(decoder.model)


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_pair_logits_and_the_loss_follow_the_formula(shards, task: str) -> None:
    """Segment embeddings add the row of each token's segment; the pair logits are
    ``classifier(tanh(pooler(h[:, 0])))`` of the state before the MLM head; the objective's
    loss is the summed MLM cross-entropy plus the pair cross-entropy times targets / rows, so
    that it is their two means over the targets."""
    cfg = encoder_config(f"objective.weights={{{task}: 1}}", "model.dropout=0.0")
    model = build_model(cfg.model)
    model.init_weights(0)
    batch = next(iter(_loader(shards, task)))
    kwargs = model_inputs(batch, cfg.model, torch.device("cpu"))
    assert torch.equal(kwargs["token_type_ids_BT"], batch["token_type_ids"])
    mix = ObjectiveMix.from_config(cfg)
    with torch.no_grad():
        hidden, pair = mix.split_outputs(
            model(batch["input_ids"], return_hidden=True, **kwargs, **mix.model_options())
        )
        # the formula: the stack's state at <cls> before the MLM head
        seen = {}
        handle = model.head.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
        model(batch["input_ids"], **kwargs)
        handle.remove()
        pooled = torch.tanh(F.linear(seen["x"][:, 0], model.pooler.dense.weight,
                                     model.pooler.dense.bias))  # fmt: skip
        want = F.linear(pooled, model.pair_classifier.weight, model.pair_classifier.bias)
        torch.testing.assert_close(pair, want, rtol=1e-5, atol=1e-6)
        # segment embeddings: swapping every token's segment changes the states
        other = {**kwargs, "token_type_ids_BT": 1 - kwargs["token_type_ids_BT"]}
        assert not torch.allclose(model(batch["input_ids"], **other), model(batch["input_ids"],
                                                                             **kwargs))  # fmt: skip
    num_groups = mix.num_groups(4)
    sums = torch.zeros(num_groups)
    counts = torch.zeros(num_groups)
    row_loss = mix.row_loss(pair, batch, sums, counts)
    labels = batch["pair_label"]
    torch.testing.assert_close(row_loss, F.cross_entropy(pair, labels, reduction="sum"))
    assert float(counts[-1]) == float(counts[-2]) == len(labels)
    assert float(sums[-1]) == float((pair.argmax(-1) == labels).sum())
    metrics = mix.group_metrics(sums.double(), counts.double(), ["de", "en", "ja", "ru"])
    assert metrics["sentence_loss"][task] == pytest.approx(float(row_loss) / len(labels))
    assert 0.0 <= metrics["sentence_accuracy"][task] <= 1.0
    assert int(mix.num_rows(batch)) == len(labels)
