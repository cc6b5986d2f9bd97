"""scFoundation (Hao et al. 2024) fed from the store: its 19,264-gene log1p(CP10k) input with the
total-count tokens T and S, and read-depth-aware (RDA) downsampling
(:mod:`atlasmix.training.scfoundation.encoding`, :mod:`atlasmix.training.rda`)."""

from atlasmix.training.scfoundation.encoding import (ScFoundationEncoder, scfoundation_input,
                                                     scfoundation_input_reference)

__all__ = ["ScFoundationEncoder", "scfoundation_input", "scfoundation_input_reference"]
