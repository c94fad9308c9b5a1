"""The link model against theory, against Sionna, and against hand counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from typer.testing import CliRunner

from airlora.cli import app
from airlora.config import LinkConfig
from airlora.link import WirelessLink, build_link, build_snr_process
from airlora.link.channel import GaussMarkovSNR, TraceSNR, UniformSNR
from airlora.link.crc import CRC32_POLY, CRC_BITS, crc32_bits, detect_corrupted
from airlora.link.digital import PacketChannel, bytes_to_packets
from airlora.link.modulation import Modulation, bpsk_rayleigh_ber, pick_modulation
from airlora.link.quantization import bits_to_codes, codes_to_bits, dequantize, quantize
from airlora.link.simulate import simulate_ber

MODS = ["bpsk", "qpsk", "16qam", "64qam"]


def snr_for_ber(mod: str, target: float) -> float:
    m = Modulation(mod)
    return brentq(lambda s: float(m.ber_awgn(s)) - target, -20, 40)


# ----------------------------------------------------------------------------- modulation


@pytest.mark.parametrize("mod", MODS)
def test_constellation_has_unit_energy_and_gray_neighbours(mod):
    m = Modulation(mod)
    k = m.bits_per_symbol
    labels = np.arange(2**k)
    bits = ((labels[:, None] >> np.arange(k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    points = m.modulate(bits)
    assert np.isclose(np.mean(np.abs(points) ** 2), 1.0, atol=1e-6)
    np.testing.assert_array_equal(m.demodulate(points), bits)
    # Gray: nearest neighbours differ in exactly one bit
    d = np.abs(points[:, None] - points[None, :])
    np.fill_diagonal(d, np.inf)
    nearest = d.min(axis=1)
    for i in range(2**k):
        for j in np.flatnonzero(np.isclose(d[i], nearest[i])):
            assert bin(int(labels[i]) ^ int(labels[j])).count("1") == 1


def test_theory_matches_textbook_closed_forms():
    g = 10 ** (np.array([0.0, 4.0, 8.0]) / 10)
    q = lambda x: 0.5 * math.erfc(x / math.sqrt(2))  # noqa: E731
    bpsk = [q(math.sqrt(2 * s)) for s in g]
    qpsk = [q(math.sqrt(s)) for s in g]
    np.testing.assert_allclose(Modulation("bpsk").ber_awgn([0, 4, 8]), bpsk, rtol=1e-12)
    np.testing.assert_allclose(Modulation("qpsk").ber_awgn([0, 4, 8]), qpsk, rtol=1e-12)
    # 16-QAM, Gray, exact (Cho & Yoon): (1/4)[3Q(a) + 2Q(3a) - Q(5a)], a = sqrt(Es/(5 N0))
    qam16 = [
        0.25 * (3 * q(math.sqrt(s / 5)) + 2 * q(3 * math.sqrt(s / 5)) - q(5 * math.sqrt(s / 5)))
        for s in g
    ]
    np.testing.assert_allclose(Modulation("16qam").ber_awgn([0, 4, 8]), qam16, rtol=1e-10)
    np.testing.assert_allclose(
        Modulation("bpsk").ber_rayleigh([0.0, 10.0, 20.0]),
        bpsk_rayleigh_ber(np.array([0.0, 10.0, 20.0])),
        rtol=1e-6,
    )


@pytest.mark.parametrize("mod", MODS)
def test_measured_ber_within_5_percent_of_exact_on_awgn(mod):
    """Es/N0 throughout. Symbol-level chain, fixed seeds, >= 10^6 bits per point."""
    for i, target in enumerate((5e-2, 1e-2, 2e-3)):
        snr = snr_for_ber(mod, target)
        n_bits = 1_000_000 if target >= 1e-2 else 4_000_000
        r = simulate_ber(mod, snr, n_bits, seed=10 + i)
        assert 1e-4 <= r["theory_ber"] <= 1e-1
        assert r["relative_error"] < 0.05, r


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
def test_bpsk_rayleigh_matches_closed_form(snr):
    r = simulate_ber("bpsk", snr, 2_000_000, channel="rayleigh", seed=3)
    expected = float(bpsk_rayleigh_ber(snr))
    assert abs(r["measured_ber"] - expected) / expected < 0.05


def test_rician_approaches_awgn_for_large_k():
    m = Modulation("qpsk")
    assert m.ber_rayleigh(10.0, rician_k=0.0) > m.ber_rayleigh(10.0, rician_k=5.0)
    assert m.ber_rayleigh(10.0, rician_k=1e4) == pytest.approx(float(m.ber_awgn(10.0)), rel=0.01)


@pytest.mark.parametrize("mod, snr", [("qpsk", 6.0), ("16qam", 12.0), ("bpsk", 4.0)])
def test_same_ber_as_sionna_chain(mod, snr):
    from sionna.phy.channel import AWGN
    from sionna.phy.mapping import Demapper, Mapper

    k = Modulation(mod).bits_per_symbol
    n_bits = 1_200_000 // k * k
    torch.manual_seed(0)
    bits = torch.randint(0, 2, (n_bits,)).float()
    n0 = torch.tensor(10 ** (-snr / 10))
    ctype = "pam" if mod == "bpsk" else "qam"
    with torch.no_grad():
        y = AWGN()(Mapper(ctype, k)(bits), n0)
        if mod == "bpsk":  # Sionna's PAM is real-valued; the noise is complex
            y = y.real.to(torch.complex64)
            y = y  # the imaginary noise does not matter for BPSK decisions
        rx = Demapper("maxlog", ctype, k, hard_out=True)(y, n0)
    sionna_ber = float((rx != bits).float().mean())
    ours = simulate_ber(mod, snr, n_bits, seed=5)["measured_ber"]
    sigma = math.sqrt(sionna_ber * (1 - sionna_ber) / n_bits * 2)
    assert abs(ours - sionna_ber) < 4 * sigma, (ours, sionna_ber)


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("mod", ["bpsk", "qpsk"])
def test_fast_path_matches_symbol_level_chain(mod):
    """Same BER and the same packet error rate (errors independent across bits)."""
    snr = snr_for_ber(mod, 2e-3)
    rng = np.random.default_rng(0)
    tx = rng.integers(0, 256, (4000, 64), dtype=np.uint8)  # 4000 packets of 512 bits
    results = {}
    for fast in (True, False):
        link = PacketChannel(Modulation(mod), LinkConfig_channel(), 512, fast_path=fast)
        assert link.uses_fast_path is fast
        errors = link._errors(tx, snr, np.random.default_rng(1 if fast else 2))
        per_packet = np.bincount(errors // link.frame_bits, minlength=4000)
        results[fast] = (errors.size / (4000 * link.frame_bits), np.mean(per_packet > 0))
    (ber_f, per_f), (ber_s, per_s) = results[True], results[False]
    assert abs(ber_f - ber_s) / ber_s < 0.06
    p_packet = 1 - (1 - Modulation(mod).ber_awgn(snr)) ** (512 + 32)
    for per in (per_f, per_s):
        assert abs(per - p_packet) < 4 * math.sqrt(p_packet * (1 - p_packet) / 4000)


def LinkConfig_channel():
    from airlora.link.channel import ChannelModel

    return ChannelModel("awgn")


# ----------------------------------------------------------------------------- CRC


def test_crc_syndromes_agree_with_a_bit_serial_crc():
    rng = np.random.default_rng(0)
    data_bits = 64
    disagreements = 0
    for _ in range(400):
        data = rng.integers(0, 2, data_bits, dtype=np.uint8)
        crc = crc32_bits(data)
        crc_field = np.array([(crc >> (31 - j)) & 1 for j in range(32)], dtype=np.uint8)
        error = np.zeros(data_bits + CRC_BITS, dtype=np.uint8)
        error[rng.choice(data_bits + CRC_BITS, rng.integers(0, 5), replace=False)] = 1
        received = np.r_[data, crc_field] ^ error
        received_crc = int("".join(map(str, received[data_bits:])), 2)
        truth = crc32_bits(received[:data_bits]) != received_crc
        flagged = detect_corrupted(np.flatnonzero(error), 1, data_bits)[0]
        disagreements += truth != flagged
    assert disagreements == 0


def _bits_of(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))  # MSB first


def test_crc_has_the_published_check_value():
    """CRC-32 with the IEEE 802.3 generator, MSB first, init 0: CRC-32/POSIX (cksum) before
    its final inversion. The catalogue's check value of "123456789" is 0x765E7680, so the
    register must read 0x765E7680 ^ 0xFFFFFFFF."""
    assert crc32_bits(_bits_of(b"123456789")) ^ 0xFFFFFFFF == 0x765E7680
    assert crc32_bits(_bits_of(b"")) == 0


def _generator_multiple(rng: np.random.Generator, length: int) -> np.ndarray:
    """A random multiple of the generator g(x) (degree 32) as a bit pattern of ``length``."""
    g = np.array([1, *[(CRC32_POLY >> (31 - j)) & 1 for j in range(32)]], dtype=np.uint8)
    m = rng.integers(0, 2, length - 32, dtype=np.uint8)
    m[rng.integers(0, m.size)] = 1  # not the zero multiple
    product = np.zeros(length, dtype=np.uint8)
    for i in np.flatnonzero(m):  # polynomial product over GF(2)
        product[i : i + 33] ^= g
    return product


def test_error_patterns_that_are_multiples_of_the_generator_go_undetected():
    """A real CRC cannot see an error that is a multiple of its generator: the check must
    pass (no erasure), exactly as the bit-serial CRC of the received packet says."""
    rng = np.random.default_rng(3)
    data_bits = 64
    for _ in range(50):
        error = _generator_multiple(rng, data_bits + CRC_BITS)
        assert error.sum() > 4  # many flipped bits, yet invisible to the CRC
        data = rng.integers(0, 2, data_bits, dtype=np.uint8)
        crc = crc32_bits(data)
        sent = np.r_[data, [(crc >> (31 - j)) & 1 for j in range(32)]].astype(np.uint8)
        received = sent ^ error
        received_crc = int("".join(map(str, received[data_bits:])), 2)
        assert crc32_bits(received[:data_bits]) == received_crc  # the truth: undetectable
        assert not detect_corrupted(np.flatnonzero(error), 1, data_bits)[0]
        # One more flipped bit is always seen (g has more than one term).
        extra = error.copy()
        extra[rng.integers(0, extra.size)] ^= 1
        assert detect_corrupted(np.flatnonzero(extra), 1, data_bits)[0]


def test_crc_agrees_with_the_bit_serial_crc_on_heavy_error_patterns():
    """Up to 40 flipped bits per 96-bit packet, across several packets at once."""
    rng = np.random.default_rng(4)
    data_bits, n_packets = 64, 30
    length = data_bits + CRC_BITS
    for _ in range(20):
        errors, truth = [], []
        for k in range(n_packets):
            error = np.zeros(length, dtype=np.uint8)
            error[rng.choice(length, rng.integers(0, 41), replace=False)] = 1
            if k % 7 == 3:
                error = _generator_multiple(rng, length)
            data = rng.integers(0, 2, data_bits, dtype=np.uint8)
            crc = crc32_bits(data)
            sent = np.r_[data, [(crc >> (31 - j)) & 1 for j in range(32)]].astype(np.uint8)
            received = sent ^ error
            received_crc = int("".join(map(str, received[data_bits:])), 2)
            truth.append(crc32_bits(received[:data_bits]) != received_crc)
            errors.append(np.flatnonzero(error) + k * length)
        flagged = detect_corrupted(np.concatenate(errors), n_packets, data_bits)
        assert flagged.tolist() == truth
        assert not all(truth)  # the generator multiples are in there, and pass


# ----------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("bits", [2, 3, 8, 11, 16])
def test_quantiser_round_trip_and_range(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(5000) * 3).astype(np.float32)
    q = quantize(x, bits)
    stream = codes_to_bits(q.codes, bits)
    assert stream.size == 5000 * bits
    np.testing.assert_array_equal(bits_to_codes(stream, bits), q.codes)
    y = dequantize(q.codes, q.lo, q.hi, bits)
    step = (q.hi - q.lo) / (2**bits - 1)
    assert np.abs(y - x).max() <= step * 0.51 + 1e-5  # float32 rounding
    # corrupted codes (any bit pattern) still land inside the tensor's range
    garbage = rng.integers(0, 2**16, 5000).astype(np.uint16 if bits > 8 else np.uint8)
    z = dequantize(garbage, q.lo, q.hi, bits)
    assert z.min() >= q.lo - 1e-6 and z.max() <= q.hi + 1e-6


def test_quantiser_rejects_bad_bits():
    with pytest.raises(ValueError, match=r"2\.\.16"):
        quantize(np.zeros(3, np.float32), 1)


# ----------------------------------------------------------------------------- the link


def tensors(n: int = 100_000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g) * 0.05, "head.w": torch.randn(4, 8, generator=g)}


def test_analog_error_power_is_signal_power_over_snr():
    for snr in (0.0, 10.0, 20.0):
        link = WirelessLink(LinkConfig(scheme="analog"), seed=1)
        t = {"w": torch.randn(1_000_000) * 0.05}
        out, _ = link.transmit(t, snr)
        ratio = float(((out["w"] - t["w"]) ** 2).mean() / (t["w"] ** 2).mean())
        assert ratio == pytest.approx(10 ** (-snr / 10), rel=0.02)


def test_accounting_matches_a_hand_count():
    cfg = LinkConfig(
        scheme="digital",
        modulation="16qam",
        quant_bits=8,
        packet_bits=1024,
        bandwidth_hz=2e5,
        tx_power_w=0.5,
    )
    link = WirelessLink(cfg, seed=0)
    t = {"a": torch.randn(300), "b": torch.randn(50), "head": torch.randn(10)}
    _, r = link.transmit(t, 30.0, protected=["head"])
    # 350 parameters x 8 bits = 2800 bits -> 3 packets of 1024 data bits
    assert r.packets == 3
    # each packet: 1024 + 32 CRC = 1056 bits = 264 16-QAM symbols
    data_symbols = 3 * 264
    # control: head 10 x 32 bits + 2 tensors x 64 bits of quantiser range, rate 1/2, 4 bits/sym
    control_bits = 10 * 32 + 2 * 64
    control_symbols = math.ceil(control_bits * 2 / 4)
    assert r.extra["control_bits"] == control_bits
    assert r.symbols == data_symbols + control_symbols
    assert r.airtime_s == pytest.approx(r.symbols / 2e5)
    assert r.energy_j == pytest.approx(0.5 * r.airtime_s)
    assert r.payload_bits == 2800 + 320
    assert r.params == 360
    assert r.shannon_airtime_s == pytest.approx(3120 / (2e5 * math.log2(1 + 1000)))


@pytest.mark.parametrize("scheme", ["analog", "digital"])
@pytest.mark.parametrize("snr", [-10.0, 40.0])
@pytest.mark.parametrize("channel", ["awgn", "rayleigh"])
def test_extreme_snr_gives_finite_values(scheme, snr, channel):
    link = WirelessLink(LinkConfig(scheme=scheme, channel=channel, crc_check=False), seed=0)
    t = tensors(20_000)
    out, r = link.transmit(t, snr, protected=["head.w"])
    assert all(torch.isfinite(v).all() for v in out.values())
    assert math.isfinite(r.airtime_s) and math.isfinite(r.shannon_airtime_s)
    if scheme == "digital":
        assert out["w"].min() >= t["w"].min() - 1e-6 and out["w"].max() <= t["w"].max() + 1e-6
    if snr == 40.0 and channel == "awgn":
        assert float((out["w"] - t["w"]).abs().max()) < 0.01
    torch.testing.assert_close(out["head.w"], t["head.w"])  # protected: intact


def test_crc_erasures_zero_fill_and_previous_fill():
    t = tensors(50_000)
    zero = WirelessLink(LinkConfig(scheme="digital", snr_db=0.0), seed=0)
    out, r = zero.transmit(t, 0.0)
    assert r.erasures == r.packets and r.erased_params == 50_000 + 32
    assert float(out["w"].abs().max()) == 0.0
    prev = WirelessLink(LinkConfig(scheme="digital", erasure_fill="previous"), seed=0)
    good, _ = prev.transmit(t, 40.0)
    again, r = prev.transmit(t, 0.0)
    assert r.erasures == r.packets
    torch.testing.assert_close(again["w"], good["w"])  # last good values kept


def test_arq_recovers_packets_and_counts_airtime():
    t = tensors(40_000)
    snr = snr_for_ber("qpsk", 2e-4)  # 1056-bit packets fail ~20 % of the time
    base = LinkConfig(scheme="digital", packet_bits=1024)
    _, plain = WirelessLink(base, seed=0).transmit(t, snr)
    _, arq = WirelessLink(base.model_copy(update={"arq_retries": 3}), seed=0).transmit(t, snr)
    assert plain.erasures > 0.1 * plain.packets
    assert arq.erasures < plain.erasures / 20
    assert arq.retransmissions >= plain.erasures * 0.8
    assert arq.symbols > plain.symbols


def test_deadline_drops_what_does_not_fit():
    t = {"w": torch.randn(10_000)}
    cfg = LinkConfig(scheme="digital", packet_bits=1024, deadline_s=0.01, bandwidth_hz=1e5)
    out, r = WirelessLink(cfg, seed=0).transmit(t, 30.0)
    # 1000 symbols fit: 1056/2 = 528 symbols per packet -> 1 packet of 1024 bits = 128 params
    assert r.erased_params == 10_000 - 128
    assert float(out["w"][128:].abs().max()) == 0.0


def test_estimated_csi_costs_errors():
    mod = Modulation("16qam")
    rng = np.random.default_rng(0)
    tx = rng.integers(0, 256, (800, 128), dtype=np.uint8)
    from airlora.link.channel import ChannelModel

    bers = {}
    for csi in ("perfect", "estimated"):
        link = PacketChannel(mod, ChannelModel("rayleigh", csi=csi, pilot_snr_db=5.0), 1024)
        bers[csi] = link._errors(tx, 20.0, np.random.default_rng(1)).size / (800 * 1056)
    assert bers["estimated"] > 1.5 * bers["perfect"]


def test_adaptive_modulation_climbs_with_snr():
    picks = [pick_modulation(s, 1e-3).name for s in (0, 11, 18, 25)]
    assert picks == ["bpsk", "qpsk", "16qam", "64qam"]
    link = WirelessLink(LinkConfig(scheme="digital", modulation="adaptive"), seed=0)
    _, r = link.transmit(tensors(1000), 25.0)
    assert r.extra["modulation"] == "64qam"


def test_unknown_modulation_is_refused():
    with pytest.raises(ValueError, match="unknown modulation '8psk'"):
        LinkConfig(modulation="8psk")
    with pytest.raises(ValueError, match="unknown modulation"):
        Modulation("8psk")


def test_link_is_reproducible_from_its_seed():
    t = tensors(10_000)
    a, _ = WirelessLink(LinkConfig(scheme="digital", crc_check=False), seed=4).transmit(t, 6.0)
    b, _ = WirelessLink(LinkConfig(scheme="digital", crc_check=False), seed=4).transmit(t, 6.0)
    torch.testing.assert_close(a["w"], b["w"])


def test_bytes_to_packets_pads_the_last_packet():
    packets = bytes_to_packets(np.arange(10, dtype=np.uint8), 64)
    assert packets.shape == (2, 8) and packets[1, 2:].sum() == 0


# ----------------------------------------------------------------------------- coded


def test_coded_scheme_waterfall():
    t = {"w": torch.randn(6000) * 0.05}
    cfg = LinkConfig(scheme="coded", packet_bits=1024, code_rate=0.5)
    _, low = build_link(cfg, seed=0).transmit(t, -3.0)
    out, high = build_link(cfg, seed=0).transmit(t, 4.0)
    assert low.erasures == low.packets
    assert high.erasures == 0
    assert float((out["w"] - t["w"]).abs().max()) < 0.05 * float(t["w"].abs().max())
    # uncoded QPSK at 4 dB loses every packet of that size
    _, uncoded = WirelessLink(LinkConfig(scheme="digital", packet_bits=1024), 0).transmit(t, 4.0)
    assert uncoded.erasures == uncoded.packets


# ----------------------------------------------------------------------------- SNR processes


def test_snr_processes_are_seeded_and_have_their_statistics():
    a = UniformSNR(0, 20, seed=1).take(2000)
    assert a.min() >= 0 and a.max() <= 20 and abs(a.mean() - 10) < 0.5
    np.testing.assert_array_equal(a, UniformSNR(0, 20, seed=1).take(2000))
    g = GaussMarkovSNR(10.0, 3.0, 0.9, seed=2).take(20000)
    assert abs(g.mean() - 10) < 0.4 and abs(g.std() - 3.0) < 0.2
    assert abs(np.corrcoef(g[:-1], g[1:])[0, 1] - 0.9) < 0.02
    cfg = LinkConfig(snr_process="gauss_markov", snr_db=5.0)
    np.testing.assert_array_equal(
        build_snr_process(cfg, 3).take(5), build_snr_process(cfg, 3).take(5)
    )


def test_trace_file_and_its_errors(tmp_path):
    good = tmp_path / "trace.csv"
    good.write_text("snr_db\n3.5\n-2\n10\n")
    assert TraceSNR(good).take(4).tolist() == [3.5, -2.0, 10.0, 3.5]
    bad = tmp_path / "bad.csv"
    bad.write_text("1.0\n\n2.0\n")
    with pytest.raises(ValueError, match=r"row 2: missing value"):
        TraceSNR(bad)
    bad.write_text("1.0\nfast\n")
    with pytest.raises(ValueError, match=r"row 2: 'fast' is not a number"):
        TraceSNR(bad)
    with pytest.raises(ValueError, match="needs snr_trace"):
        LinkConfig(snr_process="trace")


# ----------------------------------------------------------------------------- commands

runner = CliRunner()


def test_cli_link_simulate_json():
    result = runner.invoke(
        app,
        [
            "link",
            "simulate",
            "--modulation",
            "qpsk",
            "--snr-db",
            "6",
            "--n-bits",
            "200000",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"measured_ber", "theory_ber"} <= set(data)
    assert abs(data["measured_ber"] - data["theory_ber"]) / data["theory_ber"] < 0.1
    bad = runner.invoke(app, ["link", "simulate", "--modulation", "256qam"])
    assert bad.exit_code == 2 and "unknown modulation" in bad.output


def test_cli_link_plot_writes_png(tmp_path):
    out = tmp_path / "ber.png"
    result = runner.invoke(app, ["link", "plot", "--out", str(out), "--n-bits", "20000"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_link_format():
    from airlora.bench.link import bench_link

    r = bench_link(n_params=20_000, repeats=1)
    assert {"name", "unit", "project", "peer", "ratio", "details"} <= set(r)
    assert r["ratio"] == pytest.approx(r["project"] / r["peer"])
    assert r["details"]["naive_numpy_mbit_s"] > 0


def test_expected_delivery_matches_simulated_erasures():
    """The theory-based delivery share (used by the surrogate) against measured erasures."""
    from airlora.link import WirelessLink

    cfg = LinkConfig(
        scheme="digital", modulation="qpsk", packet_bits=1024, snr_db=9.0, deadline_s=0.03
    )
    link = WirelessLink(cfg, seed=3)
    rng = np.random.default_rng(0)
    sizes = [3000, 5000, 4000]
    tensors = {
        f"t{i}": torch.as_tensor(rng.uniform(0.5, 1.0, n).astype(np.float32))
        for i, n in enumerate(sizes)
    }
    delivered = np.zeros(3)
    runs = 40
    for _ in range(runs):
        received, _ = link.transmit(tensors, 9.0)
        for i, name in enumerate(tensors):
            delivered[i] += float((received[name] != 0).float().mean())
    expected = link.expected_delivery(sizes, 9.0)
    assert expected[0] > expected[1] > expected[2] >= 0.0  # the deadline cuts the tail
    assert np.allclose(delivered / runs, expected, atol=0.05)
