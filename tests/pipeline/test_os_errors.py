"""OS refusals under a CLI command: one line naming the path and the reason, exit 1; --debug keeps the traceback.

Tests run as root, where chmod denies nothing; a read-only file system is made for real with a private mount
namespace (``unshare``), and the message function is fed real OSErrors the kernel raises even for root.
"""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.os_errors import os_error_message
from pipeline.synthetic import synthesize_capture

REPO = Path(__file__).resolve().parents[2]


def _raised(action) -> OSError:
    try:
        action()
    except OSError as error:
        return error
    pytest.skip("the OS did not refuse here")


def test_messages_for_real_os_errors(tmp_path):
    full = _raised(lambda: open("/dev/full", "wb", buffering=0).write(b"x"))
    assert full.errno == errno.ENOSPC
    assert os_error_message(full) == "cannot write: no space left on device"
    full.filename = "/w/reports/x.json"
    assert os_error_message(full) == "cannot write /w/reports/x.json: no space left on device"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    under_file = _raised(lambda: os.makedirs(a_file / "sub"))
    assert os_error_message(under_file) == f"cannot use {a_file / 'sub'}: a part of the path is a file, not a folder"
    missing = _raised(lambda: open(tmp_path / "nope" / "x"))
    assert os_error_message(missing) == f"cannot find {tmp_path / 'nope' / 'x'}: no such file or folder"
    if os.path.isdir("/sys/kernel"):  # sysfs refuses new files even to root: a real PermissionError
        denied = _raised(lambda: open("/sys/kernel/nersemble-test", "w"))
        if denied.errno == errno.EACCES:
            assert os_error_message(denied) == "cannot access /sys/kernel/nersemble-test: permission denied"
    assert os_error_message(ValueError("x")) is None


def test_a_stage_on_a_missing_work_folder_names_it_and_creates_nothing(tmp_path):
    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "no-work" / "001" / "SEQ")])
    assert result.exit_code == 1 and "no-work/001/SEQ" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "no-work").exists()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o ro,size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare and a private mount namespace")
@pytest.mark.parametrize("debug", [False, True])
def test_ingest_into_a_read_only_folder_is_one_line(tmp_path, debug):
    capture = synthesize_capture(tmp_path / "archive", cameras=2, frames=2, width=32, height=48, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    cli = f"{sys.executable} -c 'from pipeline.cli import app; app()' {'--debug' if debug else ''} " \
          f"ingest {capture.sequence_dir} --work {work}"
    # A read-only tmpfs over the work folder, in a mount namespace of its own: it vanishes with the command.
    script = f"mount -t tmpfs -o ro,size=64k tmpfs {work} && {cli}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 1, result.stderr
    if debug:
        assert "Traceback" in result.stderr
    else:
        assert result.stderr.strip() == f"error: cannot write {work / capture.participant_dir.name}: read-only file system"
