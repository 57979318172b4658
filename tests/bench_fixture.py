"""A tiny registered benchmark used by test_platform to check the output convention."""

from recmix.platform.bench import BenchReport


def run(quick: bool) -> BenchReport:
    return BenchReport(title="fixture bench", columns=["case", "value"], rows=[["a", 1.0], ["b", 2.0]],
                       results={"ratio": 0.5}, config={"quick": quick})
