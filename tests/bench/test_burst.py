"""bench/burst.py's arithmetic: how a burst is mixed, what each round reports, what counts as wrong."""

from __future__ import annotations

from bench.burst import BURSTS, check_round, mixed, ratios, summarize


def test_a_mix_interleaves_its_kinds_evenly_with_the_asked_counts():
    order = mixed(BURSTS["mixed 3:1"], 1024)
    assert order.count("refused") == 768 and order.count("no_op") == 256
    assert all(order[i:i + 4].count("no_op") == 1 for i in range(0, 1024, 4))  # one no-op in every four calls
    assert mixed(BURSTS["mixed 1:1"], 8) == ["refused", "no_op"] * 4
    assert mixed(BURSTS["refusals alone"], 1024) == ["refused"] * 768


def burst_of(refused: list[float], no_ops: list[float], code: str = "RESOURCE_EXHAUSTED") -> dict:
    calls = [("refused", code, s) for s in refused] + [("no_op", "OK", s) for s in no_ops]
    return summarize([("OK", 1.0, 32)] * 4, calls, fill_tokens=32)


def test_each_mix_is_its_first_kind_over_its_no_ops_and_alone_is_one_burst_over_the_other():
    round_ = {"mixed 3:1": burst_of([0.2] * 100, [0.1] * 100), "mixed 1:1": burst_of([0.3] * 100, [0.3] * 100),
              "control 3:1": summarize([], [("health", "OK", 0.4)] * 10 + [("no_op", "OK", 0.2)] * 10, 32),
              "refusals alone": burst_of([0.5] * 100, []), "no-ops alone": burst_of([], [0.4] * 100)}
    assert ratios(round_) == {"mixed 3:1": 2.0, "control 3:1": 2.0, "mixed 1:1": 1.0, "alone": 1.25}


def test_a_round_is_wrong_when_a_call_ends_otherwise_or_a_filling_stream_is_cut_short():
    assert check_round({"mixed 1:1": burst_of([0.1], [0.1])}, "StreamChat") == []
    wrong = check_round({"mixed 1:1": burst_of([0.1], [0.1], code="OK")}, "StreamChat")
    assert wrong == ["mixed 1:1: refused calls ended {'OK': 1}, all should be RESOURCE_EXHAUSTED (StreamChat)"]
    short = summarize([("OK", 1.0, 32), ("UNAVAILABLE", 1.0, 3)], [("no_op", "OK", 0.1)], fill_tokens=32)
    assert check_round({"no-ops alone": short}, "StreamChat") == ["no-ops alone: 1 of 2 filling streams completed"]
