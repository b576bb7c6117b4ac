import io
import json
import logging
from pathlib import Path

import pytest

from xlat import logs


def record(msg: str, level: int = logging.INFO, created: float = 1000.0,
           **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("xlat.test", level, __file__, 1, msg, (), None)
    r.created = created
    r.__dict__.update(extra)
    return r


def test_priorities_follow_sd_daemon() -> None:
    assert [logs.priority(lv) for lv in (10, 20, 25, 30, 40, 50)] == [7, 6, 6, 4, 3, 2]


def test_journal_text_has_a_priority_and_no_timestamp() -> None:
    r = record("bad route", logging.ERROR, call_id="abc@h", session="0123")
    assert logs.TextFormatter(journal=True).format(r) == \
        "<3>ERROR xlat.test: bad route call-id=abc@h session=0123"
    plain = logs.TextFormatter(journal=False).format(record("x"))
    assert plain.endswith(" INFO xlat.test: x") and plain[:4].isdigit()


def test_json_is_one_object_per_line() -> None:
    r = record("ended", call_id="c1", session="s1", call={"reason": "idle"})
    obj = json.loads(logs.JsonFormatter(journal=False).format(r))
    assert obj == {"time": obj["time"], "level": "info", "logger": "xlat.test",
                   "message": "ended", "call_id": "c1", "session": "s1",
                   "call": {"reason": "idle"}}
    assert logs.JsonFormatter(journal=True).format(record("x")).startswith('<6>{"level"')


def test_call_context_reaches_every_record_inside() -> None:
    f = logs.CallFilter()
    with logs.call_context("c9", "s9"):
        inside = record("x")
        f.filter(inside)
    outside = record("y")
    f.filter(outside)
    assert (inside.call_id, inside.session) == ("c9", "s9")
    assert (outside.call_id, outside.session) == (None, None)


def test_summarized_records_pass_once_per_window() -> None:
    f = logs.SummaryFilter(window=10.0)
    kind = logs.summarized("malformed SIP")
    passed = [f.filter(record("junk", created=1000.0 + i, **kind)) for i in range(5)]
    assert passed == [True, False, False, False, False]
    assert f.filter(record("other")) is True  # records of no kind are never held
    late = record("junk from %s", created=1011.0, **kind)
    late.args = ("192.0.2.1",)
    assert f.filter(late) is True
    assert late.getMessage() == "junk from 192.0.2.1 (and 4 more malformed SIP in the 11 s " \
        "before)"


def test_under_journal_compares_the_stream_itself(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    f = (tmp_path / "log").open("w")
    st = Path(f.name).stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.under_journal(f)
    assert not logs.under_journal((tmp_path / "other").open("w"))
    assert not logs.under_journal(io.StringIO())
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.under_journal(f)


def test_set_level_refuses_unknown_names() -> None:
    old = logs.level()
    try:
        assert logs.set_level("error") == old
        assert logs.level() == "error"
        with pytest.raises(ValueError, match="log level must be"):
            logs.set_level("ck")
    finally:
        logging.getLogger().setLevel(old.upper())
