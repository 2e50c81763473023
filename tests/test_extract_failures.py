"""A helper thread of extract that dies (decoder pool, cache writer) ends the run in one line, never a hang,
and the finished shards stay for the rerun. Under DVC there is no Ctrl-C, so a hang would be forever."""
from __future__ import annotations

import errno
import threading

import pytest

from pipeline.config import ExtractConfig
from pipeline.features import extractor
from pipeline.features import shards as features
from pipeline.features.reader import open_cache
from pipeline.features.shards import shard_paths
from pipeline.workers import TimedPool
from stages import extract
from stages.extract import ExtractError
from tests.cli_helpers import assert_one_line_error

TINY = dict(weights="random:0", frames=4, image_size=32, batch_size=4, workers=1, timeout=20.0)


def run_with_deadline(fn, seconds: float = 120.0):
    """fn() in a thread; fails the test (instead of hanging it) when it does not return in time."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"extract still running after {seconds:g} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


class PoolThatDiesAfter:
    """A TimedPool that hands out `good` results, then fails as a pool does when it cannot spawn a worker."""

    good = 2

    def __init__(self, fn, workers, timeout, warm=None):
        self._real = TimedPool(fn, workers, timeout, warm)

    def __enter__(self):
        return self

    def start(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._real.close()

    def imap_unordered(self, tasks):
        for count, item in enumerate(self._real.imap_unordered(tasks)):
            if count == self.good:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            yield item


@pytest.fixture
def shard_per_clip() -> ExtractConfig:
    return ExtractConfig(**TINY, shard_clips=1)


def test_a_dying_decoder_pool_is_an_error_not_a_hang_and_finished_clips_are_kept(mini_dataset, tmp_path,
                                                                                 monkeypatch, shard_per_clip):
    cache = tmp_path / "f.h5"
    monkeypatch.setattr(extractor, "TimedPool", PoolThatDiesAfter)
    with pytest.raises(ExtractError, match=r"decoding workers failed: BlockingIOError: .*Resource temporarily "
                                           r"unavailable.*rerun to resume"):
        run_with_deadline(lambda: extract.run(mini_dataset, cache, shard_per_clip, progress=False))
    assert len(shard_paths(extract.parts_dir_for(cache))) == 2  # the two clips decoded before it died
    monkeypatch.setattr(extractor, "TimedPool", TimedPool)
    resumed = run_with_deadline(lambda: extract.run(mini_dataset, cache, shard_per_clip, progress=False))
    assert (resumed.skipped, resumed.extracted) == (2, 4)


def test_a_pool_that_cannot_start_at_all_is_one_line_from_the_cli(mini_dataset, tmp_path, monkeypatch):
    from tests.cli_helpers import run_in_process

    class NoPool(PoolThatDiesAfter):
        good = 0

    monkeypatch.setattr(extractor, "TimedPool", NoPool)
    result = run_with_deadline(lambda: run_in_process("extract", str(mini_dataset), str(tmp_path / "f.h5"),
                                                      "--weights", "random:0", "--frames", "4", "--image-size", "32",
                                                      "--no-progress"))
    assert_one_line_error(result, "decoding workers failed", "rerun to resume")


def test_a_dying_cache_writer_is_an_error_not_a_hang_and_written_shards_are_kept(mini_dataset, tmp_path,
                                                                                monkeypatch, shard_per_clip):
    cache = tmp_path / "f.h5"
    real_write = features.write_shard
    calls = []

    def disk_fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(features, "write_shard", disk_fills_up)
    # a full disk says what is safe and what room the rest needs (tests/test_disk_full.py: on a real one)
    with pytest.raises(ExtractError, match=r"disk full while writing .*: 1 of 6 clips are safe .* rerun to resume"):
        run_with_deadline(lambda: extract.run(mini_dataset, cache, shard_per_clip, progress=False))
    assert len(shard_paths(extract.parts_dir_for(cache))) == 1
    monkeypatch.setattr(features, "write_shard", real_write)
    resumed = run_with_deadline(lambda: extract.run(mini_dataset, cache, shard_per_clip, progress=False))
    assert resumed.skipped == 1 and resumed.extracted == 5
    with open_cache(cache) as c:
        assert len(c) == 6


def test_a_writer_failing_on_the_last_flush_is_one_line_too(mini_dataset, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(features, "write_shard", no_space)  # shards of 32: the first write is the last flush
    with pytest.raises(ExtractError, match="No space left on device"):
        run_with_deadline(lambda: extract.run(mini_dataset, tmp_path / "f.h5", ExtractConfig(**TINY), progress=False))
