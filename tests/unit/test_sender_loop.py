"""The sender's private event loop keeps what it cannot deliver out of the user's log."""

from __future__ import annotations

import asyncio
import logging

from gradwatch.agent.core.sender import _quiet_loop_error


def test_an_error_on_the_senders_loop_is_one_debug_line_without_traceback(caplog):
    """gRPC's poller callback raised, at times, while channels closed; asyncio logged it
    at ERROR with a traceback in the training job's log (seen by the never-breaks test)."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_quiet_loop_error)
    with caplog.at_level(logging.DEBUG):
        loop.call_exception_handler({
            "message": "Exception in callback PollerCompletionQueue._handle_events()",
            "exception": BlockingIOError(11, "Resource temporarily unavailable")})
    loop.close()
    (record,) = caplog.records
    assert (record.name, record.levelno, record.exc_info) == (
        "gradwatch.agent.core.sender", logging.DEBUG, None)
    assert "PollerCompletionQueue" in record.getMessage()
    assert "BlockingIOError" in record.getMessage()
