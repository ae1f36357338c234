"""The executable service's journal line: text from outside stays one printable value."""

from hypothesis import given
from hypothesis import strategies as st

from qconnect.service.execservice import journal_entry


@given(
    message=st.text(),
    values=st.dictionaries(st.sampled_from(["caller", "port", "outcome", "reason"]), st.text()),
)
def test_every_value_is_one_printable_line(message: str, values: dict[str, str]) -> None:
    entry = journal_entry(message, values)
    assert set(entry) == {"MESSAGE", "SYSLOG_IDENTIFIER"} | {
        f"QCONNECT_{key.upper()}" for key in values
    }
    assert all(value.isprintable() for value in entry.values())


def test_a_forged_field_in_a_value_is_shown_not_sent() -> None:
    entry = journal_entry("refused\nPRIORITY=0", {"reason": "x\nQCONNECT_CALLER=dom0"})
    assert entry["MESSAGE"] == "refused\\nPRIORITY=0"
    assert entry["QCONNECT_REASON"] == "x\\nQCONNECT_CALLER=dom0"
