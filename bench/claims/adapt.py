"""Adaptation of the exports with every delta-tuning method: full fine-tuning, LoRA, prefix
tuning, prompt tuning, IA3 (peft), BitFit and bottleneck adapters
(:mod:`checkpoints_tools.delta_tuning`), on the exported encoder (``XLMRobertaFor
SequenceClassification``) and decoder (``LlamaForSequenceClassification``).

``python -m bench.claims.adapt [--encoder DIR] [--decoder DIR] [--shards DIR --valid DIR
--tokenizer DIR] [--steps N] [--epochs E] [--langs L ...] [--methods M ...] [--json] [--out DIR]``.
Without ``--encoder`` / ``--decoder`` the tiny encoder (``configs/tiny_encoder.yaml``, MLM + TLM)
and the tiny decoder (``configs/tiny_decoder.yaml``, CLM) train ``--steps`` steps on the sample's
``--langs`` and its en-X pair sets (``bench.claims.common``) and are exported with
``checkpoints_tools export-hf``. Two labelled tasks, from text the pretraining did not label:

- language identification (LID): ``--per-lang`` train paragraphs per language (the sample's
  train files), ``--test-per-lang`` held-out ones (its ``*.valid`` files); one class per language.
- cross-lingual transfer (mood): is an English help paragraph an instruction ("Select the
  cell", "Click OK") or a description of a feature ("Selects the cell", "Returns the value")?
  Labelled by its first word (``INSTRUCTION`` / ``DESCRIPTION``; others are left out). Train on
  the English sides of the train pairs, test on the *translations* of the held-out pairs (each
  pair's label is its English side's): the model never sees a labelled non-English sentence.
  The same test on the held-out English sides is reported as language ``en``.

Each (model, method, task) fine-tunes ``--epochs`` epochs (batch 16, at most 64 tokens, AdamW,
learning rates fixed per method in ``LR`` before any run, not tuned on the test); the decoder
reads its last real token (left padding). A method that does not run on a model is a row
``fails: <reason>`` (peft 0.21 with transformers 5: prefix tuning of the Llama classifier; BitFit
on Llama, which has no biases; see :mod:`checkpoints_tools.delta_tuning`). Prints a table
(method, model, trainable parameters, share of the model, LID and transfer accuracy, seconds per
epoch; ``--json``: the result object) and writes ``adapt.png`` and ``adapt.json`` under
``--out``. With ``--shards`` the texts are the decoded documents of ``--shards`` (train) and
``--valid`` (test) and the pairs those of their en-X pair shards (transfer is skipped without
held-out en-X pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.claims.common import (
    SAMPLE_PAIRS,
    export_final,
    held_out_pairs,
    run_config,
    sample_corpus,
    train_run,
)
from checkpoints_tools.delta_tuning import METHODS, count_parameters, delta_model
from data_pipeline.manifest import load_manifest
from tests.sample_data import SAMPLE, first_lines

LANGS = ("de", "en", "es", "fr", "ja", "ru", "zh")
LR = {"full": 5e-4, "lora": 5e-3, "prefix": 5e-3, "prompt": 3e-2, "ia3": 5e-3, "bitfit": 5e-3}
LR["adapters"] = 5e-3
BATCH, MAX_TOKENS = 16, 64
INSTRUCTION = frozenset(
    "Select Choose Enter Click Use Open Insert Set Type Specify Press Double-click Show Edit Go "
    "Save Drag Right-click Add Change Delete Define Create Move Apply Remove Mark Check Switch "
    "Close Print Format Sort Hide Assign Start".split()
)
DESCRIPTION = frozenset(
    "Specifies Returns Opens Inserts Displays Creates Moves Defines Adds Lists Draws Calculates "
    "Sets Allows Shows Converts Removes Determines Applies Deletes Enables Contains Changes "
    "Selects Assigns Saves Hides Activates Sorts Starts Closes Prints Formats Lets".split()
)
MOOD = ("description", "instruction")


def mood_label(english: str) -> int | None:
    """1 for an instruction, 0 for a description, None for neither (by the first word)."""
    first = english.split(" ", 1)[0]
    return 1 if first in INSTRUCTION else 0 if first in DESCRIPTION else None


def _mood_rows(pairs: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    rows, seen = [], set()
    for en, other in pairs:
        label = mood_label(en)
        if label is not None and en not in seen:
            seen.add(en)
            rows.append((en, other, label))
    return rows


def _balanced(rows: list, count: int, label_of) -> list:
    """At most ``count`` rows, the same number per label where there are enough (order kept)."""
    labels = sorted({label_of(r) for r in rows})
    per = count // max(len(labels), 1)
    taken = {label: 0 for label in labels}
    out = []
    for row in rows:
        if taken[label_of(row)] < per:
            taken[label_of(row)] += 1
            out.append(row)
    return out


def sample_texts(args: argparse.Namespace, pair_names: list[str]) -> dict:
    """The two tasks' texts from the bundled sample's files."""
    lid_train, lid_test = [], []
    for lang in args.langs:
        lines = first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 4000)
        lid_train += [(t, lang) for t in lines if len(t) >= 20][: args.per_lang]
        lines = first_lines(SAMPLE / "mono" / f"{lang}.valid.txt.zst", 2000)
        lid_test += [(t, lang) for t in lines if len(t) >= 20][: args.test_per_lang]
    train_pairs, test_pairs = [], {}
    for name in pair_names:
        lines = first_lines(SAMPLE / "parallel" / f"{name}.train.tsv.zst", 100_000)
        train_pairs += [tuple(x.split("\t", 1)) for x in lines if "\t" in x]
        test_pairs[name] = held_out_pairs(name, 100_000)
    return {"lid_train": lid_train, "lid_test": lid_test, "train_pairs": train_pairs,
            "test_pairs": test_pairs}  # fmt: skip


def shard_texts(args: argparse.Namespace) -> dict:
    """The two tasks' texts decoded from ``--shards`` (train) and ``--valid`` (test)."""
    import sentencepiece

    from data_pipeline.shard_format import (
        iter_documents_of_sample,
        iter_pairs_of_sample,
        iter_shard_samples,
    )

    model_file = next(Path(args.tokenizer).glob("*.model"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def read(directory: Path, limit: int) -> tuple[list, dict]:
        manifest = load_manifest(directory)
        mono: dict[str, list[str]] = {}
        pairs: dict[str, list[tuple[str, str]]] = {}
        for entry in manifest["shards"]:
            lang, pair = entry.get("lang"), entry.get("pair")
            for sample in iter_shard_samples(directory / entry["path"]):
                if entry["kind"] == "mono" and (args.langs is None or lang in args.langs):
                    for ids in iter_documents_of_sample(sample):
                        if len(mono.setdefault(lang, [])) < limit:
                            text = sp.decode(ids.tolist())
                            if len(text) >= 20:
                                mono[lang].append(text)
                elif pair and pair.startswith("en-"):
                    for src, tgt in iter_pairs_of_sample(sample):
                        pairs.setdefault(pair, []).append(
                            (sp.decode(src.tolist()), sp.decode(tgt.tolist()))
                        )
        return [(t, lang) for lang, texts in mono.items() for t in texts], pairs

    lid_train, train_pairs = read(Path(args.shards), args.per_lang)
    lid_test, test_pairs = read(Path(args.valid), args.test_per_lang)
    return {"lid_train": lid_train, "lid_test": lid_test,
            "train_pairs": [p for ps in train_pairs.values() for p in ps],
            "test_pairs": test_pairs}  # fmt: skip


def build_tasks(texts: dict, *, transfer_train: int) -> dict:
    """``{"lid": {...}, "transfer": {...} | None}``: texts and integer labels per split."""
    labels = sorted({lang for _, lang in texts["lid_train"]})
    index = {lang: i for i, lang in enumerate(labels)}
    lid = {
        "labels": labels,
        "train": ([t for t, _ in texts["lid_train"]], [index[x] for _, x in texts["lid_train"]]),
        "test": {"all": ([t for t, x in texts["lid_test"] if x in index],
                         [index[x] for _, x in texts["lid_test"] if x in index])},
    }  # fmt: skip
    test_rows = {name: _mood_rows(p) for name, p in texts["test_pairs"].items()}
    held_out_en = {en for rows in test_rows.values() for en, _, _ in rows}
    train_rows = [r for r in _mood_rows(texts["train_pairs"]) if r[0] not in held_out_en]
    train_rows = _balanced(train_rows, transfer_train, lambda r: r[2])
    if not train_rows or not any(test_rows.values()):
        return {"lid": lid, "transfer": None}
    test = {name.split("-", 1)[1]: ([o for _, o, _ in rows], [y for _, _, y in rows])
            for name, rows in test_rows.items() if rows}  # fmt: skip
    english = {en: y for rows in test_rows.values() for en, _, y in rows}
    test["en"] = (list(english), list(english.values()))
    transfer = {"labels": list(MOOD), "train": ([r[0] for r in train_rows],
                [r[2] for r in train_rows]), "test": test}  # fmt: skip
    return {"lid": lid, "transfer": transfer}


def _encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    )


def _load(hf_dir: Path, family: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report: the new head is expected
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if family == "decoder":
        tokenizer.padding_side = "left"  # the classifier reads the last position
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModelForSequenceClassification.from_pretrained(
        hf_dir, num_labels=num_labels, dtype=torch.float32
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def fine_tune(hf_dir: Path, family: str, method: str, task: dict, *, epochs: int, seed: int):
    """One (model, method, task) run: ``{"trainable", "total", "accuracy": {test: acc},
    "seconds_per_epoch"}`` or ``{"fails": reason}``."""
    torch.manual_seed(seed)
    model, tokenizer = _load(hf_dir, family, len(task["labels"]))
    total = sum(p.numel() for p in model.parameters())
    texts, labels = task["train"]
    data = _encode(tokenizer, texts)
    y = torch.tensor(labels)
    try:
        tuned = delta_model(model, method)
        trainable, _ = count_parameters(tuned)
        params = [p for p in tuned.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        seconds = []
        for _ in range(epochs):
            tuned.train()
            start = time.perf_counter()
            for idx in torch.randperm(len(y), generator=generator).split(BATCH):
                loss = tuned(**{k: v[idx] for k, v in data.items()}, labels=y[idx]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            seconds.append(time.perf_counter() - start)
    except (ValueError, RuntimeError, TypeError) as err:
        return {"fails": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    tuned.eval()
    accuracy = {}
    with torch.no_grad():
        for name, (test_texts, test_labels) in task["test"].items():
            hits = 0
            for start in range(0, len(test_texts), 64):
                enc = _encode(tokenizer, test_texts[start : start + 64])
                pred = tuned(**enc).logits.argmax(-1)
                hits += int((pred == torch.tensor(test_labels[start : start + 64])).sum())
            accuracy[name] = hits / len(test_texts)
    return {"trainable": trainable, "total": total, "accuracy": accuracy,
            "seconds_per_epoch": statistics.mean(seconds)}  # fmt: skip


def pretrain(family: str, data: dict, out: Path, *, steps: int, seed: int) -> Path:
    """Train the tiny ``family`` model ``steps`` steps on ``data["shards"]``; its HF export."""
    run_dir = out / "runs" / f"{family}_seed{seed}"
    preset, extra = {
        "encoder": ("tiny_encoder.yaml", ["objective.weights={mlm: 1.0, tlm: 1.0}",
                                          "model.tie_embeddings=true"]),
        "decoder": ("tiny_decoder.yaml", []),
    }[family]  # fmt: skip
    cfg = run_config(preset, data, run_dir, steps=steps, seed=seed, extra=extra,
                     log_every=max(steps // 4, 1))  # fmt: skip
    train_run(cfg)
    return export_final(run_dir, steps)


def _majority(task: dict | None) -> dict[str, float]:
    if task is None:
        return {}
    out = {}
    for name, (_, labels) in task["test"].items():
        out[name] = max(labels.count(c) for c in set(labels)) / len(labels)
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if args.langs is None and not args.shards:
        args.langs = list(LANGS)
    pair_names = [f"en-{x}" for x in args.langs or () if f"en-{x}" in SAMPLE_PAIRS]
    models = {"encoder": args.encoder, "decoder": args.decoder}
    if args.shards:
        data = {"shards": Path(args.shards)}
        texts = shard_texts(args)
    else:
        data = None
        texts = sample_texts(args, pair_names)
    started = time.perf_counter()
    for family in args.models:
        if models[family] is None:
            if data is None:
                data = sample_corpus(Path(args.data or out / "data"), args.langs, pairs=pair_names)
            models[family] = pretrain(family, data, out, steps=args.steps, seed=args.seed)
    pretrain_seconds = time.perf_counter() - started
    tasks = build_tasks(texts, transfer_train=args.transfer_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows = []
    try:
        for family in args.models:
            for method in args.methods:
                row = {"method": method, "model": family}
                for task_name, task in tasks.items():
                    if task is None:
                        continue
                    result = fine_tune(
                        Path(models[family]), family, method, task, epochs=args.epochs,
                        seed=args.seed,
                    )  # fmt: skip
                    if "fails" in result:
                        row["fails"] = result["fails"]
                        break
                    row.update(trainable=result["trainable"], total=result["total"])
                    row["share"] = result["trainable"] / result["total"]
                    row[f"{task_name}_accuracy"] = result["accuracy"]
                    row[f"{task_name}_seconds_per_epoch"] = result["seconds_per_epoch"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        torch.set_num_threads(threads)
    sizes = {name: {"labels": task["labels"], "train": len(task["train"][1]),
                    "test": {k: len(v[1]) for k, v in task["test"].items()}}
             for name, task in tasks.items() if task is not None}  # fmt: skip
    return {
        "rows": rows,
        "majority": {name: _majority(task) for name, task in tasks.items()},
        "tasks": sizes,
        "models": {k: str(v) for k, v in models.items() if k in args.models},
        "pretrain_steps": args.steps,
        "pretrain_seconds": pretrain_seconds,
        "epochs": args.epochs,
        "lr": LR,
        "seed": args.seed,
    }


def transfer_mean(row: dict) -> float | None:
    """Mean transfer accuracy over the non-English test languages."""
    acc = row.get("transfer_accuracy")
    if not acc:
        return None
    others = [v for k, v in acc.items() if k != "en"]
    return statistics.mean(others) if others else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, family in zip(axes, ("encoder", "decoder")):
        rows = [r for r in result["rows"] if r["model"] == family]
        names = [r["method"] for r in rows]
        width = 0.38
        lid = [r["lid_accuracy"]["all"] if "fails" not in r else 0 for r in rows]
        transfer = [transfer_mean(r) or 0 for r in rows]
        ax.bar([i - width / 2 for i in range(len(rows))], lid, width, label="LID")
        ax.bar([i + width / 2 for i in range(len(rows))], transfer, width, label="transfer")
        for i, r in enumerate(rows):
            if "fails" in r:
                ax.text(i, 0.02, "fails", ha="center", rotation=90, fontsize=8)
        majority = result["majority"]
        if majority.get("lid"):
            ax.axhline(majority["lid"]["all"], color="tab:blue", linestyle="--", linewidth=0.8)
        others = [v for k, v in (majority.get("transfer") or {}).items() if k != "en"]
        if others:
            ax.axhline(statistics.mean(others), color="tab:orange", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=30)
        ax.set_title(f"exported {family}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("held-out accuracy (lines: majority class)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"delta tuning ({result['epochs']} epochs, seed {result['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> list[str]:
    lines = [
        "| method | model | trainable | share | LID acc | transfer acc (non-en) | "
        "transfer acc (en) | s/epoch (LID) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "fails" in r:
            lines.append(f"| {r['method']} | {r['model']} | fails: {r['fails']} ||||||")
            continue
        mean = transfer_mean(r)
        en = (r.get("transfer_accuracy") or {}).get("en")
        lines.append(
            f"| {r['method']} | {r['model']} | {r['trainable']:,} | {r['share']:.2%} | "
            f"{r['lid_accuracy']['all']:.3f} | {'-' if mean is None else f'{mean:.3f}'} | "
            f"{'-' if en is None else f'{en:.3f}'} | {r['lid_seconds_per_epoch']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help="an export-hf directory of an encoder (no pretraining)")
    parser.add_argument("--decoder", help="an export-hf directory of a decoder (no pretraining)")
    parser.add_argument("--shards")
    parser.add_argument("--valid")
    parser.add_argument("--tokenizer")
    parser.add_argument("--data", help="where the sample corpus is built / reused")
    parser.add_argument("--langs", nargs="+", help=f"default {' '.join(LANGS)}; --shards: all")
    parser.add_argument("--models", nargs="+", choices=("encoder", "decoder"),
                        default=["encoder", "decoder"])  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--per-lang", type=int, default=100, help="LID train paragraphs")
    parser.add_argument("--test-per-lang", type=int, default=50, help="LID test paragraphs")
    parser.add_argument("--transfer-train", type=int, default=600, help="English mood examples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/claims/adapt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.shards and not (args.valid and args.tokenizer):
        parser.error("--shards needs --valid and --tokenizer (held-out shards, their tokenizer)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    plot(result, out / "adapt.png")
    (out / "adapt.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"pretraining {result['pretrain_steps']} steps ({result['pretrain_seconds']:.0f} s), "
        f"{result['epochs']} epochs per fine-tune, seed {result['seed']}; tasks {result['tasks']}"
    )
    print(f"majority-class accuracy: {result['majority']}")
    print("\n".join(table(result)))
    print(f"plot: {out / 'adapt.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
