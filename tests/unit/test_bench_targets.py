"""The benchmark's verdicts (bench/run.py): rounds, medians, ratios. No processes started."""

from __future__ import annotations

from bench.run import PRODUCT, REFERENCE, STANDARD, Plan, _scenarios, _targets


def _report(target: str, mode: str, pairs: int, round_: int, p99: float = 1.0, rate: float = 100.0) -> dict:
    return {
        "target": target, "mode": mode, "pairs": pairs, "round": round_,
        "latency_ms": {"p99": p99}, "delivered_per_s": rate,
    }  # fmt: skip


def test_the_targets_scenarios_run_in_rounds_each_relay_back_to_back():
    plan = Plan(pairs=(1, 1000), duration_s=1, idle_pairs=2, storm_pairs=2, repeat=3)
    assert _scenarios(plan) == [
        ("idle", 2, 1),
        ("max", 1, 1), ("rate", 1, 1),
        ("max", 1000, 1), ("rate", 1000, 1),
        ("max", 1000, 2), ("rate", 1000, 2),
        ("max", 1000, 3), ("rate", 1000, 3),
        ("storm", 2, 1),
    ]  # fmt: skip
    assert STANDARD.repeat == 3


def test_a_targets_ratio_is_the_median_of_its_rounds_ratios():
    plan = Plan(pairs=(1000,), duration_s=1, idle_pairs=2, storm_pairs=2, repeat=3, modes=("rate",))
    p99s = [(3.0, 2.0), (2.2, 2.0), (4.0, 2.0)]  # round ratios 1.5, 1.1, 2.0
    results = []
    for n, (product, reference) in enumerate(p99s, start=1):
        results += [_report(PRODUCT, "rate", 1000, n, p99=product), _report(REFERENCE, "rate", 1000, n, p99=reference)]
    rows = {row["target"].split(":")[0]: row for row in _targets({"results": results}, plan)}
    p99 = rows["1000 pairs at 10 frames/s each"]
    assert p99["round_ratios"] == [1.5, 1.1, 2.0]
    assert p99["ratio"] == 1.5 and p99["met"] is False  # the median, not the best round
    assert (p99["product"], p99["reference"]) == (3.0, 2.0)
