"""The back-translation loop (Edunov et al. 2018; tagged BT: Caswell et al. 2019), end to end with
the real jobs: a reverse model on the real pairs, back-translation of target-side monolingual
text, forward models on real vs real + synthetic pairs, BLEU on held-out pairs.

What to call::

    python -m launch.backtranslation_loop --out bt_loop [--pair en-es] [--steps 400]
        [--backends ckpt,apertium:spa-eng] [--tagged] [--bt-docs 3000] [--eval 200]
        [--seeds 0] [--train-pairs TSV --valid-pairs TSV --mono TXT] [--json]

(``main(argv)`` returns 0 when every step succeeded). Every step is a CLI command of this
repository, printed before it runs. For ``--pair SRC-TGT`` (forward direction SRC -> TGT;
default the bundled sample's en-es, or your own files):

1. a tokenizer on the SRC and TGT monolingual text and the real pairs; shards of the real
   training pairs and of the held-out pairs (``data_pipeline train-tokenizer`` / ``shard``);
   the TGT text to back-translate: the first ``--bt-docs`` lines of ``--mono`` that are no
   target of a training or held-out pair (so no held-out reference leaks into training);
2. the reverse model TGT -> SRC: ``configs/tiny_encdec.yaml`` with ``objective.weights=
   {translation: 1}`` and ``data.tlm_swap_prob=1`` (every pair runs target to source);
3. for each backend of ``--backends``: ``data_pipeline backtranslate`` of ``--bt-docs`` TGT
   documents into SRC (``ckpt``: the reverse model of step 2, greedy; ``apertium:PAIR``:
   Debian's rule-based translator, skipped with a note when not installed; any other
   ``--translator`` spec as given), timed: source tokens (the run's tokenizer) per wall second
   of the command (its start-up included) is the backend's throughput. ``--tagged`` also
   writes a tagged copy (``--tag``: ``<bt>`` before every synthetic source). A backend whose
   every pair the filters reject trains no forward model (a note says so);
4. forward models SRC -> TGT (``data.tlm_swap_prob=0``), same steps and batch, for every seed:
   on the real pairs alone, and on the real pairs merged with each synthetic set
   (``data_pipeline merge``; ``data.synthetic_ratio`` of the pair rows synthetic);
5. greedy translations (``pretrain.generate``) of the first ``--eval`` held-out SRC sentences
   by every forward model, scored with sacrebleu's corpus BLEU against their references, and
   against the references shifted by one sentence (a mismatched baseline: BLEU computed on
   the right pairs must beat it). With apertium installed, the rule-based SRC -> TGT pair
   (e.g. ``apertium:eng-spa``) is scored on the same sentences as a reference point.

The table (``--json``: one JSON object) has one row per forward model: its synthetic data
(none, or backend and tagging), seed, BLEU, mismatched-reference BLEU, chrF and the held-out
translation loss of its last validation; and one row per backend: documents, source tokens,
seconds and tokens/s. At the tiny preset's scale the BLEU figures are small; they are what
they are.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.backtranslate import TranslatorOptions, make_translator
from data_pipeline.text_inputs import open_binary

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_pipeline" / "sample"
PRESET = REPO / "configs" / "tiny_encdec.yaml"


def _log(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def run_command(cmd: list[str], *, quiet: bool = False) -> float:
    """Run one CLI step (printed first); returns its wall seconds. A failing step raises
    ``subprocess.CalledProcessError``."""
    _log(f"\n$ {shlex.join(cmd)}", quiet=quiet)
    start = time.monotonic()
    out = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, check=True, stdout=out)
    seconds = time.monotonic() - start
    _log(f"  ({seconds:.1f} s)", quiet=quiet)
    return seconds


def read_lines(path: Path, count: int | None = None) -> list[str]:
    """The first ``count`` lines (all: None) of a text file (``.gz``/``.zst`` or plain),
    without newlines."""
    with io.TextIOWrapper(open_binary(path), "utf-8") as text:
        return [line.rstrip("\n") for line in itertools.islice(text, count)]


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu corpus BLEU and chrF of ``hypotheses`` against their ``references`` (one
    reference each, in order), and BLEU against the references shifted by one sentence (each
    hypothesis scored against another sentence's reference: the mismatched baseline)."""
    import sacrebleu

    if len(hypotheses) != len(references) or len(references) < 2:
        raise ValueError(
            f"hypotheses ({len(hypotheses)}) and references ({len(references)}) must be as many, "
            "and at least 2"
        )
    shifted = references[1:] + references[:1]
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "bleu_mismatched": sacrebleu.corpus_bleu(hypotheses, [shifted]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def apertium_available(pair: str) -> bool:
    """Whether the ``apertium:PAIR`` backend can be made here (``apertium`` and its language
    pair ``pair``, e.g. ``eng-spa``, installed): the backend's own check."""
    try:
        make_translator(f"apertium:{pair}", TranslatorOptions())
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Corpus:
    """The loop's data: tokenizer, real and held-out pair shards, the text back-translated."""

    tokenizer: Path
    real: Path
    valid: Path
    mono: Path
    documents: int
    """TGT documents back-translated (the lines of ``mono``)."""
    source_tokens: int
    """Their tokens in the run's tokenizer (each backend's throughput is over these)."""
    held_out: list[tuple[str, str]]


def prepare_corpus(args, out: Path) -> Corpus:
    """Step 1 (tokenizer and shards), reusing finished work under ``out``."""
    from data_pipeline.tokenizer import load_tokenizer

    py = sys.executable
    src, tgt = args.pair.split("-", 1)
    train_pairs = Path(args.train_pairs or SAMPLE / "parallel" / f"{args.pair}.train.tsv.zst")
    valid_pairs = Path(args.valid_pairs or SAMPLE / "parallel" / f"{args.pair}.valid.tsv.zst")
    mono_src = Path(args.mono_src or SAMPLE / "mono" / f"{src}.train.txt.zst")
    mono_tgt = Path(args.mono or SAMPLE / "mono" / f"{tgt}.train.txt.zst")
    for what, path in (("--train-pairs", train_pairs), ("--valid-pairs", valid_pairs),
                       ("--mono-src", mono_src), ("--mono", mono_tgt)):  # fmt: skip
        if not path.is_file():
            raise SystemExit(f"error: {what} ({str(path)!r}): no such file")
    out.mkdir(parents=True, exist_ok=True)
    # the TGT documents to back-translate: the first --bt-docs lines of the mono text that are
    # no target of a real or held-out pair (monolingual text the pairs do not cover; no held-out
    # reference leaks into the synthetic training pairs)
    paired = {
        line.split("\t", 1)[1]
        for path in (train_pairs, valid_pairs)
        for line in read_lines(path)
        if "\t" in line
    }
    lines = []
    for line in read_lines(mono_tgt):
        if line.strip() and line not in paired:
            lines.append(line)
            if len(lines) == args.bt_docs:
                break
    mono = out / f"mono_{tgt}.txt"
    mono.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = out / "tokenizer"
    if not any(tokenizer.glob("*.json")):
        run_command(
            [py, "-m", "data_pipeline", "train-tokenizer", "--input", f"{src}={mono_src}",
             "--input", f"{tgt}={mono_tgt}", "--parallel", f"{args.pair}={train_pairs}",
             "--vocab-size", str(args.vocab_size), "--sample-chars", str(args.sample_chars),
             "--out", str(tokenizer)],
            quiet=args.quiet,
        )  # fmt: skip
    real, valid = out / "shards_real", out / "shards_valid"
    for pairs, where in ((train_pairs, real), (valid_pairs, valid)):
        run_command(
            [py, "-m", "data_pipeline", "shard", "--tokenizer", str(tokenizer),
             "--parallel", f"{args.pair}={pairs}", "--out", str(where), "--quiet"],
            quiet=args.quiet,
        )  # fmt: skip
    held = [line.split("\t", 1) for line in read_lines(valid_pairs, args.eval) if "\t" in line]
    tokens = sum(map(len, load_tokenizer(tokenizer).encode(lines)))
    return Corpus(tokenizer, real, valid, mono, len(lines), tokens, [(s, t) for s, t in held])


def train(args, corpus: Corpus, *, manifest: Path, run_dir: Path, swap: float, seed: int,
          extra: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A translation-only run of the tiny encoder-decoder; returns its final checkpoint."""
    from pretrain.checkpoint import complete_checkpoints

    if run_dir.exists():
        shutil.rmtree(run_dir)  # every model of the loop trains from scratch
    run_command(
        [sys.executable, "-m", "pretrain.train", "--config", str(PRESET),
         f"data.manifest={manifest}", f"data.valid_manifest={corpus.valid}",
         f"data.tokenizer={corpus.tokenizer}", f"train.run_dir={run_dir}",
         f"model.vocab_size={args.vocab_size}", "objective.weights={translation: 1}",
         f"data.tlm_swap_prob={swap}", f"train.seed={seed}", f"train.steps={args.steps}",
         f"checkpoint.every={args.steps}", f"train.eval_every={args.steps}",
         f"optim.warmup_steps={max(1, min(10, args.steps // 4))}",
         f"logging.every={max(1, args.steps // 4)}", "logging.progress=false",
         "logging.tensorboard=false", *args.override, *extra],
        quiet=args.quiet,
    )  # fmt: skip
    return complete_checkpoints(run_dir / "checkpoints")[-1][1]


def backtranslate(args, corpus: Corpus, *, translator: str, out: Path, tagged: bool) -> dict:
    """Step 3 for one backend; returns its throughput row."""
    src, tgt = args.pair.split("-", 1)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "data_pipeline", "backtranslate", "--translator", translator,
           "--tokenizer", str(corpus.tokenizer), "--input", f"{tgt}={corpus.mono}", "--to", src,
           "--out", str(out), "--max-len-a", str(args.bt_max_len_a),
           "--max-len-b", str(args.bt_max_len_b), "--keep-text",
           "--quiet"] + (["--tag"] if tagged else [])  # fmt: skip
    seconds = run_command(cmd, quiet=args.quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    (pair,) = manifest["pairs"].values()
    return {
        "backend": translator,
        "tagged": tagged,
        "documents": corpus.documents,
        "kept": pair["documents"],
        "rejected": pair.get("rejected", {}),
        "source_tokens": corpus.source_tokens,
        "seconds": seconds,
        "tokens_per_s": corpus.source_tokens / seconds,
    }


def evaluate(corpus: Corpus, checkpoint: Path, *, target: str) -> dict[str, float]:
    """BLEU (and the mismatched baseline, chrF) of ``checkpoint``'s greedy translations of the
    held-out sources."""
    from launch.demo_encdec import translate

    sources = [s for s, _ in corpus.held_out]
    outputs = translate(checkpoint, corpus.tokenizer, sources, target=target)
    return bleu(outputs, [t for _, t in corpus.held_out])


def _valid_loss(run_dir: Path) -> float | None:
    from pretrain.plots import read_metrics

    losses = [r["valid_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "valid_loss" in r]
    return losses[-1] if losses else None


def run_loop(args) -> dict:
    """Steps 1-5; returns the result (see the module docstring), also written to
    ``<out>/result.json``."""
    out = Path(args.out)
    src, tgt = args.pair.split("-", 1)
    corpus = prepare_corpus(args, out)
    notes = []
    reverse = train(args, corpus, manifest=corpus.real, run_dir=out / "run_reverse", swap=1.0,
                    seed=args.seeds[0])  # fmt: skip
    synthetic: dict[str, Path] = {}
    backends = []
    for spec in args.backends:
        translator = f"ckpt:{reverse}" if spec == "ckpt" else spec
        if spec.startswith("apertium:") and not apertium_available(spec.split(":", 1)[1]):
            notes.append(f"{spec}: apertium or its pair is not installed; skipped")
            continue
        for tagged in (False, True) if args.tagged else (False,):
            label = spec.split(":", 1)[0] + ("+tag" if tagged else "")
            bt_dir = out / f"bt_{label}"
            row = backtranslate(args, corpus, translator=translator, out=bt_dir, tagged=tagged)
            backends.append({**row, "backend": spec})
            if row["kept"] == 0:
                notes.append(f"{label}: every synthetic pair was filtered out; no forward model")
                continue
            mixed = out / f"shards_{label}"
            if mixed.exists():
                shutil.rmtree(mixed)
            run_command(
                [sys.executable, "-m", "data_pipeline", "merge", "--out", str(mixed),
                 str(corpus.real), str(bt_dir)],
                quiet=args.quiet,
            )  # fmt: skip
            synthetic[label] = mixed
    models = []
    for seed in args.seeds:
        runs = [("real", corpus.real, ())] + [
            (label, manifest, (f"data.synthetic_ratio={args.synthetic_ratio}",))
            for label, manifest in synthetic.items()
        ]
        for label, manifest, extra in runs:
            run_dir = out / f"run_forward_{label}_seed{seed}"
            ckpt = train(args, corpus, manifest=manifest, run_dir=run_dir, swap=0.0, seed=seed,
                         extra=extra)  # fmt: skip
            scores = evaluate(corpus, ckpt, target=tgt)
            models.append(
                {"synthetic": label, "seed": seed, **scores, "valid_loss": _valid_loss(run_dir)}
            )
    # the rule-based forward system on the same sentences: the reverse of the apertium backend
    reference = None
    reverse_pairs = [b.split(":", 1)[1] for b in args.backends if b.startswith("apertium:")]
    rule_based = "-".join(reversed(reverse_pairs[0].split("-", 1))) if reverse_pairs else ""
    if rule_based and apertium_available(rule_based):
        apertium = make_translator(f"apertium:{rule_based}", TranslatorOptions())
        sources = [s for s, _ in corpus.held_out]
        reference = {
            "translator": f"apertium:{rule_based}",
            **bleu(apertium.translate(sources, seed=0), [t for _, t in corpus.held_out]),
        }
    result = {
        "pair": args.pair,
        "steps": args.steps,
        "held_out_pairs": len(corpus.held_out),
        "bt_documents": corpus.documents,
        "synthetic_ratio": args.synthetic_ratio,
        "models": models,
        "backends": backends,
        "rule_based_reference": reference,
        "notes": notes,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _table(result: dict) -> str:
    lines = [
        f"forward {result['pair']}: {result['steps']} steps per model, BLEU on "
        f"{result['held_out_pairs']} held-out pairs ({result['bt_documents']} documents "
        f"back-translated, synthetic_ratio {result['synthetic_ratio']})",
        f"{'synthetic':<14} {'seed':>4} {'BLEU':>6} {'mismatched':>10} {'chrF':>6} {'valid':>7}",
    ]
    for m in result["models"]:
        valid = f"{m['valid_loss']:.3f}" if m["valid_loss"] is not None else "-"
        lines.append(
            f"{m['synthetic']:<14} {m['seed']:>4} {m['bleu']:>6.2f} {m['bleu_mismatched']:>10.2f} "
            f"{m['chrf']:>6.2f} {valid:>7}"
        )
    lines.append(f"{'backend':<22} {'tag':<4} {'docs':>5} {'kept':>5} {'tokens':>7} {'tok/s':>8}")
    for b in result["backends"]:
        lines.append(
            f"{b['backend']:<22} {'yes' if b['tagged'] else 'no':<4} {b['documents']:>5} "
            f"{b['kept']:>5} {b['source_tokens']:>7} {b['tokens_per_s']:>8.0f}"
        )
    if result["rule_based_reference"]:
        r = result["rule_based_reference"]
        lines.append(
            f"reference {r['translator']}: BLEU {r['bleu']:.2f} (mismatched "
            f"{r['bleu_mismatched']:.2f}), chrF {r['chrf']:.2f}"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m launch.backtranslation_loop", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="bt_loop", help="output directory (reused if present)")
    parser.add_argument("--pair", default="en-es", help="SRC-TGT, the forward direction")
    parser.add_argument("--steps", type=int, default=400, help="training steps per model")
    parser.add_argument(
        "--backends", default="ckpt,apertium:spa-eng",
        help="comma-separated: ckpt (the reverse model), apertium:PAIR (TGT -> SRC) or any "
        "--translator of data_pipeline backtranslate (hf:DIR, reverse: for tests)",
    )  # fmt: skip
    parser.add_argument("--tagged", action="store_true", help="also train on tagged BT (<bt>)")
    parser.add_argument("--bt-docs", type=int, default=3000, help="TGT documents back-translated")
    parser.add_argument(
        "--bt-max-len-a", type=float, default=1.5, help="backtranslate --max-len-a (default 1.5)"
    )
    parser.add_argument(
        "--bt-max-len-b", type=int, default=10, help="backtranslate --max-len-b (default 10)"
    )
    parser.add_argument("--eval", type=int, default=200, help="held-out pairs scored")
    parser.add_argument("--seeds", default="0", help="comma-separated forward-model seeds")
    parser.add_argument(
        "--synthetic-ratio", type=float, default=0.5, help="share of pair rows synthetic"
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--sample-chars", type=int, default=2_000_000)
    parser.add_argument("--train-pairs", help="real training pairs (TSV SRC<TAB>TGT)")
    parser.add_argument("--valid-pairs", help="held-out pairs (TSV SRC<TAB>TGT)")
    parser.add_argument("--mono", help="TGT monolingual text to back-translate")
    parser.add_argument("--mono-src", help="SRC monolingual text (for the tokenizer)")
    parser.add_argument(
        "--override", action="append", default=[], help="extra trainer override (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no command lines or job output")
    args = parser.parse_args(argv)
    if args.pair.count("-") != 1 or not all(args.pair.split("-")):
        parser.error(f"--pair ({args.pair!r}) must be SRC-TGT, e.g. en-es")
    args.backends = [b for b in args.backends.split(",") if b]
    for spec in args.backends:
        if spec != "ckpt" and ":" not in spec:
            parser.error(f"--backends entry ({spec!r}) must be ckpt or a translator BACKEND:ARG")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds ({args.seeds!r}) must be comma-separated integers")
    if not args.seeds:
        parser.error("--seeds must name at least one seed")
    for name in ("steps", "bt_docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.eval < 2:
        parser.error(f"--eval ({args.eval}) must be >= 2")
    if not 0.0 < args.synthetic_ratio < 1.0:
        parser.error(f"--synthetic-ratio ({args.synthetic_ratio}) must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the loop; print the table (or JSON); returns the exit code."""
    args = parse_args(argv)
    try:
        result = run_loop(args)
    except subprocess.CalledProcessError as err:
        print(f"error: step failed (exit {err.returncode}): {shlex.join(err.cmd)}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else "\n" + _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
