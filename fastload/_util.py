"""Small helpers shared by the Python modules."""
from __future__ import annotations


class AttrDict(dict):
    """A dict whose keys also read as attributes (transformers' configs, outputs and encodings do)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None


def is_torch(x) -> bool:
    """True for torch objects, without importing torch."""
    return type(x).__module__.split(".")[0] == "torch"
