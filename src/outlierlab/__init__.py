"""outlierlab: measure, avoid and price outlier features in transformers.

Implements He et al., *Understanding and Minimising Outlier Features in Transformer Training*
(NeurIPS 2024, arXiv 2405.19279). Importing this package never imports ``transformers`` or
``lightning``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["OutlierMonitor", "__version__", "metrics", "version_info"]


def version_info() -> dict[str, str]:
    """``{"version": __version__}``, plus ``git_commit`` when the package is imported from a
    git checkout (an editable install): what a run's ``status.json`` records as the code it
    ran."""
    import subprocess
    from pathlib import Path

    info = {"version": __version__}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
        commit = out.stdout.strip()
        if len(commit) == 40:
            info["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout, or no git: the version alone
    return info


def __getattr__(name: str):  # lazy, so `import outlierlab` stays cheap
    if name == "metrics":
        import importlib

        return importlib.import_module("outlierlab.metrics")
    if name == "OutlierMonitor":
        from outlierlab.monitor import OutlierMonitor

        return OutlierMonitor
    raise AttributeError(f"module 'outlierlab' has no attribute {name!r}")
