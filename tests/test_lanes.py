"""The fast lane's rules (tests/conftest.py): a test that uses a model-building fixture is slow, and a test outside
the slow lane that builds a model or starts a server fails with one line saying to mark it slow."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import heavy_command
from cpu_report import read_report

# torch and open_clip imported here, before any small suite runs in process: pytester takes out of sys.modules what
# a run imported, and torch's extension modules cannot be imported a second time in one process
import patcher.models  # noqa: F401

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A folder with this suite's conftest, for small suites run in process."""
    pytester.makeconftest(CONFTEST.read_text())
    return pytester


def test_a_test_using_a_model_fixture_is_slow_and_left_out_of_the_fast_lane(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_sample="""
        def test_uses_the_run(tiny_run):
            pass

        def test_through_another_fixture(exported):
            pass

        def test_plain():
            pass

        import pytest

        @pytest.fixture
        def exported(tiny_export):
            return tiny_export
    """)
    result = suite.runpytest_inprocess("--collect-only", "-q", "-m", "not slow", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["test_sample.py::test_plain", "*1/3 tests collected (2 deselected)*"])


def test_an_unmarked_test_that_starts_a_server_or_builds_a_model_fails(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_sample="""
        import subprocess
        import sys

        import patcher.models  # open_clip, imported as patcher imports it
        import pytest

        def test_server():
            subprocess.run(["true", "tritonserver"], check=True)

        def test_torchrun():
            subprocess.run([sys.executable, "-c", "pass", "torchrun"], check=True)

        def test_model_in_process():
            from patcher.models import load_clip
            load_clip("patcher-tiny")

        @pytest.mark.slow
        def test_marked_server():
            subprocess.run(["true", "tritonserver"], check=True)

        def test_ordinary_command():
            subprocess.run(["true", "--version"], check=True)
    """)
    result = suite.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines_random([
        "*test_server is not marked slow but it starts tritonserver: mark it @pytest.mark.slow*",
        "*test_torchrun is not marked slow but it starts torchrun*",
        "*test_model_in_process is not marked slow but it builds a model*",
    ])


@pytest.mark.parametrize(("command", "reason"), [
    (["/opt/x/bin/tritonserver", "--model-repository=r"], "it starts tritonserver"),
    (["torchrun", "--nproc-per-node", "2", "-m", "patcher", "build"], "it starts torchrun"),
    (["python", "bench/gpu_check.py", "--cpu-smoke"], "it runs a benchmark script"),
    (["/x/python", "-m", "moto.server", "-H", "127.0.0.1"], "it starts moto_server"),
    (["python", "-m", "patcher", "show", "run"], None),
    (["python", "-c", "import patcher"], None),
    ("strace -f true", None),
])
def test_heavy_commands(command: list[str] | str, reason: str | None) -> None:
    assert heavy_command(command) == reason


def test_the_cpu_report_counts_each_tests_own_and_its_childrens_cpu(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_sample="""
        import subprocess
        import sys

        SPIN = "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"

        def test_child_spins():
            subprocess.run([sys.executable, "-c", SPIN], check=True)

        def test_idle():
            pass
    """)
    report = suite.path / "cpu.tsv"
    result = suite.runpytest_inprocess("-q", "-p", "no:cacheprovider", "--cpu-report", str(report))
    result.assert_outcomes(passed=2)
    rows = {test.split("::")[-1]: (own, children) for test, own, children, _ in read_report(report)}
    assert set(rows) == {"test_child_spins", "test_idle"}
    assert rows["test_child_spins"][1] >= 0.3 and rows["test_idle"][1] < 0.3  # the child counted where it ran
    result.stdout.fnmatch_lines(["*CPU seconds: * in 2 tests*", "* children *test_sample.py::test_child_spins"])
