"""The interface shared by the parts of a training step, and the registries that name them.

A step's loss is ``L = L_sup + w_c(t) L_c + w_g(t) L_g``: one part per term, each chosen by name from its
registry (the flags ``--supervised_loss``, ``--specialist`` and ``--generalist_term`` take the names):

- ``SUPERVISED_LOSSES``: called with a ``LabeledBatch`` (the labeled rows);
- ``CONSISTENCY_TERMS``: the specialist consistency (student vs the EMA teacher), called with an
  ``UnlabeledBatch``;
- ``GENERALIST_TERMS``: the generalist term (student vs the frozen generalist's pseudo-labels), called with
  an ``UnlabeledBatch``; it owns its generalist (built in ``setup``) and calls it itself.

Every part returns a ``TermOutput``. The engine adds ``weight(t) * loss`` of each part to the total and logs
``loss/<slot>``, ``weights/<slot>`` (slot: 'supervised', 'consistency', 'generalist'), the part's ``logs``
as ``<log_prefix>/<key>`` and its ``visuals`` as ``labeled/<key>`` or ``unlabeled/<key>``. Names under
``loss/`` (a part with ``log_prefix = 'loss'`` logs loss components) are listed first in the log line and
checked for finiteness before the optimiser step. The engine never names a particular part: what a part
needs (the teacher, the generalist, its own random stream) it says through its class attributes.

Adding a part: subclass ``Term`` (or one of the bases in ``training.methods`` / ``training.generalist_terms``),
give it a ``name`` and decorate it with ``@register_supervised_loss``, ``@register_consistency`` or
``@register_generalist_term``. The flags' choices and help text come from the registries, so the new name is
usable at once, provided its module is imported before the command line is parsed (the built-in parts'
modules are imported by ``training.methods``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from training.timing import Timer, null_timer

LogValue = Union[float, torch.Tensor]


@dataclass
class TermOutput:
    """What every part of a step returns.

    loss: scalar tensor (with its autograd graph), or None when the part adds nothing this step.
    logs: scalars to log, name -> python float or 0-d tensor (tensors are read in the step's one host sync).
    visuals: volumes for TensorBoard, name -> (X, Y, Z) tensor of the first patch of the part's batch.
    """
    loss: Optional[torch.Tensor]
    logs: dict[str, LogValue] = field(default_factory=dict)
    visuals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LabeledBatch:
    """The labeled rows of a step (L = labeled_bs). logits: (L, C, X, Y, Z) float32 student logits (with
    autograd graph); labels: (L, X, Y, Z) int64 class indices."""
    logits: torch.Tensor
    labels: torch.Tensor


@dataclass
class UnlabeledBatch:
    """The unlabeled rows of step ``t`` (U = batch_size - labeled_bs), as every unlabeled part sees them.

    images: (U, 1, X, Y, Z) patches; student_prob: (U, C, X, Y, Z) float32 student softmax (with autograd
    graph; its channel 1 detached is the ``student_fg_prob`` that prompts a generalist); teacher: the
    ``training.methods.NoisyTeacher`` (None when no part needs one); timer: the engine's section timer.
    """
    t: int
    max_iterations: int
    images: torch.Tensor
    student_prob: torch.Tensor
    teacher: Optional[object] = None
    timer: Timer = null_timer


@dataclass
class SetupContext:
    """What a part may use to set itself up, before any data is read (``Term.setup``).

    generator: the parts' own random stream (e.g. simulated clicks), saved and restored with the train
    state; warn: writes a warning to the run's log.
    """
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    timer: Timer = null_timer
    generator: Optional[torch.Generator] = None
    warn: Callable[[str], None] = print


class Term:
    """A part of the step's loss. Subclasses set the class attributes and implement ``__call__``.

    name: registry key (the flag's value); log_prefix: prefix of the part's ``logs``; uses_unlabeled: the
    part reads the unlabeled rows (a method without such a part never loads them); needs_teacher: build the
    EMA teacher; needs_generator: the part draws from ``SetupContext.generator``.
    """
    name = ""
    log_prefix = ""
    uses_unlabeled = False
    needs_teacher = False
    needs_generator = False

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, ctx: SetupContext) -> None:
        """Called once before any data is read (e.g. load a model, so a missing file stops the run early)."""

    def weight(self, t: int) -> float:
        """w(t), the factor of the part's loss at step ``t``."""
        return 1.0

    def __call__(self, batch) -> TermOutput:
        raise NotImplementedError


class Registry(dict):
    """name -> part class, filled by the ``register`` class decorator (one name per class)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, cls: type[Term]) -> type[Term]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} has no name to register as a {self.what}")
        if self.get(cls.name, cls) is not cls:
            raise ValueError(f"{self.what} {cls.name!r} is registered twice ({self[cls.name].__name__}, "
                             f"{cls.__name__})")
        self[cls.name] = cls
        return cls

    def build(self, name: str, cfg) -> Term:
        if name not in self:
            raise KeyError(f"{self.what} {name!r} is not registered; choose from {sorted(self)}")
        return self[name](cfg)

    def describe(self) -> str:
        """'name: first docstring line; ...' of every entry (the flags' help text)."""
        def summary(cls):
            doc = (cls.__doc__ or "").strip().splitlines()
            return doc[0].rstrip(".") if doc else cls.__name__
        return "; ".join(f"{name}: {summary(cls)}" for name, cls in sorted(self.items()))


SUPERVISED_LOSSES = Registry("supervised loss")
CONSISTENCY_TERMS = Registry("specialist")   # the flag's name
GENERALIST_TERMS = Registry("generalist term")
register_supervised_loss = SUPERVISED_LOSSES.register
register_consistency = CONSISTENCY_TERMS.register
register_generalist_term = GENERALIST_TERMS.register


@register_consistency
@register_generalist_term
class NoTerm(Term):
    """no term (weight 0, reads no unlabeled patch)."""
    name = "none"

    def weight(self, t: int) -> float:
        return 0.0

    def __call__(self, batch) -> TermOutput:
        return TermOutput(None)
