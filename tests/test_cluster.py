"""The local Ray cluster a run starts: its GCS keeps at most `cluster.max_task_events` task events."""

from __future__ import annotations

import time

from selfdistill.launch.cluster import ray_cluster


def _stored_task_events() -> int:
    from ray._private.state import state

    return len(state._get_all_task_events())


def test_the_gcs_of_a_local_cluster_keeps_at_most_max_task_events():
    with ray_cluster(None, 1, max_task_events=50) as ray:

        @ray.remote(num_cpus=0)
        class Echo:
            def call(self, x):
                return x

        echo = Echo.remote()
        assert ray.get([echo.call.remote(i) for i in range(300)]) == list(range(300))
        deadline, held = time.monotonic() + 20, 0
        while time.monotonic() < deadline and held < 50:  # workers report their task events every second
            time.sleep(0.5)
            held = _stored_task_events()
        time.sleep(2)  # any report still in flight lands, and must not push it past the cap
        assert _stored_task_events() == 50  # 301 task events happened (300 calls and the actor's creation)
