"""`airlora bench link`: the uncoded digital chain against the same chain around Sionna.

All three chains quantise 1,000,000 float32 parameters to 8 bits, send them with QPSK over
AWGN at Es/N0 = 5 dB with hard decisions, and de-quantise, on one thread, from the same
parameters, interleaved over repeats:

- project: :class:`~airlora.link.WirelessLink` as the round engine runs it (packets with
  CRC-32, erasure handling; its default fast path draws bit errors directly, which is exact
  for Gray QPSK on AWGN). ``details`` also gives its symbol-level figure (fast path off).
- peer: Sionna PHY's QPSK ``Mapper``, ``AWGN`` and hard-decision ``Demapper`` in the middle.
- naive: NumPy with complex symbols, ``unpackbits`` / ``packbits``.

The figure is payload bits (8 per parameter) per second of wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from airlora.config import LinkConfig
from airlora.errors import LinkError
from airlora.link import WirelessLink
from airlora.link.quantization import dequantize, quantize

SNR_DB = 5.0
BITS = 8


def _naive_numpy(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    q = quantize(values, BITS)
    bits = np.unpackbits(q.codes).reshape(-1, 2)
    symbols = ((1 - 2.0 * bits[:, 0]) + 1j * (1 - 2.0 * bits[:, 1])) / math.sqrt(2)
    n0 = 10 ** (-SNR_DB / 10)
    noise = rng.standard_normal(symbols.size) + 1j * rng.standard_normal(symbols.size)
    y = symbols + noise * math.sqrt(n0 / 2)
    rx = np.stack([y.real < 0, y.imag < 0], axis=1).astype(np.uint8).reshape(-1)
    return dequantize(np.packbits(rx), q.lo, q.hi, BITS)


def _sionna_chain() -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    try:
        from sionna.phy.channel import AWGN
        from sionna.phy.mapping import Demapper, Mapper
    except ImportError as err:
        raise LinkError(
            "bench link measures against Sionna's chain: pip install 'airlora[sionna]'"
        ) from err

    mapper = Mapper("qam", 2)
    demapper = Demapper("maxlog", "qam", 2, hard_out=True)
    awgn = AWGN()
    n0 = torch.tensor(10 ** (-SNR_DB / 10), dtype=torch.float32)

    def run(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        q = quantize(values, BITS)
        bits = torch.from_numpy(np.unpackbits(q.codes).astype(np.float32))
        with torch.no_grad():
            rx = demapper(awgn(mapper(bits), n0), n0)
        return dequantize(np.packbits(rx.numpy().astype(np.uint8)), q.lo, q.hi, BITS)

    return run


def bench_link(n_params: int = 1_000_000, repeats: int = 5, seed: int = 0) -> dict:
    """Bits per second of the three chains; ratio = project / peer (Sionna)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(seed)
        values = (rng.standard_normal(n_params) * 0.02).astype(np.float32)
        tensor = {"adapter": torch.from_numpy(values)}
        config = LinkConfig(scheme="digital", modulation="qpsk", quant_bits=BITS, snr_db=SNR_DB)
        fast = WirelessLink(config, seed)
        symbol_level = WirelessLink(config.model_copy(update={"fast_path": False}), seed)
        sionna = _sionna_chain()
        chains: dict[str, Callable[[], object]] = {
            "project": lambda: fast.transmit(tensor, SNR_DB),
            "project_symbol_level": lambda: symbol_level.transmit(tensor, SNR_DB),
            "peer": lambda: sionna(values, rng),
            "naive_numpy": lambda: _naive_numpy(values, rng),
        }
        for run in chains.values():  # warm-up
            run()
        times: dict[str, list[float]] = {k: [] for k in chains}
        for rep in range(repeats):
            order = list(chains.items())
            if rep % 2:
                order.reverse()
            for name, run in order:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        bits = n_params * BITS
        rate = {k: bits / statistics.median(v) for k, v in times.items()}
        _, report = fast.transmit(tensor, SNR_DB)
    finally:
        torch.set_num_threads(threads)
    return {
        "name": "link",
        "unit": "bit/s",
        "project": rate["project"],
        "peer": rate["peer"],
        "ratio": rate["project"] / rate["peer"],
        "details": {
            "chain": "8-bit per-tensor quantisation, QPSK (Gray), AWGN Es/N0 5 dB, hard "
            "decisions, de-quantisation",
            "n_params": n_params,
            "payload_bits": bits,
            "threads": 1,
            "repeats": repeats,
            "project_mbit_s": rate["project"] / 1e6,
            "project_symbol_level_mbit_s": rate["project_symbol_level"] / 1e6,
            "peer_sionna_mbit_s": rate["peer"] / 1e6,
            "naive_numpy_mbit_s": rate["naive_numpy"] / 1e6,
            "project_vs_naive": rate["project"] / rate["naive_numpy"],
            "project_path": "fast path: bit errors drawn directly (exact for Gray QPSK on AWGN)",
            "project_measured_ber": report.measured_ber,
            "theory_ber": report.extra.get("theory_ber"),
            "seconds": {k: v for k, v in times.items()},
        },
    }
