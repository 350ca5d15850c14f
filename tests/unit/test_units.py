import pytest

from testbed import units


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100Mbit", 1e8),
        ("1Gbit", 1e9),
        ("2.5 Gbit", 2.5e9),
        ("64kbit", 64e3),
        ("10Mbps", 1e7),
        ("12.5MB/s", 1e8),
        (1000, 1000.0),
        ("0.5gbit", 5e8),
    ],
)
def test_rates(text, bps):
    assert units.parse_rate_bps(text) == pytest.approx(bps)


@pytest.mark.parametrize(
    ("text", "s"),
    [("20ms", 0.02), ("1.5s", 1.5), ("250us", 250e-6), ("2min", 120), (0.1, 0.1), ("0ms", 0.0)],
)
def test_durations(text, s):
    assert units.parse_duration_s(text) == pytest.approx(s)


@pytest.mark.parametrize(
    ("text", "n"),
    [("16GiB", 16 * 2**30), ("512MB", 512e6), ("1.5KiB", 1536), (4096, 4096), ("100", 100)],
)
def test_sizes(text, n):
    assert units.parse_size_bytes(text) == int(n)


def test_compute_and_bandwidth():
    assert units.parse_flops("19.5TFLOPS") == pytest.approx(19.5e12)
    assert units.parse_bandwidth_Bps("936GB/s") == pytest.approx(936e9)
    assert units.parse_percent("0.1%") == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("fn", "bad", "hint"),
    [
        (units.parse_rate_bps, "fast", "100Mbit"),
        (units.parse_rate_bps, "10 furlongs", "unknown rate unit"),
        (units.parse_rate_bps, -5, ">= 0"),
        (units.parse_duration_s, "20", "no unit"),
        (units.parse_duration_s, "20 parsecs", "unknown time unit"),
        (units.parse_size_bytes, "16G", "ambiguous"),
        (units.parse_size_bytes, "lots", "16GiB"),
        (units.parse_percent, "150%", "between 0% and 100%"),
        (units.parse_rate_bps, True, "not a rate"),
        (units.parse_duration_s, float("nan"), "must be finite and >= 0"),
        (units.parse_rate_bps, float("inf"), "must be finite"),
        (units.parse_size_bytes, "512Mb", "in bits"),
        (units.parse_size_bytes, "1Gbit", "in bits"),
    ],
)
def test_bad_units_say_how_to_fix(fn, bad, hint):
    with pytest.raises(units.UnitError, match=hint):
        fn(bad)


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        # lower-case b: bits
        ("10Mbps", 10e6),
        ("10Mb/s", 10e6),
        ("10Mbit", 10e6),
        ("10mbit", 10e6),
        ("1Gbps", 1e9),
        # upper-case B: bytes (x 8)
        ("10MBps", 80e6),
        ("10MB/s", 80e6),
        ("1GBps", 8e9),
        ("1KiB/s", 8 * 1024),
        ("2kBps", 16e3),
    ],
)
def test_rate_bits_and_bytes_are_told_apart(text, bps):
    """'10MBps' is ten megabytes per second (80 Mbit/s), not ten megabits (issue 10)."""
    assert units.parse_rate_bps(text) == pytest.approx(bps)


def test_memory_bandwidth_bits_and_bytes():
    assert units.parse_bandwidth_Bps("100GB/s") == pytest.approx(100e9)
    assert units.parse_bandwidth_Bps("100GBps") == pytest.approx(100e9)
    assert units.parse_bandwidth_Bps("800Gb/s") == pytest.approx(100e9)  # bits / 8


def test_sizes_are_bytes():
    assert units.parse_size_bytes("512MB") == 512_000_000
    assert units.parse_size_bytes("1kB") == 1000
    with pytest.raises(units.UnitError, match=r"write e\.g\. 512MB"):
        units.parse_size_bytes("512Mb")


def test_huge_bad_values_are_shown_short():
    with pytest.raises(units.UnitError) as info:
        units.parse_rate_bps("x" * 1_000_000)
    assert len(str(info.value)) < 200
