"""The scheduler process: receives requests over zmq, steps the scheduler, sends outputs.

An error one request causes is handled inside the step: that request is aborted and the
loop goes on (faults.py). An error that reaches this loop is the scheduler's or the
device's: every request in flight is failed (SchedulerCrashed) and the process exits,
for its parent to report or a supervisor to restart.

Every turn of the loop beats the heartbeat the parent's watchdog reads (watchdog.py); an
idle loop wakes to beat, so only a loop that is stuck (a step that never returns, a
stopped process) goes quiet."""

from __future__ import annotations

import logging
import sys
import traceback

from loom.runtime import messages as m
from loom.runtime.args import ServerArgs
from loom.runtime.scheduler.load_log import LoadLog
from loom.runtime.watchdog import Heartbeat

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 2  # while only grammar compiles are pending


def run_scheduler_process(
    args: ServerArgs,
    model_folder: str,
    in_addr: str,
    out_addr: str,
    heartbeat: Heartbeat,
    ready_conn,
) -> None:
    import zmq

    from loom.runtime.process_util import configure_process
    from loom.runtime.scheduler.parts import GIL_SWITCH_INTERVAL_S
    from loom.runtime.scheduler.scheduler import Scheduler

    configure_process("scheduler", args.log_level, args.log_format)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # why: parts.py
    ctx = zmq.Context(1)
    receiver = ctx.socket(zmq.PULL)
    receiver.bind(in_addr)
    sender = ctx.socket(zmq.PUSH)
    sender.connect(out_addr)
    try:
        sched = Scheduler(args, model_folder)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        ready_conn.send(m.SchedulerCrashed(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    info = sched.server_info()
    logger.info(
        "model ready on %s (%s): KV capacity %d tokens, context %d",
        sched.device,
        sched.runner.dtype,
        info.max_total_tokens,
        info.context_length,
    )
    ready_conn.send(m.SchedulerReady(info))
    try:
        _loop(sched, receiver, sender, heartbeat)
    except Exception as e:  # noqa: BLE001 - not one request's: every caller must learn of it
        logger.exception("scheduler crashed")
        sender.send_pyobj(m.SchedulerCrashed(f"scheduler crashed: {type(e).__name__}: {e}"))
        raise SystemExit(1) from e


def _loop(sched, receiver, sender, heartbeat: Heartbeat) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(receiver, zmq.POLLIN)
    load = LoadLog(sched.args.log_interval)
    while True:
        heartbeat.beat()
        if sched.has_work():
            timeout = 0 if sched.can_step() else _IDLE_POLL_MS
        else:
            timeout = heartbeat.idle_ms  # idle: sleep until a message comes, waking to beat
        events = dict(poller.poll(timeout))
        while events.get(receiver) or receiver.poll(0):
            events = {}
            msg = receiver.recv_pyobj()
            if isinstance(msg, m.ShutdownRequest):
                sender.send_pyobj(msg)  # the detokenizer stops on it too
                return
            reply = _handle(sched, msg)
            if reply is not None:
                sender.send_pyobj(reply)
        if sched.has_work():
            sched.step()
        outputs = sched.take_outputs()
        if outputs:
            sender.send_pyobj(m.BatchOutput(outputs))
        load.tick(sched)


def _handle(sched, msg):
    if isinstance(msg, m.GenerateRequest):
        sched.add_request(msg)
    elif isinstance(msg, m.AbortRequest):
        sched.abort(msg.rid)
    elif isinstance(msg, m.FlushCacheRequest):
        return sched.flush_cache()
    elif isinstance(msg, m.ServerInfoRequest):
        return sched.server_info()
    else:
        logger.warning("unknown message %r", type(msg).__name__)
    return None
