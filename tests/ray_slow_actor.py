"""A backbone actor that waits to be killed, for the Ray kill tests, and a CLI launcher that runs with it.

`python -m tests.ray_slow_actor PID_FILE extract ...` is `python -m pipeline extract ...` whose backbone actor,
on its second batch, writes its pid to PID_FILE (when the file does not exist yet) and waits up to 60 s to be
killed mid-batch; a restarted actor finds the file and goes on. Ray's workers cannot import tests/, so the class
travels to them by value (cloudpickle), not by name.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.engines.ray_operators import BackboneActor


class ActorWaitingToBeKilled(BackboneActor):
    PID_FILE = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and not os.path.exists(self.PID_FILE):
            Path(self.PID_FILE + ".tmp").write_text(str(os.getpid()))
            os.replace(self.PID_FILE + ".tmp", self.PID_FILE)
            time.sleep(60)
        return super().__call__(batch)


@contextmanager
def actor_waiting_to_be_killed(pid_file: Path) -> Iterator[None]:
    """Within: extract --engine ray runs ActorWaitingToBeKilled writing to `pid_file`."""
    import ray.cloudpickle

    from pipeline.engines import ray_extract

    module = sys.modules[__name__]
    ActorWaitingToBeKilled.PID_FILE = str(pid_file)
    ray.cloudpickle.register_pickle_by_value(module)
    ray_extract.BackboneActor = ActorWaitingToBeKilled
    try:
        yield
    finally:
        ray_extract.BackboneActor = BackboneActor
        ray.cloudpickle.unregister_pickle_by_value(module)


if __name__ == "__main__":
    from pipeline.__main__ import main

    pid_file, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    with actor_waiting_to_be_killed(Path(pid_file)):
        main()
