"""An agent whose model has nothing published warns once, naming the closest models.

``Agent(model, "minlm")`` while ``minilm`` is published used to report ready for
ever without a word.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
import torch
from agent_support import Watch, until

from hotswap import keys
from hotswap.agent import Agent
from hotswap.connection import operation_retry
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.unpublished import LISTED, SHOWN, message, warning
from publisher.publisher import Publisher

SAID = (
    "model 'minlm': nothing is published under this name (published models: minilm); "
    "did you mean 'minilm'? serving the model's own weights"
)


def warnings_about(caplog: pytest.LogCaptureFixture, model: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith(f"model {model!r}:")
    ]


@contextmanager
def polling(model: torch.nn.Module, name: str, settings: HotswapSettings) -> Iterator[Watch]:
    """An agent of ``name`` polling often; its ``Watch`` counts the looks at head."""
    watch = Watch()
    fast = settings.model_copy(update={"poll_interval": 0.05})
    with Agent(model, name, settings=fast, store_factory=watch.factory):
        yield watch


def test_a_misspelled_model_name_is_warned_about_once_naming_the_closest(
    settings: HotswapSettings, caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Linear(4, 4)
    with Publisher("minilm", settings=settings) as pub:
        pub.publish(torch.nn.Linear(4, 4).state_dict(), message="v1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="hotswap.agent"):
        with polling(model, "minlm", settings) as watch:
            # Several polls after the first look: said once, not each time.
            assert watch.wait(lambda: watch.count("head") >= 5, 10)
    assert warnings_about(caplog, "minlm") == [SAID]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_published_later_is_applied_after_the_one_warning(
    settings: HotswapSettings, caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Linear(4, 4)
    new = torch.nn.Linear(4, 4).state_dict()
    with caplog.at_level(logging.WARNING, logger="hotswap.agent"):
        with Agent(model, "early", settings=settings) as agent:
            assert until(agent, lambda: bool(warnings_about(caplog, "early")))
            with Publisher("early", settings=settings) as pub:
                v1 = pub.publish(new, message="first")
            assert agent.wait_for(v1, 30)
    assert warnings_about(caplog, "early") == [
        "model 'early': nothing is published under this name (no model is published in "
        "namespace 'hotswap' yet); serving the model's own weights"
    ]
    assert all(torch.equal(v, new[k]) for k, v in model.state_dict().items())


def test_a_redis_user_that_may_not_list_keys_gets_the_warning_without_the_list(
    settings: HotswapSettings, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # As the README's agent ACL user: no SCAN.
    client.acl_setuser(
        "no-scan",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-scan"],
    )
    try:
        url = settings.redis_url.replace("redis://", "redis://no-scan:pw@", 1)
        limited = settings.model_copy(update={"redis_url": url})
        with caplog.at_level(logging.WARNING, logger="hotswap.agent"):
            with polling(torch.nn.Linear(4, 4), "minlm", limited) as watch:
                assert watch.wait(lambda: watch.count("head") >= 3, 10)
    finally:
        client.acl_deluser("no-scan")
    assert warnings_about(caplog, "minlm") == [
        "model 'minlm': nothing is published under this name (the published models could "
        "not be listed); serving the model's own weights"
    ]


def test_the_message_names_at_most_a_few_models_and_guesses_only_close_ones() -> None:
    many = [f"model-{i}" for i in range(8)]
    assert message("zzz", many, "prod") == (
        "model 'zzz': nothing is published under this name (published models: model-0, "
        "model-1, model-2, model-3, model-4 (+3 more)); serving the model's own weights"
    )
    assert message("bert-bse", ["bert-base", "bert-large"], "hotswap") == (
        "model 'bert-bse': nothing is published under this name (published models: "
        "bert-base, bert-large); did you mean 'bert-base' or 'bert-large'? serving the "
        "model's own weights"
    )


def test_a_flood_of_hostile_model_keys_costs_the_warning_a_bounded_list(
    settings: HotswapSettings, client: redis.Redis
) -> None:
    """Anyone with write access can create model marker keys: the warning reads at most
    ``LISTED`` names of them, and still says nothing is published under its own."""
    with client.pipeline(transaction=False) as pipe:
        for i in range(LISTED + 500):
            pipe.set(keys.head_key("hotswap", f"fake{i:05d}"), b"1")
        pipe.execute()
    store = Store.from_settings(client, "minlm", settings, operation_retry(1))
    said = warning(store)
    assert said.startswith("model 'minlm': nothing is published under this name (published")
    more = int(said.split("(+")[1].split(" more)")[0])
    assert more == LISTED - SHOWN  # LISTED names read, SHOWN of them shown
