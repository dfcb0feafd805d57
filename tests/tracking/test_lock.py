"""The output-folder lock: one owner at a time, a stale lock (dead pid on this host) taken over, a live or
foreign owner refused in one line naming it, and release never removing another process's lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dlm.settings import ConfigError
from dlm.tracking.lock import LOCK_FILE, acquire, folder_lock, read_lock, release


def _plant(folder, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": "2026-01-01T00:00:00", "what": "test"}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_records_pid_and_host_and_is_released_on_exit(tmp_path):
    with folder_lock(tmp_path / "out", "output_dir") as path:
        owner = read_lock(tmp_path / "out")
        assert path.name == LOCK_FILE and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path, "output_dir"):
            raise RuntimeError("boom")
    assert read_lock(tmp_path) is None


def test_a_live_owner_is_refused_in_one_line_naming_pid_and_host(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _plant(tmp_path, sleeper.pid)
        with pytest.raises(ConfigError, match=rf"in use by pid {sleeper.pid} on {socket.gethostname()}") as err:
            acquire(tmp_path, "sweep 's'")
        assert "\n" not in str(err.value) and str(tmp_path / LOCK_FILE) in str(err.value)
        assert read_lock(tmp_path)["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    _plant(tmp_path, _dead_pid())
    acquire(tmp_path, "output_dir")
    assert read_lock(tmp_path)["pid"] == os.getpid()
    release(tmp_path)


def test_an_empty_lock_file_left_by_a_kill_is_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    acquire(tmp_path, "output_dir")
    assert read_lock(tmp_path)["pid"] == os.getpid()
    release(tmp_path)


def test_a_lock_from_another_host_is_refused_since_its_pid_cannot_be_checked(tmp_path):
    _plant(tmp_path, _dead_pid(), host="some-other-node")
    with pytest.raises(ConfigError, match="on some-other-node"):
        acquire(tmp_path, "output_dir")


def test_the_same_process_cannot_take_a_folder_twice(tmp_path):
    with folder_lock(tmp_path, "output_dir"):
        with pytest.raises(ConfigError, match="already locked by this process"):
            acquire(tmp_path, "output_dir")


def test_release_leaves_another_process_lock_in_place(tmp_path):
    _plant(tmp_path, 1)  # pid 1 is alive on every system
    release(tmp_path)
    assert read_lock(tmp_path)["pid"] == 1
