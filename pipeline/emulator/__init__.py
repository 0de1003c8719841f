"""A local server of the Azure OpenAI / OpenAI chat-completions API, for demos, tests and quota rehearsals."""

from pipeline.emulator.server import (
    Emulator,
    EmulatorStats,
    Fault,
    ReceivedRequest,
    serve_forever,
)
from pipeline.emulator.wire import COMPLETION_FILTER_MARKER, FILTER_MARKER, FINISH_OBJECT_MARKER

__all__ = [
    "COMPLETION_FILTER_MARKER",
    "FILTER_MARKER",
    "FINISH_OBJECT_MARKER",
    "Emulator",
    "EmulatorStats",
    "Fault",
    "ReceivedRequest",
    "serve_forever",
]
