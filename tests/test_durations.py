import pytest

from vaultlayer.durations import parse_duration, parse_interval


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20.0), ("1.5s", 1.5), ("5m", 300.0), ("2h", 7200.0), (" 30s ", 30.0), ("0.5m", 30.0)],
)
def test_parse_duration_accepts_number_with_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "s", "5 minutes", "-5s", "5d", "1e3s", "5ms"])
def test_parse_duration_rejects_anything_without_a_plain_unit(text):
    with pytest.raises(ValueError) as err:
        parse_duration(text)
    assert repr(text) in str(err.value)
    assert "'5m'" in str(err.value)  # names the accepted forms


@pytest.mark.parametrize("text", ["0s", "0.0m", "0h"])
def test_parse_duration_rejects_zero(text):
    with pytest.raises(ValueError, match="longer than zero"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "interval"),
    [("50", ("steps", 50)), ("1", ("steps", 1)), ("30s", ("seconds", 30.0)), ("5m", ("seconds", 300.0))],
)
def test_parse_interval_tells_steps_from_durations(text, interval):
    assert parse_interval(text) == interval


@pytest.mark.parametrize(("text", "hint"), [("0", "positive"), ("-5", "positive"), ("0s", "longer than zero")])
def test_parse_interval_rejects_zero_and_negative(text, hint):
    with pytest.raises(ValueError, match=hint) as err:
        parse_interval(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("text", ["abc", "1.5", "", "50 steps", "5x"])
def test_parse_interval_rejects_garbage_and_names_the_fix(text):
    with pytest.raises(ValueError) as err:
        parse_interval(text)
    message = str(err.value)
    assert repr(text) in message
    assert "'50'" in message and "'5m'" in message
