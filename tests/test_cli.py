"""The command line as a user meets it (issue 33 row 7): readable at 80 columns, --version, one name for the
served entry, open_clip_train's flag names, --url with a scheme, nearest names for typos."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from patcher import __version__
from patcher.cli import app
from patcher.cli.shared import grpc_address

runner = CliRunner()
COMMANDS = ["build", "merge", "pretrain", "show", "demo", "tasks", "models", "export", "triton", "serve", "classify",
            "embed", "bench", "deploy", "verify"]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"patcher {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_keeps_every_option_name_whole(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and max(len(line) for line in result.output.splitlines()) <= 80
def test_option_names_listed_whole() -> None:
    output = runner.invoke(app, ["build", "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
    for flag in ("--grad-checkpointing", "--checkpoint-every", "--accum-steps", "--accum-freq", "--warmup",
                 "--wd", "--eval-batch-size", "--task-name", "--csv-img-key", "--csv-caption-key"):
        assert flag in output


@pytest.mark.parametrize("command", ["classify", "embed", "verify", "triton"])
def test_the_served_entry_is_model_everywhere(command: str) -> None:
    output = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"}).output
    assert "--model " in output and "--name" not in output  # --name still works, hidden


def test_name_and_model_must_agree(tmp_path) -> None:
    result = runner.invoke(app, ["verify", str(tmp_path), "--model", "a", "--name", "b"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "pass --model only" in errors[0], result.stderr


@pytest.mark.parametrize(("given", "expected"), [("http://10.0.0.5:8001", "10.0.0.5:8001"),
                                                 ("grpc://host:8001/", "host:8001"), ("host:8001", "host:8001")])
def test_url_schemes_are_accepted(given: str, expected: str) -> None:
    assert grpc_address(given) == expected


def test_a_bad_url_is_one_error_line(tmp_path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    for url, message in [("http://host:8001/v2/models", "is not a gRPC address"),
                         ("http://127.0.0.1:9", "no Triton server answers at 127.0.0.1:9")]:
        result = subprocess.run([sys.executable, "-m", "patcher", "classify", str(image), "--model", "m", "--url", url],
                                capture_output=True, text=True, timeout=120)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
        assert "Misformatted" not in result.stderr


def test_bad_inline_template_is_one_error_line(tmp_path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "patcher", "classify", str(image), "--run", str(tmp_path),
                             "--labels", "cat,dog", "--templates", "a {:>300000000} photo"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs exactly one {} for the label" in result.stderr, result.stderr


def test_re_exporting_over_another_export_fails_before_any_work(tiny_run, tiny_export) -> None:
    """Issue 33 row 7: the conflict is found from export.json and the manifest alone, before torch is imported."""
    script = ("import sys\nfrom patcher.cli import main\n"
              f"sys.argv = ['patcher', 'export', {str(tiny_run)!r}, '--out', {str(tiny_export)!r}, '--int8']\n"
              "try:\n    main()\nexcept SystemExit as done:\n    print('exit', done.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "holds a different export (int8 False -> True): pass --overwrite" in result.stderr, result.stderr
    assert result.stdout.strip() == "exit 2 False"


def test_open_clip_train_precision_names(tmp_path) -> None:
    result = runner.invoke(app, ["build", "--task", "digits", "--precision", "amp", "--device", "cpu",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "trains in fp32 on this device (cpu)" in result.output
    result = runner.invoke(app, ["build", "--task", "digits", "--precision", "bf16", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "use one of auto, fp32, amp" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_open_clip_train_flag_names_set_the_same_hyperparameters(tmp_path) -> None:
    import json

    out = tmp_path / "run"
    result = runner.invoke(app, ["build", "--task", "digits", "--model", "patcher-tiny", "--pretrained", "none",
                                 "--steps", "2", "--batch-size", "8", "--alpha", "0.5", "--eval-batch-size", "64",
                                 "--wd", "0.05", "--warmup", "1", "--accum-freq", "2", "--precision", "auto",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert (training["weight_decay"], training["warmup_steps"], training["accum_steps"]) == (0.05, 1, 2)


@pytest.mark.parametrize(("labels", "message"), [(",,,", "names no label"),
                                               ("cat,\x01\x02", "only control characters")])
def test_labels_that_name_nothing_are_refused(tmp_path, labels: str, message: str) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    result = runner.invoke(app, ["classify", str(image), "--model", "m", "--labels", labels])
    assert result.exit_code == 2 and message in result.output
