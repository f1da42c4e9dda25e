"""Back-translation: filters and counts against a rule written here, shares of ranks and array
tasks against one process, resume after a crash, bad translators, ``--tag``, shard inputs, the
apertium backend against the apertium program, the ``hf:`` backend against transformers'
``generate`` on a seeded tiny Marian model, and ``launch.preprocess backtranslate``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from data_pipeline import backtranslate as bt
from data_pipeline.cli import main
from data_pipeline.loader import StreamingDataset
from data_pipeline.shard import ShardSettings, run_shard_job
from data_pipeline.shard_format import iter_pairs_of_sample, iter_shard_samples
from data_pipeline.text_inputs import MonoInput
from data_pipeline.tokenizer import TAG_PIECE, load_tokenizer, sha256_file, train_tokenizer
from data_pipeline.transforms import MaskingConfig, Vocab
from data_pipeline.verify import verify_directory
from tests.sample_data import SAMPLE, first_lines

APERTIUM = shutil.which("apertium")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An en/es tokenizer and 60 Spanish lines (plus an empty and a non-UTF-8 line)."""
    root = tmp_path_factory.mktemp("bt")
    mono = []
    for lang in ("en", "es"):
        path = root / f"{lang}.txt"
        path.write_text("\n".join(first_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", 150)))
        mono.append(MonoInput(lang, (path,)))
    train_tokenizer(mono, vocab_size=600, out=root / "tok", num_sentinels=0, num_threads=1)
    lines = first_lines(SAMPLE / "mono" / "es.train.txt.zst", 60)
    raw = "\n".join(lines[:10]).encode() + b"\n\n\xff\xfe bad\n" + "\n".join(lines[10:]).encode()
    (root / "es_mono.txt").write_bytes(raw + b"\n")
    return {"root": root, "tok": root / "tok", "es": root / "es_mono.txt", "lines": lines}


class Scripted:
    """A test translator: text i of the input file gets a translation chosen by i % 5."""

    concurrent = True

    def __init__(self, lines: list[str], *, fail_after: int | None = None) -> None:
        self.index = {line: i for i, line in enumerate(lines)}
        self.name = "scripted"
        self.settings = {"rule": "i % 5"}
        self.calls = 0
        self.fail_after = fail_after

    @staticmethod
    def rule(i: int, text: str) -> str:
        return ["", text, text + " " + text, text[: len(text) // 4], " ".join(["w"] * 400)][i % 5]

    def translate(self, texts: list[str], *, seed: int = 0) -> list[str]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("backend lost its GPU\nsecond line")
        return [self.rule(self.index[t], t) for t in texts]


def _settings(**kw) -> bt.BTSettings:
    return bt.BTSettings(**{"shard_docs": 12, "batch_tokens": 300, "sample_tokens": 200, **kw})


def _run(corpus, out: Path, translator, **kw) -> dict | None:
    settings = kw.pop("settings", _settings())
    return bt.run_backtranslate(
        [bt.BTInput("es", paths=(corpus["es"],))],
        translator=translator,
        tokenizer=corpus["tok"],
        to="en",
        out=out,
        settings=settings,
        log=lambda line: None,
        **kw,
    )


def _pairs(out: Path) -> list[tuple[list[int], list[int]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    found = []
    for entry in manifest["shards"]:
        for sample in iter_shard_samples(out / entry["path"]):
            assert sample["synthetic"] is True and (sample["src"], sample["tgt"]) == ("en", "es")
            found += [(s.tolist(), t.tolist()) for s, t in iter_pairs_of_sample(sample)]
    return found


def _tree(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".backtranslate" not in p.parts
    }


def test_decode_specs_map_to_generate_arguments():
    assert bt.parse_decode("greedy").generate_kwargs() == {"do_sample": False, "num_beams": 1}
    assert bt.parse_decode("beam:5").generate_kwargs() == {"do_sample": False, "num_beams": 5}
    assert bt.parse_decode("sample").generate_kwargs() == {
        "do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
    }  # fmt: skip
    got = bt.parse_decode("sample:top_k=10,temperature=0.7").as_dict()
    assert got == {"mode": "sample", "top_k": 10, "top_p": 1.0, "temperature": 0.7}
    for bad, message in [
        ("beam:0", r"beam:N needs a beam size N >= 1"),
        ("sample:top_q=1", r"'top_q=1' must be top_k=K, top_p=P or temperature=T"),
        ("sample:top_p=2", r"top_p in \(0, 1\]"),
        ("nucleus", r"must be greedy, beam:N or sample"),
    ]:
        with pytest.raises(ValueError, match=message):
            bt.parse_decode(bad)


def test_filters_and_counts_follow_fairseqs_rule(corpus, tmp_path):
    lines = corpus["lines"]
    manifest = _run(corpus, tmp_path / "out", Scripted(lines), settings=_settings(keep_text=True))
    tok = load_tokenizer(corpus["tok"])
    # the rule, written out again: empty; a side over 0 * n + 250 tokens; ratio over 1.5
    want_pairs, want = [], {"empty_translation": 0, "over_max_len": 0, "length_ratio": 0}
    for i, text in enumerate(lines):
        trans = Scripted.rule(i, text)
        n, m = len(tok.encode([text])[0]), len(tok.encode([trans])[0]) if trans else 0
        if m == 0:
            want["empty_translation"] += 1
        elif n > 250 or m > 250:
            want["over_max_len"] += 1
        elif max(n, m) / min(n, m) > 1.5:
            want["length_ratio"] += 1
        else:
            want_pairs.append((tok.encode([trans])[0], tok.encode([text])[0], text, trans))
    stats = manifest["pairs"]["en-es"]
    assert all(want.values()) and want_pairs  # every reason is exercised
    assert {k: stats["rejected"][k] for k in want} == want
    assert stats["rejected"]["empty"] == 1 and stats["rejected"]["invalid_utf8"] == 1
    assert stats["documents"] + sum(stats["rejected"].values()) == len(lines) + 2
    assert stats["synthetic"] is True and stats["src"] == "en" and stats["tgt"] == "es"
    prov = stats["provenance"]
    assert prov["backend"] == "scripted" and prov["backend_settings"] == {"rule": "i % 5"}
    assert prov["decode"] == {"mode": "greedy"} and prov["input"] == {"files": ["es_mono.txt"]}
    # source = the translation, target = the original, in input order
    assert _pairs(tmp_path / "out") == [(s, t) for s, t, _, _ in want_pairs]
    tsv = (tmp_path / "out" / "text" / "en-es.tsv").read_text().splitlines()
    assert tsv == [f"{text}\t{trans}" for _, _, text, trans in want_pairs]
    assert verify_directory(tmp_path / "out")[0] == []


def test_output_does_not_depend_on_ranks_tasks_or_threads(corpus, tmp_path):
    lines = corpus["lines"]
    _run(corpus, tmp_path / "one", Scripted(lines))
    reference = _tree(tmp_path / "one")
    assert len([k for k in reference if k.endswith(".tar")]) == 5
    # two ranks (rank 1 first, then rank 0 finalizes), as torchrun runs them after a barrier
    _run(corpus, tmp_path / "ranks", Scripted(lines), rank=1, world_size=2, finalize=False)
    _run(corpus, tmp_path / "ranks", Scripted(lines), rank=0, world_size=2)
    assert _tree(tmp_path / "ranks") == reference
    # three array tasks of two ranks each, then the finalize step alone
    for task in range(3):
        for rank in range(2):
            _run(corpus, tmp_path / "tasks", Scripted(lines), part=(task, 3), rank=rank,
                 world_size=2, finalize=False)  # fmt: skip
    _run(corpus, tmp_path / "tasks", Scripted(lines), translate=False)
    assert _tree(tmp_path / "tasks") == reference
    _run(corpus, tmp_path / "threads", Scripted(lines), workers=3)
    assert _tree(tmp_path / "threads") == reference


def test_finalize_names_the_chunks_still_missing(corpus, tmp_path):
    _run(corpus, tmp_path / "out", Scripted(corpus["lines"]), part=(0, 2), finalize=False)
    with pytest.raises(
        ValueError,
        match=r"2 chunk\(s\) not translated yet \(pair_en-es_00001, pair_en-es_00003\); run the ",
    ):
        _run(corpus, tmp_path / "out", Scripted(corpus["lines"]), translate=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_crash_leaves_finished_chunks_and_a_rerun_completes_them(corpus, tmp_path):
    lines = corpus["lines"]
    whole = Scripted(lines)
    _run(corpus, tmp_path / "ref", whole)
    out = tmp_path / "out"
    # batches of 300 padded tokens: a 12-document chunk takes several calls
    with pytest.raises(ValueError) as info:
        _run(corpus, out, Scripted(lines, fail_after=7))
    assert str(info.value).startswith("translator scripted failed in pair_en-es_0000")
    assert str(info.value).endswith("RuntimeError: backend lost its GPU")
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("pair_*.tar")}
    assert 0 < len(finished) < 5
    again = Scripted(lines)
    _run(corpus, out, again)
    assert _tree(out) == _tree(tmp_path / "ref")
    assert {p: (out / p).stat().st_mtime_ns for p in finished} == finished  # kept, not redone
    assert 0 < again.calls < whole.calls  # only the unfinished chunks were translated again


class Miscount:
    name, settings, concurrent = "miscount", {}, False

    def translate(self, texts, *, seed=0):
        return texts[:-1]


def test_a_translator_returning_fewer_texts_is_refused(corpus, tmp_path):
    with pytest.raises(
        ValueError, match=r"^translator miscount returned \d+ translations for \d+ texts in "
        r"pair_en-es_00000: it must return one per text$",
    ):  # fmt: skip
        _run(corpus, tmp_path / "out", Miscount())
    assert (
        not list((tmp_path / "out").glob("pair_*"))
        and not (tmp_path / "out/manifest.json").exists()
    )


def test_registry_and_input_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(known: apertium, hf, reverse"):
        bt.make_translator("nope:x")
    with pytest.raises(ValueError, match=r"must be BACKEND:ARG"):
        bt.make_translator("apertium")
    bt.register_backend("scripted", lambda arg, options: Scripted([arg]))
    try:
        assert bt.make_translator("scripted:hola").translate(["hola"]) == [""]
    finally:
        bt._BACKENDS.pop("scripted")
    inputs = [bt.BTInput("es", paths=(corpus["es"],))]
    kw = dict(translator=Miscount(), tokenizer=corpus["tok"], out=tmp_path / "x")
    with pytest.raises(ValueError, match=r"--to 'fr' is not one of the tokenizer's languages"):
        bt.run_backtranslate(inputs, to="fr", **kw)
    with pytest.raises(ValueError, match=r"--to es: the inputs must be text of other languages"):
        bt.run_backtranslate(inputs, to="es", **kw)
    run_shard_job([MonoInput("es", (corpus["es"],))], tokenizer=corpus["tok"],
                  out=tmp_path / "mono", workers=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds shards of other data \(monolingual or real"):
        bt.run_backtranslate(inputs, to="en", **{**kw, "out": tmp_path / "mono"})
    assert list((tmp_path / "mono").glob("mono_es_*.tar"))
    with pytest.raises(ValueError, match=r"--shard-docs \(0\) must be >= 1"):
        _run(corpus, tmp_path / "x", Miscount(), settings=_settings(shard_docs=0))
    with pytest.raises(ValueError, match=r"--translator 'reverse:fast': 'fast' must be sleep=S"):
        bt.make_translator("reverse:fast")


def _older_tokenizer(tok: Path, out: Path) -> Path:
    """``tok`` as a directory made before ``<bt>`` was reserved: the piece gone from the model
    (the ids after it one lower, as they were) and from the sidecar."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tok / "spm.model").read_bytes())
    [index] = [i for i, p in enumerate(proto.pieces) if p.piece == TAG_PIECE]
    del proto.pieces[index]
    proto.trainer_spec.vocab_size -= 1
    out.mkdir()
    (out / "spm.model").write_bytes(proto.SerializeToString())
    sidecar = json.loads((tok / "spm.json").read_text())
    for key in ("special_ids", "special_pieces"):
        del sidecar[key]["bt"]
    sidecar.update(vocab_size=len(proto.pieces), model_sha256=sha256_file(out / "spm.model"))
    (out / "spm.json").write_text(json.dumps(sidecar))
    return out


def test_tag_puts_the_reserved_token_before_every_source(corpus, tmp_path):
    # end to end through the command line, with the fixture's freshly trained tokenizer
    tok = load_tokenizer(corpus["tok"])
    tag = tok.special_ids["bt"]
    assert tok.sp.id_to_piece(tag) == TAG_PIECE and tok.sp.is_control(tag)
    assert tag == max(tok.sentinel_ids + list(tok.lang_ids.values())) + 1  # the last control
    common = ["backtranslate", "--translator=reverse:", f"--tokenizer={corpus['tok']}",
              f"--input=es={corpus['es']}", "--to=en", "--shard-docs=12"]  # fmt: skip
    assert main([*common, f"--out={tmp_path / 'plain'}"]) == 0
    assert main([*common, f"--out={tmp_path / 'tag'}", "--tag"]) == 0
    plain, tagged = _pairs(tmp_path / "plain"), _pairs(tmp_path / "tag")
    assert plain and all(tag not in s and tag not in t for s, t in plain)
    assert tagged == [([tag, *s], t) for s, t in plain]
    assert tok.decode(tagged[0][0]) == tok.decode(plain[0][0])  # decodes to ''
    prov = json.loads((tmp_path / "tag" / "manifest.json").read_text())["pairs"]["en-es"]
    assert prov["provenance"]["tag"] == tag
    # an older tokenizer directory, made before <bt> was reserved, is refused
    old = _older_tokenizer(corpus["tok"], tmp_path / "old")
    assert load_tokenizer(old).vocab_size == tok.vocab_size - 1
    with pytest.raises(ValueError, match=r"^--tag: tokenizer .* reserves no <bt> control token"):
        bt.run_backtranslate([bt.BTInput("es", paths=(corpus["es"],))], translator=Miscount(),
                             tokenizer=old, to="en", out=tmp_path / "x",
                             settings=_settings(tag=True))  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_tlm_rows_never_mask_the_tag(corpus, tmp_path):
    """The loader takes ``<bt>`` for a control symbol, as it takes ``<lang:xx>``: never selected
    for masking, never drawn as a random replacement."""
    out = tmp_path / "tag"
    _run(corpus, out, bt.make_translator("reverse:"), settings=_settings(tag=True))
    vocab = Vocab.from_tokenizer(str(corpus["tok"]))
    tag = load_tokenizer(corpus["tok"]).special_ids["bt"]
    assert tag in vocab.special_ids and vocab.special_mask_V()[tag]
    masking = MaskingConfig(mask_prob=1.0, replace_prob=0.5, random_prob=0.5, tlm_share=1.0)
    loader = dict(dp_rank=0, dp_world_size=1, seq_len=64, batch_size=4, seed=0, objective="mlm")
    ds = StreamingDataset(out, vocab=vocab, masking=masking, tlm_swap_prob=0.0, **loader)
    it = iter(ds)
    kept = replaced = 0
    for _ in range(5):
        batch = next(it)
        ids, labels = batch["input_ids"], batch["labels"]
        starts = (batch["position_ids"] == 0) & batch["attention_mask"]
        first = starts & (batch["lang_ids"] == ds.lang_index["en"])  # each pair's source start
        assert bool((ids[first] == tag).all()) and bool((labels[first] == -100).all())
        kept += int(first.sum())
        # every other token was selected (mask_prob 1): half masked, half a random normal id
        text = batch["attention_mask"] & ~first & (labels != -100)
        replaced += int(text.sum())
        assert not bool((ids[text] == tag).any())
    assert kept > 0 and replaced > 10 * kept


def test_a_shard_directory_is_read_back_to_text_with_its_own_tokenizer(corpus, tmp_path):
    settings = ShardSettings(sample_tokens=300)
    run_shard_job([MonoInput("es", (corpus["es"],))], tokenizer=corpus["tok"],
                  out=tmp_path / "mono", workers=1, settings=settings)  # fmt: skip
    [item] = bt.parse_inputs([f"es={tmp_path / 'mono'}"])
    assert item.shards == tmp_path / "mono"
    kw = dict(translator=Scripted(corpus["lines"]), tokenizer=corpus["tok"], to="en",
              settings=_settings(), log=lambda line: None)  # fmt: skip
    from_shards = bt.run_backtranslate([item], out=tmp_path / "a", **kw)
    bt.run_backtranslate([bt.BTInput("es", paths=(corpus["es"],))], out=tmp_path / "b", **kw)
    assert _pairs(tmp_path / "a") == _pairs(tmp_path / "b")
    stats = from_shards["pairs"]["en-es"]
    assert stats["documents"] + sum(stats["rejected"].values()) == len(corpus["lines"])
    assert len(stats["provenance"]["input"]["shards_manifest_sha256"]) == 64


# --- apertium -----------------------------------------------------------------------------------


def _apertium(lines: list[str], pair: str = "spa-eng") -> list[str]:
    """The reference: the apertium program on each line alone, as a person would run it."""
    return [
        subprocess.run([APERTIUM, "-u", pair], input=line + "\n", capture_output=True,
                       text=True, check=True).stdout.removesuffix("\n")
        for line in lines
    ]  # fmt: skip


@pytest.mark.skipif(APERTIUM is None, reason="apertium is not installed (make system-deps)")
def test_apertium_translates_real_text_as_the_program_does(corpus, tmp_path):
    translator = bt.make_translator("apertium:spa-eng")
    assert translator.settings["packages"].get("apertium-eng-spa")
    lines = corpus["lines"][:6]
    assert translator.translate(lines) == _apertium(lines)
    two = translator.translate([f"{lines[3]}\n{lines[4]}\n \n{lines[1]}", lines[2], ""])
    ref = _apertium([lines[3], lines[4], lines[1], lines[2]])
    assert two == [f"{ref[0]}\n{ref[1]}\n \n{ref[2]}", ref[3], ""]
    settings = _settings(keep_text=True, shard_docs=25)
    manifest = _run(corpus, tmp_path / "out", translator, settings=settings, workers=2)
    stats = manifest["pairs"]["en-es"]
    assert stats["documents"] > 45 and stats["provenance"]["backend"] == "apertium:spa-eng"
    rows = [r.split("\t") for r in (tmp_path / "out/text/en-es.tsv").read_text().splitlines()]
    assert len(rows) == stats["documents"]
    some = rows[3::9]  # a sample of the rows: the reference runs apertium once per line
    assert [t for _, t in some] == _apertium([o for o, _ in some])


def test_apertium_missing_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(bt.shutil, "which", lambda name: None)
    with pytest.raises(
        ValueError,
        match=r"^--translator 'apertium:spa-eng': the apertium program "
        r"is not installed \(Debian: apt-get install apertium apertium-eng-spa\)$",
    ):
        bt.make_translator("apertium:spa-eng")  # fmt: skip


@pytest.mark.skipif(APERTIUM is None, reason="apertium is not installed (make system-deps)")
def test_apertium_refuses_a_missing_pair_and_a_wrong_direction(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"pair 'spa-xxx' is not installed \(installed: .*eng-spa"):
        bt.make_translator("apertium:spa-eng".replace("eng", "xxx"))
    with pytest.raises(ValueError, match=r"rule-based and takes only greedy"):
        bt.make_translator(
            "apertium:spa-eng", bt.TranslatorOptions(decode=bt.parse_decode("beam:2"))
        )
    with pytest.raises(ValueError, match=r"--to en: apertium:eng-spa translates into es, not en"):
        bt.run_backtranslate([bt.BTInput("es", paths=(corpus["es"],))],
                             translator=bt.make_translator("apertium:eng-spa"),
                             tokenizer=corpus["tok"], to="en", out=tmp_path / "x")  # fmt: skip


# --- hf: a seeded tiny Marian model ------------------------------------------------------------


@pytest.fixture(scope="module")
def marian(corpus) -> Path:
    """A seeded tiny MarianMTModel (safetensors) with our tokenizer as its fast tokenizer."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    from checkpoints_tools.hf_tokenizer import save_tokenizer

    out = corpus["root"] / "marian"
    tok = load_tokenizer(corpus["tok"])
    save_tokenizer(tok, out, family="encoder")
    torch.manual_seed(0)
    ids = tok.special_ids
    config = MarianConfig(
        vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=512, init_std=0.5, pad_token_id=ids["pad"],
        eos_token_id=ids["eos"], bos_token_id=ids["bos"], decoder_start_token_id=ids["pad"],
    )  # fmt: skip
    MarianMTModel(config).eval().save_pretrained(out)
    return out


def _reference_generate(model_dir: Path, texts: list[str], **kwargs) -> list[str]:
    """transformers itself, one text at a time (no padding)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    out = []
    for text in texts:
        batch = tok([text], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**batch, pad_token_id=tok.pad_token_id, **kwargs)
        out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
    return out


def test_hf_greedy_batches_match_transformers_one_by_one(corpus, marian, tmp_path):
    options = bt.TranslatorOptions(max_len_b=12)
    translator = bt.make_translator(f"hf:{marian}", options)
    import hashlib

    digest = hashlib.sha256((marian / "model.safetensors").read_bytes()).hexdigest()
    assert translator.settings["weights_sha256"] == {"model.safetensors": digest}
    texts = corpus["lines"][:6]
    got = translator.translate(texts, seed=1)
    assert len(set(got)) > 1  # the outputs depend on the input
    assert got == _reference_generate(marian, texts, do_sample=False, max_new_tokens=12)
    assert translator.translate(texts, seed=2) == got  # greedy ignores the seed
    sampler = bt.make_translator(f"hf:{marian}", bt.TranslatorOptions(
        decode=bt.parse_decode("sample:top_k=20"), max_len_b=12))  # fmt: skip
    first = sampler.translate(texts, seed=5)
    assert sampler.translate(texts, seed=5) == first and sampler.translate(texts, seed=6) != first


def test_hf_causal_lm_continues_each_text_as_transformers_does(corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from checkpoints_tools.hf_tokenizer import save_tokenizer

    tok = load_tokenizer(corpus["tok"])
    save_tokenizer(tok, tmp_path / "llama", family="decoder")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    translator = bt.make_translator(f"hf:{tmp_path / 'llama'}", bt.TranslatorOptions(max_len_b=8))
    texts = corpus["lines"][:4]
    got = translator.translate(texts)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    want = []
    for text in texts:  # one at a time, no padding: only the continuation is the translation
        ids = hf_tok([text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
        want.append(hf_tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert got == [w.strip() for w in want] and len(set(got)) > 1


def test_hf_refuses_a_directory_without_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(pickled weights are not"):
        bt.make_translator(f"hf:{tmp_path / 'm'}")
    with pytest.raises(ValueError, match=r"hf:.*nowhere': no such directory"):
        bt.make_translator(f"hf:{tmp_path / 'nowhere'}")


# --- launch.preprocess --------------------------------------------------------------------------


def test_preprocess_runs_array_tasks_then_finalize(corpus, tmp_path, capsys):
    from launch.preprocess import main, make_backtranslate_plan

    data = ["--translator=reverse:", f"--tokenizer={corpus['tok']}", f"--input=es={corpus['es']}",
            "--to=en", "--shard-docs=12", "--quiet"]  # fmt: skip
    plan = make_backtranslate_plan(data_args=data, out="bt", num_tasks=3, python="/py")
    assert plan["tasks"][2]["argv"] == [
        "/py", "-m", "data_pipeline", "backtranslate", *data, "--out=bt", "--part=2/3",
    ]  # fmt: skip
    assert plan["merge"]["argv"][-1] == "--finalize"
    with pytest.raises(ValueError, match=r"--part is set by launch.preprocess: leave it out"):
        make_backtranslate_plan(data_args=["--part=0/2"], out="bt", num_tasks=2)
    out = tmp_path / "arr"
    assert main(["backtranslate", *data, f"--out={out}", "--array=2", "--local"]) == 0
    single = tmp_path / "single"
    _run(corpus, single, bt.make_translator("reverse:"), settings=bt.BTSettings(shard_docs=12))
    assert _tree(out) == _tree(single)
    script = (tmp_path / "arr.jobs" / "backtranslate.sbatch").read_text()
    assert "#SBATCH --array=0-1" in script
