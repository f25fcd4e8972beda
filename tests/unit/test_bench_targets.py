"""The benchmark's verdicts (bench/run.py): rounds, medians, ratios. No processes started."""

from __future__ import annotations

from bench.run import PRODUCT, REFERENCE, STANDARD, Plan, _scenarios, _targets, ramp_step, ramp_summary


def _report(target: str, mode: str, pairs: int, round_: int, p99: float = 1.0, rate: float = 100.0) -> dict:
    return {
        "target": target, "mode": mode, "pairs": pairs, "round": round_,
        "latency_ms": {"p99": p99}, "delivered_per_s": rate,
    }  # fmt: skip


def test_the_targets_scenarios_run_in_rounds_each_relay_back_to_back():
    plan = Plan(pairs=(1, 1000), duration_s=1, idle_pairs=2, storm_pairs=2, repeat=3, realistic_steps=(200, 100))
    assert _scenarios(plan) == [
        ("idle", 2, 1),
        ("max", 1, 1), ("rate", 1, 1),
        ("max", 1000, 1), ("rate", 1000, 1),
        ("max", 1000, 2), ("rate", 1000, 2),
        ("max", 1000, 3), ("rate", 1000, 3),
        ("realistic", 100, 1), ("realistic", 200, 1),
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


def _step(target: str, pairs: int, p99: float = 5.0, cpu: float = 0.5, load: float = 0.3, **extra) -> dict:
    """A realistic-mode report as `run_load` makes it, judged as `bench.run` judges it."""
    report = {
        "target": target, "mode": "realistic", "pairs": pairs, "round": 1,
        "setup": {"paired": pairs, "failed": 0, "idle_registered": 5 * pairs, "idle_failed": 0},
        "latency_ms": {"p99": p99}, "relay": {"cpu_util": cpu, "cpu_per_pair": round(cpu / pairs, 7)},
        "lost": 0, "errors": 0, "loadgen": {"cpu_util": load}, "nats": {"cpu_util": 0.1},
        "heartbeats": {"mac": {"unanswered": 0}, "ios": {"unanswered": 0}, "ack_ms": {"p99": 1.0}},
    } | extra  # fmt: skip
    report["ramp"] = ramp_step(report, load_cores=1)
    return report


def test_a_ramp_step_holds_within_50_ms_p99_and_095_of_the_relays_core():
    assert _step(PRODUCT, 100)["ramp"] == {"held": True, "why": None, "load_cpu": 0.4, "load_bound": False}
    assert _step(PRODUCT, 100, p99=50.5)["ramp"]["why"] == "p99 50.5 ms > 50 ms"
    assert _step(PRODUCT, 100, cpu=0.96)["ramp"]["why"] == "relay CPU 0.96 > 0.95 core"
    assert _step(PRODUCT, 100, lost=3)["ramp"]["why"] == "3 payloads lost"
    beats = {"mac": {"unanswered": 2}, "ios": {"unanswered": 0}, "ack_ms": {}}
    assert _step(PRODUCT, 100, heartbeats=beats)["ramp"]["why"] == "2 heartbeats unanswered"
    saturated = _step(PRODUCT, 100, p99=80.0, load=0.75, others={"metering": {"cpu_util": 0.1}})["ramp"]
    assert saturated["held"] is False and saturated["load_bound"] is True  # 0.75 + 0.1 + 0.1 of one load CPU


def test_a_ramp_reports_the_largest_count_before_the_first_step_that_did_not_hold():
    results = [_step(PRODUCT, 100, cpu=0.2), _step(PRODUCT, 200, cpu=0.4), _step(PRODUCT, 400, p99=70.0)]
    ramp = ramp_summary(results, PRODUCT)
    assert (ramp["largest_held"], ramp["stopped_at"], ramp["why"]) == (200, 400, "p99 70.0 ms > 50 ms")
    assert ramp["cpu_per_pair"] == 0.002  # CPU-seconds per pair per second at 200 pairs
    assert [step["held"] for step in ramp["steps"]] == [True, True, False]


def test_the_realistic_target_is_the_edges_pairs_over_the_references():
    plan = Plan(pairs=(1000,), duration_s=1, idle_pairs=2, storm_pairs=2, modes=("realistic",))

    def row(results: list[dict]) -> dict:
        return {r["target"].split(":")[0]: r for r in _targets({"results": results}, plan)}["realistic"]

    product = [_step(PRODUCT, n) for n in (100, 200, 400)] + [_step(PRODUCT, 800, cpu=0.99)]
    reference = [_step(REFERENCE, 100), _step(REFERENCE, 200, p99=60.0)]
    met = row(product + reference)
    assert (met["product"], met["reference"], met["ratio"], met["met"]) == (400, 100, 4.0, True)
    missed = row([_step(PRODUCT, 100), _step(PRODUCT, 200, p99=99.0)]
                 + [_step(REFERENCE, 100), _step(REFERENCE, 200), _step(REFERENCE, 400, cpu=0.97)])  # fmt: skip
    assert (missed["ratio"], missed["met"]) == (0.5, False)
    # A product that held every step gives only a lower bound: below the bound, no verdict.
    capped = row(product[:1] + reference)
    assert (capped["ratio"], capped["met"]) == (1.0, None) and "larger --realistic-steps" in capped["note"]
    assert row([])["met"] is None
