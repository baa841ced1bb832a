"""qid2: q-space (angular) up-sampling of diffusion MRI as a BIDS app."""

__version__ = "0.1.0"
__all__ = ["__version__"]
