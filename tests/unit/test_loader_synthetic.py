"""Real and synthetic (back-translated) pair sets in the loader: ``data.synthetic_ratio``,
``data.parallel_upsample``, the per-pair token counters, ``mix --json`` and the metrics line."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch

from data_pipeline.config import DataConfig, validate_data
from data_pipeline.loader import SYNTHETIC_SUFFIX, StreamingDataset, build_loader
from data_pipeline.manifest import merge_manifests
from data_pipeline.mix import main as mix_main
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import MaskingConfig
from pretrain.metrics import MetricsWindow

VOCAB = synthetic_vocab(512)
LANGS = ["de", "en", "fr"]  # the manifest's own languages, sorted (no tokenizer sidecar)
PAIRS = {"en-de": 150, "en-fr": 400, "de-fr": 60}
SYNTHETIC = ("en-fr", "de-fr")
TLM = MaskingConfig(tlm_share=1.0)


def _mark(root: Path, names: tuple[str, ...]) -> None:
    """Mark pair sets synthetic in the manifest, as the back-translation job does."""
    file = root / "manifest.json"
    manifest = json.loads(file.read_text())
    for name in names:
        manifest["pairs"][name]["synthetic"] = True
    file.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    write_synthetic_shards(root, docs={"en": 80, "de": 40}, pairs=PAIRS, sample_tokens=150)
    return root


@pytest.fixture(scope="module")
def marked(plain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("marked") / "d"
    shutil.copytree(plain, root)
    _mark(root, SYNTHETIC)
    return root


def _ds(root: Path, **kw) -> StreamingDataset:
    args = dict(
        dp_rank=0,
        dp_world_size=1,
        seq_len=48,
        batch_size=4,
        vocab=VOCAB,
        objective="mlm",
        masking=TLM,
        seed=5,
        shuffle_buffer=8,
        alpha=0.5,
    )
    return StreamingDataset(root, **{**args, **kw})


def _row_pairs(batch: dict) -> list[str]:
    """The pair set of each TLM row, read off its language ids (each set has its own two)."""
    by_langs = {frozenset(LANGS.index(x) for x in k.split("-")): k for k in PAIRS}
    out = []
    for lang_T, valid_T in zip(batch["lang_ids"], batch["attention_mask"]):
        out.append(by_langs[frozenset(lang_T[valid_T].tolist())])
    return out


def _rows(ds: StreamingDataset, num_batches: int) -> list[str]:
    it = iter(ds)
    return [name for _ in range(num_batches) for name in _row_pairs(next(it))]


def _binomial_ok(hits: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(hits / n - p) <= z * math.sqrt(p * (1 - p) / n)


def _smoothed(tokens: dict[str, int], alpha: float) -> dict[str, float]:
    """The paper's rule, written out: p_l = q_l^alpha / sum_k q_k^alpha."""
    total = sum(tokens.values())
    w = {k: (n / total) ** alpha for k, n in tokens.items()}
    return {k: v / sum(w.values()) for k, v in w.items()}


def test_synthetic_sets_come_from_the_manifest_flag(marked: Path, plain: Path) -> None:
    assert _ds(marked).synthetic_pairs == sorted(SYNTHETIC)
    assert _ds(plain).synthetic_pairs == []


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8])
def test_ratio_is_the_share_of_synthetic_pair_rows(marked: Path, ratio: float) -> None:
    ds = _ds(marked, synthetic_ratio=ratio)
    rows = _rows(ds, 400)
    n = len(rows)
    synthetic = sum(name in SYNTHETIC for name in rows)
    if ratio == 0.0:
        assert synthetic == 0
    else:
        assert _binomial_ok(synthetic, n, ratio), (synthetic, n)
    # within the synthetic pool, alpha smoothing of the pool's own token counts
    tokens = {k: s.tokens for k, s in ds.sources.items() if k in SYNTHETIC}
    within = _smoothed(tokens, 0.5)
    for name in SYNTHETIC:
        assert ds.pair_p[name] == pytest.approx(ratio * within[name])
        if ratio:
            hits = sum(r == name for r in rows)
            assert _binomial_ok(hits, n, ratio * within[name]), (name, hits, n)
    assert ds.pair_p["en-de"] == pytest.approx(1 - ratio)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_upsample_multiplies_the_real_sets_odds_as_fairseq_does(marked: Path, alpha: float) -> None:
    upsample = 3.0
    base = _ds(marked, alpha=alpha)
    ds = _ds(marked, alpha=alpha, parallel_upsample=upsample)
    tokens = {k: s.tokens for k, s in ds.sources.items() if s.kind == "pair"}
    # fairseq's --upsample-primary: the real set counted U times (ConcatDataset sample_ratios),
    # then the smoothing weights: w_real = U q_real^alpha, w_synthetic = q^alpha
    q = {k: n / sum(tokens.values()) for k, n in tokens.items()}
    w = {k: q[k] ** alpha * (upsample if k not in SYNTHETIC else 1.0) for k in q}
    want = {k: v / sum(w.values()) for k, v in w.items()}
    assert ds.pair_p == pytest.approx(want)
    odds = ds.pair_p["en-de"] / ds.pair_p["en-fr"]
    assert odds == pytest.approx(upsample * base.pair_p["en-de"] / base.pair_p["en-fr"])
    if alpha == 1.0:  # fairseq's own ratio: U n_real / (U n_real + n_synthetic)
        real = upsample * tokens["en-de"]
        assert ds.pair_p["en-de"] == pytest.approx(
            real / (real + tokens["en-fr"] + tokens["de-fr"])
        )
    rows = _rows(ds, 300)
    assert _binomial_ok(sum(r == "en-de" for r in rows), len(rows), want["en-de"])


def test_without_options_the_flag_changes_no_bit(marked: Path, plain: Path) -> None:
    for kw in (
        {},
        {"synthetic_ratio": None, "parallel_upsample": None},
        {"parallel_upsample": 1.0},
        # a ratio is not applied to a loader that draws no pair rows (validation loaders)
        {"synthetic_ratio": 0.5, "objective": "clm"},
    ):
        mixed = dict(objective=kw.pop("objective", "mlm"), masking=MaskingConfig(tlm_share=0.5))
        got = iter(_ds(marked, **mixed, **kw))
        want = iter(_ds(plain, **mixed))
        for _ in range(12):
            a, b = next(got), next(want)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), kw


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_with_a_ratio(marked: Path, workers: int) -> None:
    kw = dict(synthetic_ratio=0.4, masking=MaskingConfig(tlm_share=0.5), num_workers=workers)
    for rank in (0, 1):
        ds = _ds(marked, dp_rank=rank, dp_world_size=2, **kw)
        it = iter(ds) if workers == 0 else None
        if it is None:
            from data_pipeline.loader import StreamingLoader

            loader = StreamingLoader(ds)
            it = iter(loader)
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(ds.state_dict()))
        reference = [next(it) for _ in range(6)]
        counters = ds.counters
        again = _ds(marked, dp_rank=rank, dp_world_size=2, **kw)
        again.load_state_dict(state)
        if workers == 0:
            it2 = iter(again)
        else:
            from data_pipeline.loader import StreamingLoader

            it2 = iter(StreamingLoader(again))
        for want in reference:
            got = next(it2)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert again.counters == counters


def test_pair_token_counters_are_the_pair_rows_tokens(marked: Path) -> None:
    ds = _ds(marked, synthetic_ratio=0.5)
    it = iter(ds)
    want = dict.fromkeys(PAIRS, 0)
    for _ in range(30):
        batch = next(it)
        for name, valid_T in zip(_row_pairs(batch), batch["attention_mask"]):
            want[name] += int(valid_T.sum())
    assert ds.counters["pair_tokens"] == {k: want[k] for k in sorted(PAIRS)}
    assert sum(want.values()) == sum(ds.counters["tokens"].values())


def test_seq2seq_translation_rows_count_pair_tokens(marked: Path) -> None:
    from data_pipeline.transforms import Seq2SeqConfig

    # <lang:xx> ids for the decoder start (special ids of synthetic shards)
    vocab = dataclasses.replace(VOCAB, lang_token_ids={"de": 5, "en": 6, "fr": 7})
    masking = MaskingConfig(tlm_share=1.0, seq2seq=Seq2SeqConfig())
    ds = _ds(marked, objective="seq2seq", masking=masking, vocab=vocab, synthetic_ratio=0.5)
    it = iter(ds)
    seen = 0
    for _ in range(10):
        batch = next(it)
        seen += int(batch["tokens_per_lang"].sum())
    counted = ds.counters["pair_tokens"]
    assert sum(counted.values()) == seen
    assert sum(counted[k] for k in SYNTHETIC) > 0 and counted["en-de"] > 0


def test_merged_real_and_synthetic_sets_of_one_name_stay_apart(tmp_path: Path) -> None:
    real, fake = tmp_path / "real", tmp_path / "bt"
    write_synthetic_shards(real, docs={}, pairs={"en-de": 200}, sample_tokens=150, seed=1)
    write_synthetic_shards(fake, docs={}, pairs={"en-de": 300}, sample_tokens=150, seed=2)
    file = fake / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["pairs"]["en-de"]["synthetic"] = True
    for entry in manifest["shards"]:
        entry["synthetic"] = True  # the back-translation job flags every shard entry too
    file.write_text(json.dumps(manifest))
    for order in ([fake, real], [real, fake]):
        out = tmp_path / f"merged_{order[0].name}"
        merge_manifests(order, out=out)
        ds = _ds(out, synthetic_ratio=0.25)
        name = "en-de" + SYNTHETIC_SUFFIX
        assert list(ds.sources) == ["en-de", name] and ds.synthetic_pairs == [name]
        assert ds.pair_langs[name] == ("en", "de")
        assert ds.pair_p == {"en-de": 0.75, name: 0.25}
        # each source holds its own directory's shards
        assert len(ds.sources["en-de"].paths) == len(_shards(real))
        assert len(ds.sources[name].paths) == len(_shards(fake))
        rows = _rows_of(_ds(out, synthetic_ratio=0.25, batch_size=1), 400)
        assert _binomial_ok(rows.count(name), len(rows), 0.25)


def _shards(root: Path) -> list:
    return json.loads((root / "manifest.json").read_text())["shards"]


def _rows_of(ds: StreamingDataset, num_batches: int) -> list[str]:
    """The pair source of each one-row TLM batch, read off the loader's per-pair counter."""
    assert ds.batch_size == 1
    it, out = iter(ds), []
    for _ in range(num_batches):
        before = dict(ds.counters["pair_tokens"])
        next(it)
        (grown,) = [k for k, n in ds.counters["pair_tokens"].items() if n > before[k]]
        out.append(grown)
    return out


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"synthetic_ratio": 1.0}, r"^data.synthetic_ratio \(1.0\) must be in \[0, 1\) or null$"),
        ({"synthetic_ratio": -0.1}, r"^data.synthetic_ratio \(-0.1\) must be in \[0, 1\)"),
        ({"synthetic_ratio": float("nan")}, r"^data.synthetic_ratio \(nan\) must be in"),
        (
            {"parallel_upsample": 0.5},
            r"^data.parallel_upsample \(0.5\) must be a finite number >= 1 or null$",
        ),
        ({"parallel_upsample": float("inf")}, r"^data.parallel_upsample \(inf\) must be"),
        (
            {"synthetic_ratio": 0.2, "parallel_upsample": 2.0},
            r"^data.synthetic_ratio \(0.2\) and data.parallel_upsample \(2.0\) must not both "
            r"be set",
        ),
    ],
)
def test_option_rules_are_one_line_errors(marked: Path, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        validate_data(DataConfig(**kw))
    _one_line(err)
    with pytest.raises(ValueError, match=message) as err:
        _ds(marked, **kw)
    _one_line(err)


def test_a_ratio_needs_synthetic_and_real_pair_sets(plain: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"^data.synthetic_ratio \(0.3\) needs a synthetic pair set; manifest .* has none",
    ) as err:
        _ds(plain, synthetic_ratio=0.3)
    _one_line(err)
    _ds(plain, synthetic_ratio=0.0)  # 0: every pair row real, fine without synthetic sets
    only = tmp_path / "only"
    write_synthetic_shards(only, docs={}, pairs={"en-de": 50}, sample_tokens=150)
    _mark(only, ("en-de",))
    with pytest.raises(ValueError, match=r"leaves 0.7 of pair rows to real pair sets") as err:
        _ds(only, synthetic_ratio=0.3)
    _one_line(err)


def test_pair_weights_must_cover_both_pools(marked: Path) -> None:
    with pytest.raises(
        ValueError, match=r"^data.pair_weights \(\{'en-de': 1.0\}\) must give the synthetic pair"
    ) as err:
        _ds(marked, synthetic_ratio=0.3, pair_weights={"en-de": 1.0})
    _one_line(err)


def test_pair_weights_apply_within_each_pool(marked: Path) -> None:
    weights = {"en-de": 1.0, "en-fr": 1.0, "de-fr": 3.0}
    ds = _ds(marked, synthetic_ratio=0.4, pair_weights=weights)
    assert ds.pair_p == pytest.approx({"de-fr": 0.3, "en-de": 0.6, "en-fr": 0.1})


def test_build_loader_passes_both_fields(marked: Path) -> None:
    cfg = DataConfig(manifest=str(marked), seq_len=48, batch_size=4, synthetic_ratio=0.3)
    loader = build_loader(
        cfg, dp_rank=0, dp_world_size=1, objective="mlm", masking=TLM, vocab=VOCAB
    )
    assert loader.dataset.synthetic_ratio == 0.3
    cfg = DataConfig(manifest=str(marked), seq_len=48, batch_size=4, parallel_upsample=2.0)
    loader = build_loader(
        cfg, dp_rank=0, dp_world_size=1, objective="mlm", masking=TLM, vocab=VOCAB
    )
    assert loader.dataset.parallel_upsample == 2.0
    assert DataConfig().synthetic_ratio is None and DataConfig().parallel_upsample is None


def test_mix_json_reports_real_and_synthetic_pair_sets(
    marked: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [str(marked), "--alpha", "0.5", "--tokens", "40000", "--seq-len", "48"]
    assert mix_main([*args, "--synthetic-ratio", "0.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["languages", "pairs"]
    assert list(out["languages"][0]) == ["lang", "tokens", "q", "p", "realised"]
    rows = {r["pair"]: r for r in out["pairs"]}
    assert list(rows) == sorted(PAIRS)
    assert list(rows["en-de"]) == ["pair", "synthetic", "tokens", "q", "p", "realised"]
    manifest = json.loads((marked / "manifest.json").read_text())
    n = {k: v["tokens"] for k, v in manifest["pairs"].items()}
    within = _smoothed({k: n[k] for k in SYNTHETIC}, 0.5)
    for name, r in rows.items():
        assert r["synthetic"] == (name in SYNTHETIC)
        assert r["tokens"] == n[name]
        assert r["q"] == pytest.approx(n[name] / sum(n.values()))
        assert r["p"] == pytest.approx(0.3 * within[name] if name in SYNTHETIC else 0.7)
    # token shares follow the row shares roughly (rows of different sets fill alike)
    synthetic_share = sum(r["realised"] for r in rows.values() if r["synthetic"])
    assert abs(synthetic_share - 0.3) < 0.05
    assert sum(r["realised"] for r in rows.values()) == pytest.approx(1.0)
    assert mix_main([*args, "--parallel-upsample", "4", "--json"]) == 0
    up = {r["pair"]: r for r in json.loads(capsys.readouterr().out)["pairs"]}
    assert up["en-de"]["p"] > up["en-de"]["q"]
    assert mix_main([*args, "--synthetic-ratio", "0.3", "--parallel-upsample", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert mix_main([*args, "--synthetic-ratio", "0.3"]) == 0  # the table
    table = capsys.readouterr().out
    assert "synthetic" in table and "en-fr" in table


def test_mix_of_a_directory_without_synthetic_sets_refuses_a_ratio(
    plain: Path, capsys: pytest.CaptureFixture
) -> None:
    assert mix_main([str(plain), "--alpha", "0.5", "--tokens", "2000", "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    assert not any(r["synthetic"] for r in pairs)
    assert mix_main([str(plain), "--alpha", "0.5", "--synthetic-ratio", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a synthetic pair set" in err[0]


def test_metrics_line_reports_real_and_synthetic_pair_tokens() -> None:
    window = types.SimpleNamespace(dims=None)  # no layout: the reduction is the identity
    got = MetricsWindow._pair_metrics(window, {"de-fr": 5, "en-de": 7, "en-fr": 11}, SYNTHETIC)
    assert got == {
        "pair_tokens": {"de-fr": 5, "en-de": 7, "en-fr": 11},
        "real_pair_tokens": 7,
        "synthetic_pair_tokens": 16,
    }
