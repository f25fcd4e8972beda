"""Which edge incarnations died between two views of the live leases."""

from edge.protocol.plans import adopt_view, edges_gone


def test_an_edge_missing_from_the_new_view_is_gone():
    assert edges_gone({"a": "b1", "b": "b2"}, {"a": "b1"}) == [("b", "b2")]


def test_an_edge_that_restarted_under_the_same_id_lost_its_old_incarnation():
    assert edges_gone({"a": "b1"}, {"a": "b9"}) == [("a", "b1")]


def test_new_edges_and_unchanged_edges_are_not_gone():
    assert edges_gone({"a": "b1"}, {"a": "b1", "c": "b3"}) == []


def test_a_lease_view_never_takes_back_an_incarnation_known_gone():
    # A watcher restarted while a NATS node rejoined its cluster read edge b's lease as its
    # old incarnation: the edges told the peers of b's live one `timeout` and took its
    # slots for dead (issue 15, routes cut).
    gone = {("b", "b-old")}
    assert adopt_view({"a": "a1", "b": "b-new"}, {"a": "a1", "b": "b-old"}, gone) == {"a": "a1", "b": "b-new"}
    assert adopt_view({"a": "a1"}, {"a": "a1", "b": "b-old"}, gone) == {"a": "a1"}
    assert adopt_view({"b": "b-new"}, {"b": "b-newer"}, gone) == {"b": "b-newer"}
    assert edges_gone({"b": "b-new"}, adopt_view({"b": "b-new"}, {"b": "b-old"}, gone)) == []
