"""The shm transport's refusal of a region the machine cannot hold (#16): it names the memory
it needs and the transport to use instead, before any byte is written."""

from __future__ import annotations

import pytest

from actors.broadcast_group import TransportUnavailable
from learners.weight_push import refuse_unless_free


def test_a_region_larger_than_free_memory_is_refused_with_the_way_out():
    refuse_unless_free(1 << 30, free=2 << 30)
    with pytest.raises(TransportUnavailable, match=r"needs 3\.0 GiB .* has 2\.0 GiB free; use --sync-transport gloo"):
        refuse_unless_free(3 << 30, free=2 << 30)


def test_the_free_memory_is_this_machines_when_not_given():
    refuse_unless_free(1)  # a byte always fits
    with pytest.raises(TransportUnavailable):
        refuse_unless_free(1 << 60)
