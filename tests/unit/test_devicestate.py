"""The status model (bmig.devicestate) and its three views: text (bmig.cli.statustext),
events (diff) and metrics (bmig.metrics).

The contract under test: a state or a field a producer adds to a part (the HA
replication's states, its lag, the target's consistency) shows in every view without a
change to their code: by its declaration if it has one, else by its name and value.
"""

from __future__ import annotations

import re

from bmig import devicestate
from bmig.cli.statustext import device_text, part_line, status_line
from bmig.devicestate import Kind, diff, exists, kind_of, parts, severity
from bmig.metrics import metric_name, prometheus

MiB = 1 << 20
NOW = 1_700_000_000.0


def device(**parts_: object) -> dict:
    status = {"device": "vm1", "side": "source", "time": NOW, "role": "primary",
              "generation": "1a2b3c4d5e6f7a8b", "successor": "0" * 16,
              "device_id": "00000000000000ff", "size": 64 * MiB, "dirty_bytes": 2 * MiB,
              "inflight_bytes": 0, "held_bytes": 0, "mirrored_bytes": 0}
    status.update(parts_)
    return status


def nbd(**fields: object) -> dict:
    base = {"device": "vm1", "export": "vm1", "replicating": True, "protocol": "C",
            "policy": "degrade", "target": "tcp://backup:10810/vm1", "failed": None,
            "blocked": False, "frozen": False, "read_only": False, "source_failed": None,
            "bytes_written": 5 * MiB, "state": "replicating", "replication": "connected"}
    base.update(fields)
    return base


def test_parts_are_the_flat_fields_then_each_object():
    status = device(nbd=nbd(), service=None)
    names = [(name, fields is None) for name, fields in parts(status)]
    assert names == [("tracker", False), ("nbd", False), ("service", True)]
    tracker = dict(parts(status))["tracker"]
    assert "device" not in tracker and "time" not in tracker
    assert tracker["dirty_bytes"] == 2 * MiB


def test_kinds_by_declaration_then_by_name_and_value():
    assert kind_of("tracker", "dirty_bytes", 1) is Kind.BYTES
    assert kind_of("target", "last_pass", 1.5) is Kind.TIME          # declared
    assert kind_of("nbd", "catch_up_bytes_total", 1) is Kind.BYTES_TOTAL
    assert kind_of("nbd", "lag_bytes", 1) is Kind.BYTES
    assert kind_of("nbd", "lag_seconds", 1.0) is Kind.SECONDS
    assert kind_of("nbd", "degraded_time", 1.0) is Kind.TIME
    assert kind_of("nbd", "resyncs_total", 3) is Kind.COUNT
    assert kind_of("nbd", "consistent", True) is Kind.FLAG
    assert kind_of("nbd", "link_state", "up") is Kind.STATE
    assert kind_of("nbd", "peer", "host") is Kind.TEXT
    assert kind_of("nbd", "window", 3) is Kind.NUMBER


def test_a_part_in_words():
    status = device(nbd=nbd(), target=None)
    text = device_text(status, NOW)
    assert text.splitlines() == [
        "vm1: primary; generation 1a2b3c4d5e6f7a8b, 2.0 MiB dirty",
        "  bmig-nbd: replicating, connected; protocol C, to tcp://backup:10810/vm1, "
        "5.0 MiB written",
        "  target: no record of this export"]
    service = {"state": "retrying", "message": "receiver unreachable, retry in 10 s",
               "lag_bytes": 2 * MiB, "lag_seconds": 4.0, "last_pass_time": NOW - 180,
               "error": "cannot connect", "retry_in_seconds": 10, "pid": 7}
    assert status_line("vm1", "service", service, NOW) == \
        ("vm1: receiver unreachable, retry in 10 s; lag 2.0 MiB, 4.0 s to ship, "
         "last pass 3 min ago, cannot connect")


def test_new_states_and_fields_show_in_every_view_without_a_declaration():
    """What the HA replication adds to bmig-nbd's status (names made up here, declared
    nowhere) is in the text, the events and the metrics."""
    before = device(nbd=nbd())
    after = device(nbd=nbd(replication_state="degraded", lag_bytes=3 * MiB,
                           lag_seconds=2.5, consistent=False, catch_up_bytes_total=MiB,
                           peer="backup"))
    line = part_line("nbd", dict(parts(after))["nbd"], NOW)
    for words in ("degraded", "lag 3.0 MiB", "lag 2.5 s", "catch up 1.0 MiB",
                  "peer backup"):
        assert words in line, line
    assert "consistent" not in line                       # a flag shows when true
    events = diff(before, after, NOW)
    assert [(e["event"], e["part"]) for e in events] == [("change", "nbd")]
    assert events[0]["changed"] == {"replication_state": [None, "degraded"],
                                    "consistent": [None, False], "peer": [None, "backup"]}
    assert "lag_bytes" in diff(before, after, NOW, statistics=True)[0]["changed"]
    prom = prometheus([after])
    assert 'bmig_nbd_replication_state{device="vm1",replication_state="degraded"} 1' in prom
    assert f'bmig_nbd_lag_bytes{{device="vm1"}} {3 * MiB}' in prom
    assert 'bmig_nbd_lag_seconds{device="vm1"} 2.5' in prom
    assert 'bmig_nbd_consistent{device="vm1"} 0' in prom
    assert "# TYPE bmig_nbd_catch_up_bytes_total counter" in prom


def test_an_object_inside_a_part_is_a_part_of_its_own_in_every_view():
    """bmig-nbd's status may carry an object (the HA replication's word, ``ha``): it is
    the part ``nbd.ha``, with its state a state, its lag bytes, in every view."""
    quiet = device(nbd=nbd(ha=None))
    ha = device(nbd=nbd(ha={"state": "catching up", "lag_bytes": 3 * MiB,
                            "target": "tcp://backup:10810/vm1"}))
    assert [name for name, _ in parts(ha)] == ["tracker", "nbd", "nbd.ha"]
    assert "ha" not in dict(parts(ha))["nbd"]
    text = device_text(ha, NOW).splitlines()
    assert text[2] == "  bmig-nbd ha: catching up; lag 3.0 MiB, to tcp://backup:10810/vm1"
    assert status_line("vm1", "nbd.ha", dict(parts(ha))["nbd.ha"], NOW).startswith(
        "vm1: bmig-nbd ha: catching up; ")
    created = diff(quiet, ha, NOW)
    assert [(e["event"], e["part"]) for e in created] == [("create", "nbd.ha")]
    synchronous = device(nbd=nbd(ha={"state": "synchronous", "lag_bytes": 0,
                                     "target": "tcp://backup:10810/vm1"}))
    changed = diff(ha, synchronous, NOW)
    assert [(e["event"], e["part"], e["changed"]) for e in changed] == \
        [("change", "nbd.ha", {"state": ["catching up", "synchronous"]})]
    assert [(e["event"], e["part"]) for e in diff(synchronous, quiet, NOW)] == \
        [("destroy", "nbd.ha")]
    prom = prometheus([ha])
    assert 'bmig_nbd_ha_state{device="vm1",state="catching up"} 1' in prom
    assert f'bmig_nbd_ha_lag_bytes{{device="vm1"}} {3 * MiB}' in prom
    assert 'bmig_part_up{device="vm1",part="nbd.ha"} 1' in prom
    assert "ha" not in part_line("nbd", dict(parts(ha))["nbd"], NOW)


def test_a_declared_state_word_has_its_severity_and_its_metric_a_sample_per_word():
    assert severity("nbd", nbd(replication="degraded")) == "warning"
    assert severity("nbd", nbd(state="source failed", replication="degraded")) == "error"
    assert severity("service", {"state": "a word nobody declared"}) == "info"
    prom = prometheus([device(nbd=nbd(replication="degraded"))])
    assert 'bmig_nbd_replication{device="vm1",replication="degraded"} 1' in prom
    assert 'bmig_nbd_replication{device="vm1",replication="connected"} 0' in prom


def test_events_create_change_destroy():
    first = device(nbd=None)
    second = device(nbd=nbd(), dirty_bytes=4 * MiB)
    assert [e["event"] for e in exists(first, NOW)] == ["exists"]
    events = diff(first, second, NOW)
    assert [(e["event"], e["part"]) for e in events] == [("create", "nbd")]
    statistics = diff(first, second, NOW, statistics=True)
    assert statistics[0]["changed"] == {"dirty_bytes": [2 * MiB, 4 * MiB]}
    third = device(nbd=nbd(state="frozen", frozen=True))
    changed = diff(second, third, NOW)[0]
    assert changed["changed"] == {"state": ["replicating", "frozen"], "frozen": [False, True]}
    assert changed["severity"] == "notice" and changed["status"]["frozen"] is True
    gone = diff(third, None, NOW)
    assert [(e["event"], e["part"], e["status"]) for e in gone] == \
        [("destroy", "tracker", None), ("destroy", "nbd", None)]
    assert [e["event"] for e in diff(None, first, NOW)] == ["create"]


def test_metric_names_follow_prometheus_conventions():
    f = devicestate.field_of
    assert metric_name("service", f("service", "last_pass_time")) == \
        "bmig_service_last_pass_timestamp_seconds"
    assert metric_name("target", f("target", "last_pass")) == \
        "bmig_target_last_pass_timestamp_seconds"
    assert metric_name("nbd", f("nbd", "bytes_written")) == "bmig_nbd_bytes_written_total"
    assert metric_name("tracker", f("tracker", "dirty_bytes")) == "bmig_dirty_bytes"
    assert metric_name("service", f("service", "errors_total")) == \
        "bmig_service_errors_total"


def test_the_exposition_is_well_formed():
    """One HELP and TYPE per family, its samples together, names and labels valid,
    label values escaped; every sample a number."""
    service = {"state": "retrying", "message": "x", "error": 'quote " back \\ nl \n',
               "lag_bytes": MiB, "lag_seconds": None, "errors_total": 2, "pid": 9,
               "link_state": 'a "b" \\ c\nd'}
    prom = prometheus([device(nbd=nbd(), service=service),
                       device(device="vm2", nbd=None, service=None)])
    families: list[str] = []
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="'
                        r'(?:[^"\\\n]|\\.)*",?)*\})? (-?[0-9.e+]+|NaN|[+-]Inf)$')
    for line in prom.splitlines():
        if line.startswith("# HELP "):
            families.append(line.split()[2])
        elif line.startswith("# TYPE "):
            assert line.split()[2] == families[-1] and line.split()[3] in ("gauge", "counter")
        else:
            m = sample.match(line)
            assert m, line
            assert m.group(1) == families[-1], line           # samples stay together
    assert len(families) == len(set(families))
    assert 'link_state="a \\"b\\" \\\\ c\\nd"} 1' in prom
    assert "bmig_service_pid" not in prom                  # declared not a metric
    assert "lag_seconds" not in prom                       # null: no sample
    assert 'bmig_part_up{device="vm2",part="nbd"} 0' in prom
    assert 'bmig_part_up{device="vm1",part="service"} 1' in prom
    assert prometheus([], breqd_up=False).splitlines()[-1] == "bmig_breqd_up 0"


def test_the_ha_part_is_declared_its_since_a_time_its_retry_seconds_its_states_ranked():
    """``nbd.ha`` (the HA replication's word in bmig-nbd's status) is declared: its since
    shows as an age, retry_in as seconds, degraded is a warning, and its metrics have
    the units in their names, their help, and a sample for every state word."""
    degraded = device(nbd=nbd(ha={"state": "degraded", "lag_bytes": 3 * MiB,
                                  "since": NOW - 90.5, "retry_in": 5,
                                  "target": "tcp://backup:10810/vm1", "protocol": "C",
                                  "error": "connection refused"}))
    line = device_text(degraded, NOW).splitlines()[2]
    assert line.startswith("  bmig-nbd ha: degraded; "), line
    assert "since 90 s ago" in line and "retry in 5.0 s" in line, line
    assert str(NOW - 90.5) not in line
    assert severity("nbd.ha", dict(parts(degraded))["nbd.ha"]) == "warning"
    created = diff(device(nbd=nbd(ha=None)), degraded, NOW)
    assert [(e["part"], e["severity"]) for e in created] == [("nbd.ha", "warning")]
    prom = prometheus([degraded])
    assert f'bmig_nbd_ha_since_timestamp_seconds{{device="vm1"}} {NOW - 90.5}' in prom
    assert 'bmig_nbd_ha_retry_in_seconds{device="vm1"} 5' in prom
    assert "# HELP bmig_nbd_ha_since_timestamp_seconds when the HA replication entered " \
        "its state" in prom
    for word in ("connecting", "catching up", "synchronous"):
        assert f'bmig_nbd_ha_state{{device="vm1",state="{word}"}} 0' in prom
    assert 'bmig_nbd_ha_state{device="vm1",state="degraded"} 1' in prom
