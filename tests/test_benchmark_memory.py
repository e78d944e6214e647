"""benchmarks.memory runs: each quick case in its own process, with positive peaks for every phase."""

from benchmarks import memory


def test_quick_cases_report_their_own_peaks():
    command = "python -m benchmarks.memory --quick"
    results = memory.run_benchmark(command, quick=True, threads=1, counts=(2, 4))
    for count, case in zip((2, 4), results["cases"]):
        assert case["images"] == count and case["resolution"] == memory.RESOLUTION[True]
        assert list(case["peak_mib"]) == ["start", "model", "images", "training"]
        assert all(peak > 0 for peak in case["peak_mib"].values())
        assert case["peak_mib"]["training"] >= case["peak_mib"]["model"]  # a peak never goes down
        assert set(case["seconds"]) == {"model", "images", "training"}
    assert results["ratio"] > 0 and results["bar"] == memory.BAR
    assert memory.markdown_report(results).startswith(f"`{command}`")
