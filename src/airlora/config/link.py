"""The downlink: channel, SNR process, scheme, quantiser, packets, deadline."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from airlora.config.base import ConfigBase


class LinkConfig(ConfigBase):
    """The downlink from cloud to edge (design section 2). SNRs are Es/N0 in dB.

    Parameters
    ----------
    scheme:
        ``perfect`` (bit-exact, Shannon airtime), ``analog`` (power-normalised parameters sent
        uncoded, two per complex symbol), ``digital`` (quantise, packetise with CRC, Gray QAM,
        hard decisions), ``coded`` (``digital`` with 5G NR LDPC from Sionna; extra
        ``airlora[sionna]``), or ``shannon`` (the online formulation's capacity cost against a
        slot, :class:`~airlora.config.OnlineSettings`). Default ``perfect``.
    snr_db:
        The SNR when ``snr_process`` is ``fixed``, and the mean of ``gauss_markov``. Default 10.
    snr_process:
        ``fixed``; ``uniform`` over [snr_low_db, snr_high_db]; ``gauss_markov`` around
        ``snr_db`` with ``snr_std_db`` and correlation ``snr_rho``; ``trace`` from ``snr_trace``.
    channel:
        ``awgn``, ``rayleigh`` or ``rician`` (``rician_k``) block fading, a gain per
        ``fading_block`` (``packet`` or ``round``), with ``csi`` ``perfect`` or ``estimated``
        (least squares from one pilot per block at ``pilot_snr_db``, default the data SNR).
    modulation:
        ``bpsk``, ``qpsk``, ``16qam``, ``64qam``, or ``adaptive`` (the most bits per symbol
        whose theoretical BER at the SNR meets ``target_ber``). Default ``qpsk``.
    quant_bits:
        Bits per parameter of the per-tensor uniform quantiser, 2..16. Default 8.
    packet_bits:
        Data bits per packet (multiple of 8, at least 64); each packet adds a 32-bit CRC.
        Default 8192.
    crc_check:
        Drop packets whose CRC fails (erasures). False keeps them, bit errors and all, as a
        receiver without error detection would. Default true.
    arq_retries:
        Retransmissions allowed per lost packet (0: no ARQ; needs ``crc_check``). Default 0.
    erasure_fill:
        What the receiver puts in place of lost parameters: ``zero``, or ``previous`` (the
        last value it received for that tensor, when the shape still matches; else zero).
    analog_block_symbols:
        Symbols per fading block of the analog scheme when ``fading_block`` is ``packet``.
    protect_head:
        Send the task head (and quantiser ranges, power scales) as protected control data:
        delivered intact, airtime counted at the data modulation with a rate-1/2 code.
        Default true.
    deadline_s:
        Per-round airtime budget; what does not fit is not delivered. Default none.
    bandwidth_hz:
        Channel bandwidth; one complex symbol per second per Hz. Default 1 MHz.
    tx_power_w:
        Transmit power for the energy figure. Default 0.1 W.
    fast_path:
        Draw bit errors directly where that is exact (Gray BPSK/QPSK on AWGN). Default true.
    code_rate:
        LDPC code rate of the ``coded`` scheme. Default 0.5.
    bits_per_param:
        Bits per parameter of the ``perfect`` scheme (float32). Default 32.
    """

    scheme: Literal["perfect", "analog", "digital", "coded", "shannon"] = "perfect"
    snr_db: float = 10.0
    snr_process: Literal["fixed", "uniform", "gauss_markov", "trace"] = "fixed"
    snr_low_db: float = 0.0
    snr_high_db: float = 20.0
    snr_std_db: float = Field(default=3.0, ge=0)
    snr_rho: float = Field(default=0.9, gt=-1, lt=1)
    snr_trace: Path | None = None
    channel: Literal["awgn", "rayleigh", "rician"] = "awgn"
    rician_k: float = Field(default=4.0, ge=0)
    fading_block: Literal["packet", "round"] = "packet"
    csi: Literal["perfect", "estimated"] = "perfect"
    pilot_snr_db: float | None = None
    modulation: Literal["bpsk", "qpsk", "16qam", "64qam", "adaptive"] = "qpsk"
    target_ber: float = Field(default=1e-3, gt=0, lt=0.5)
    quant_bits: int = Field(default=8, ge=2, le=16)
    packet_bits: int = Field(default=8192, ge=64, multiple_of=8)
    crc_check: bool = True
    arq_retries: int = Field(default=0, ge=0, le=16)
    erasure_fill: Literal["zero", "previous"] = "zero"
    analog_block_symbols: int = Field(default=4096, ge=1)
    protect_head: bool = True
    deadline_s: float | None = Field(default=None, gt=0)
    bandwidth_hz: float = Field(default=1e6, gt=0)
    tx_power_w: float = Field(default=0.1, gt=0)
    fast_path: bool = True
    code_rate: float = Field(default=0.5, gt=0.05, lt=0.95)
    bits_per_param: int = Field(default=32, ge=1, le=64)

    @classmethod
    def implied(cls, given: dict) -> dict:
        """An ``snr_db`` given without an ``snr_process`` means a fixed SNR: otherwise the
        uniform process that policy runs default to would silently ignore it."""
        if "snr_db" in given and "snr_process" not in given:
            return {**given, "snr_process": "fixed"}
        return given

    @field_validator("modulation", mode="before")
    @classmethod
    def _known_modulation(cls, v: object) -> object:
        if isinstance(v, str):
            key = v.lower().replace("-", "")
            known = ("bpsk", "qpsk", "16qam", "64qam", "adaptive")
            if key not in known:
                raise ValueError(f"unknown modulation '{v}'; choose one of {list(known)}")
            return key
        return v

    @model_validator(mode="after")
    def _process_inputs(self) -> LinkConfig:
        if self.snr_process == "trace" and self.snr_trace is None:
            raise ValueError("snr_process 'trace' needs snr_trace (a CSV of dB values)")
        if self.snr_process == "uniform" and self.snr_high_db < self.snr_low_db:
            raise ValueError(f"empty SNR range [{self.snr_low_db}, {self.snr_high_db}]")
        return self
