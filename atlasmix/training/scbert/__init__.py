"""scBERT (Yang et al. 2022) fed from the store: its binned log2 expression tokens on the PanglaoDB
gene axis as a loader transform (:mod:`atlasmix.training.scbert.encoding`)."""

from atlasmix.training.scbert.encoding import ScBERTEncoder, scbert_tokens, scbert_tokens_reference

__all__ = ["ScBERTEncoder", "scbert_tokens", "scbert_tokens_reference"]
