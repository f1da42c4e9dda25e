"""checkpoints_tools: inspect, streaming export-hf (each family, verified logits), the tokenizer
conversion on every sample language, import-hf round trips, and bad input (exit 2, one line,
nothing left behind).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints_tools import convert  # noqa: E402 - after the importorskip
from checkpoints_tools.adapters import to_hf  # noqa: E402
from checkpoints_tools.adapters.tensor_map import export_items  # noqa: E402
from checkpoints_tools.cli import main  # noqa: E402
from checkpoints_tools.dcp_io import open_checkpoint  # noqa: E402
from checkpoints_tools.testing import (  # noqa: E402
    FAMILIES,
    IMPORTED,
    family_config,
    make_tokenizer,
    sample_languages,
    sample_lines,
    save_family_checkpoint,
    shards_for,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ckpt_tools")
    tok = make_tokenizer(root)
    ckpts, cfgs = {}, {}
    for family in FAMILIES:
        cfgs[family] = family_config(family, tokenizer=tok, run_dir=root / family)
        ckpts[family] = save_family_checkpoint(cfgs[family])
    return {"root": root, "tok": tok, "ckpts": ckpts, "cfgs": cfgs}


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_gives_exactly_to_hf(built, family: str):
    cfg = built["cfgs"][family].model
    state = open_checkpoint(built["ckpts"][family]).load_model_state()
    expected, _ = to_hf(state, cfg)
    planned = {i.name: i.combine(*[state[s] for s in i.sources]) for i in export_items(cfg)}
    tied = {"lm_head.weight", "lm_head.decoder.weight", "cls.predictions.decoder.weight"}
    tied = tied if cfg.tie_embeddings else set()
    assert set(planned) == set(expected) - tied
    for name, tensor in planned.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_each_family_verifies(built, family: str, tmp_path: Path):
    out = tmp_path / "hf"
    result = convert.export_hf(built["ckpts"][family], out=out, verify=True)
    assert result["max_abs_diff"] <= 1e-4
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    assert ("generation_config.json" in files) == (family not in ("encoder", "bert", "electra"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    assert _leftovers(tmp_path, "hf") == ["hf"]
    # ELECTRA: the generator in a directory of its own, verified too (max_abs_diff covers both)
    assert ("generator" in files) == (family == "electra")
    if family == "electra":
        assert result["generator_architecture"] == "ElectraForMaskedLM"
        generator = {p.name for p in (out / "generator").iterdir()}
        assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= generator
        config = json.loads((out / "generator" / "config.json").read_text())
        assert config["architectures"] == ["ElectraForMaskedLM"]
        assert (config["hidden_size"], config["embedding_size"]) == (8, 32)


def test_electra_export_does_not_import(built, tmp_path: Path, capsys):
    convert.export_hf(built["ckpts"]["electra"], out=tmp_path / "hf")
    code = main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model_type ('electra') must be one of" in err[0], err
    assert not (tmp_path / "back").exists()


def test_export_bf16_in_several_shards(built, tmp_path: Path):
    out = tmp_path / "hf"
    code = main(
        [
            "export-hf",
            str(built["ckpts"]["decoder"]),
            "--out",
            str(out),
            "--dtype",
            "bf16",
            "--verify",
            "--max-shard-gb",
            str(40_000 / 2**30),
        ]
    )
    assert code == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_tokenizer_encodes_every_language_as_sentencepiece(built, tmp_path: Path, model_type):
    from checkpoints_tools.hf_tokenizer import save_tokenizer
    from data_pipeline.tokenizer import load_tokenizer

    tok_dir = (
        built["tok"] if model_type == "unigram" else make_tokenizer(tmp_path, model_type="bpe")
    )
    ours = load_tokenizer(tok_dir)
    save_tokenizer(ours, tmp_path / "hf_tok", family="decoder")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_tok")
    tricky = [
        "",
        " lead",
        "  two  spaces ",
        "<mask> <lang:en> </s> literal",
        "12345",
        "\u2603 \U0001f600",
        "a\tb",
    ]
    for lang in sample_languages():
        lines = sample_lines(lang, count=60) + tricky
        for line, expected in zip(lines, ours.encode(lines)):
            # split_special_tokens=True: exactly sentencepiece, a typed "<mask>" spelled out
            got = theirs.encode(line, add_special_tokens=False, split_special_tokens=True)
            assert got == expected, (lang, line[:40])
            assert theirs.decode(got) == ours.decode(expected) == line
            if "<" not in line:  # the default differs only where a special token is typed
                assert theirs.encode(line, add_special_tokens=False) == expected, line[:40]
    assert theirs.convert_tokens_to_ids("<lang:en>") == ours.lang_ids["en"]
    assert theirs.pad_token_id == 0 and theirs.eos_token_id == 3


def test_encoder_decoder_tokenizer_ends_texts_in_eos_and_names_sentinels(built, tmp_path: Path):
    """The encoder-decoder export round-trips through ``AutoTokenizer``: every text ends in
    ``</s>`` (as T5's tokenizer, and as our seq2seq sources), sentinels and language tokens are
    special tokens with our ids, and decoding drops them again."""
    from checkpoints_tools.hf_tokenizer import save_tokenizer
    from data_pipeline.tokenizer import load_tokenizer

    ours = load_tokenizer(built["tok"])
    save_tokenizer(ours, tmp_path / "hf_tok", family="encoder_decoder")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_tok")
    eos = ours.special_ids["eos"]
    lines = sample_lines("en", count=20) + sample_lines("zh", count=20)
    batch = theirs(lines)["input_ids"]
    for line, got, expected in zip(lines, batch, ours.encode(lines)):
        assert got == [*expected, eos], line[:40]
        assert theirs.encode(line, add_special_tokens=False) == expected
        assert theirs.decode(got, skip_special_tokens=True) == line
    first, second = ours.encode(lines[:2])
    assert theirs(lines[0], lines[1])["input_ids"] == [*first, eos, *second, eos]
    sentinels = [f"<extra_id_{i}>" for i in range(len(ours.sentinel_ids))]
    assert len(sentinels) > 10
    assert theirs.convert_tokens_to_ids(sentinels) == ours.sentinel_ids
    assert set(sentinels) <= set(theirs.all_special_tokens)
    for lang, tag in ours.lang_ids.items():
        assert theirs.convert_tokens_to_ids(f"<lang:{lang}>") == tag
    # a span-corrupted input typed as text: the sentinels keep their ids
    hello, world = ours.encode(["Hello", "world"])
    typed = theirs("Hello <extra_id_0> world <extra_id_1>")["input_ids"]
    assert typed == [*hello, ours.sentinel_ids[0], *world, ours.sentinel_ids[1], eos]
    assert theirs.mask_token_id == ours.special_ids["mask"] and theirs.padding_side == "right"
    with pytest.raises(ValueError, match=r"family \('seq2seq'\) must be one of"):
        save_tokenizer(ours, tmp_path / "bad", family="seq2seq")
    assert not (tmp_path / "bad").exists()


def test_bert_tokenizer_frames_segment_pairs_as_training_did(built, tmp_path: Path):
    """An encoder with the pair head (NSP / SOP) exports a tokenizer whose pairs are the rows it
    trained on: ``<cls> A <sep> B <sep>`` with token types 0 then 1."""
    from checkpoints_tools.hf_tokenizer import save_tokenizer
    from data_pipeline.tokenizer import load_tokenizer

    ours = load_tokenizer(built["tok"])
    save_tokenizer(ours, tmp_path / "hf_tok", family="bert")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_tok")
    cls, sep = ours.special_ids["cls"], ours.special_ids["sep"]
    lines = sample_lines("en", count=2) + sample_lines("zh", count=2)
    first, second = ours.encode(lines[:2])
    pair = theirs(lines[0], lines[1])
    assert pair["input_ids"] == [cls, *first, sep, *second, sep]
    assert pair["token_type_ids"] == [0] * (len(first) + 2) + [1] * (len(second) + 1)
    assert theirs(lines[2])["input_ids"] == [cls, *ours.encode(lines[2:3])[0], sep]
    assert theirs.cls_token_id == cls and theirs.sep_token_id == sep


def test_typed_special_tokens_stay_special(built, tmp_path: Path):
    """As XLM-R's tokenizer: a typed "<mask>" is the mask id, with the text on either side
    encoded as sentencepiece encodes it alone (no stray "▁" beside the special token), so the
    fill-mask pipeline works on the exported encoder."""
    from data_pipeline.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    convert.export_hf(built["ckpts"]["encoder"], out=out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(built["tok"])
    mask = ours.special_ids["mask"]
    left, right = ours.encode(["Paris is the", "of France."])
    got = tokenizer.encode("Paris is the <mask> of France.", add_special_tokens=False)
    assert got == [*left, mask, *right]
    (lang,) = ours.encode(["bonjour"])
    got = tokenizer.encode("<lang:fr> bonjour", add_special_tokens=False)
    assert got == [ours.lang_ids["fr"], *lang]
    fill_mask = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
    predictions = fill_mask("Paris is the <mask> of France.", top_k=3)
    assert len(predictions) == 3 and all(0.0 <= p["score"] <= 1.0 for p in predictions)


def test_inspect_reads_metadata_only(built, capsys):
    assert main(["inspect", str(built["ckpts"]["moe"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 5 and info["family"] == "decoder-moe"
    assert info["hf_architecture"] == "MixtralForCausalLM"
    names = {t["name"]: t for t in info["tensors"]}
    assert names["layers.0.moe.experts.w1"]["shape"] == [4, 88, 32]
    assert info["has_optimizer"] is True
    assert main(["inspect", str(built["ckpts"]["switch"])]) == 0
    text = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM" in text and "step         5" in text


@pytest.mark.parametrize("family", ["decoder", "switch", "encoder"])
def test_import_round_trip_and_resume_state(built, family: str, tmp_path: Path):
    from pretrain.checkpoint import CheckpointManager, TrainState
    from pretrain.models import build_model
    from pretrain.optim import build_optimizer, build_scheduler

    hf_dir, back = tmp_path / "hf", tmp_path / "imported"
    convert.export_hf(built["ckpts"][family], out=hf_dir)
    assert main(["import-hf", str(hf_dir), "--out", str(back)]) == 0
    original = open_checkpoint(built["ckpts"][family]).load_model_state()
    imported = open_checkpoint(back)
    assert imported.step() == 0 and imported.has_optimizer()
    state = imported.load_model_state()
    assert set(state) == set(original)
    for key in state:
        assert torch.equal(state[key], original[key]), key
    # what the trainer does on train.resume=<CKPT>: model, optimizer and scheduler load
    cfg = imported.cfg
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, device_type="cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    train_state = TrainState(model, optimizer, scheduler)
    assert CheckpointManager(tmp_path / "run", keep=1).load(back, train_state) == {}
    assert torch.equal(
        model.state_dict()["tok_embeddings.weight"], original["tok_embeddings.weight"]
    )


@pytest.mark.parametrize("family", IMPORTED)
def test_import_plan_gives_exactly_from_hf(built, family: str, tmp_path: Path):
    from safetensors.torch import load_file

    from checkpoints_tools.adapters import adapter_for_hf, from_hf
    from checkpoints_tools.adapters.tensor_map import import_items

    hf_dir = tmp_path / "hf"
    convert.export_hf(built["ckpts"][family], out=hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    stored = {}
    for file in hf_dir.glob("*.safetensors"):
        stored.update(load_file(file))
    expected, cfg = from_hf(stored, hf_config)
    assert cfg == adapter_for_hf(hf_config).config_from_hf(hf_config)
    planned = {
        i.name: i.combine(*[stored[s] for s in i.sources]) for i in import_items(cfg, stored)
    }
    assert set(planned) == set(expected)
    for name, tensor in planned.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize(("family", "max_shard_size"), [("moe", None), ("switch", "20KB")])
def test_import_reads_transformers_per_expert_layout(
    built, family: str, max_shard_size: str | None, tmp_path: Path
):
    """transformers' save_pretrained (and the Hub) store one tensor per expert
    (Mixtral ``block_sparse_moe.experts.<e>.w1``, Qwen3-MoE ``mlp.experts.<e>.gate_proj``);
    import-hf stacks them into our grouped tensors, from one model.safetensors or shards."""
    from safetensors.torch import load_file

    hf_dir, saved, back = tmp_path / "hf", tmp_path / "saved", tmp_path / "imported"
    convert.export_hf(built["ckpts"][family], out=hf_dir)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(hf_dir)
    )
    exported = {}
    for file in hf_dir.glob("*.safetensors"):
        exported.update(load_file(file))
    model.load_state_dict(exported, strict=True)
    model.save_pretrained(saved, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    files = sorted(p.name for p in saved.glob("*.safetensors"))
    assert (files == ["model.safetensors"]) == (max_shard_size is None)
    stored = set()
    for file in files:
        stored |= set(load_file(saved / file))
    assert not any(name.endswith("gate_up_proj") for name in stored)  # really per expert
    convert.import_hf(saved, out=back)
    original = open_checkpoint(built["ckpts"][family]).load_model_state()
    state = open_checkpoint(back).load_model_state()
    assert set(state) == set(original)
    for key in state:
        assert torch.equal(state[key], original[key]), key


def _move_manifest(ckpt: Path, where: Path, *, tok: Path) -> None:
    """Point the checkpoint's data.manifest somewhere that does not exist (shards moved)."""
    text = (ckpt / "config.yaml").read_text()
    assert str(shards_for(tok)) in text
    (ckpt / "config.yaml").write_text(text.replace(str(shards_for(tok)), str(where)))


def _other_tokenizer(built) -> Path:
    """A tokenizer the runs did not use (1,000 pieces; made once per module)."""
    other = built["root"] / "tok_other"
    if not other.is_dir():
        from data_pipeline.text_inputs import MonoInput
        from data_pipeline.tokenizer import train_tokenizer

        text = built["root"] / "other.en.txt"
        text.write_text("\n".join(sample_lines("en", split="train", count=300)) + "\n")
        train_tokenizer(
            [MonoInput("en", (text,))], vocab_size=1000, out=other, seed=0, num_threads=1
        )
    return other


def test_export_uses_the_manifests_tokenizer_not_data_tokenizer(built, tmp_path: Path):
    """One tokenizer per run, the one data.manifest records: a data.tokenizer naming another
    (the trainer ignores it) does not ship with the model."""
    from data_pipeline.tokenizer import load_tokenizer

    other = _other_tokenizer(built)
    cfg = family_config(
        "encoder",
        tokenizer=built["tok"],
        run_dir=tmp_path / "run",
        extra=(f"data.tokenizer={other}",),
    )
    ckpt = save_family_checkpoint(cfg)
    convert.export_hf(ckpt, out=tmp_path / "hf")
    shipped = json.loads((tmp_path / "hf" / "rosetta_spm.json").read_text())
    assert shipped["model_sha256"] == load_tokenizer(built["tok"]).model_sha256
    manifest = json.loads((shards_for(built["tok"]) / "manifest.json").read_text())
    assert shipped["model_sha256"] == manifest["tokenizer"]["model_sha256"]


def test_export_refuses_a_tokenizer_the_run_did_not_use(built, tmp_path: Path, capsys):
    from data_pipeline.tokenizer import load_tokenizer

    other = _other_tokenizer(built)
    out = tmp_path / "hf"
    argv = ["export-hf", str(built["ckpts"]["encoder"]), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err
    ours, theirs = load_tokenizer(built["tok"]).model_sha256, load_tokenizer(other).model_sha256
    assert err.count("\n") == 1 and err.startswith("error: --tokenizer"), err
    assert f"model sha256 {theirs[:12]} != {ours[:12]}" in err and "one tokenizer per run" in err
    assert _leftovers(tmp_path, "hf") == []
    # the run's own tokenizer, named explicitly (here: the manifest's copy), is fine
    tok_copy = shards_for(built["tok"]) / "tokenizer"
    assert main([*argv, "--tokenizer", str(tok_copy)]) == 0


def test_export_when_the_manifest_moved(built, tmp_path: Path, capsys):
    """Manifest not reachable: --tokenizer is used with a warning line; without it, refused."""
    ckpt = tmp_path / "step_5"
    shutil.copytree(built["ckpts"]["decoder"], ckpt)
    _move_manifest(ckpt, tmp_path / "moved", tok=built["tok"])
    out = tmp_path / "hf"
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer not found" in err and "not reachable" in err, err
    assert _leftovers(tmp_path, "hf") == []
    assert main(["export-hf", str(ckpt), "--out", str(out), "--tokenizer", str(built["tok"])]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "unchecked" in err, err
    assert (out / "tokenizer.json").is_file()


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(built, tmp_path: Path, capsys):
    cfg = family_config(
        "decoder",
        tokenizer=built["tok"],
        run_dir=tmp_path / "run",
        extra=("model.vocab_size=2000",),
    )
    ckpt = save_family_checkpoint(cfg)
    _move_manifest(
        ckpt, tmp_path / "moved", tok=built["tok"]
    )  # so that only the vocabulary check can refuse
    out = tmp_path / "hf"
    assert main(["export-hf", str(ckpt), "--out", str(out), "--tokenizer", str(built["tok"])]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "has 2500 pieces but model.vocab_size is 2000" in err, err
    assert _leftovers(tmp_path, "hf") == []


def _bad_input_cases(built, tmp_path: Path) -> dict[str, list[str]]:
    dense = built["ckpts"]["decoder"]
    incomplete = tmp_path / "step_9"
    shutil.copytree(dense, incomplete)
    (incomplete / ".metadata").unlink()
    partial = tmp_path / ".step_9.partial"
    shutil.copytree(dense, partial)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(dense, no_tok)
    _move_manifest(no_tok, tmp_path / "gone", tok=built["tok"])
    moe_encoder = family_config(
        "encoder",
        tokenizer=built["tok"],
        run_dir=tmp_path / "moe_enc",
        extra=("model.moe.num_experts=4", "model.moe.top_k=2"),
    )
    moe_encoder_ckpt = save_family_checkpoint(moe_encoder)
    bert = tmp_path / "gpt2"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    exists = tmp_path / "exists"
    exists.mkdir()
    wrong_shape = tmp_path / "wrong_shape"
    convert.export_hf(dense, out=wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] += 8
    (wrong_shape / "config.json").write_text(json.dumps(config))
    return {
        "incomplete": ["export-hf", str(incomplete), "--out"],
        "partial": ["export-hf", str(partial), "--out"],
        "missing-tokenizer": ["export-hf", str(no_tok), "--out"],
        "moe-encoder": ["export-hf", str(moe_encoder_ckpt), "--out"],
        "other-family-import": ["import-hf", str(bert), "--out"],
        "import-wrong-shape": ["import-hf", str(wrong_shape), "--out"],
        "reshard-not-parallel": ["reshard", str(dense), "model.num_layers=3", "--out"],
        "output-exists": ["export-hf", str(dense), "--out", str(exists)],
    }


def test_bad_input_one_line_exit_2_nothing_left(built, tmp_path: Path, capsys):
    expected = {
        "incomplete": "incomplete",
        "partial": ".partial",
        "missing-tokenizer": "tokenizer not found",
        "moe-encoder": "model.moe.num_experts (4) must be 0",
        "other-family-import": "model_type ('gpt2')",
        "import-wrong-shape": "that config.json implies",
        "reshard-not-parallel": "parallel.<key>=<value>",
        "output-exists": "exists",
    }
    for name, argv in _bad_input_cases(built, tmp_path).items():
        out = tmp_path / f"out_{name}"
        if name != "output-exists":
            argv = [*argv, str(out)]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert expected[name] in err, (name, err)
        assert _leftovers(tmp_path, out.name) == [], name
    assert (tmp_path / "exists").is_dir()


def test_failed_verify_leaves_nothing(built, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(convert, "VERIFY_ATOL", -1.0)
    with pytest.raises(ValueError, match="--verify: logits"):
        convert.export_hf(built["ckpts"]["decoder"], out=tmp_path / "hf", verify=True)
    assert _leftovers(tmp_path, "hf") == []


def test_help_says_checkpoints_are_trusted(capsys):
    with pytest.raises(SystemExit):
        main(["export-hf", "--help"])
    assert "trusted run output" in capsys.readouterr().out


def test_export_of_a_capacity_moe_warns_once_and_verifies_dropless(built, tmp_path: Path):
    # Trained with an expert capacity small enough to drop on the verification batch; the
    # Mixtral target runs dropless: one warning line, and --verify compares our model routed
    # dropless (a capacity-routed model would differ beyond tolerance).
    from dataclasses import replace

    from pretrain.models import build_model

    cfg = family_config(
        "moe",
        tokenizer=built["tok"],
        run_dir=tmp_path / "run",
        extra=(
            "model.moe.dropless=false",
            "model.moe.capacity_factor=0.25",
            "model.moe.eval_capacity_factor=0.25",
        ),
    )
    ckpt = save_family_checkpoint(cfg)
    lines: list[str] = []
    result = convert.export_hf(ckpt, out=tmp_path / "hf", verify=True, log=lines.append)
    assert result["max_abs_diff"] <= 1e-4
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: MixtralForCausalLM does not express the training MoE")
    assert "model.moe.capacity_factor=0.25" in lines[0] and "dropless" in lines[0]
    # What an unlike comparison would have seen: the eval capacity drops on this batch.
    state = open_checkpoint(ckpt).load_model_state()
    tokens_BT = convert.fixed_batch(cfg.model, avoid=None)
    logits = {}
    for dropless in (True, False):
        model = build_model(replace(cfg.model, moe=replace(cfg.model.moe, dropless=dropless)))
        model.load_state_dict(state)
        with torch.no_grad():
            logits[dropless] = model.eval()(tokens_BT)
    assert float((logits[True] - logits[False]).abs().max()) > 1e-3


def test_dropless_moe_export_has_no_routing_warning(built):
    cfg = built["cfgs"]["moe"].model
    assert convert.moe_export_difference(cfg, architecture="MixtralForCausalLM") is None
