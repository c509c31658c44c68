"""The deterministic simulator: the real runtime under a seeded scheduler and a virtual clock.

The real transition functions (or a choreography's event handlers and tracker),
consumers, participant handlers and relays run; only the network, the clock and the
order of events are simulated. A :class:`SimNetwork` (a
:class:`~sagakit.transports.base.Transport`) only *records* what a relay publishes,
one copy per subscriber for an event (the relay fans events out; each copy, named
``<message id>@<endpoint>`` in a schedule, is delivered, duplicated, delayed or lost on
its own); a :class:`Scheduler` driven by ``random.Random(seed)`` then decides, one
action per step, what happens next:

* ``deliver``: hand an in-flight message (a random one, so messages are reordered; now
  and then a small batch for one endpoint) to its consumer, called directly, never from
  an asyncio task, so the seed alone decides the run;
* ``relay``: run one store's :meth:`Relay.relay_once`;
* ``tick``: move the virtual clock to the next timer (or end of a delay) and fire what
  is due: the world's :class:`Timers`, i.e. :meth:`Orchestrator.fire_due_timers`, or a
  choreography's periodic jobs (:class:`JobTimers`: the tracker's SLA check, ...),
  each run exactly when it could change something;

and, while its fault budget lasts, injects faults: ``drop`` (a command or event is
lost), ``lost_reply``, ``duplicate`` (delivered, and a copy stays in flight),
``delay`` (a message is held back for a few virtual seconds), ``partition`` (an
endpoint receives nothing for a while), ``crash_before_commit`` (the consumer's
transaction, or the one firing timers, rolls back; the message stays in flight, the
timers stay due), ``crash_after_commit`` (the
commit happened, the acknowledgement did not: redelivered), ``ack_lost`` (a publish
arrived but the relay did not hear back, so it publishes again), ``publish_lost`` and
``timeout`` (timers fire although messages wait in flight: a timeout that hid a
success, or a saga the tracker's SLA check declares stuck while its facts are on
their way). Then it switches to a fair, fault-free mode (oldest message first, timers
only when nothing else can happen) and drives the system to quiescence, so that
liveness can be judged, and asks the world to check its invariants.

Every action taken is appended to the run's schedule. :func:`replay` runs a world from
a schedule instead of a seed (actions that no longer apply are skipped; fair mode
completes the run), and :func:`shrink` removes faults from a failing schedule (delta
debugging) while the violation persists.
"""

from __future__ import annotations

from sagakit.testing.sim.checks import no_dead_letters, nothing_lost
from sagakit.testing.sim.network import EPOCH, InFlight, SimFaultHook, SimNetwork, VirtualClock
from sagakit.testing.sim.scheduler import (
    FAULT_KINDS,
    Action,
    RunResult,
    Scheduler,
    SimConfig,
    Verdict,
    World,
    WorldFactory,
    replay,
    simulate,
)
from sagakit.testing.sim.shrink import Shrunk, shrink
from sagakit.testing.sim.timers import Job, JobTimers, OrchestratorTimers, Timers, tracker_sla

__all__ = [
    "EPOCH",
    "FAULT_KINDS",
    "Action",
    "InFlight",
    "Job",
    "JobTimers",
    "OrchestratorTimers",
    "RunResult",
    "Scheduler",
    "Shrunk",
    "SimConfig",
    "SimFaultHook",
    "SimNetwork",
    "Timers",
    "Verdict",
    "VirtualClock",
    "World",
    "WorldFactory",
    "no_dead_letters",
    "nothing_lost",
    "replay",
    "shrink",
    "simulate",
    "tracker_sla",
]
