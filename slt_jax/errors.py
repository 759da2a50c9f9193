"""What the library raises and warns, in one place, so callers can catch them by kind."""


class CalibrationError(RuntimeError):
    """No step size could be verified: the sweep (with its downward extensions) found no two
    consecutive stable step sizes that agree."""


class CalibrationWarning(UserWarning):
    """A result the library cannot fully vouch for: a step size above the kernel's stable step
    at the chains, or a λ̂ trace that had not stopped trending when the run ended."""


class DivergenceWarning(UserWarning):
    """Some chains diverged and were excluded from the estimate."""


class DivergenceError(RuntimeError):
    """Chains diverged and the caller asked for an error (``on_divergence="raise"``)."""
