"""How the driver side reaches the weight component inside a Ray actor: typed, no method names.

The learner (rank 0) holds a :class:`~ray_rlhf.sync.sender.WeightSender` and every generator a
:class:`~ray_rlhf.sync.receiver.WeightReceiver`, each as its attribute ``weights``
(:class:`WeightSource`, :class:`WeightSink`). The actor classes carry no method for the sync: the
broadcaster runs the component's own method in the actor with :func:`call`, e.g.
``call(generator, WeightReceiver.load, version, ref, True)``. That is Ray's ``__ray_call__``
(every actor has it: it runs a function on the actor's instance, with the arguments resolved as
for any actor method -- an ObjectRef argument arrives as its value) with :func:`_on_weights` as
the function, which calls ``method(actor.weights, *args)``.

Why this seam: the method is passed as a function object, so an editor jumps from the call to its
code and a type checker checks the arguments against its signature (``ParamSpec``); the actor
classes stay free of one-line delegates, and this package imports nothing of the classes it runs
in (the learner and the generator hand their component a callable or an engine instead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from ray_rlhf.sync.receiver import WeightReceiver
from ray_rlhf.sync.sender import WeightSender

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", WeightSender, WeightReceiver)


class WeightSource(Protocol):
    """An actor whose weights are sent: the learner's rank 0."""

    weights: WeightSender


class WeightSink(Protocol):
    """An actor whose engine loads the weights: a generator."""

    weights: WeightReceiver


def _on_weights(actor: WeightSource | WeightSink, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs in the actor: ``method`` on the actor's weight component."""
    return method(actor.weights, *args, **kwargs)


def call(handle: Any, method: Callable[Concatenate[C, P], R], *args: P.args, **kwargs: P.kwargs) -> Any:
    """``method(actor.weights, *args, **kwargs)`` inside the actor behind ``handle``; returns the
    ObjectRef of its result (a failed or dead actor raises at ``ray.get``, as for any actor call).

    ``handle``: a Ray actor handle of a :class:`WeightSource` or :class:`WeightSink`; ``method``: a
    method of :class:`WeightSender` or :class:`WeightReceiver`, e.g. ``WeightSender.export``.
    """
    return handle.__ray_call__.remote(_on_weights, method, *args, **kwargs)
