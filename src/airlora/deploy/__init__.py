"""Real cloud and edge processes over a network, on Flower (``pip install "airlora[deploy]"``).

- :mod:`.payload`: the adapter on the wire (quantised codes as the link sends them);
- :mod:`.edge`: an edge device (frozen base, its own rows, its channel emulated at the
  receiver);
- :mod:`.cloud`: the cloud trainer and the deployment loop over any transport;
- :mod:`.flower_app`: the Flower ServerApp and ClientApp (imports ``flwr``);
- :mod:`.launch`: ``airlora deploy``: a SuperLink and SuperNodes on loopback.
"""

from typing import TYPE_CHECKING

from airlora._lazy import lazy_exports

# Loaded on first use: `python -m airlora.deploy.supernode` (a Flower process) imports this
# package and must not pay for torch, transformers and PEFT.
_WHERE = {
    "CloudTrainer": "airlora.deploy.cloud",
    "run_in_process": "airlora.deploy.cloud",
    "run_rounds": "airlora.deploy.cloud",
    "EdgeDevice": "airlora.deploy.edge",
    "EdgeReport": "airlora.deploy.edge",
    "PayloadError": "airlora.deploy.payload",
    "decode_adapter": "airlora.deploy.payload",
    "encode_adapter": "airlora.deploy.payload",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports("airlora.deploy", globals(), _WHERE)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from airlora.deploy.cloud import CloudTrainer, run_in_process, run_rounds  # noqa: F401
    from airlora.deploy.edge import EdgeDevice, EdgeReport  # noqa: F401
    from airlora.deploy.payload import PayloadError, decode_adapter, encode_adapter  # noqa: F401
