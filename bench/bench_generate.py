"""Generation tokens/s of ``pretrain.generate`` against transformers' ``generate()`` on the same
model and batch: greedy and beam 4, the tiny encoder-decoder (``configs/tiny_encdec.yaml`` ->
``MT5ForConditionalGeneration``) and the tiny decoder (``configs/tiny_decoder.yaml`` ->
``LlamaForCausalLM``), exported with ``checkpoints_tools.adapters.to_hf``; CPU, one timed run
each after one untimed warm-up call (``--repeat N``: the fastest of N, for a busy machine).

What to call:

    python bench/bench_generate.py [--batch 8] [--max-new 32] [--threads 1] [--repeat 1] [--json]

Prints a table (model, decode, our tokens/s, transformers' tokens/s, ratio, whether the two
outputs are the same tokens). Tokens/s counts generated tokens (EOS included, padding not) over
wall time. The model is random (seeded), so EOS is an id it rarely produces and most rows run to
``--max-new``. Both run with a key/value cache (ours: ``pretrain.models.kv_cache``, cross-attention
keys/values computed once) and SDPA attention.
Before timing, the twin's logits are checked against ours (1e-4).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAD = 0
EOS = 1


def _models(name: str):
    """``(ours, twin, cfg)`` for the preset ``configs/<name>.yaml``, random weights (seed 0)."""
    import transformers

    from checkpoints_tools.adapters import to_hf
    from pretrain.config import load_config
    from pretrain.models import build_model

    cfg = load_config(REPO / "configs" / f"{name}.yaml").model
    torch.manual_seed(0)
    ours = build_model(cfg)
    ours.init_weights(0)
    ours.eval()
    hf_state_dict, hf_config = to_hf(ours.state_dict(), cfg)
    hf_config.pad_token_id = PAD
    hf_config.eos_token_id = EOS
    twin = getattr(transformers, hf_config.architectures[0])._from_config(hf_config).eval()
    twin.load_state_dict(hf_state_dict, strict=True)
    return ours, twin, cfg


def _sources(batch: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 33, (batch,), generator=gen).tolist()
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def _padded(rows: list[list[int]], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = longest - len(row)
        ids.append([PAD] * fill + row if left else row + [PAD] * fill)
        mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
    return torch.tensor(ids), torch.tensor(mask)


def _cut(row: list[int]) -> list[int]:
    return row[: row.index(EOS) + 1] if EOS in row else row


def _check_logits(ours, twin, rows: list[list[int]], *, encdec: bool) -> float:
    with torch.no_grad():
        if encdec:
            ids, mask = _padded(rows, left=False)
            decoder = torch.tensor([[PAD, 5, 6, 7]] * len(rows))
            mine = ours(ids, decoder, document_ids_BS=torch.where(mask.bool(), 0, -1))
            theirs = twin(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
            return float((mine - theirs).abs().max())
        ids = torch.tensor([rows[0]])
        return float((ours(ids) - twin(input_ids=ids).logits).abs().max())


def _run_ours(ours, rows, *, encdec: bool, max_new: int, num_beams: int) -> list[list[int]]:
    from pretrain.generate import generate

    kwargs = dict(decoder_start_id=PAD) if encdec else {}
    decode = "beam" if num_beams > 1 else "greedy"
    return generate(
        ours,
        rows,
        eos_id=EOS,
        pad_id=PAD,
        max_len_b=max_new,
        decode=decode,
        num_beams=max(num_beams, 1),
        **kwargs,
    )


def _run_hf(twin, rows, *, encdec: bool, max_new: int, num_beams: int) -> list[list[int]]:
    ids, mask = _padded(rows, left=not encdec)
    kwargs = dict(decoder_start_token_id=PAD) if encdec else {}
    with torch.no_grad():
        out = twin.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=EOS,
            pad_token_id=PAD,
            **kwargs,
        )
    start = 1 if encdec else ids.shape[1]
    return [_cut(row[start:]) for row in out.tolist()]


def _timed(fn, *, repeat: int) -> tuple[float, list[list[int]]]:
    """Fastest of ``repeat`` timed calls after one warm-up call, and the output."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print its table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--max-new", type=int, default=32, help="tokens per row (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed runs, the fastest kept (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    results = []
    for name, encdec in (("tiny_encdec", True), ("tiny_decoder", False)):
        ours, twin, cfg = _models(name)
        rows = _sources(args.batch, cfg.vocab_size)
        max_diff = _check_logits(ours, twin, rows, encdec=encdec)
        if max_diff > 1e-4:
            raise SystemExit(f"{name}: twin logits differ by {max_diff:.2e} (> 1e-4)")
        for decode, num_beams in (("greedy", 1), ("beam4", 4)):
            kwargs = dict(encdec=encdec, max_new=args.max_new, num_beams=num_beams)
            t_ours, out_ours = _timed(lambda: _run_ours(ours, rows, **kwargs), repeat=args.repeat)
            t_hf, out_hf = _timed(lambda: _run_hf(twin, rows, **kwargs), repeat=args.repeat)
            tokens_ours = sum(map(len, out_ours))
            tokens_hf = sum(map(len, out_hf))
            results.append(
                {
                    "model": name,
                    "decode": decode,
                    "ours_tokens_per_s": tokens_ours / t_ours,
                    "hf_tokens_per_s": tokens_hf / t_hf,
                    "ratio": (tokens_ours / t_ours) / (tokens_hf / t_hf),
                    "same_tokens": out_ours == out_hf,
                    "tokens": tokens_ours,
                }
            )
    machine = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "max_new": args.max_new,
        "repeat": args.repeat,
    }
    if args.json:
        print(json.dumps({"setup": machine, "results": results}, indent=2))
        return 0
    print(" ".join(f"{k}={v}" for k, v in machine.items()))
    header = f"{'model':<13} {'decode':<7} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} same"
    print(header)
    for r in results:
        print(
            f"{r['model']:<13} {r['decode']:<7} {r['ours_tokens_per_s']:>11.0f} "
            f"{r['hf_tokens_per_s']:>10.0f} {r['ratio']:>6.2f} {r['same_tokens']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
