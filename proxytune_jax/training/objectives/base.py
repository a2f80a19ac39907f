"""The objective interface (a strategy) and the one registry of objectives.

An objective is a frozen dataclass: its fields are its typed hyperparameters (the ``objective`` node of a
``TrainConfig``), its methods say what the trainer must provide and how the loss is computed:

- ``frozen_models()``: the frozen models the step reads, by role (``{"teacher": folder}``; several at once
  for a fused teacher). The trainer loads each and passes its params as ``frozen[role]``.
- ``attach(data)``: host-side additions to each batch for a dataset (a teacher's top-k cache, an n-gram
  prior), or ``None``. ``data`` is a ``DataContext`` (the tokenized examples, the file, the tokenizer).
- ``make_generate(student, frozen_graphdefs)``: ``None`` (the default), or the pure
  ``generate(params, frozen, batch, rng) -> batch`` that makes data *inside* the jitted step before the
  gradient (student samples for on-policy distillation), under ``stop_gradient``.
- ``init_state()`` / ``update_state(state, step, metrics)``: objective state carried in the train state
  (``TrainState.extras``, checkpointed with it; a schedule such as TAID's interpolation weight).
- ``bind_run(total_steps)``: the objective for a run of ``total_steps`` optimizer steps (the trainer calls it
  first; TAID's schedule needs the run's length). Default: itself.
- ``loss_fn(student, frozen_graphdefs)``: the pure ``loss_fn(params, frozen, batch, rng, state) ->
  (loss, metrics)`` the step differentiates. ``metrics`` holds ``loss``, every term, and ``tokens`` (the
  number of counted positions: the batch weight in gradient accumulation and evaluation).

Registering: ``@register_objective`` on the class (``name`` a class attribute). ``OBJECTIVES`` maps names to
classes; a config file or a user script may register its own objective and train with it through
``proxytune train`` or ``training.train``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from proxytune_jax.errors import UserError

LossFn = Callable[[Any, Any, dict, Any, Any], tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class DataContext:
    """What ``Objective.attach`` may read about one dataset of a run."""

    split: str  # "train" or "eval"
    path: str  # the JSONL file ("" for in-memory data)
    examples: Any  # the tokenized examples (``training.data.Example`` list), in file order
    tokenizer: Any


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base class of every objective; see the module docstring. Subclasses are frozen dataclasses."""

    name: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ``UserError`` for values that cannot work (types are checked by the config loader)."""

    def frozen_models(self) -> dict[str, str]:
        return {}

    def attach(self, data: DataContext) -> Callable[[dict], dict] | None:
        del data
        return None

    def bind_run(self, total_steps: int) -> "Objective":
        del total_steps
        return self

    def make_generate(self, student, frozen_graphdefs: dict) -> Callable[[Any, Any, dict, Any], dict] | None:
        del student, frozen_graphdefs
        return None

    def init_state(self) -> dict:
        return {}

    def update_state(self, state: dict, step, metrics: dict) -> dict:
        del step, metrics
        return state

    def loss_fn(self, student, frozen_graphdefs: dict) -> LossFn:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective] | None = None, *, replace: bool = False):
    """Class decorator (or function) adding an ``Objective`` subclass to ``OBJECTIVES`` under ``cls.name``."""

    def add(c):
        if not (isinstance(c, type) and issubclass(c, Objective) and dataclasses.is_dataclass(c)):
            raise TypeError("register_objective takes a dataclass subclass of training.objectives.Objective")
        if not c.name:
            raise TypeError(f"{c.__name__} needs a class attribute `name`")
        if c.name in OBJECTIVES and OBJECTIVES[c.name] is not c and not replace:
            if OBJECTIVES[c.name].__qualname__ == c.__qualname__:  # the same file run again (a resume)
                OBJECTIVES[c.name] = c
                return c
            raise UserError(f"an objective named {c.name!r} is already registered; pick another name")
        OBJECTIVES[c.name] = c
        return c

    return add if cls is None else add(cls)


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise UserError(f"objective {name!r} is unknown; choose one of {', '.join(OBJECTIVES)} (or register your "
                        "own with training.register_objective)")
    return OBJECTIVES[name]
