"""Engine errors, one class per thing a caller can do about it (the gRPC layer maps each to one status)."""


class EngineError(ValueError):
    """Base class: the request or adapter cannot be served as given; the message says what to change."""


class AdapterNotFound(EngineError):
    """An adapter id that is not loaded (NOT_FOUND)."""


class AdapterExists(EngineError):
    """An adapter id that is already loaded (ALREADY_EXISTS)."""


class SlotsFull(EngineError):
    """Every slot holds an adapter (RESOURCE_EXHAUSTED)."""


class AdapterMismatch(EngineError):
    """An adapter trained on another base, or for modules this engine does not serve (FAILED_PRECONDITION)."""


class BatchError(EngineError):
    """A batch context that does not fit the batch or the loaded slots (INVALID_ARGUMENT)."""


class InvalidRequest(EngineError):
    """A generation request or sampling parameter out of range (INVALID_ARGUMENT)."""


class NonFiniteOutput(EngineError):
    """A row whose logits or sampling probabilities went NaN or infinite (its adapter or mix overflows): that row
    alone fails, the rest of its batch goes on (FAILED_PRECONDITION)."""


class DeadlineExpired(EngineError):
    """A request whose deadline passed while it waited for a batch row; it never ran (DEADLINE_EXCEEDED)."""


class RequestCancelled(EngineError):
    """A request its caller cancelled; its row was freed at the next step boundary (CANCELLED)."""
