"""The one list of drop reasons (bpf/reasons.h) and what is derived from it."""

import re

import pytest

from xlat.media import nft, reasons
from xlat.media.reasons import ReasonsError
from xlat.media.userspace import DropReason


def test_the_list_reads_with_forwarded_first_and_each_datapath_its_own_reasons() -> None:
    ebpf = [r.name for r in reasons.counted_by("ebpf")]
    assert ebpf[0] == "forwarded"
    assert {"no_flow", "fragment", "rewrite_fail", "fib_fail"} <= set(ebpf)
    assert "unallocated" not in ebpf  # not a slot of the kernel counters
    assert {r.value for r in DropReason} == {r.name for r in reasons.counted_by("userspace")}
    assert {r.name for r in reasons.counted_by("nft")} == {"unallocated", "sip_rate_limited",
                                                             "sip_strangers_limited"}
    assert len({r.name for r in reasons.ALL}) == len(reasons.ALL)


def test_the_ebpf_verdict_drops_exactly_the_drop_column() -> None:
    drops = {r.name for r in reasons.counted_by("ebpf") if r.ebpf == "drop"}
    assert drops == {"no_peer", "strict_mismatch", "rate_limited", "rewrite_fail"}
    assert all(r.action("userspace") == "drop" for r in reasons.counted_by("userspace"))


def test_the_nft_column_names_the_rulesets_drop_counters() -> None:
    ruleset = nft.RULESET.read_text()
    declared = set(re.findall(r"^\s*counter (\w+) \{", ruleset, re.M))
    assert declared == set(nft.NAMED_COUNTERS)
    assert set(nft.DROP_COUNTERS) == {r.name for r in reasons.counted_by("nft")}


def test_a_meaning_leads_with_the_ebpf_action_else_the_others() -> None:
    meanings = reasons.meanings()
    assert meanings["expired"] == "(stack) flow idle for longer than its idle timeout"
    assert meanings["send_failed"].startswith("(drop) ")
    assert set(meanings) == {r.name for r in reasons.ALL}


@pytest.mark.parametrize("text, says", [
    ('X(NOT_UDP, stack, none, none, "x")', "FORWARDED must be the first"),
    ('X(FORWARDED, sent, none, none, "x")\nX(GSO, stak, none, none, "x")', "not one of"),
    ('X(FORWARDED, sent, none, none, "x")\nX(GSO, stack, none, "x")', r"is not X\(NAME"),
])
def test_a_list_that_does_not_read_is_a_typed_error(text: str, says: str) -> None:
    with pytest.raises(ReasonsError, match=says):
        reasons.parse(text)
