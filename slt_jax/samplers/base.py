"""The sampler interface shared by every kernel (after blackjax's ``SamplingAlgorithm``)."""

from typing import Any, Callable, NamedTuple

PyTree = Any


class SamplingAlgorithm(NamedTuple):
    """A sampler as a pair of pure functions.

    ``init(position) -> state`` builds the state a chain carries forward; ``step(key, state,
    loss_grad) -> (state, info)`` advances it by one step, given the gradient of the minibatch
    loss ``∇L_B`` at ``state.position`` (the chain runner evaluates it, because only the runner
    knows the minibatch). ``info`` holds per-step scalars the runner may record.
    """

    init: Callable[[PyTree], Any]
    step: Callable[[Any, Any, PyTree], tuple[Any, Any]]


class KernelFactory(NamedTuple):
    """How the chain runner builds a kernel inside its compiled program.

    ``build(step_size, posterior)`` returns a :class:`SamplingAlgorithm` for the
    :class:`~slt_jax.posterior.LocalPosterior` ``posterior``. The step size and the posterior's
    fields are traced arrays, so one compiled program serves every checkpoint, step size and
    temperature.
    """

    name: str
    build: Callable[..., SamplingAlgorithm]
