"""Real cloud and edge processes over a network, on Flower (``pip install "airlora[deploy]"``).

- :mod:`.payload`: the adapter on the wire (quantised codes as the link sends them);
- :mod:`.edge`: an edge device (frozen base, its own rows, its channel emulated at the
  receiver);
- :mod:`.cloud`: the cloud trainer and the deployment loop over any transport;
- :mod:`.flower_app`: the Flower ServerApp and ClientApp (imports ``flwr``);
- :mod:`.launch`: ``airlora deploy``: a SuperLink and SuperNodes on loopback.
"""

from airlora.deploy.cloud import CloudTrainer, run_in_process, run_rounds
from airlora.deploy.edge import EdgeDevice, EdgeReport
from airlora.deploy.payload import PayloadError, decode_adapter, encode_adapter

__all__ = [
    "CloudTrainer",
    "EdgeDevice",
    "EdgeReport",
    "PayloadError",
    "decode_adapter",
    "encode_adapter",
    "run_in_process",
    "run_rounds",
]
