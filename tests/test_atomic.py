"""Atomic writes: whole or not at all, and readable by whoever the umask lets read them."""

from __future__ import annotations

import os
import stat

import pytest

from kdforge.atomic import atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    """A status file or ledger is read by monitoring users: the temp file behind the rename must
    get the mode a plain open() would give, not mkstemp's private 0600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "status.txt", "x")
        atomic_write_json(tmp_path / "status.json", {"a": 1}, durable=False)
    finally:
        os.umask(old)
    for name in ("status.txt", "status.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert os.umask(old) == old  # the process umask is left as it was
