"""Errors atlasmix raises for bad input; the CLI prints them as one line and exits with code 2."""


class AtlasmixError(Exception):
    """A user-facing error: bad input, a refused operation, or a store in the wrong state.

    The message is a single line meant for the user. The CLI catches it, prints
    ``error: <message>`` and exits with status 2. Raising it must leave the store unchanged.
    """


class IngestError(AtlasmixError):
    """An input dataset was refused by ``atlasmix ingest`` (validation, genes, duplicates...)."""


class StoreError(AtlasmixError):
    """The store does not exist, is not an atlasmix store, or is locked by another writer."""
