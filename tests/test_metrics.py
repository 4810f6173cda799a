"""Fleet health: `earlyfw status --json` (schema 1) and `--prometheus FILE`,
whose text is read back with prometheus_client's own parser (what a scraper
does), over generated status data and from a live table in a throwaway netns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from earlyfw import metrics
from earlyfw.policy import State
from tests.test_cli_netns import earlyfw, netns  # noqa: F401  (fixture)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


counter_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
documents = st.fixed_dictionaries(
    {
        "present": st.booleans(),
        "state": st.sampled_from([None, *(str(s) for s in State)]),
        "intact": st.booleans(),
        "counters": st.dictionaries(
            counter_names,
            st.fixed_dictionaries({"packets": st.integers(0, 2**53), "bytes": st.integers(0, 2**53)}),
            max_size=5,
        ),
        "warnings": st.lists(st.text(max_size=5), max_size=3),
        "last_handshake": st.one_of(st.none(), st.floats(0, 2e9)),
    }
)


@given(documents)
def test_every_status_parses_back_to_its_values(document: dict[str, Any]) -> None:
    now = 2e9 + 1
    got = samples(metrics.prometheus(document, now=now))
    assert got[("earlyfw_table_present", ())] == int(document["present"])
    assert got[("earlyfw_table_intact", ())] == int(document["intact"])
    for state in State:
        assert got[("earlyfw_state", (("state", str(state)),))] == int(document["state"] == str(state))
    for name, counter in document["counters"].items():
        # the parser drops the _total suffix from counter family names, not sample names
        assert got[("earlyfw_packets_total", (("counter", name),))] == float(counter["packets"])
        assert got[("earlyfw_bytes_total", (("counter", name),))] == float(counter["bytes"])
    age = got[("earlyfw_last_handshake_age_seconds", ())]
    if document["last_handshake"] is None:
        assert math.isinf(age)
    else:
        assert age == pytest.approx(now - document["last_handshake"])
    assert got[("earlyfw_warnings", ())] == len(document["warnings"])


@pytest.mark.netns
def test_status_json_and_textfile_from_a_live_table(netns: str, tmp_path: Path) -> None:  # noqa: F811
    textfile = tmp_path / "earlyfw.prom"
    absent = earlyfw(netns, "status", "--json", "--prometheus", str(textfile))
    assert absent.returncode == 3  # control: nothing loaded
    assert samples(textfile.read_text())[("earlyfw_table_present", ())] == 0
    assert earlyfw(netns, "apply", "--state", "blocked").returncode == 0
    result = earlyfw(netns, "status", "--json", "--prometheus", str(textfile))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == metrics.SCHEMA == 1
    assert {"present", "state", "intact", "counters", "endpoints", "warnings", "last_handshake"} <= set(document)
    assert document["last_handshake"] is None  # no wg0 in this namespace
    got = samples(textfile.read_text())
    assert got[("earlyfw_table_present", ())] == 1
    assert got[("earlyfw_table_intact", ())] == 1
    assert got[("earlyfw_state", (("state", "blocked"),))] == 1
    assert got[("earlyfw_state", (("state", "relaxed"),))] == 0
    assert ("earlyfw_packets_total", (("counter", "refused_out"),)) in got
    assert (textfile.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["earlyfw.prom"]  # no temporary left behind
