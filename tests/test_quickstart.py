"""The README's quickstart commands in a fresh virtual environment (tests/test_quickstart.sh,
mode "system": `python -m venv --system-site-packages`, so nothing is downloaded). It takes
minutes and runs the quick test selection inside, so it is marked `quickstart` and `slow`
and runs only when asked for: `pytest -m quickstart`. The other modes of the script
(torch-index fallback, no environment at all) download and install everything; run them by
hand: `tests/test_quickstart.sh fallback`, `tests/test_quickstart.sh bare`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("test_quickstart.sh")


@pytest.mark.quickstart
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_readme_quickstart_in_a_fresh_venv():
    done = subprocess.run(["bash", str(SCRIPT), "system"], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "test_quickstart[system]: ok" in done.stdout
