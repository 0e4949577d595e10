"""`import outlierlab` / `outlierlab.integrations` never import transformers or lightning."""

from __future__ import annotations

import subprocess
import sys


def test_core_and_integrations_import_no_framework():
    code = (
        "import sys, outlierlab, outlierlab.integrations, outlierlab.integrations.alert\n"
        "from outlierlab.integrations import OutlierAlert, flatten_results\n"
        "bad = sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning')"
        " if m in sys.modules)\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
