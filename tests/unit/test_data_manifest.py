"""``merge_manifests`` keeps real and synthetic (back-translated) pair sets of one name apart,
with their own counts and provenance, as the loader samples them; it refuses what one entry cannot
hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import loader
from data_pipeline.manifest import SYNTHETIC_SUFFIX, merge_manifests, summary_lines
from data_pipeline.synthetic import synthetic_vocab, write_synthetic_shards
from data_pipeline.transforms import MaskingConfig
from data_pipeline.verify import verify_directory

PROVENANCE = {"backend": "reverse", "seed": 0, "input": {"files": ["de.txt"]}}


def _write(root: Path, pairs: dict[str, int], *, seed: int, synthetic: dict | None = None) -> Path:
    """Pair shards of random ids; ``synthetic``: the provenance of a back-translation job's
    output (every set and shard entry marked as that job marks them), None: real pairs."""
    write_synthetic_shards(root, docs={}, pairs=pairs, sample_tokens=150, seed=seed)
    if synthetic is not None:
        file = root / "manifest.json"
        manifest = json.loads(file.read_text())
        for stats in manifest["pairs"].values():
            stats.update(synthetic=True, provenance=synthetic)
        for entry in manifest["shards"]:
            entry["synthetic"] = True
        file.write_text(json.dumps(manifest))
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _count_problems(root: Path) -> list[str]:
    """verify's findings but the tokenizer (random-id shards come without one)."""
    problems, _ = verify_directory(root)
    return [p for p in problems if not p.startswith("tokenizer ")]


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    return {
        "real": _write(tmp_path / "real", {"en-de": 120, "en-fr": 40}, seed=1),
        "bt": _write(tmp_path / "bt", {"en-de": 200}, seed=2, synthetic=PROVENANCE),
    }


def test_real_and_synthetic_sets_of_one_name_stay_two_entries(parts, tmp_path) -> None:
    real, fake = _manifest(parts["real"]), _manifest(parts["bt"])
    name = "en-de" + SYNTHETIC_SUFFIX
    merged = {}
    for order in (["real", "bt"], ["bt", "real"]):
        out = tmp_path / f"merged_{order[0]}"
        merged[order[0]] = merge_manifests([parts[k] for k in order], out=out)
        pairs = merged[order[0]]["pairs"]
        assert sorted(pairs) == ["en-de", name, "en-fr"]
        # the real entry holds the real part's counts, unmarked; the synthetic one its own
        assert pairs["en-de"] == real["pairs"]["en-de"] and "synthetic" not in pairs["en-de"]
        assert pairs[name] == fake["pairs"]["en-de"]
        assert pairs[name]["provenance"] == PROVENANCE and pairs[name]["synthetic"] is True
        shards = merged[order[0]]["shards"]
        assert sorted(e["pair"] for e in shards) == sorted(
            [e["pair"] for e in real["shards"]] + [name] * len(fake["shards"])
        )
        assert all(e.get("synthetic", False) == (e["pair"] == name) for e in shards)
        assert _count_problems(out) == []  # each entry's counts are the sum over its shards
        ds = loader.StreamingDataset(
            out, dp_rank=0, dp_world_size=1, seq_len=48, batch_size=4, seed=0, objective="mlm",
            vocab=synthetic_vocab(512), masking=MaskingConfig(tlm_share=1.0), synthetic_ratio=0.5,
        )  # fmt: skip
        assert list(ds.sources) == ["en-de", name, "en-fr"] and ds.synthetic_pairs == [name]
        assert ds.pair_langs[name] == ("en", "de")
        assert ds.sources[name].tokens == fake["pairs"]["en-de"]["tokens"]
        assert ds.pair_p[name] == 0.5
    assert merged["real"]["pairs"] == merged["bt"]["pairs"]
    table = "\n".join(summary_lines(merged["real"]))
    assert f"\n{name}  " in table and "\nen-de  " in table


def test_synthetic_sets_without_a_real_namesake_keep_their_name(parts, tmp_path) -> None:
    more = _write(tmp_path / "bt2", {"en-de": 50}, seed=3, synthetic=PROVENANCE)
    merged = merge_manifests([parts["bt"], more], out=tmp_path / "out")
    assert list(merged["pairs"]) == ["en-de"] and merged["pairs"]["en-de"]["synthetic"] is True
    assert merged["pairs"]["en-de"]["documents"] == 250
    assert {e["pair"] for e in merged["shards"]} == {"en-de"}
    # merged again with real en-de, then with more synthetic en-de: still apart, counts summed
    again = merge_manifests([tmp_path / "out", parts["real"]], out=tmp_path / "again")
    assert again["pairs"]["en-de"]["documents"] == 120
    assert again["pairs"]["en-de" + SYNTHETIC_SUFFIX]["documents"] == 250
    more3 = _write(tmp_path / "bt3", {"en-de": 30}, seed=4, synthetic=PROVENANCE)
    third = merge_manifests([tmp_path / "again", more3], out=tmp_path / "third")
    assert sorted(third["pairs"]) == ["en-de", "en-de" + SYNTHETIC_SUFFIX, "en-fr"]
    assert third["pairs"]["en-de" + SYNTHETIC_SUFFIX]["documents"] == 280
    assert _count_problems(tmp_path / "third") == []


def test_what_one_entry_cannot_hold_is_refused(parts, tmp_path) -> None:
    other = _write(tmp_path / "bt_hf", {"en-de": 20}, seed=5, synthetic={"backend": "hf"})
    with pytest.raises(ValueError) as err:
        merge_manifests([parts["bt"], other], out=tmp_path / "no")
    assert str(err.value) == (
        f"merge: synthetic pair set 'en-de' of {str(other)!r} has a provenance other than that "
        "of the set of its name merged before it, and one entry keeps one provenance: merge "
        "each back-translation job's output apart"
    )
    # a merge made before real and synthetic sets were kept apart: one entry, both kinds
    old = tmp_path / "old"
    old.mkdir()
    manifest = merge_manifests([parts["real"], parts["bt"]], out=old)
    for entry in manifest["shards"]:
        if entry.get("synthetic"):  # flagged, as the back-translation job flags them
            entry["pair"] = "en-de"
    manifest["pairs"].pop("en-de" + SYNTHETIC_SUFFIX)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        merge_manifests([old], out=tmp_path / "no")
    assert str(err.value) == (
        f"merge: pair set 'en-de' of {str(old)!r} holds real and synthetic shards in one entry "
        "(merged before they were kept apart): merge its parts again"
    )
    assert not (tmp_path / "no").exists()  # a refused merge writes nothing
