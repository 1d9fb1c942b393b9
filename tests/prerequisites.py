"""Programs the test suite needs beyond Python: installed from Debian's packages when missing (as root, or with
sudo that asks no password), else the run stops with one line saying what to install.

Chromium (the browser tests), Java 17 and Maven (the HAPI FHIR test server), Node.js and npm (the OAuth
server and the renderers). Each is looked for only by the tests that need it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_updated = False


def _installer() -> list[str] | None:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def program(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` first if it is missing and this user may."""
    found = shutil.which(command)
    if found:
        return found
    prefix = _installer()
    if prefix is not None and shutil.which("apt-get"):
        global _updated
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 1200}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _updated:
            subprocess.run([*prefix, "apt-get", "update", "-qq"], check=False, env=env, **quiet)
            _updated = True
        subprocess.run([*prefix, "apt-get", "install", "-y", "-qq", package], check=False, env=env, **quiet)
        found = shutil.which(command)
    if not found:
        pytest.exit(f"The tests need {command}: install Debian's package {package} (apt-get install {package}).",
                    returncode=4)
    return found
