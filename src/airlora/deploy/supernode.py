"""Flower's SuperNode with a short idle poll: ``flower-supernode`` with its waits shortened.

Between pulls, an idle SuperNode (flwr 1.42, ``flwr.supernode.start_client_internal``) sleeps a
hard-coded 3 s, and it checks for its ClientApp's reply in 0.5 s steps; nothing configures
either. Over a round of a few seconds per edge that is a large share: the server waits on
average ~2 s for the slowest of three idle nodes to notice a message. This entry point is
``flower-supernode`` itself (same arguments, same protocol) with the idle poll at
``AIRLORA_SUPERNODE_POLL_S`` seconds (default 0.5) and the local reply checks (the node's own
memory, no network) at 0.05 s. Each poll is a request the SuperLink serves: on a machine of
its own the SuperLink has CPU to spare and 0.5 s keeps the pick-up short. ``airlora deploy``
on loopback, where every poll's CPU is taken from the cloud and the edges, sets 1 s (with
its SuperExecs' task poll at 0.5 s: the idle federation's CPU fell from 5.5 to 3.1 CPU-s per
30 s on 2 cores; :mod:`airlora.deploy.launch`).

Use it where ``flower-supernode`` would be used::

    python -m airlora.deploy.supernode --isolation process --superlink HOST:9092 ...
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

DEFAULT_POLL_S = 0.5
# Flower waits 0.5 s between checks of its own memory for a reply; no request is made.
LOCAL_WAIT_S = 0.05


def poll_interval_s() -> float:
    """The longest wait between pulls, from ``AIRLORA_SUPERNODE_POLL_S`` (seconds, > 0)."""
    text = os.environ.get("AIRLORA_SUPERNODE_POLL_S", str(DEFAULT_POLL_S))
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(
            f"AIRLORA_SUPERNODE_POLL_S must be a number of seconds, got {text!r}"
        ) from None
    if not value > 0:
        raise SystemExit(f"AIRLORA_SUPERNODE_POLL_S must be > 0 seconds, got {text!r}")
    return value


def short_sleep(poll_s: float, local_s: float = LOCAL_WAIT_S):
    """``time.sleep`` for the SuperNode loop: its idle poll (Flower: 3 s) becomes ``poll_s``,
    its local waits (Flower: 0.5 s) at most ``local_s``."""

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, poll_s) if seconds >= 1.0 else min(seconds, local_s))

    return sleep


def patch_supernode(poll_s: float, local_s: float = LOCAL_WAIT_S) -> None:
    """Shorten the SuperNode loop's sleeps (only that module's view of ``time``)."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = SimpleNamespace(  # type: ignore[attr-defined]
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
        | {"sleep": short_sleep(poll_s, local_s)}
    )


def main() -> None:
    patch_supernode(poll_interval_s())
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
