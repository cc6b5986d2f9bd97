"""scGPT (Cui et al. 2024) fed from the store: its value binning and gene tokens as a loader
transform (:mod:`atlasmix.training.scgpt.encoding`)."""

from atlasmix.training.scgpt.encoding import (ScGPTEncoder, bin_and_tokenize, bin_and_tokenize_reference,
                                              load_vocab, vocabulary_axis)

__all__ = ["ScGPTEncoder", "bin_and_tokenize", "bin_and_tokenize_reference", "load_vocab", "vocabulary_axis"]
