"""bench.ocr's verdicts on the targets, from a result of made-up numbers (no server started)."""

from bench.ocr import table, targets


def point(mode: str, c: int, p50: float, rate: float) -> dict[str, object]:
    return {
        "mode": mode,
        "concurrency": c,
        "pages": 10,
        "p50_ms": p50,
        "p99_ms": 2 * p50,
        "pages_per_s": rate,
        "cpu_ms_per_page": 300.0,
        "others_cores": 0.5,
        "wrong": 0,
        "errors": {},
        "steps_ms_per_page": {"det": {"node": 150.0, "hop": 30.0}} if mode == "mesh" else {},
    }


def test_targets_are_ratios_of_the_mesh_to_the_all_in_one() -> None:
    result = {
        "points": [
            point("mesh", 1, 110.0, 9.0),
            point("all-in-one", 1, 100.0, 10.0),
            point("reference", 1, 80.0, 12.0),
            point("mesh", 4, 300.0, 12.0),
            point("all-in-one", 4, 400.0, 10.0),
            point("mesh", 16, 900.0, 9.0),
            point("all-in-one", 16, 800.0, 10.0),
        ]
    }
    assert targets(result) == [
        "c=1: mesh p50 1.10x the all-in-one's (target <= 1.15): met",
        "c=4: mesh throughput 1.20x the all-in-one's (target >= 1.0): met",
        "c=16: mesh throughput 0.90x the all-in-one's (target >= 1.0): MISSED",
    ]
    rendered = table(result)
    assert "| mesh | 4 | 10 | 300 | 600 | 12.00 | 300 | 0.50 | 0 | 0 |" in rendered
    assert "| det | 150.0 | 30.0 |" in rendered
