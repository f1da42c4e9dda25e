"""Batched generation for encoder-decoder and decoder-only models: greedy, beam search, sampling.

What to call: ``generate(model, src_ids, decoder_start_id=, eos_id=, pad_id=, max_len_a=,
max_len_b=, decode="greedy" | "beam" | "sample", ...) -> list[list[int]]``.

- ``model``: an ``EncoderDecoder`` (anything with ``encode`` / ``decode`` /
  ``output_projection``): ``src_ids`` are source sentences, the result their translations; or a
  causal ``Transformer`` (decoder family: ``model(ids, document_ids_BT=, return_hidden=True)`` +
  ``output_projection``): ``src_ids`` are prompts, the result their continuations (a decoder
  trained on ``src <sep> tgt`` rows translates when prompted with ``src <sep>``).
- ``src_ids``: a list of token-id lists (rows of different lengths are padded: sources on the
  right, prompts on the left, the padding with document id -1 so that no real token sees it) or
  an int tensor ``ids_BS`` whose every position is a real token.
- Each result row is the generated tokens only (no decoder start, no prompt), at most
  ``int(max_len_a * source_len + max_len_b)`` of them (``source_len``: that row's real tokens),
  ending with ``eos_id`` when the row finished by EOS. A finished row stops growing (greedy and
  sampling drop it from the batch).

Guarantees (tests/unit/test_generate.py): greedy and beam search give, token for token, what
transformers' ``generate()`` gives on the exported twin (``MT5ForConditionalGeneration``,
``LlamaForCausalLM``) with ``max_new_tokens = max_len_b``, ``max_len_a = 0``. Beam search is
transformers' (5.x) algorithm: the top ``2 * num_beams`` continuations per step, an EOS among
the top ``num_beams`` of them closes a hypothesis scored ``sum_logprobs / generated_len **
length_penalty`` (``generated_len`` counts the EOS, not the decoder start or the prompt), the
best ``num_beams`` closed hypotheses kept, and ``early_stopping`` as there: False (its default:
stop a row once ``num_beams`` hypotheses are closed and the best open beam, scored at its current
length, cannot beat the worst of them), True (stop once ``num_beams`` are closed) or "never"
(with ``length_penalty > 0`` the open beam is scored at the row's maximum length). At a row's
maximum length its top ``num_beams`` continuations are closed as they are. One sequence per
row (``num_return_sequences = 1``). Sampling: temperature, then top-k, then top-p (nucleus) as
transformers' warpers filter, drawn from a ``torch.Generator`` seeded with ``seed``: the same
call gives the same tokens.

The encoder runs once per call; its output (and the source padding) is reused at every step.
Models whose forward (decoder family) or ``decode`` (encoder-decoder) takes a ``cache`` run with
a key/value cache (``pretrain.models.kv_cache``): each step runs only the new tokens, the
cross-attention keys/values are computed once from the memory, and ``select_rows`` reorders the
cache with the rows; a model without one is run over the whole prefix each step (same tokens,
O(T^2)). Everything model-specific is in :class:`DecodeState`, :func:`step_logits` and
:func:`select_rows`; the search loops do not know which.

Shape legend:
    B batch rows (B * num_beams during beam search), S source / prompt length, T decoder prefix
    length, N new tokens, D model width, V vocabulary, K beams, C candidates (2K), L longest
    generation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.kv_cache import KVCache

_NEG = -1.0e9
"""Score of an excluded candidate (transformers' constant, so that ties break as there)."""

DecodeMode = Literal["greedy", "beam", "sample"]


@dataclass
class DecodeState:
    """What a step needs: the model, the token prefix it has seen and, for an encoder-decoder,
    the encoder output.

    ``tokens_BT``: the decoder prefix (encoder-decoder: from the decoder start) or the prompt and
    continuation (decoder-only). ``document_ids_BT``: the prefix's document ids (-1 = padding;
    decoder-only with left-padded prompts), None when the prefix has no padding.
    ``memory_BSD`` / ``src_document_ids_BS``: the encoder output and the source's document ids
    (None: no source padding); None for decoder-only models.
    """

    model: nn.Module
    tokens_BT: torch.Tensor
    document_ids_BT: torch.Tensor | None = None
    memory_BSD: torch.Tensor | None = None
    src_document_ids_BS: torch.Tensor | None = None
    cache: KVCache | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the state carries an encoder output."""
        return self.memory_BSD is not None


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` has the encoder-decoder contract (``encode`` and ``decode``)."""
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))


def start_state(
    model: nn.Module, src_BS: torch.Tensor, *, src_document_ids_BS: torch.Tensor | None
) -> DecodeState:
    """The state before the first step: for an encoder-decoder the source is encoded here (once)
    and the prefix is empty; for a decoder the prompt is the first ``step_logits`` input."""
    empty_B0 = src_BS.new_empty((src_BS.shape[0], 0))
    if is_encoder_decoder(model):
        memory_BSD = model.encode(src_BS, document_ids_BS=src_document_ids_BS)
        return DecodeState(
            model,
            empty_B0,
            memory_BSD=memory_BSD,
            src_document_ids_BS=src_document_ids_BS,
            cache=KVCache() if supports_cache(model) else None,
        )
    return DecodeState(model, empty_B0, cache=KVCache() if supports_cache(model) else None)


def supports_cache(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes a key/value cache (``pretrain.models.kv_cache``)."""
    import inspect

    forward = model.decode if is_encoder_decoder(model) else model.forward
    return "cache" in inspect.signature(forward).parameters


def step_logits(
    state: DecodeState,
    new_tokens_BN: torch.Tensor,
    *,
    new_document_ids_BN: torch.Tensor | None = None,
) -> tuple[DecodeState, torch.Tensor]:
    """Append ``new_tokens_BN`` to the prefix; return the new state and the fp32 logits of the
    next token, ``logits_BV``.

    ``new_document_ids_BN``: document ids of the new tokens (-1 = padding); None: real tokens
    (document 0). Here the model runs over the whole prefix (no cache).
    """
    tokens_BT = torch.cat([state.tokens_BT, new_tokens_BN], dim=1)
    document_ids_BT = state.document_ids_BT
    if new_document_ids_BN is not None or document_ids_BT is not None:
        if new_document_ids_BN is None:
            new_document_ids_BN = torch.zeros_like(new_tokens_BN)
        if document_ids_BT is None:
            document_ids_BT = torch.zeros_like(state.tokens_BT)
        document_ids_BT = torch.cat([document_ids_BT, new_document_ids_BN], dim=1)
    model = state.model
    if state.is_encoder_decoder:
        cached = {} if state.cache is None else {"cache": state.cache}
        hidden_BTD = model.decode(
            tokens_BT if state.cache is None else new_tokens_BN,
            memory_BSD=state.memory_BSD,
            document_ids_BS=state.src_document_ids_BS,
            decoder_document_ids_BT=document_ids_BT,
            **cached,
        )
    elif state.cache is not None:
        hidden_BTD = model(
            new_tokens_BN, document_ids_BT=document_ids_BT, return_hidden=True, cache=state.cache
        )
    else:
        hidden_BTD = model(tokens_BT, document_ids_BT=document_ids_BT, return_hidden=True)
    weight_VD, bias_V = model.output_projection()
    logits_BV = F.linear(hidden_BTD[:, -1], weight_VD, bias_V).float()
    return replace(state, tokens_BT=tokens_BT, document_ids_BT=document_ids_BT), logits_BV


def select_rows(state: DecodeState, index_B: torch.Tensor) -> DecodeState:
    """The state of rows ``index_B`` (repeats allowed: beam expansion and reordering; fewer
    rows: finished rows dropped)."""

    def take(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.index_select(0, index_B)

    return replace(
        state,
        tokens_BT=take(state.tokens_BT),
        document_ids_BT=take(state.document_ids_BT),
        memory_BSD=take(state.memory_BSD),
        src_document_ids_BS=take(state.src_document_ids_BS),
        cache=None if state.cache is None else state.cache.select(index_B),
    )


# --------------------------------------------------------------------------------------------
# logit filters (sampling)


def filter_logits(
    logits_BV: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Sampling logits: divided by ``temperature``, then all but the ``top_k`` largest set to
    -inf (ties with the k-th kept; 0 = off), then all but the smallest set of most likely tokens
    whose probability reaches ``top_p`` (1.0 = off; the most likely token always stays). The
    rules, and their order, of transformers' Temperature / TopK / TopP logits warpers."""
    logits_BV = logits_BV / temperature if temperature != 1.0 else logits_BV
    if top_k > 0:
        k = min(top_k, logits_BV.shape[-1])
        kth_B1 = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=False)
        cumulative_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted_BV = cumulative_BV <= 1.0 - top_p
        remove_sorted_BV[..., -1] = False
        remove_BV = remove_sorted_BV.scatter(-1, order_BV, remove_sorted_BV)
        logits_BV = logits_BV.masked_fill(remove_BV, float("-inf"))
    return logits_BV


# --------------------------------------------------------------------------------------------
# the public entry point


def _check_args(
    *,
    decode: str,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
    top_k: int,
    top_p: float,
    temperature: float,
    max_len_a: float,
    max_len_b: int,
) -> None:
    if decode not in ("greedy", "beam", "sample"):
        raise ValueError(f"decode ({decode!r}) must be one of greedy, beam, sample")
    if num_beams < 1:
        raise ValueError(f"num_beams ({num_beams}) must be >= 1")
    if not (early_stopping is False or early_stopping is True or early_stopping == "never"):
        raise ValueError(f"early_stopping ({early_stopping!r}) must be False, True or 'never'")
    if top_k < 0:
        raise ValueError(f"top_k ({top_k}) must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1]")
    if temperature <= 0.0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if max_len_a < 0:
        raise ValueError(f"max_len_a ({max_len_a}) must be >= 0")
    if max_len_b < 0:
        raise ValueError(f"max_len_b ({max_len_b}) must be >= 0")
    del length_penalty  # any float is valid (transformers' rule)


def _pad_rows(
    src_ids: list[list[int]] | torch.Tensor, *, pad_id: int, left: bool, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """``(ids_BS, document_ids_BS or None, lengths)``: rows padded with ``pad_id`` (document id
    -1) on the left or right; None when no row needs padding."""
    if isinstance(src_ids, torch.Tensor):
        if src_ids.dim() != 2 or src_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"src_ids (tensor {tuple(src_ids.shape)}, {src_ids.dtype}) must be a 2-D "
                "integer tensor ids_BS"
            )
        rows = src_ids.long().tolist()
    else:
        rows = [list(map(int, row)) for row in src_ids]
    if not rows:
        raise ValueError("src_ids (empty) must hold at least one row")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"src_ids[{i}] (empty) must hold at least one token")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"src_ids[{i}] holds token {bad[0]}, outside [0, vocab_size ({vocab_size}))"
            )
    lengths = [len(row) for row in rows]
    longest = max(lengths)
    ids, docs = [], []
    for row in rows:
        fill = longest - len(row)
        if left:
            ids.append([pad_id] * fill + row)
            docs.append([-1] * fill + [0] * len(row))
        else:
            ids.append(row + [pad_id] * fill)
            docs.append([0] * len(row) + [-1] * fill)
    ids_BS = torch.tensor(ids, dtype=torch.long)
    document_ids_BS = torch.tensor(docs, dtype=torch.long) if min(lengths) < longest else None
    return ids_BS, document_ids_BS, lengths


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def generate(
    model: nn.Module,
    src_ids: list[list[int]] | torch.Tensor,
    *,
    decoder_start_id: int | None = None,
    eos_id: int,
    pad_id: int,
    max_len_a: float = 0.0,
    max_len_b: int = 200,
    decode: DecodeMode = "greedy",
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | Literal["never"] = False,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Generate one sequence per row of ``src_ids`` (see the module docstring).

    Args:
        model: an encoder-decoder (``encode`` / ``decode`` / ``output_projection``) or a causal
            decoder-family ``Transformer``; run in eval mode under ``torch.no_grad`` (its mode
            is restored afterwards).
        src_ids: token-id lists, or an integer tensor ``ids_BS`` without padding.
        decoder_start_id: first decoder token (encoder-decoder only; mT5: the pad id 0, mBART:
            the target language token); None for a decoder.
        eos_id: the token that ends a row (kept as the row's last token; an id outside the
            vocabulary never ends one).
        pad_id: the id written into padding positions (never seen by real tokens).
        max_len_a, max_len_b: a row generates at most ``int(max_len_a * source_len +
            max_len_b)`` tokens, EOS included.
        decode: greedy | beam (``num_beams``, ``length_penalty``, ``early_stopping``) | sample
            (``temperature``, ``top_k``, ``top_p``, ``seed``).

    Returns:
        One list of generated token ids per row, in input order.

    Raises:
        ValueError: a bad argument (decode mode, beam count, filter values, empty row, token
            out of the vocabulary, ``decoder_start_id`` missing for an encoder-decoder or given
            to a decoder, a maximum length below 1 or beyond a learned position table), or a
            non-causal (encoder-family) model.
    """
    _check_args(
        decode=decode,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
    )
    encdec = is_encoder_decoder(model)
    if not encdec and not getattr(model, "causal", False):
        raise ValueError(
            f"model ({type(model).__name__}) must be an encoder-decoder or a causal decoder "
            "(an encoder does not generate)"
        )
    if encdec and decoder_start_id is None:
        raise ValueError("decoder_start_id (None) must be set for an encoder-decoder model")
    if not encdec and decoder_start_id is not None:
        raise ValueError(
            f"decoder_start_id ({decoder_start_id}) must be None for a decoder-only model "
            "(it continues its prompt: put any start token in the prompt)"
        )
    cfg = model.cfg
    if decode == "beam" and cfg.vocab_size < 2 * num_beams:
        raise ValueError(
            f"num_beams ({num_beams}) must be <= model.vocab_size ({cfg.vocab_size}) / 2 "
            "(each step keeps 2 * num_beams candidates)"
        )
    src_BS, src_document_ids_BS, lengths = _pad_rows(
        src_ids, pad_id=pad_id, left=not encdec, vocab_size=cfg.vocab_size
    )
    max_new = [int(max_len_a * n + max_len_b) for n in lengths]
    if min(max_new) < 1:
        row = max_new.index(min(max_new))
        raise ValueError(
            f"max_len_a * source_len + max_len_b ({max_new[row]} for row {row}) must be >= 1"
        )
    if cfg.position == "learned":
        needed = max(max_new) + (1 if encdec else src_BS.shape[1])
        if needed > cfg.max_seq_len:
            raise ValueError(
                f"generation length ({needed} positions) must be <= model.max_seq_len "
                f"({cfg.max_seq_len}) with model.position=learned"
            )
    device = _model_device(model)
    src_BS = src_BS.to(device)
    if src_document_ids_BS is not None:
        src_document_ids_BS = src_document_ids_BS.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state = start_state(model, src_BS, src_document_ids_BS=src_document_ids_BS)
            if encdec:
                first_BN = torch.full((src_BS.shape[0], 1), decoder_start_id, device=device)
                first_docs_BN = None
            else:
                first_BN, first_docs_BN = src_BS, src_document_ids_BS
            if decode == "beam":
                return _beam_search(
                    state,
                    first_BN,
                    first_docs_BN,
                    max_new=max_new,
                    eos_id=eos_id,
                    num_beams=num_beams,
                    length_penalty=length_penalty,
                    early_stopping=early_stopping,
                )
            generator = None
            if decode == "sample":
                generator = torch.Generator(device=device).manual_seed(seed)
            return _greedy_or_sample(
                state,
                first_BN,
                first_docs_BN,
                max_new=max_new,
                eos_id=eos_id,
                generator=generator,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            )
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# search loops


def _greedy_or_sample(
    state: DecodeState,
    first_BN: torch.Tensor,
    first_docs_BN: torch.Tensor | None,
    *,
    max_new: list[int],
    eos_id: int,
    generator: torch.Generator | None,
    temperature: float,
    top_k: int,
    top_p: float,
) -> list[list[int]]:
    """Greedy (``generator`` None) or sampled decoding; finished rows leave the batch."""
    device = first_BN.device
    outputs: list[list[int]] = [[] for _ in max_new]
    max_new_B = torch.tensor(max_new, device=device)
    active_B = torch.arange(len(max_new), device=device)
    state, logits_BV = step_logits(state, first_BN, new_document_ids_BN=first_docs_BN)
    for step in range(max(max_new)):
        if generator is None:
            next_B = logits_BV.argmax(dim=-1)
        else:
            filtered_BV = filter_logits(
                logits_BV, temperature=temperature, top_k=top_k, top_p=top_p
            )
            next_B = torch.multinomial(filtered_BV.softmax(dim=-1), 1, generator=generator)[:, 0]
        for row, token in zip(active_B.tolist(), next_B.tolist(), strict=True):
            outputs[row].append(token)
        keep_B = (next_B != eos_id) & (max_new_B[active_B] > step + 1)
        if not bool(keep_B.any()):
            break
        if not bool(keep_B.all()):
            kept_B = keep_B.nonzero()[:, 0]
            state, active_B, next_B = select_rows(state, kept_B), active_B[kept_B], next_B[kept_B]
        state, logits_BV = step_logits(state, next_B[:, None])
    return outputs


def _gather_beams(x_BC_: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k], ...]`` for each row b and slot k."""
    while index_BK.dim() < x_BC_.dim():
        index_BK = index_BK.unsqueeze(-1)
    return torch.take_along_dim(x_BC_, index_BK, dim=1)


def _beam_search(
    state: DecodeState,
    first_BN: torch.Tensor,
    first_docs_BN: torch.Tensor | None,
    *,
    max_new: list[int],
    eos_id: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
) -> list[list[int]]:
    """transformers' vectorised beam search (module docstring), rows of their own max length."""
    device = first_BN.device
    batch, beams = len(max_new), num_beams
    cands = 2 * beams
    longest = max(max_new)
    max_new_B1 = torch.tensor(max_new, device=device)[:, None]
    expand_B = torch.arange(batch, device=device).repeat_interleave(beams)
    state = select_rows(state, expand_B)
    first_BN = first_BN.index_select(0, expand_B)
    if first_docs_BN is not None:
        first_docs_BN = first_docs_BN.index_select(0, expand_B)

    running_BKL = torch.zeros((batch, beams, longest), dtype=torch.long, device=device)
    running_scores_BK = torch.zeros((batch, beams), device=device)
    running_scores_BK[:, 1:] = _NEG
    closed_BKL = running_BKL.clone()
    closed_scores_BK = torch.full((batch, beams), _NEG, device=device)
    closed_len_BK = torch.zeros((batch, beams), dtype=torch.long, device=device)
    closed_BK = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    open_B1 = torch.ones((batch, 1), dtype=torch.bool, device=device)
    top_beams_C = torch.arange(cands, device=device) < beams
    row_offset_B1 = torch.arange(batch, device=device)[:, None] * beams
    # "never": an open beam scored as if it ran to its row's maximum length (a Python power,
    # as transformers computes it, so that ties compare the same).
    never_norm_B1 = torch.tensor([float(n) ** length_penalty for n in max_new], device=device)
    never_norm_B1 = never_norm_B1[:, None]

    state, logits_BV = step_logits(state, first_BN, new_document_ids_BN=first_docs_BN)
    vocab = logits_BV.shape[-1]
    for step in range(longest):
        log_probs_BKV = F.log_softmax(logits_BV, dim=-1).view(batch, beams, vocab)
        log_probs_BX = (log_probs_BKV + running_scores_BK[:, :, None]).view(batch, beams * vocab)
        top_scores_BC, top_index_BC = torch.topk(log_probs_BX, k=cands)
        parent_BC = top_index_BC // vocab
        token_BC = top_index_BC % vocab
        top_BCL = _gather_beams(running_BKL, parent_BC)
        top_BCL[:, :, step] = token_BC
        hits_BC = (token_BC == eos_id) | (max_new_B1 <= step + 1)

        # Open beams for the next step: the best continuations that did not stop.
        open_scores_BC = top_scores_BC + hits_BC.float() * _NEG
        keep_BK = torch.topk(open_scores_BC, k=beams).indices
        running_BKL = _gather_beams(top_BCL, keep_BK)
        running_scores_BK = _gather_beams(open_scores_BC, keep_BK)
        parent_BK = _gather_beams(parent_BC, keep_BK)

        # Closed hypotheses: merge the stopped top-`beams` continuations, keep the best.
        just_closed_BC = hits_BC & top_beams_C[None, :]
        closing_BC = top_scores_BC / ((step + 1) ** length_penalty)
        if early_stopping is True:
            closing_BC = closing_BC + closed_BK.all(dim=-1, keepdim=True).float() * _NEG
        closing_BC = closing_BC + (~open_B1).float() * _NEG
        closing_BC = closing_BC + (~just_closed_BC).float() * _NEG
        merged_BXL = torch.cat([closed_BKL, top_BCL], dim=1)
        merged_scores_BX = torch.cat([closed_scores_BK, closing_BC], dim=1)
        merged_len_BX = torch.cat([closed_len_BK, torch.full_like(token_BC, step + 1)], dim=1)
        merged_closed_BX = torch.cat([closed_BK, just_closed_BC], dim=1)
        best_BK = torch.topk(merged_scores_BX, k=beams).indices
        closed_BKL = _gather_beams(merged_BXL, best_BK)
        closed_scores_BK = _gather_beams(merged_scores_BX, best_BK)
        closed_len_BK = _gather_beams(merged_len_BX, best_BK)
        closed_BK = _gather_beams(merged_closed_BX, best_BK)

        # Can an open beam still beat the worst closed hypothesis?
        generated = step + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_open_B1 = running_scores_BK[:, :1] / never_norm_B1
        else:
            best_open_B1 = running_scores_BK[:, :1] / (generated**length_penalty)
        worst_closed_BK = torch.where(
            closed_BK, closed_scores_BK.min(dim=1, keepdim=True).values, _NEG
        )
        open_B1 = open_B1 & (best_open_B1 > worst_closed_BK).any(dim=-1, keepdim=True)
        open_B1 = open_B1 & (max_new_B1 > generated)
        if early_stopping is True and bool(closed_BK.all()):
            break
        if not bool(open_B1.any()) or bool(hits_BC.all()):
            break
        state = select_rows(state, (parent_BK + row_offset_B1).flatten())
        state, logits_BV = step_logits(state, running_BKL[:, :, step].reshape(-1, 1))

    best_L = closed_BKL[:, 0].tolist()
    lengths = closed_len_BK[:, 0].tolist()
    return [tokens[:n] for tokens, n in zip(best_L, lengths, strict=True)]
