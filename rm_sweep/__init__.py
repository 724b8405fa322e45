"""rm_sweep: Random Mask CNNs, swept, attacked and tabulated at cluster scale."""

__version__ = "0.1.0"
