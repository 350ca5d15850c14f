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
        (units.parse_duration_s, float("nan"), "must be >= 0"),
    ],
)
def test_bad_units_say_how_to_fix(fn, bad, hint):
    with pytest.raises(units.UnitError, match=hint):
        fn(bad)
