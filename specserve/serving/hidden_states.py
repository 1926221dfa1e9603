"""HiddenStates messages <-> tensors, and joining messages without decoding them.

The bytes are the elements' bit patterns, little-endian whatever the host: a tensor
is viewed as integers of its width and numpy writes (and reads) those explicitly
little-endian, so bfloat16 needs no numpy support of its own.
"""

from __future__ import annotations

import numpy as np
import torch

from specserve.core.errors import InvalidArgument
from specserve.v1 import common_pb2

# dtype name -> (torch dtype, integer dtype of the same width, little-endian numpy dtype)
_FORMATS = {
    "float32": (torch.float32, torch.int32, np.dtype("<i4")),
    "bfloat16": (torch.bfloat16, torch.int16, np.dtype("<i2")),
    "float16": (torch.float16, torch.int16, np.dtype("<i2")),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _, _) in _FORMATS.items()}


def to_proto(hidden: torch.Tensor) -> common_pb2.HiddenStates:
    """hidden [n, H] (float32, bfloat16 or float16, any device) as a message."""
    if hidden.dim() != 2 or hidden.dtype not in _NAMES:
        raise ValueError(f"expected a [n, H] float32/bfloat16/float16 tensor, got {tuple(hidden.shape)} {hidden.dtype}")
    name = _NAMES[hidden.dtype]
    _, int_dtype, wire = _FORMATS[name]
    bits = hidden.detach().cpu().contiguous().view(int_dtype).numpy()  # [n, H]
    return common_pb2.HiddenStates(rows=hidden.shape[0], dim=hidden.shape[1], dtype=name,
                                   data=bits.astype(wire, copy=False).tobytes())


def from_proto(message: common_pb2.HiddenStates, field: str = "hidden_states") -> torch.Tensor:
    """The [rows, dim] tensor a message holds; a malformed one is INVALID_ARGUMENT naming `field`."""
    if message.dtype not in _FORMATS:
        raise InvalidArgument(f"{field}: dtype must be one of {', '.join(_FORMATS)}, got {message.dtype!r}")
    torch_dtype, _, wire = _FORMATS[message.dtype]
    expected = message.rows * message.dim * wire.itemsize
    if len(message.data) != expected:
        raise InvalidArgument(f"{field}: {len(message.data)} bytes of data for {message.rows} x {message.dim} "
                              f"{message.dtype} elements ({expected} bytes)")
    bits = np.frombuffer(message.data, dtype=wire).astype(wire.newbyteorder("="))  # a writable native copy
    return torch.from_numpy(bits).view(torch_dtype).reshape(message.rows, message.dim)  # [rows, dim]


def concat(messages: list[common_pb2.HiddenStates]) -> common_pb2.HiddenStates:
    """The rows of several messages (same dim and dtype) in one message, in order."""
    if not messages:
        raise ValueError("no hidden states to join")
    first = messages[0]
    if len(messages) == 1:
        return first
    for message in messages[1:]:
        if (message.dim, message.dtype) != (first.dim, first.dtype):
            raise ValueError(f"cannot join hidden states of {first.dim} {first.dtype} and {message.dim} {message.dtype}")
    return common_pb2.HiddenStates(rows=sum(m.rows for m in messages), dim=first.dim, dtype=first.dtype,
                                   data=b"".join(m.data for m in messages))
