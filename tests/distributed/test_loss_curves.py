"""The tiny presets' short loss curves reproduce the stored ones in
``tests/distributed/curves/``: bit for bit on a machine with the recorded fingerprint, to rel
1e-5 elsewhere (see ``bench/loss_curves.py`` for the cases and when to re-record)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest

from bench.loss_curves import (
    CASES,
    CURVES,
    REL_TOLERANCE,
    build_shards,
    compare,
    fingerprint,
    load_stored,
    run_cases,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, Any]]:
    """``runs(world_size)``: every case of that world size, trained in one launch on first use
    (a failed launch is re-raised for each of its cases, not re-run)."""
    shards = build_shards(tmp_path_factory.mktemp("loss_curve_data"))
    done: dict[int, dict[str, Any] | BaseException] = {}

    def get(world_size: int) -> dict[str, Any]:
        if world_size not in done:
            names = [name for name, case in CASES.items() if case.world_size == world_size]
            workdir = tmp_path_factory.mktemp(f"loss_curves_{world_size}p")
            try:
                done[world_size] = run_cases(names, shards=shards, workdir=workdir)
            except Exception as error:  # noqa: BLE001 - re-raised for every case below
                done[world_size] = error
        result = done[world_size]
        if isinstance(result, BaseException):
            raise result
        return result

    return get


def test_every_case_has_a_stored_curve():
    assert sorted(path.stem for path in CURVES.glob("*.json")) == sorted(CASES)
    for name in CASES:
        stored = load_stored(name)
        assert len(stored["curve"]) >= 4, name
        assert all(row["loss_per_lang"] for row in stored["curve"]), name
        if name.startswith("encoder"):  # pair data reached the TLM objective
            assert all(set(row["loss_per_objective"]) == {"mlm", "tlm"} for row in stored["curve"])


@pytest.mark.parametrize("name", list(CASES))
def test_short_loss_curve_reproduces_the_stored_one(runs, name: str):
    got = runs(CASES[name].world_size)[name]
    want = load_stored(name)
    problems = compare(got, want)
    how = (
        "bit for bit"
        if got["fingerprint"] == want["fingerprint"]
        else f"to rel {REL_TOLERANCE}: fingerprint {got['fingerprint']} != recorded "
        f"{want['fingerprint']}"
    )
    assert not problems, (
        f"{name} does not reproduce tests/distributed/curves/{name}.json ({how}); re-record only "
        "for a deliberate numerics change (bench/loss_curves.py):\n" + "\n".join(problems)
    )


def test_compare_flags_one_ulp_exactly_and_tolerates_noise_across_machines():
    """The comparison itself: one ulp in one step's loss is a difference on the recorded
    machine; on another machine 1e-7 relative noise passes and 1e-4 does not; a case whose
    overrides changed since recording asks for a re-record."""
    want = load_stored("decoder-1p")
    assert compare(copy.deepcopy(want), want) == []

    def moved(to: Callable[[float], float], *, machine: dict[str, str]) -> dict[str, Any]:
        got = copy.deepcopy(want)
        got["fingerprint"] = machine
        got["curve"][2]["loss"] = to(float.fromhex(want["curve"][2]["loss"])).hex()
        return got

    problems = compare(moved(lambda x: math.nextafter(x, math.inf), machine=fingerprint()), want)
    if fingerprint() == want["fingerprint"]:
        assert len(problems) == 1 and "step 3 loss" in problems[0], problems
    other = {**want["fingerprint"], "cpu_capability": "another"}
    assert compare(moved(lambda x: x * (1 + 1e-7), machine=other), want) == []
    problems = compare(moved(lambda x: x * (1 + 1e-4), machine=other), want)
    assert len(problems) == 1 and f"rel {REL_TOLERANCE}" in problems[0], problems
    changed = copy.deepcopy(want)
    changed["overrides"] = [*want["overrides"], "optim.lr=0.1"]
    assert "re-record" in compare(changed, want)[0]
