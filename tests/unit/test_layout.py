"""platform/ is a source root, never a package: it must not shadow the stdlib `platform` module,
which torch, ray and mlflow all import.

    .venv/bin/python -m pytest tests/unit/test_layout.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])


def _under(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def test_repo_root_is_found():
    assert (REPO / "pyproject.toml").is_file()
    assert (REPO / "platform" / "raymoe" / "__init__.py").is_file()


def test_platform_dir_has_no_init_py():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_import_platform_in_this_process_is_the_stdlib_module():
    import platform

    assert _under(platform.__file__, STDLIB), platform.__file__
    assert platform.system()
    assert callable(platform.python_version)


def test_import_platform_from_the_repo_root_is_the_stdlib_module():
    # cwd = repo root puts the repo root first on sys.path ('' for -c), right where platform/ lives.
    code = "import platform, sys; print(platform.__file__); print(platform.system()); print(sys.path[0] == '')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    file, system, cwd_first = r.stdout.strip().splitlines()
    assert cwd_first == "True"
    assert _under(file, STDLIB), file
    assert system  # e.g. 'Linux'


def test_import_platform_with_repo_root_explicitly_on_sys_path_is_the_stdlib_module():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "sys.modules.pop('platform', None); import platform; print(platform.__file__); print(platform.system())"
    )
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    file, system = r.stdout.strip().splitlines()
    assert _under(file, STDLIB), file
    assert system


def test_raymoe_is_imported_from_platform_raymoe():
    import raymoe

    assert _under(raymoe.__file__, str(REPO / "platform" / "raymoe")), raymoe.__file__


def test_raymoe_is_importable_outside_the_repo_from_the_installed_package(tmp_path):
    # The editable install must find raymoe without pytest's pythonpath setting.
    code = "import raymoe, raymoe.config; print(raymoe.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert _under(r.stdout.strip(), str(REPO / "platform" / "raymoe")), r.stdout
