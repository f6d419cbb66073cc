"""The publisher's commit under lost state and hostile input (issue 13).

Numbering heals itself when ``seq`` is lost; a full publish that omits
tensors is refused unless named; Redis out of memory is its own error.
"""

from __future__ import annotations

import pytest
import redis
import torch
from rel_support import MODEL, make_state, nudged

from hotswap import keys
from hotswap.settings import HotswapSettings
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability

SEQ = keys.seq_key("hotswap", MODEL)
HEAD = keys.head_key("hotswap", MODEL)


def publish_five(pub: Publisher) -> dict[str, torch.Tensor]:
    """v1..v5 published; returns a sixth, different state."""
    state = make_state(1)
    for i in range(5):
        assert pub.publish(nudged(state, 0.01 * i)) == i + 1
    return nudged(state, 0.5)


@pytest.mark.parametrize("lost", ["deleted", "lower than head"])
def test_a_lost_seq_costs_no_failed_publish(
    settings: HotswapSettings, client: redis.Redis, lost: str
) -> None:
    with Publisher(MODEL, settings=settings, connection=client) as pub:
        nxt = publish_five(pub)
        if lost == "deleted":
            client.delete(SEQ)
        else:
            client.set(SEQ, 2)
        assert pub.publish(nxt) == 6  # at the first try
        assert client.get(HEAD) == b"6" and client.get(SEQ) == b"6"
        assert pub.publish(nudged(nxt, 0.1)) == 7
