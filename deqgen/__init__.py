"""deqgen: deep-equilibrium models in PyTorch.

Public API (anything not re-exported here may change)::

    from deqgen import FixedPointProblem, Picard, Anderson, Broyden, fixed_point, run, Solution, SolverStats, Status
"""

from deqgen import solvers
from deqgen.problem import FixedPointProblem
from deqgen.solve import fixed_point
from deqgen.solvers import Anderson, Broyden, Picard, Solver, run
from deqgen.stats import Solution, SolverError, SolverStats, Status

__version__ = "0.1.0"

__all__ = [
    "FixedPointProblem",
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "fixed_point",
    "run",
    "solvers",
    "Solution",
    "SolverStats",
    "SolverError",
    "Status",
]
