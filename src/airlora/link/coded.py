"""Coded digital transmission built on Sionna PHY (PyPI ``sionna-no-rt``, extra ``sionna``).

quantiser -> packets -> Sionna CRC24A -> 5G NR LDPC encoder -> Sionna QAM mapper -> channel
-> equalisation -> Sionna APP demapper (LLRs) -> LDPC belief-propagation decoder -> CRC check
-> de-quantiser. A packet whose CRC fails after decoding is an erasure, filled as in the
uncoded scheme. The channel (AWGN or block fading with its CSI) is this package's own, so
coded and uncoded transmissions of an adapter see the same channel model.

Sionna is built for GPUs; on a CPU its LDPC decoder moves on the order of 10^5 bits/s, so a
coded round of a large adapter takes seconds.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
import torch

from airlora.config import LinkConfig
from airlora.errors import LinkError
from airlora.link.base import LinkReport, shannon_airtime
from airlora.link.digital import erased_items
from airlora.link.quantization import (
    bits_to_codes,
    dequantize,
    quantize,
)
from airlora.link.wireless import WirelessLink, control_cost

CRC_NAME = "CRC24A"
CRC_LEN = 24
LDPC_MAX_K = 8448  # 5G NR base graph 1


def _sionna():
    try:
        from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
        from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
        from sionna.phy.mapping import Demapper, Mapper
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise LinkError(
            "the 'coded' link scheme needs Sionna PHY: pip install 'airlora[sionna]'"
        ) from err
    return CRCEncoder, CRCDecoder, LDPC5GEncoder, LDPC5GDecoder, Mapper, Demapper


class CodedLink(WirelessLink):
    """CRC + 5G NR LDPC + QAM through Sionna, over this package's channel model.

    Parameters
    ----------
    config: link configuration; uses ``modulation`` (not ``adaptive``), ``code_rate``,
        ``packet_bits`` (information bits per codeword, CRC included, at most 8448),
        ``channel`` and its CSI, ``quant_bits``, ``erasure_fill``.
    seed: seeds the channel and noise.
    """

    def __init__(self, config: LinkConfig, seed: int = 0) -> None:
        super().__init__(config.model_copy(update={"scheme": "digital"}), seed)
        self.config = config
        self.name = "coded"
        if config.modulation == "adaptive":
            raise LinkError("the coded scheme needs a fixed modulation, not 'adaptive'")
        if config.packet_bits > LDPC_MAX_K:
            raise LinkError(f"coded packet_bits must be <= {LDPC_MAX_K}, got {config.packet_bits}")
        crc_enc, crc_dec, ldpc_enc, ldpc_dec, mapper, demapper = _sionna()
        k_bits = self.modulation_at(0.0).bits_per_symbol
        self.k = config.packet_bits
        n = round(self.k / config.code_rate)
        n += (-n) % k_bits  # whole symbols per codeword
        self.n = n
        self.bits_per_symbol = k_bits
        self._crc = crc_enc(CRC_NAME)
        self._crc_check = crc_dec(self._crc)
        self._encoder = ldpc_enc(self.k, n, num_bits_per_symbol=k_bits)
        self._decoder = ldpc_dec(self._encoder, hard_out=True, num_iter=20)
        self._mapper = mapper("qam", k_bits)
        self._demapper = demapper("app", "qam", k_bits)
        torch.manual_seed(seed)

    def codewords(self, n_bits: int) -> int:
        """Codewords that carry ``n_bits`` information bits (at least one)."""
        return max(1, -(-n_bits // (self.k - CRC_LEN)))

    def airtime_s(self, n_params: int, snr_db: float) -> float:
        """Seconds on air of ``n_params`` parameters: whole codewords of ``packet_bits``
        information bits (CRC included) at the code rate; no control data. A fixed
        modulation and code: the SNR decides what is lost, not the airtime."""
        symbols = self.codewords(n_params * self.config.quant_bits) * (
            self.n // self.bits_per_symbol
        )
        return symbols / self.config.bandwidth_hz

    def transmit(
        self, tensors: dict[str, torch.Tensor], snr_db: float, protected: Collection[str] = ()
    ) -> tuple[dict[str, torch.Tensor], LinkReport]:
        snr_db = float(snr_db)
        protected = set(protected) if self.config.protect_head else set()
        out: dict[str, torch.Tensor] = {}
        noisy = {k: v for k, v in tensors.items() if k not in protected}
        flat = {k: v.detach().cpu().float().numpy().reshape(-1) for k, v in noisy.items()}
        bits = self.config.quant_bits
        info_bits = self.k - CRC_LEN
        quantized = {k: quantize(v, bits) for k, v in flat.items()}
        stream = (
            np.concatenate(
                [
                    np.unpackbits(q.codes.astype(">u2").view(np.uint8))
                    .reshape(-1, 16)[:, 16 - bits :]
                    .reshape(-1)
                    for q in quantized.values()
                ]
            )
            if quantized
            else np.zeros(0, np.uint8)
        )
        n_items = stream.size // bits
        n_packets = self.codewords(stream.size)
        padded = np.zeros(n_packets * info_bits, dtype=np.uint8)
        padded[: stream.size] = stream
        tx = torch.from_numpy(padded.reshape(n_packets, info_bits).astype(np.float32))
        with torch.no_grad():
            codewords = self._encoder(self._crc(tx))
            symbols = self._mapper(codewords).numpy()
            n0 = 10.0 ** (-snr_db / 10.0)
            h = self.channel.gains(n_packets if self.channel.block == "packet" else 1, self.rng)
            h_hat = self.channel.estimate(h, snr_db, self.rng)
            if h.size == 1:
                h, h_hat = np.repeat(h, n_packets), np.repeat(h_hat, n_packets)
            noise = (
                self.rng.standard_normal(symbols.shape)
                + 1j * self.rng.standard_normal(symbols.shape)
            ) * math.sqrt(n0 / 2.0)
            z = (h[:, None] * symbols + noise) / h_hat[:, None]
            no_eff = torch.from_numpy((n0 / np.abs(h_hat) ** 2).astype(np.float32))[:, None]
            llr = self._demapper(torch.from_numpy(z.astype(np.complex64)), no_eff)
            decoded, crc_ok = self._crc_check(self._decoder(llr))
        rx = decoded.numpy().astype(np.uint8).reshape(-1)[: n_items * bits]
        lost = ~crc_ok.numpy().reshape(-1).astype(bool)
        erased = erased_items(lost, n_items, bits, info_bits)
        bit_errors = int((decoded.numpy().astype(np.uint8) != tx.numpy().astype(np.uint8)).sum())
        codes_all = bits_to_codes(rx, bits)
        offset = 0
        for name, q in quantized.items():
            count = q.codes.size
            values = dequantize(codes_all[offset : offset + count], q.lo, q.hi, bits)
            values = self._fill(name, values, erased[offset : offset + count])
            self._previous[name] = values.copy()
            out[name] = torch.from_numpy(values).reshape(noisy[name].shape)
            offset += count
        control = {k: v for k, v in tensors.items() if k in protected}
        for name, tensor in control.items():
            out[name] = tensor.detach().clone()
        control_bits, control_symbols = control_cost(control, len(flat), self.bits_per_symbol)
        data_symbols = n_packets * (self.n // self.bits_per_symbol)
        symbols_total = data_symbols + control_symbols
        airtime = symbols_total / self.config.bandwidth_hz
        payload_bits = n_items * bits + 32 * sum(v.numel() for v in control.values())
        out = {k: out[k] for k in tensors}
        return out, LinkReport(
            scheme="coded",
            snr_db=snr_db,
            params=sum(v.numel() for v in tensors.values()),
            payload_bits=payload_bits,
            airtime_s=airtime,
            shannon_airtime_s=shannon_airtime(payload_bits, snr_db, self.config.bandwidth_hz),
            energy_j=airtime * self.config.tx_power_w,
            symbols=symbols_total,
            packets=n_packets,
            erasures=int(lost.sum()),
            erased_params=int(erased.sum()),
            measured_ber=bit_errors / (n_packets * info_bits),
            extra={
                "modulation": self.config.modulation,
                "code_rate": self.k / self.n,
                "codeword_bits": self.n,
                "quant_bits": bits,
                "control_bits": control_bits,
                "control_symbols": control_symbols,
                "measured_ber_is": "post-decoding information bits",
            },
        )
