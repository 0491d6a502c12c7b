"""Writing matplotlib figures (report plots, plan views, benchmark curves) the same way."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made if missing), close it; the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["save_figure"]
