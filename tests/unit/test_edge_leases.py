"""Which edge incarnations died between two views of the live leases."""

from edge.protocol.plans import edges_gone


def test_an_edge_missing_from_the_new_view_is_gone():
    assert edges_gone({"a": "b1", "b": "b2"}, {"a": "b1"}) == [("b", "b2")]


def test_an_edge_that_restarted_under_the_same_id_lost_its_old_incarnation():
    assert edges_gone({"a": "b1"}, {"a": "b9"}) == [("a", "b1")]


def test_new_edges_and_unchanged_edges_are_not_gone():
    assert edges_gone({"a": "b1"}, {"a": "b1", "c": "b3"}) == []
