"""``pretrain.generate`` gives, token for token, what transformers' ``generate()`` gives on a twin
with the same weights (greedy, beam 4 with length penalties and each ``early_stopping``), for an
mT5-shaped encoder-decoder (weights copied in this file into ``MT5ForConditionalGeneration``),
mBART- and Switch-shaped ones and a Llama-shaped decoder (through
``checkpoints_tools.adapters.to_hf``); per-row maximum lengths equal one-row runs; sampling is
seeded and stays inside its filter.

Shape legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.generate import filter_logits, generate
from pretrain.models import build_model
from pretrain.models.config import ModelConfig

transformers = pytest.importorskip("transformers")

from checkpoints_tools.adapters import to_hf  # noqa: E402 - after the importorskip
from tests.twins import hf_twin, randomised, tiny_encdec  # noqa: E402

VOCAB = 96
PAD = 0
MAX_NEW = 12
_COMMON = {"vocab_size": VOCAB, "ffn_hidden_size": 48, "max_seq_len": 64}
ENCDEC = tiny_encdec("mt5", **_COMMON, num_decoder_layers=2)
DECODER = ModelConfig(
    family="decoder",
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=64,
    max_seq_len=64,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny matmuls only lose from more, and on a shared 2-core box
    two threads per process made each step 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MBART = tiny_encdec("mbart", **_COMMON, num_decoder_layers=2, scale_embeddings=False)
SWITCH = tiny_encdec("switch", **_COMMON)


def _mt5_twin(model: torch.nn.Module, cfg: ModelConfig, *, eos_id: int) -> torch.nn.Module:
    """``MT5ForConditionalGeneration`` holding ``model``'s weights (the export)."""
    twin = hf_twin(model, cfg, decoder_start_token_id=PAD, eos_token_id=eos_id)
    assert not torch.equal(twin.lm_head.weight, twin.shared.weight)  # the head stayed untied
    return twin


def _pick_eos(rows: list[list[int]]) -> int:
    """A token the model produces mid-way (after position 1) in many rows, preferring one that
    never comes first or second, so that rows finish at different steps."""
    early = {t for row in rows for t in row[:2]}
    counts: dict[int, int] = {}
    for row in rows:
        for token in set(row[2:]) - set(row[:2]):
            counts[token] = counts.get(token, 0) + 1
    assert counts, rows
    return min(counts, key=lambda t: (t in early, -counts[t], t))


def _sources(lengths: tuple[int, ...], *, seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _cut(row: list[int], eos_id: int) -> list[int]:
    """A transformers output row up to its first EOS (included)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = [row + [PAD] * (longest - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (longest - len(row)) for row in rows]
    return torch.tensor(ids), torch.tensor(mask)


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = [[PAD] * (longest - len(row)) + row for row in rows]
    mask = [[0] * (longest - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def encdec():
    """``(ours, twin, sources, eos_id)``; the twin's logits checked first (1e-4)."""
    model = randomised(ENCDEC)
    sources = _sources((7, 11, 5, 9, 8))
    probe = generate(
        model, sources, decoder_start_id=PAD, eos_id=VOCAB + 1, pad_id=PAD, max_len_b=MAX_NEW
    )
    eos_id = _pick_eos([row[:MAX_NEW] for row in probe])
    twin = _mt5_twin(model, ENCDEC, eos_id=eos_id)
    ids_BS, mask_BS = _right_padded(sources)
    decoder_BT = torch.tensor([[PAD] + row[:9] for row in probe])
    document_ids_BS = torch.where(mask_BS.bool(), 0, -1)
    with torch.no_grad():
        ours_BTV = model(ids_BS, decoder_BT, document_ids_BS=document_ids_BS)
        theirs_BTV = twin(
            input_ids=ids_BS, attention_mask=mask_BS, decoder_input_ids=decoder_BT
        ).logits
    # If this fails, the model or this file's mapping is wrong, not generation.
    torch.testing.assert_close(ours_BTV, theirs_BTV, atol=1e-4, rtol=0)
    return model, twin, sources, eos_id


@pytest.fixture(scope="module")
def decoder():
    """``(ours, twin, prompts, eos_id)``; the twin's logits checked first (1e-4)."""
    model = randomised(DECODER)
    hf_state_dict, hf_config = to_hf(model.state_dict(), DECODER)
    prompts = _sources((6, 9, 4, 7), seed=3)
    probe = generate(model, prompts, eos_id=VOCAB + 1, pad_id=PAD, max_len_b=MAX_NEW)
    eos_id = _pick_eos(probe)
    hf_config.eos_token_id = eos_id
    hf_config.pad_token_id = PAD
    twin = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="eager")
    twin.load_state_dict(hf_state_dict, strict=True)
    twin.eval()
    ids_BT, mask_BT = _left_padded(prompts)
    with torch.no_grad():
        ours_BTV = model(ids_BT, document_ids_BT=torch.where(mask_BT.bool(), 0, -1))
        theirs_BTV = twin(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            position_ids=(mask_BT.cumsum(-1) - 1).clamp(min=0),
        ).logits
    real_BT = mask_BT.bool()
    torch.testing.assert_close(ours_BTV[real_BT], theirs_BTV[real_BT], atol=1e-4, rtol=0)
    return model, twin, prompts, eos_id


def _hf_encdec(twin, sources, *, eos_id: int, **kwargs) -> list[list[int]]:
    ids_BS, mask_BS = _right_padded(sources)
    with torch.no_grad():
        out_BT = twin.generate(
            input_ids=ids_BS,
            attention_mask=mask_BS,
            max_new_tokens=MAX_NEW,
            decoder_start_token_id=PAD,
            eos_token_id=eos_id,
            pad_token_id=PAD,
            **kwargs,
        )
    return [_cut(row[1:], eos_id) for row in out_BT.tolist()]


def _hf_decoder(twin, prompts, *, eos_id: int, **kwargs) -> list[list[int]]:
    ids_BT, mask_BT = _left_padded(prompts)
    with torch.no_grad():
        out_BT = twin.generate(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            max_new_tokens=MAX_NEW,
            eos_token_id=eos_id,
            pad_token_id=PAD,
            **kwargs,
        )
    return [_cut(row[ids_BT.shape[1] :], eos_id) for row in out_BT.tolist()]


def test_encdec_greedy_matches_mt5_generate(encdec) -> None:
    model, twin, sources, eos_id = encdec
    ours = generate(
        model, sources, decoder_start_id=PAD, eos_id=eos_id, pad_id=PAD, max_len_b=MAX_NEW
    )
    assert ours == _hf_encdec(twin, sources, eos_id=eos_id, do_sample=False, num_beams=1)
    finished = [row[-1] == eos_id for row in ours]
    assert any(finished) and not all(finished)  # rows stop at different steps
    assert all(eos_id not in row[:-1] for row in ours)


def _beam4_both(encdec, eos_id: int, length_penalty: float, early_stopping) -> tuple[list, list]:
    """Beam-4 outputs of ours and of the MT5 twin on the ``encdec`` fixture's sources."""
    model, twin, sources, _ = encdec
    ours = generate(
        model,
        sources,
        decoder_start_id=PAD,
        eos_id=eos_id,
        pad_id=PAD,
        max_len_b=MAX_NEW,
        decode="beam",
        num_beams=4,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    theirs = _hf_encdec(
        twin,
        sources,
        eos_id=eos_id,
        do_sample=False,
        num_beams=4,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    return ours, theirs


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"),
    [(1.0, False), (2.0, False), (-0.5, False), (0.0, False), (1.0, True), (2.0, "never")],
)
def test_encdec_beam4_matches_mt5_generate(encdec, length_penalty, early_stopping) -> None:
    ours, theirs = _beam4_both(encdec, encdec[3], length_penalty, early_stopping)
    assert ours == theirs


def test_encdec_beam_early_stopping_rules_match_mt5_generate(encdec) -> None:
    """Each ``early_stopping`` rule, over EOS tokens that close hypotheses often, and the sweep
    reaches cases where the three rules give different results (so each rule is exercised)."""
    model, twin, sources, _ = encdec
    greedy = generate(
        model, sources, decoder_start_id=PAD, eos_id=VOCAB + 1, pad_id=PAD, max_len_b=MAX_NEW
    )
    counts: dict[int, int] = {}
    for row in greedy:
        for token in row:
            counts[token] = counts.get(token, 0) + 1
    frequent = sorted(counts, key=lambda t: (-counts[t], t))[:3]
    differs = {"True": False, "never": False}
    for eos_id in frequent:
        for length_penalty in (1.0, 2.0):
            results = {}
            for early_stopping in (False, True, "never"):
                ours, theirs = _beam4_both(encdec, eos_id, length_penalty, early_stopping)
                assert ours == theirs, (eos_id, length_penalty, early_stopping)
                results[str(early_stopping)] = ours
            for rule in differs:
                differs[rule] |= results[rule] != results["False"]
    assert all(differs.values()), differs


@pytest.mark.parametrize(("cfg", "start_id"), [(MBART, 5), (SWITCH, PAD)], ids=["mbart", "switch"])
def test_other_encdec_shapes_match_their_exports(cfg: ModelConfig, start_id: int) -> None:
    """A tied head with ``final_logits_bias`` and learned positions (mBART; decoder start: a
    language-code-like id), and Switch MoE layers, through ``to_hf``'s export."""
    model = randomised(cfg, seed=1)  # seed 0 repeats one token per row
    pad_id = cfg.pad_token_id
    sources = _sources((7, 11, 5, 9))
    common = dict(decoder_start_id=start_id, pad_id=pad_id, max_len_b=MAX_NEW)
    eos_id = _pick_eos(generate(model, sources, eos_id=VOCAB + 1, **common))
    # MBartConfig's default forces EOS at max length
    twin = hf_twin(model, cfg, forced_eos_token_id=None)
    longest = max(map(len, sources))
    ids_BS = torch.tensor([row + [pad_id] * (longest - len(row)) for row in sources])
    mask_BS = torch.tensor([[1] * len(row) + [0] * (longest - len(row)) for row in sources])
    for num_beams, length_penalty in ((1, 1.0), (4, 2.0)):
        decode = "beam" if num_beams > 1 else "greedy"
        ours = generate(
            model,
            sources,
            eos_id=eos_id,
            decode=decode,
            num_beams=num_beams,
            length_penalty=length_penalty,
            **common,
        )
        with torch.no_grad():
            out_BT = twin.generate(
                input_ids=ids_BS,
                attention_mask=mask_BS,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                num_beams=num_beams,
                length_penalty=length_penalty,
                decoder_start_token_id=start_id,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
        assert ours == [_cut(row[1:], eos_id) for row in out_BT.tolist()], decode


def test_decoder_greedy_and_beam_match_llama_generate(decoder) -> None:
    model, twin, prompts, eos_id = decoder
    ours = generate(model, prompts, eos_id=eos_id, pad_id=PAD, max_len_b=MAX_NEW)
    assert ours == _hf_decoder(twin, prompts, eos_id=eos_id, do_sample=False, num_beams=1)
    assert any(row[-1] == eos_id for row in ours)
    for length_penalty in (1.0, 2.0):
        ours = generate(
            model,
            prompts,
            eos_id=eos_id,
            pad_id=PAD,
            max_len_b=MAX_NEW,
            decode="beam",
            num_beams=4,
            length_penalty=length_penalty,
        )
        theirs = _hf_decoder(
            twin,
            prompts,
            eos_id=eos_id,
            do_sample=False,
            num_beams=4,
            length_penalty=length_penalty,
        )
        assert ours == theirs, length_penalty


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_per_row_max_length_equals_one_row_runs(encdec, decode) -> None:
    """``a * source_len + b`` per row: the batch gives what each row gives alone (and those are
    transformers' outputs: the tests above)."""
    model, _, sources, eos_id = encdec
    kwargs = dict(
        decoder_start_id=PAD,
        eos_id=eos_id,
        pad_id=PAD,
        max_len_a=0.5,
        max_len_b=3,
        decode=decode,
        length_penalty=1.5,
    )
    batched = generate(model, sources, **kwargs)
    alone = [generate(model, [row], **kwargs)[0] for row in sources]
    assert batched == alone
    for row, out in zip(sources, batched, strict=True):
        assert len(out) <= int(0.5 * len(row) + 3)
        assert eos_id not in out[:-1]
    assert any(len(out) == int(0.5 * len(row) + 3) for row, out in zip(sources, batched))


def _reference_filter(logits_V: torch.Tensor, *, top_k: int, top_p: float) -> set[int]:
    """The kept tokens, computed one by one: the top-k (ties with the k-th kept), then from
    the most likely down until the kept mass reaches top_p."""
    values = logits_V.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])
    kept = order
    if top_k > 0:
        kth = values[order[top_k - 1]]
        kept = [i for i in order if values[i] >= kth]
    if top_p < 1.0:
        probs = torch.tensor([values[i] for i in kept]).softmax(-1).tolist()
        mass, nucleus = 0.0, []
        for i, p in zip(kept, probs, strict=True):
            nucleus.append(i)
            mass += p
            if mass >= top_p:
                break
        kept = nucleus
    return set(kept)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.7), (10, 0.5), (1, 0.9)])
def test_filter_logits_matches_warpers_and_direct_computation(top_k, top_p) -> None:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits_BV = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    ours_BV = filter_logits(logits_BV, temperature=0.7, top_k=top_k, top_p=top_p)
    theirs_BV = TemperatureLogitsWarper(0.7)(None, logits_BV.clone())
    if top_k > 0:
        theirs_BV = TopKLogitsWarper(top_k)(None, theirs_BV)
    if top_p < 1.0:
        theirs_BV = TopPLogitsWarper(top_p)(None, theirs_BV)
    torch.testing.assert_close(ours_BV, theirs_BV, atol=0, rtol=0)
    for row_V, filtered_V in zip(logits_BV / 0.7, ours_BV, strict=True):
        kept = set(torch.isfinite(filtered_V).nonzero()[:, 0].tolist())
        assert kept == _reference_filter(row_V, top_k=top_k, top_p=top_p)


def test_sampling_is_seeded_and_inside_the_filter(encdec) -> None:
    model, _, sources, eos_id = encdec
    kwargs = dict(
        decoder_start_id=PAD,
        eos_id=eos_id,
        pad_id=PAD,
        max_len_b=MAX_NEW,
        decode="sample",
        top_k=8,
        top_p=0.8,
        temperature=0.9,
    )
    first = generate(model, sources, seed=1, **kwargs)
    assert first == generate(model, sources, seed=1, **kwargs)
    assert first != generate(model, sources, seed=2, **kwargs)
    greedy = generate(
        model, sources, decoder_start_id=PAD, eos_id=eos_id, pad_id=PAD, max_len_b=MAX_NEW
    )
    assert first != [row[:MAX_NEW] for row in greedy]
    with torch.no_grad():
        for source, row in zip(sources, first, strict=True):
            decoder_1T = torch.tensor([[PAD] + row[:-1]])
            logits_TV = model(torch.tensor([source]), decoder_1T)[0]
            for t, token in enumerate(row):
                allowed = _reference_filter(logits_TV[t] / 0.9, top_k=8, top_p=0.8)
                assert token in allowed, (t, token)


def test_generation_restores_training_mode_and_accepts_tensors(encdec) -> None:
    model, _, sources, eos_id = encdec
    kwargs = dict(decoder_start_id=PAD, eos_id=eos_id, pad_id=PAD, max_len_b=6)
    model.train()
    try:
        as_tensor = generate(model, torch.tensor([sources[0]]), **kwargs)
        assert model.training
    finally:
        model.eval()
    assert as_tensor == generate(model, [sources[0]], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decode="topk"), r"^decode \('topk'\) must be one of greedy, beam, sample$"),
        (dict(decode="beam", num_beams=0), r"^num_beams \(0\) must be >= 1$"),
        (dict(top_p=0.0), r"^top_p \(0\.0\) must be in \(0, 1\]$"),
        (dict(temperature=0.0), r"^temperature \(0\.0\) must be > 0$"),
        (dict(early_stopping="yes"), r"^early_stopping \('yes'\) must be False, True or 'never'$"),
        (dict(max_len_b=0), r"^max_len_a \* source_len \+ max_len_b \(0 for row 0\) must be >= 1$"),
        (dict(decoder_start_id=None), r"^decoder_start_id \(None\) must be set"),
        (dict(decode="beam", num_beams=49), r"^num_beams \(49\) must be <= model.vocab_size"),
        (dict(src=[[3], []]), r"^src_ids\[1\] \(empty\) must hold at least one token$"),
        (dict(src=[[3, VOCAB]]), rf"^src_ids\[0\] holds token {VOCAB}, outside \[0, vocab_size"),
    ],
)
def test_bad_arguments_raise_one_line(encdec, kwargs, message) -> None:
    model = encdec[0]
    args = dict(decoder_start_id=PAD, eos_id=1, pad_id=PAD, max_len_b=4)
    src = kwargs.pop("src", [[3, 4]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, src, **args)


def test_decoder_refuses_a_decoder_start_id(decoder) -> None:
    with pytest.raises(ValueError, match=r"^decoder_start_id \(0\) must be None for a decoder-"):
        generate(decoder[0], [[3, 4]], decoder_start_id=0, eos_id=1, pad_id=PAD)


def test_encoder_family_is_refused() -> None:
    encoder = build_model(ModelConfig(family="encoder", vocab_size=VOCAB, hidden_size=16))
    with pytest.raises(ValueError, match=r"^model \(Encoder\) must be an encoder-decoder or a"):
        generate(encoder, [[3, 4]], eos_id=1, pad_id=PAD)
