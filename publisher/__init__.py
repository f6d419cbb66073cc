"""The publishing side of hotswap: the ``Publisher`` API and the ``hotswap`` CLI."""
