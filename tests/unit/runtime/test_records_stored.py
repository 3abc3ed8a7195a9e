"""A store read that cannot wait for what is on the bus answers UNAVAILABLE, naming what."""

from __future__ import annotations

import pytest

from tickmesh.runtime.errors import StatusError
from tickmesh.runtime.records import require_records_stored
from tickmesh.sdk.errors import StatusCode


async def _stored(tenant: str) -> bool:
    return tenant == "acme"


async def test_a_read_goes_on_once_what_is_on_the_bus_is_stored() -> None:
    await require_records_stored(_stored, "acme")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({}, "execution records"), ({"what": "lifetime events"}, "lifetime events")],
)
async def test_a_read_that_cannot_wait_is_unavailable_and_says_what_it_waited_for(
    kwargs: dict[str, str], named: str
) -> None:
    with pytest.raises(StatusError) as raised:
        await require_records_stored(_stored, "beta", **kwargs)

    assert raised.value.status == StatusCode.UNAVAILABLE
    assert f"still storing the {named} on the bus" in raised.value.detail
