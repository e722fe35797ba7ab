"""The run-directory lock: exclusive across processes, gone with its holder (however it dies), and leaving no
trace of a directory it created for a run that wrote nothing."""

import os
import signal
import subprocess
import sys

import pytest

from nibble.errors import NibbleError
from nibble.io.lock import LOCK_NAME, locked_directory

HOLD = "import sys, time; from nibble.io.lock import locked_directory\nwith locked_directory(sys.argv[1]):\n"
HOLD += "    print('held', flush=True); time.sleep(600)\n"


def test_a_lock_held_by_another_process_is_refused_and_freed_by_its_death(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(NibbleError) as exc:
            with locked_directory(tmp_path):
                pass
        assert str(exc.value) == (
            f"{tmp_path}: another nibble run (pid {holder.pid}) is using this output directory; "
            "wait for it to finish, stop it, or choose another --output"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # a killed holder leaves the file, but not the lock
    with locked_directory(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_directory_created_for_nothing_is_removed(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(NibbleError, match="bad option"):
        with locked_directory(out):
            raise NibbleError("bad option")
    assert not out.exists()
    with locked_directory(out):
        (out / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with locked_directory(tmp_path):
        with pytest.raises(NibbleError, match=f"pid {os.getpid()}"):
            with locked_directory(tmp_path):
                pass
