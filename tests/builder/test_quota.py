"""The quota ledger (``builder.quota``), without Ray."""

from builder.quota import QuotaLedger


def test_a_unit_committed_twice_counts_once_and_frees_its_grant():
    ledger = QuotaLedger({"cat": 10})
    ledger.grant("u", {"cat": 4})
    ledger.commit("u", {"cat": 4})
    ledger.commit("u", {"cat": 4})  # the commit retried on a restarted ledger
    ledger.grant("u", {"cat": 4}, {"cat": 4})  # the unit resent: its grant is freed again
    ledger.commit("u", {"cat": 4})
    assert ledger.snapshot() == {"cat": {"target": 10, "accepted": 4, "granted": 0}}
    assert ledger.rooms() == {"cat": 6}


def test_a_rebuilt_ledger_does_not_count_the_journaled_units_again():
    ledger = QuotaLedger({"cat": 10}, {"cat": 4}, committed=["u"])
    ledger.commit("u", {"cat": 4})
    ledger.grant("v", {"cat": 3})
    ledger.commit("v", {"cat": 2})
    assert ledger.snapshot() == {"cat": {"target": 10, "accepted": 6, "granted": 0}}

