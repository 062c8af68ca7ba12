"""Read back the Prefect events a test's flow emitted (from the API the harness or a server runs)."""

import time


def wait_for_events(name: str, resource_id: str, seconds: float = 120) -> list:
    """The events called ``name`` on ``resource_id``; waits for them to be stored (events are sent in the
    background), fails if none arrive."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            # limit: the client's default (100) is over the server's maximum (50) in 3.9.1
            page = client.read_events(EventFilter(event=EventNameFilter(name=[name]),
                                                  resource=EventResourceFilter(id=[resource_id])), limit=50)
            if page.events or time.monotonic() > deadline:
                assert page.events, f"no {name} event on {resource_id}"
                return page.events
            time.sleep(1)
