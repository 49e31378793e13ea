"""The exceptions foresightkv raises: one base class, ``Error``, and a few subclasses that also derive
from the matching built-in exception, so ``except ValueError`` keeps working for callers that do not
know foresightkv."""

from typing import Optional


class Error(Exception):
    """Base class of every exception raised by foresightkv."""


class ConfigError(Error, ValueError):
    """A cache or eviction configuration breaks a rule (the message names the value and the rule)."""


class InvalidArgumentError(Error, ValueError):
    """An argument has a value foresightkv refuses (negative or huge size, empty prompt, bad slot...)."""


class ShapeError(InvalidArgumentError):
    """A tensor's shape, strides, contiguity or size does not match what the call needs."""


class ArgumentTypeError(Error, TypeError):
    """An argument has the wrong Python type (e.g. a list where a tensor is needed)."""


class DTypeError(ArgumentTypeError):
    """A tensor has the wrong element type."""


class DeviceError(Error, ValueError):
    """A tensor is on the wrong device, tensors are on different devices, or CUDA is unavailable."""


class SequenceError(Error, LookupError):
    """A sequence id is unknown (never added, freed or preempted) or already registered."""


class EvictionStateError(Error):
    """The eviction schedule forbids the call: an eviction is due (compact first) or none is due."""


class OutOfBlocksError(Error):
    """The block pool cannot supply the blocks an operation needs; nothing was changed."""

    def __init__(self, message: str, needed: Optional[int] = None, free: Optional[int] = None) -> None:
        super().__init__(message)
        #: Blocks the operation needed.
        self.needed = needed
        #: Blocks free when it was refused.
        self.free = free


class CapacityError(Error):
    """More than what was reserved at start-up: a forward with more requests holding state than the
    request slots reserved (``EvictionEngine.reserve``), or more queries than a slot holds; nothing
    was changed."""


class FormatError(Error, ValueError):
    """A scorer checkpoint or trace file is malformed (missing or misshapen tensor, bad JSON)."""


class FileError(Error, OSError):
    """Reading or writing a checkpoint or trace file failed."""


class CudaError(Error, RuntimeError):
    """A CUDA driver call or kernel launch failed."""


__all__ = [
    "Error",
    "ConfigError",
    "InvalidArgumentError",
    "ShapeError",
    "ArgumentTypeError",
    "DTypeError",
    "DeviceError",
    "SequenceError",
    "EvictionStateError",
    "OutOfBlocksError",
    "FormatError",
    "FileError",
    "CudaError",
]
