"""signals.py: the first SIGINT/SIGTERM only sets a flag; the second quits at once."""

import os
import signal
import threading

import pytest

from mlx_oisd.signals import StopSignals


def test_stop_signals_set_a_flag_then_quit_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM  # delivered, the process goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGTERM) is before  # the second one restored them
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_handlers_outside_the_main_thread():
    before = signal.getsignal(signal.SIGINT)
    seen = []

    def run():
        with StopSignals() as signals:
            seen.append((signals.signum, signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(None, before)]
