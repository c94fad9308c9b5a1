"""One entry point: send a dict of named tensors over a configured link at an SNR.

``WirelessLink.transmit(tensors, snr_db, protected)`` returns what the receiver rebuilt and a
:class:`~airlora.link.base.LinkReport`. Tensors named in ``protected`` (the task head by
default) travel as control data: delivered intact, airtime counted.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from airlora.config import LinkConfig
from airlora.errors import LinkError
from airlora.link.base import LinkReport, shannon_airtime
from airlora.link.channel import (
    ChannelModel,
    FixedSNR,
    GaussMarkovSNR,
    SNRProcess,
    TraceSNR,
    UniformSNR,
)
from airlora.link.digital import PacketChannel, bytes_to_packets, erased_items
from airlora.link.modulation import Modulation, pick_modulation
from airlora.link.quantization import (
    CONTROL_BITS_PER_TENSOR,
    bits_to_codes,
    codes_to_bits,
    dequantize,
    quantize,
)

CONTROL_CODE_RATE = 0.5  # protected control data pays for a rate-1/2 code


def build_snr_process(config: LinkConfig, seed: int = 0) -> SNRProcess:
    """The per-round SNR sequence a link configuration describes."""
    if config.snr_process == "fixed":
        return FixedSNR(config.snr_db, seed)
    if config.snr_process == "uniform":
        return UniformSNR(config.snr_low_db, config.snr_high_db, seed)
    if config.snr_process == "gauss_markov":
        return GaussMarkovSNR(config.snr_db, config.snr_std_db, config.snr_rho, seed)
    assert config.snr_trace is not None
    return TraceSNR(config.snr_trace, seed)


def control_cost(
    control: dict[str, torch.Tensor], noisy_tensors: int, bits_per_symbol: int
) -> tuple[int, int]:
    """Bits and channel symbols of the control data: the protected tensors as float32 plus
    per-tensor side information for each noisy tensor, under a rate-1/2 code."""
    bits = 32 * sum(v.numel() for v in control.values())
    bits += CONTROL_BITS_PER_TENSOR * noisy_tensors
    return bits, math.ceil(bits / CONTROL_CODE_RATE / bits_per_symbol)


class WirelessLink:
    """Analog or uncoded digital transmission of named tensors.

    Parameters
    ----------
    config: the link configuration (:class:`~airlora.config.LinkConfig`).
    seed: seeds every random draw of the link (noise, fading, pilots).
    """

    def __init__(self, config: LinkConfig, seed: int = 0) -> None:
        if config.scheme not in ("analog", "digital"):
            raise LinkError(f"WirelessLink does not run scheme '{config.scheme}'")
        self.config = config
        self.name = config.scheme
        self.rng = np.random.default_rng(seed)
        self.channel = ChannelModel(
            config.channel, config.rician_k, config.fading_block, config.csi, config.pilot_snr_db
        )
        self._previous: dict[str, np.ndarray] = {}
        self._symbols_per_packet: dict[float, int] = {}
        self._delivery_at: dict[float, tuple[float, float]] = {}

    # -------------------------------------------------------------- receiver memory

    @property
    def erasure_memory(self) -> dict[str, np.ndarray]:
        """The receiver's copy of each tensor from the last transmission (flat float32); with
        ``erasure_fill: previous`` an erased value is filled from it."""
        return dict(self._previous)

    def restore_erasure_memory(self, memory: dict[str, np.ndarray]) -> None:
        """Set the receiver's memory (a receiver that keeps it across processes, say)."""
        self._previous = {
            k: np.asarray(v, np.float32).reshape(-1).copy() for k, v in memory.items()
        }

    # -------------------------------------------------------------- helpers

    def modulation_at(self, snr_db: float) -> Modulation:
        if self.config.modulation == "adaptive":
            fading = "awgn" if not self.channel.fading else "rayleigh"
            return pick_modulation(snr_db, self.config.target_ber, fading)
        return Modulation(self.config.modulation)

    def _fill(self, name: str, values: np.ndarray, erased: np.ndarray) -> np.ndarray:
        if not erased.any():
            return values
        previous = self._previous.get(name)
        usable = previous is not None and previous.shape == values.shape
        if self.config.erasure_fill == "previous" and usable:
            values[erased] = previous[erased]
            return values
        values[erased] = 0.0
        return values

    def theory_ber(self, modulation: Modulation, snr_db: float) -> float:
        """Uncoded BER with perfect CSI on this link's channel."""
        if not self.channel.fading:
            return float(modulation.ber_awgn(snr_db))
        k = self.channel.rician_k if self.channel.kind == "rician" else 0.0
        return float(modulation.ber_rayleigh(snr_db, rician_k=k))

    def _symbol_rate(self) -> float:
        return self.config.bandwidth_hz

    def expected_delivery(self, sizes: Sequence[int], snr_db: float) -> np.ndarray:
        """Expected share of each item of a stream (sizes in parameters, in sending order) that
        reaches the receiver usable, from theory rather than simulation.

        Digital with CRC: a packet survives with probability (1 - BER)^frame_bits (theory BER
        of the chosen modulation on this channel); without CRC everything counts as delivered.
        A deadline delivers only the head of the stream that fits into its airtime. Analog:
        everything sent is delivered (noisy). ARQ is ignored. Surrogate models use this as a
        feature; the link itself never does.
        """
        sizes = np.asarray(sizes, dtype=np.float64)
        # Surrogates ask at the same few SNRs many times: the link's side depends on it alone.
        cached = self._delivery_at.get(snr_db)
        if cached is None:
            if len(self._delivery_at) >= 4096:  # a continuous SNR process: keep it bounded
                self._delivery_at.clear()
            cached = self._delivery_at[snr_db] = self._capacity_and_survival(snr_db)
        capacity, p_ok = cached
        end = np.cumsum(sizes)
        start = end - sizes
        fits = np.clip(np.minimum(end, capacity) - start, 0.0, None)
        share = np.divide(fits, sizes, out=np.ones_like(sizes), where=sizes > 0)
        return p_ok * share

    def _capacity_and_survival(self, snr_db: float) -> tuple[float, float]:
        """Parameters that fit before the deadline, and a packet's survival probability."""
        budget = self._budget_symbols()
        if self.config.scheme == "analog":
            return (np.inf if budget is None else 2.0 * budget), 1.0
        modulation = self.modulation_at(snr_db)
        channel = PacketChannel(modulation, self.channel, self.config.packet_bits, True)
        p_ok = 1.0
        if self.config.crc_check:
            ber = self.theory_ber(modulation, snr_db)
            p_ok = float((1.0 - ber) ** channel.frame_bits)
        per_packet = self.config.packet_bits / self.config.quant_bits
        capacity = np.inf if budget is None else (budget // channel.symbols_per_packet) * per_packet
        return capacity, p_ok

    def airtime_s(self, n_params: int, snr_db: float) -> float:
        """Seconds on air of a first transmission of ``n_params`` parameters at ``snr_db``
        (packets with their CRC; no retransmissions, no control data): what a transmitter
        knows before it sends, and what the online formulation prices against its slot.
        Only ``modulation: adaptive`` makes it depend on the SNR (a better channel carries
        more bits per symbol); with a fixed modulation the SNR decides what is lost. Analog:
        two parameters per symbol (``transmit`` pads each tensor to whole symbols: up to one
        symbol more per tensor of odd size)."""
        if self.config.scheme == "analog":
            return math.ceil(n_params / 2) / self._symbol_rate()
        # Rank searches price many payloads at one SNR: pick the modulation once per SNR.
        per_packet = self._symbols_per_packet.get(snr_db)
        if per_packet is None:
            modulation = self.modulation_at(snr_db)
            per_packet = PacketChannel(
                modulation, self.channel, self.config.packet_bits, True
            ).symbols_per_packet
            self._symbols_per_packet[snr_db] = per_packet
        packets = -(-n_params * self.config.quant_bits // self.config.packet_bits)
        return packets * per_packet / self._symbol_rate()

    # -------------------------------------------------------------- transmit

    def transmit(
        self,
        tensors: dict[str, torch.Tensor],
        snr_db: float,
        protected: Collection[str] = (),
        modulation_snr_db: float | None = None,
        value_ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], LinkReport]:
        """Send ``tensors`` over a channel at ``snr_db``; ``modulation_snr_db``: the SNR the
        transmitter picked the modulation for (adaptive modulation; default ``snr_db``: it
        knows this receiver's channel; a multicast sends at its weakest receiver's);
        ``value_ranges``: the quantiser's (min, max) per tensor where it is not the tensor's
        own (a block of a larger tensor, on that tensor's grid)."""
        snr_db = float(snr_db)
        if not math.isfinite(snr_db):
            raise LinkError(f"SNR must be a finite number of dB, got {snr_db}")
        tx_snr_db = snr_db if modulation_snr_db is None else float(modulation_snr_db)
        if not math.isfinite(tx_snr_db):
            raise LinkError(f"the modulation's SNR must be finite, got {tx_snr_db} dB")
        protected = set(protected) if self.config.protect_head else set()
        noisy = {k: v for k, v in tensors.items() if k not in protected}
        control = {k: v for k, v in tensors.items() if k in protected}
        flat = {k: v.detach().cpu().float().numpy().reshape(-1) for k, v in noisy.items()}
        if self.config.scheme == "analog":
            received, report = self._analog(flat, snr_db)
        else:
            received, report = self._digital(flat, snr_db, tx_snr_db, value_ranges or {})
        # Control data: the protected tensors plus per-tensor side information.
        modulation_bits = (
            2 if self.config.scheme == "analog" else self.modulation_at(tx_snr_db).bits_per_symbol
        )
        control_bits, control_symbols = control_cost(control, len(flat), modulation_bits)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if name in control:
                out[name] = tensor.detach().clone()
            else:
                values = received[name]
                self._previous[name] = values.copy()
                out[name] = torch.from_numpy(values).reshape(tensor.shape).to(tensor.dtype)
        symbols = report["symbols"] + control_symbols
        airtime = symbols / self._symbol_rate()
        params = sum(v.numel() for v in tensors.values())
        payload_bits = report["payload_bits"] + 32 * sum(v.numel() for v in control.values())
        extra = dict(report.get("extra", {}))
        extra.update(control_bits=control_bits, control_symbols=control_symbols)
        return out, LinkReport(
            scheme=self.name,
            snr_db=snr_db,
            params=params,
            payload_bits=payload_bits,
            airtime_s=airtime,
            shannon_airtime_s=shannon_airtime(payload_bits, snr_db, self.config.bandwidth_hz),
            energy_j=airtime * self.config.tx_power_w,
            symbols=symbols,
            packets=report.get("packets", 0),
            erasures=report.get("erasures", 0),
            retransmissions=report.get("retransmissions", 0),
            erased_params=report.get("erased_params", 0),
            measured_ber=report.get("measured_ber"),
            extra=extra,
        )

    # -------------------------------------------------------------- analog

    def _analog(self, flat: dict[str, np.ndarray], snr_db: float) -> tuple[dict, dict]:
        """Two parameters per complex symbol, unit average symbol energy, ZF equalisation.

        The error of a received parameter has power P_tensor / SNR on AWGN.
        """
        n0 = 10.0 ** (-snr_db / 10.0)
        out: dict[str, np.ndarray] = {}
        total_symbols, sq_err, sig, erased_total = 0, 0.0, 0.0, 0
        budget = self._budget_symbols()
        for name, values in flat.items():
            n = values.size
            if n == 0:
                out[name] = values.copy()
                continue
            power = float(np.mean(values.astype(np.float64) ** 2))
            scale = math.sqrt(2.0 * power) if power > 0 else 1.0
            padded = np.zeros(n + (n % 2), dtype=np.float32)
            padded[:n] = values / np.float32(scale)
            symbols = padded.view(np.complex64)
            m = symbols.size
            noise = np.empty(m, dtype=np.complex64)
            noise.real = self.rng.standard_normal(m, dtype=np.float32)
            noise.imag = self.rng.standard_normal(m, dtype=np.float32)
            noise *= np.float32(math.sqrt(n0 / 2.0))
            if self.channel.fading:
                block = self.config.analog_block_symbols
                n_blocks = -(-m // block) if self.channel.block == "packet" else 1
                h = self.channel.gains(n_blocks, self.rng)
                h_hat = self.channel.estimate(h, snr_db, self.rng)
                which = np.minimum(np.arange(m) // block, n_blocks - 1)
                y = h[which] * symbols + noise
                z = y / h_hat[which]
            else:
                z = symbols + noise
            received = z.view(np.float32)[:n] * np.float32(scale)
            erased = np.zeros(n, dtype=bool)
            if budget is not None:
                fits = max(0, min(m, budget - total_symbols))
                erased[2 * fits :] = True
                received = self._fill(name, received.copy(), erased)
            total_symbols += m
            erased_total += int(erased.sum())
            err = received[~erased].astype(np.float64) - values[~erased]
            sq_err += float(np.sum(err**2))
            sig += power * n
            out[name] = received.astype(np.float32)
        sent = total_symbols if budget is None else min(total_symbols, budget)
        return out, {
            "symbols": sent,
            "payload_bits": 32 * sum(v.size for v in flat.values()),
            "erased_params": erased_total,
            "extra": {"error_power_ratio": sq_err / sig if sig > 0 else None},
        }

    def _budget_symbols(self) -> int | None:
        if self.config.deadline_s is None:
            return None
        return int(self.config.deadline_s * self._symbol_rate())

    # -------------------------------------------------------------- digital

    def _digital(
        self,
        flat: dict[str, np.ndarray],
        snr_db: float,
        tx_snr_db: float,
        value_ranges: Mapping[str, tuple[float, float]],
    ) -> tuple[dict, dict]:
        cfg = self.config
        modulation = self.modulation_at(tx_snr_db)
        bits = cfg.quant_bits
        names = list(flat)
        quantized = [quantize(flat[k], bits, value_ranges.get(k)) for k in names]
        counts = [q.codes.size for q in quantized]
        if bits == 8:
            stream = (
                np.concatenate([q.codes for q in quantized]) if names else np.zeros(0, np.uint8)
            )
        else:
            stream = np.packbits(
                np.concatenate([codes_to_bits(q.codes, bits) for q in quantized])
                if names
                else np.zeros(0, np.uint8)
            )
        n_items = sum(counts)
        if n_items == 0:
            return {k: flat[k].copy() for k in names}, {"symbols": 0, "payload_bits": 0}
        packets = bytes_to_packets(stream, cfg.packet_bits)
        link = PacketChannel(modulation, self.channel, cfg.packet_bits, cfg.fast_path)
        max_packets = None
        if cfg.deadline_s is not None:
            max_packets = int(self._budget_symbols() // link.symbols_per_packet)
        retries = cfg.arq_retries if cfg.crc_check else 0
        result = link.send(packets, snr_db, self.rng, retries, max_packets)
        lost = result.lost if cfg.crc_check else result.unsent
        rx_stream = result.rx_bytes.reshape(-1)
        if bits == 8:
            codes_all = rx_stream[:n_items]
        else:
            codes_all = bits_to_codes(np.unpackbits(rx_stream)[: n_items * bits], bits)
        erased_all = erased_items(lost, n_items, bits, cfg.packet_bits)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, q, n in zip(names, quantized, counts, strict=True):
            values = dequantize(codes_all[offset : offset + n], q.lo, q.hi, bits)
            out[name] = self._fill(name, values, erased_all[offset : offset + n])
            offset += n
        return out, {
            "symbols": result.packets_sent * link.symbols_per_packet,
            "payload_bits": n_items * bits,
            "packets": int(packets.shape[0]),
            "erasures": int(lost.sum()),
            "retransmissions": result.retransmissions,
            "erased_params": int(erased_all.sum()),
            "measured_ber": result.bit_errors / result.bits_exposed
            if result.bits_exposed
            else None,
            "extra": {
                "modulation": modulation.name,
                "quant_bits": bits,
                "packet_bits": cfg.packet_bits,
                "theory_ber": self.theory_ber(modulation, snr_db),
                "fast_path": link.uses_fast_path,
            },
        }
