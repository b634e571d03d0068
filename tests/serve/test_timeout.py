"""serve.request_timeout_s reaches Serve's proxy: a request still waiting past it is answered
408, while a request that fits within it is answered as usual (issue 21, finding 7)."""

import httpx
import pytest

from tests.conftest import tiny_config
from tests.serve.conftest import SERVE_OVERRIDES, free_port

pytestmark = pytest.mark.ray

# A lone request waits batch_wait_timeout_s for its batch to fill: 2 s, against a 1 s timeout.
SLOW_BATCHES = ["serve.max_batch_size=8", "serve.batch_wait_timeout_s=2.0", "serve.request_timeout_s=1.0"]


@pytest.fixture(scope="module")
def timing_out_service(tuned_run):
    import ray
    from ray import serve

    from reclora_ray.serve.app import start

    cfg = tiny_config(*SERVE_OVERRIDES, *SLOW_BATCHES, f"serve.port={free_port()}")
    try:
        url = start(cfg, tuned_run)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_request_past_the_timeout_is_answered_408(timing_out_service):
    client = timing_out_service
    assert client.get("/healthz").status_code == 200  # no batching: within the timeout
    reply = client.post("/score", json={"user_id": 1, "candidates": [1, 2, 3]})
    assert reply.status_code == 408, (reply.status_code, reply.text)
    assert "timed out after 1.0s" in reply.text
    # A caller may still ask for more time per request, which Serve honours over the default.
    slow = client.post(
        "/score", json={"user_id": 1, "candidates": [1, 2, 3]}, headers={"x-request-timeout-seconds": "20"}
    )
    assert slow.status_code == 200 and len(slow.json()["scores"]) == 3
