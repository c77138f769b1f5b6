"""fairseq-train with injected faults, for the reliability tests (tests/test_faults.py) and
scripts/bench_faults.py.  Run it where fairseq-train would run (torchrun's script, or
FAIRSEQ_TRAIN= for scripts/train_torchrun.sh); with no MOE_FAULT_* variable set it is
fairseq-train.

MOE_FAULT_KILL=R:U[:N]    rank R kills itself with SIGKILL inside its N-th (default 2: the first
                          exchange of token rows, after the count exchange) all_to_all_single
                          once it has done U updates, i.e. in the middle of step U+1; the time
                          of the kill is written to MOE_FAULT_STAMP
MOE_FAULT_STALL=R:U[:N[:stop]]  the same, but the rank hangs instead of dying: it sleeps inside
                          the all-to-all (a deadlocked process), or with `stop` it stops itself
                          with SIGSTOP (a frozen host: it does not even react to SIGTERM)
MOE_FAULT_SAVE=R:K:B      on rank R the K-th torch.save (1-based, counted from the start)
                          raises OSError(ENOSPC) after writing B bytes: a full disk
MOE_FAULT_COPY=K:B        the K-th shutil.copyfile (fairseq's save_checkpoint copies its first
                          file to checkpoint_last.pt, ...) fails the same way after B bytes
MOE_FAULT_ARGS=R:ARGS     rank R gets ARGS (whitespace-separated) appended to its command line
"""
import errno
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist


def _rank():
    return int(os.environ.get("RANK", 0))


def _spec(name):
    value = os.environ.get(name)
    return value.split(":") if value else None


class _FullDisk:
    """A file object that accepts `limit` bytes, then fails as a full disk does."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.left:
            self.f.write(bytes(memoryview(data).cast("B")[:self.left]))
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.left -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _install():
    state = {"update": 0, "a2a": {}}
    from fairseq.trainer import Trainer

    train_step = Trainer.train_step

    def counting_train_step(self, *args, **kwargs):
        state["update"] = self.get_num_updates()
        return train_step(self, *args, **kwargs)

    Trainer.train_step = counting_train_step

    for var in ("MOE_FAULT_KILL", "MOE_FAULT_STALL"):
        spec = _spec(var)
        if spec and int(spec[0]) == _rank():
            at_update, nth = int(spec[1]), int(spec[2]) if len(spec) > 2 else 2
            action = {"MOE_FAULT_KILL": "kill", "MOE_FAULT_STALL": spec[3] if len(spec) > 3 else "sleep"}[var]
            original = dist.all_to_all_single

            def faulty_a2a(*args, _original=original, _action=action, _at=at_update, _nth=nth, **kwargs):
                if state["update"] >= _at:
                    count = state["a2a"][_at] = state["a2a"].get(_at, 0) + 1
                    if count == _nth:
                        stamp = os.environ.get("MOE_FAULT_STAMP")
                        if stamp:
                            with open(stamp, "w") as f:
                                f.write(repr(time.time()))
                        if _action == "sleep":
                            while True:
                                time.sleep(3600)
                        os.kill(os.getpid(), signal.SIGKILL if _action == "kill" else signal.SIGSTOP)
                return _original(*args, **kwargs)

            dist.all_to_all_single = faulty_a2a

    spec = _spec("MOE_FAULT_SAVE")
    if spec and int(spec[0]) == _rank():
        nth, limit, calls = int(spec[1]), int(spec[2]), [0]
        original_save = torch.save

        def faulty_save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                if isinstance(f, (str, os.PathLike)):
                    with open(f, "wb") as handle:
                        return original_save(obj, _FullDisk(handle, limit), *args, **kwargs)
                return original_save(obj, _FullDisk(f, limit), *args, **kwargs)
            return original_save(obj, f, *args, **kwargs)

        torch.save = faulty_save

    spec = _spec("MOE_FAULT_COPY")
    if spec:
        nth, limit, calls = int(spec[0]), int(spec[1]), [0]
        original_copyfile = shutil.copyfile

        def faulty_copyfile(src, dst, *args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
                    _FullDisk(fdst, limit).write(fsrc.read())
            return original_copyfile(src, dst, *args, **kwargs)

        shutil.copyfile = faulty_copyfile

    spec = os.environ.get("MOE_FAULT_ARGS")
    if spec:
        rank, args = spec.split(":", 1)
        if int(rank) == _rank():
            sys.argv += args.split()


if __name__ == "__main__":
    _install()
    from fairseq_cli.train import cli_main

    sys.argv[0] = "fairseq-train"
    cli_main()
