"""A small HTTP inference server with an embedded hotswap agent.

    HOTSWAP_REDIS_URL=redis://127.0.0.1:6379/0 python examples/serve.py --model-name tiny

POST /predict {"tokens": [1, 2, 3]} -> top tokens, the version that answered, a fingerprint
GET  /version                       -> the version this process runs, what its apply cost
GET  /applied                       -> every version this process applied, in order
GET  /healthz                       -> liveness: agent state and lag behind head (503 once stopped)
GET  /readyz                        -> readiness: 200 once the model runs head (or refused head
                                       and runs an earlier version), else 503 with the reason

Each forward pass runs inside ``agent.reading()``, so an update is applied
between requests, never during one. SIGTERM or SIGINT stops accepting
requests, lets the ones in flight finish, then stops the agent.
``--max-drift 0.1`` adds a post-apply probe (a fixed batch whose logits may
move at most 10% from the last good version's); HOTSWAP_TRACK=canary and
HOTSWAP_AGENT_NAME=canary-1 make it a canary of ``hotswap rollout`` with a
stable id.

The server's code is ``publisher/demo_server.py`` (``make_server`` shows how
the agent is embedded): it ships inside the package so that an installed
``hotswap demo`` can run it as ``python -m publisher.demo_server``, which is
the same program as this script. It uses only names ``hotswap`` exports.
"""

from __future__ import annotations

import sys

from publisher.demo_server import Handler, HeadWatch, Server, close_server, main, make_server

__all__ = ["Handler", "HeadWatch", "Server", "close_server", "main", "make_server"]

if __name__ == "__main__":
    sys.exit(main())
