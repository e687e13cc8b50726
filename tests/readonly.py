"""A path no test process can write to, not even as root."""

from __future__ import annotations

import os

import pytest


def read_only_dir() -> str:
    """A directory that not even root can create: under /sys (sysfs refuses mkdir)."""
    path = "/sys/raymoe-write-check"
    try:
        os.mkdir(path)
    except OSError:
        return path
    os.rmdir(path)
    pytest.skip("/sys accepts new directories here")
