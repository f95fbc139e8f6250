"""matplotlib, loaded only when something is drawn: it is the `plots` extra, not part of the core install."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the headless Agg backend (the demo and the comparison only write files)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Plotting needs matplotlib, which the core install of sdpg-trl leaves out: pip install 'sdpg-trl[plots]'."
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
