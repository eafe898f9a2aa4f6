"""deqgen: deep-equilibrium models in PyTorch.

Public API (anything not re-exported here may change)::

    from deqgen import FixedPointProblem, Picard, Anderson, Broyden, fixed_point, run, Solution, SolverStats, Status
    from deqgen import ImplicitLayer, JFB, SJFB, Phantom, ImplicitDiff, Unrolled
    from deqgen import attention, AttentionBackend, AppendCache, IterationKeyedCache, EquilibriumCache
    from deqgen import jac_reg, spectral_radius, fp_correction, VariationalDropout, weight_norm, spectral_norm
    from deqgen import tree, regularization, nn   # structured states, Jacobian losses, reusable cell parts
"""

from deqgen import gradients, nn, regularization, solvers, tree
from deqgen._version import __version__ as __version__
from deqgen.gradients import JFB, SJFB, BackwardStatsRecorder, GradInfo, ImplicitDiff, Phantom, Unrolled
from deqgen.kv_cache import AppendCache, EquilibriumCache, IterationKeyedCache, KVCache, MissingIterationError
from deqgen.layer import ImplicitLayer, implicit_solve
from deqgen.nn.attention import AttentionBackend, attention
from deqgen.nn.dropout import VariationalDropout
from deqgen.nn.normalization import apply_norm, spectral_norm, weight_norm
from deqgen.problem import FixedPointProblem
from deqgen.regularization import fp_correction, jac_reg, spectral_radius
from deqgen.solve import fixed_point
from deqgen.solvers import Anderson, Broyden, Picard, Solver, run
from deqgen.stats import Solution, SolverError, SolverStats, Status

__all__ = [
    "JFB",
    "SJFB",
    "Anderson",
    "AppendCache",
    "AttentionBackend",
    "BackwardStatsRecorder",
    "Broyden",
    "EquilibriumCache",
    "FixedPointProblem",
    "GradInfo",
    "ImplicitDiff",
    "ImplicitLayer",
    "IterationKeyedCache",
    "KVCache",
    "MissingIterationError",
    "Phantom",
    "Picard",
    "Solution",
    "Solver",
    "SolverError",
    "SolverStats",
    "Status",
    "Unrolled",
    "VariationalDropout",
    "apply_norm",
    "attention",
    "fixed_point",
    "fp_correction",
    "gradients",
    "implicit_solve",
    "jac_reg",
    "nn",
    "regularization",
    "run",
    "solvers",
    "spectral_norm",
    "spectral_radius",
    "tree",
    "weight_norm",
]
