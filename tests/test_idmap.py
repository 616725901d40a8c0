"""The map of live documents' locations (index/idmap.py) against a dict, through random
batches of sets, pops and lookups; also with a hash so weak that most ids share it, which
drives the path that tells ids apart by their CRC."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.index import idmap
from shoal.index.idmap import ABSENT, IdLocations

IDS = st.sampled_from([f"id-{n}" for n in range(300)] + ["", "é", "a.b", "id-1 "])
BATCH = st.lists(IDS, max_size=40, unique=True)
OPERATIONS = st.lists(st.tuples(st.sampled_from(["set", "pop", "get"]), BATCH), max_size=60)


REAL_FINGERPRINTS = idmap._fingerprints


def weak_fingerprints(ids):
    keys, checks = REAL_FINGERPRINTS(ids)
    return keys % np.uint64(3), checks  # three hashes for all ids


@pytest.fixture(params=["real hash", "weak hash"])
def fingerprints(request, monkeypatch):
    if request.param == "weak hash":
        monkeypatch.setattr(idmap, "_fingerprints", weak_fingerprints)
    monkeypatch.setattr(idmap, "_MIN_RECENT", 8)  # merge often


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the patch holds for all
@given(operations=OPERATIONS)
def test_behaves_as_a_dict(fingerprints, operations):
    locations, model = IdLocations(), {}
    for step, (operation, ids) in enumerate(operations):
        if operation == "set":
            values = np.arange(len(ids)) + step * 1000
            locations.set_many(ids, values)
            model.update(zip(ids, values.tolist()))
            continue
        expected = [model.pop(i, ABSENT) if operation == "pop" else model.get(i, ABSENT) for i in ids]
        got = (locations.pop_many if operation == "pop" else locations.get_many)(ids)
        assert got.tolist() == expected
        assert len(locations) == len(model)
    assert locations.get_many(sorted(model)).tolist() == [model[i] for i in sorted(model)]
    assert len(locations) == len(model)


def test_clear_forgets_everything():
    locations = IdLocations()
    locations.set_many(["a", "b"], np.array([1, 2]))
    locations.clear()
    assert len(locations) == 0
    assert locations.get_many(["a", "b"]).tolist() == [ABSENT, ABSENT]
