"""Geneformer (Theodoris et al. 2023) on mixtures streamed from the store.

- :mod:`.dictionaries`: Geneformer-format pickles (token dictionary, gene median dictionary).
- :mod:`.medians`: exact out-of-core per-gene nonzero medians of CP10k expression.
- :mod:`.tokenizer`: vectorised rank value encoding (V1 / V2) of CSR minibatches, and the
  streaming wrapper around :class:`atlasmix.training.loader.MixtureLoader`.
- :mod:`.pretrain`: BertForMaskedLM pretraining (MLM) from the stream.
- :mod:`.embed`: cell embeddings of a trained model.

Submodules are imported lazily (torch / transformers are heavy).
"""
