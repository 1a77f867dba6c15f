"""Transfer syntax choice per presentation context (pure)."""

from __future__ import annotations

from node.policy.contexts import requestor_first

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT, BIG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
RLE, J2K = "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.91"
SUPPORTED = {CT: [EXPLICIT, IMPLICIT, BIG, RLE, J2K], MR: [EXPLICIT, IMPLICIT]}


def test_requestor_order_comes_first_then_the_rest_of_the_node_list() -> None:
    assert requestor_first([(CT, [RLE, EXPLICIT, IMPLICIT])], SUPPORTED) == [
        (CT, [RLE, EXPLICIT, IMPLICIT, BIG, J2K])]


def test_several_contexts_for_one_abstract_syntax_merge_in_order() -> None:
    # DCMTK proposes [Explicit] and [Big, Implicit] as two contexts of the same SOP class.
    assert requestor_first([(CT, [EXPLICIT]), (CT, [BIG, IMPLICIT])], SUPPORTED) == [
        (CT, [EXPLICIT, BIG, IMPLICIT, RLE, J2K])]


def test_unsupported_syntaxes_and_classes_are_left_out() -> None:
    result = requestor_first([(MR, [RLE, IMPLICIT]), ("1.2.3.4", [EXPLICIT])], SUPPORTED)
    assert result == [(MR, [IMPLICIT, EXPLICIT])]


def test_unproposed_classes_get_no_context() -> None:
    assert requestor_first([], SUPPORTED) == []
