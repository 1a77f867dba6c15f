"""Which transfer syntax to accept in each presentation context the requestor proposes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def requestor_first(
    requested: Iterable[tuple[str, Sequence[str]]],
    supported: Mapping[str, Sequence[str]],
) -> list[tuple[str, list[str]]]:
    """The acceptor's syntaxes per abstract syntax, reordered to follow the requestor.

    pynetdicom accepts, in each proposed context, the first syntax of the *acceptor's* list that
    the requestor offers. Putting the requestor's own order first means a sender that proposes
    [RLE, Explicit VR LE] for data it holds in RLE sends it as it is: the node stores what it
    receives, so it gains nothing by making the sender convert (and some senders cannot).
    Abstract syntaxes the requestor did not propose are left out.
    """
    proposed: dict[str, list[str]] = {}
    for abstract, syntaxes in requested:
        if abstract not in supported:
            continue
        accepted = set(supported[abstract])
        order = proposed.setdefault(abstract, [])
        order.extend(ts for ts in syntaxes if ts in accepted and ts not in order)
    return [
        (abstract, order + [ts for ts in supported[abstract] if ts not in order])
        for abstract, order in proposed.items()
    ]
