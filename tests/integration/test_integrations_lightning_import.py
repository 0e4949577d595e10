"""Without Lightning, the Lightning integration fails on import with a one-line fix."""

from __future__ import annotations

import subprocess
import sys


def test_missing_lightning_gives_a_clear_import_error():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"  # as if not installed
        "sys.modules['pytorch_lightning'] = None\n"
        "try:\n"
        "    import outlierlab.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'outlierlab[lightning]'" in out.stdout, out.stdout + out.stderr
