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
  is due: the world's :class:`Timers`, i.e. :meth:`Orchestrator.fire_due_timers` of one
  of its orchestrator workers, or a choreography's periodic jobs (:class:`JobTimers`:
  the tracker's SLA check, ...), each run exactly when it could change something;
* ``cancel``: a customer cancels a running saga (at most ``max_cancels`` per run);
* ``operator``: a person decides on a saga in the manual queue, through
  :meth:`Orchestrator.resolve`: one of the manual actions (``retry``, ``mark_done``,
  ``compensate``, ``mark_compensated``, ``use_rung`` with a rung, ``accept_partial``),
  mostly one the machine accepts for the saga (tried first on its pure transition
  function), now and then any (a refused decision changes nothing and is counted as
  ``operator_refused``). Not a fault, but at most ``max_decisions`` per run, taken while
  the answers to the tries before the decision may still be on their way or be
  duplicated (the fence floor must hold); the fair phase decides on some of the sagas
  left in the queue, and a saga a person sent back to running or compensating must end
  terminal again;

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
their way), ``stale_timer`` (a timer that already fired is applied again, with its old
fence, as by a second worker that read the row before the first deleted it) and
``late_timer`` (a step timer the saga replaced or cancelled before it fired is applied
late; the machine's fence checks must make both harmless). A partition is now and then
an outage, longer than every retry of a command and than a saga's deadline. Then it
switches to a fair, fault-free mode (oldest message first, timers only when nothing
else can happen) and drives the system to quiescence, so that liveness can be judged,
and asks the world to check its invariants: the checkout's (from the services'
ledgers), plus no dead letters, compensations in reverse order of the steps they undo
(:func:`compensation_order`) and stale inputs moving nothing (:func:`stale_inputs`:
answers to earlier tries, or to tries from before a person's decision, and timers of
tries no longer in flight), read from the sagas' histories. The verdict also counts
what the histories show was exercised (:func:`sagakit.testing.coverage.exercised`).

An orchestrated (or hybrid) world runs two orchestrator workers on its saga store, as
two ``sagakit worker`` processes would: each delivery to the orchestrator's endpoints
is handled, and each firing of timers done, by one of them (chosen by the seed).

Every action taken is appended to the run's schedule. :func:`replay` runs a world from
a schedule instead of a seed (actions that no longer apply are skipped; fair mode
completes the run), and :func:`shrink` removes faults from a failing schedule (delta
debugging) while the violation persists.
"""

from __future__ import annotations

from sagakit.testing.sim.checks import (
    Answer,
    compensation_order,
    no_dead_letters,
    nothing_lost,
    stale_inputs,
)
from sagakit.testing.sim.network import EPOCH, InFlight, SimFaultHook, SimNetwork, VirtualClock
from sagakit.testing.sim.scheduler import (
    FAULT_KINDS,
    MANUAL_ACTIONS,
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
    "MANUAL_ACTIONS",
    "Action",
    "Answer",
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
    "compensation_order",
    "no_dead_letters",
    "nothing_lost",
    "replay",
    "shrink",
    "simulate",
    "stale_inputs",
    "tracker_sla",
]
