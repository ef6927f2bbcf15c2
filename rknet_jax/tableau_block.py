"""One Runge-Kutta time-step with a convolutional vector field, as a Flax Linen module.

:class:`TableauStep` computes (paper section 3.1, equations 2-3)

    z_i     = f(t_n + c_i h, y_n + h sum_j a_ij z_j),     i = 1..s
    y_{n+1} = y_n + h sum_i b_i z_i

for any Butcher tableau (:mod:`rknet_jax.tableaus`), where f is a small convolutional
network (:class:`ConvVectorField`: pre-activation BN -> ReLU -> conv, twice; channels
preserved).  Options:

* ``stage_functions="shared"``: one f for all stages, a genuine vector field f(t, y)
  (equation 3).  f sees the stage time t_n + c_i h as an extra constant input channel
  appended to the input of each of its convolutions (the "concat" time conditioning of
  neural ODEs).  ``"per_stage"``: one f_i per stage, z_i = f_i(y_n + h sum_j a_ij z_j),
  the paper's relaxation (equation 4), in which f_i absorbs the stage time.
* ``learn_coefficients``: a, b (and c in shared mode) become parameters initialised from
  the tableau (section 3.2: "the other coefficients ... are learned by training").  For
  explicit tableaus only the strictly lower triangle of a is ever read, so the step stays
  explicit (the other entries of the stored s x s matrix get zero gradient).
* ``learn_step_size``: h = exp(log_step_size), initialised at ``step_size`` and positive
  by construction (section 3.2: "step size h is learned by training").
* Implicit tableaus: the stage equations are solved by ``implicit_iterations`` unrolled
  fixed-point iterations from the predictor z_i^0 = f(t_n, y_n) (shared) or
  f_i(y_n) (per stage), exactly as :func:`rknet_jax.rk_step` does; see
  :mod:`rknet_jax.rk` for how to choose the count (default: order + 1).

Batch normalisation inside f: every evaluation of f normalises with the statistics of
its own input in training, and (with ``mutable=["batch_stats"]``) every evaluation
updates the running averages of the BN layers it uses.  With a shared f that is s
(explicit) or 1 + s * iterations (implicit) updates per step, so the running statistics
mostly reflect the last stages; use ``"per_stage"`` for stage-specific statistics.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rknet_jax import checks
from rknet_jax import rk as rk_lib
from rknet_jax import tableaus as tableaus_lib
from rknet_jax.layers import LayerConfig

__all__ = ["ConvVectorField", "TableauStep", "STAGE_FUNCTIONS"]

STAGE_FUNCTIONS = ("shared", "per_stage")


class ConvVectorField(nn.Module):
  """A convolutional vector field f(t, y): ``num_layers`` x (BN -> ReLU -> conv).

  The pre-activation block of the paper's convolutional subnetwork (section 3.2,
  "a convolutional subnetwork is employed to approximate the increment"); all
  convolutions go through :class:`rknet_jax.conv.Conv` (He-normal, no bias).

  Attributes:
    features: output channels; None keeps the input's channel count (y -> z of the
      same shape, as an ODE right-hand side must).
    hidden_features: channels between the convolutions; None means ``features``.
    num_layers: number of BN -> activation -> conv layers (2 by default).
    kernel_size: convolution window.
    normalize: use BatchNorm before each activation.
    activation: elementwise nonlinearity, or None for none (with ``normalize=False``
      and ``num_layers=1``, f is a single linear convolution).
    time_conditioning: append a constant channel holding t to the input of every
      convolution, so f depends on the (stage) time as in equation 3.
    config: the shared layer options (:class:`~rknet_jax.layers.LayerConfig`): BatchNorm
      momentum/epsilon (default: the RKNets', the authors' RKCNN code), compute and
      parameter dtypes, convolution formulation.

  Call: ``f(t, y, train=False)`` with y NHWC and t a scalar.
  """

  features: int | None = None
  hidden_features: int | None = None
  num_layers: int = 2
  kernel_size: Sequence[int] = (3, 3)
  normalize: bool = True
  activation: Callable[[Any], Any] | None = nn.relu
  time_conditioning: bool = True
  config: LayerConfig = LayerConfig()

  @nn.compact
  def __call__(self, t, y, train: bool = False):
    checks.check_int("ConvVectorField", "num_layers", self.num_layers)
    cfg = self.config
    out_features = self.features or y.shape[-1]
    hidden = self.hidden_features or out_features
    x = jnp.asarray(y, cfg.dtype)
    for layer in range(self.num_layers):
      if self.normalize:
        x = cfg.batch_norm(train, name=f"bn{layer}")(x)
      if self.activation is not None:
        x = self.activation(x)
      if self.time_conditioning:
        time_channel = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1] + (1,))
        x = jnp.concatenate([x, time_channel], axis=-1)
      last = layer == self.num_layers - 1
      x = cfg.conv(out_features if last else hidden, self.kernel_size, name=f"conv{layer}")(x)
    return x


class TableauStep(nn.Module):
  """One RK time-step y_n -> y_{n+1} with a Butcher tableau and a conv vector field.

  Implements equations 2-3 (``stage_functions="shared"``) or equation 4
  (``"per_stage"``) of the paper; see the module docstring for the options.  Channels
  and spatial size are preserved; the output has dtype ``dtype``.

  Attributes:
    tableau: a :class:`~rknet_jax.tableaus.ButcherTableau` or a shipped name
      (e.g. ``"rk4"``, ``"gauss_legendre2"``).
    step_size: h (> 0); the initial value when ``learn_step_size``.
    time: t_n, the time at the start of this step (shared f only; overridable per
      call with ``t=``).
    stage_functions: ``"shared"`` (one f(t, y), eq. 3) or ``"per_stage"`` (f_i, eq. 4).
    learn_coefficients: make a, b (and c when shared) parameters ``"a"``, ``"b"``,
      ``"c"`` initialised from the tableau.
    learn_step_size: learn h as ``exp(log_step_size)``.
    implicit_iterations: fixed-point iterations for implicit tableaus (None: order + 1).
    hidden_features: width inside the default vector field (None: the input channels).
    kernel_size: conv window of the default vector field.
    vector_field: optional factory for f, called as ``vector_field(name=...)`` and the
      result as ``f(t, y, train=train)``; e.g. ``functools.partial(ConvVectorField,
      num_layers=1, normalize=False, activation=None)`` for a linear f.  None builds
      :class:`ConvVectorField` from the attributes here (time-conditioned iff shared).
    config: the shared layer options (:class:`~rknet_jax.layers.LayerConfig`): compute and
      parameter dtypes, and the BatchNorm settings and convolution formulation of the
      default vector field (default: the RKNets', see :class:`ConvVectorField`).

  Parameters (``params``): ``f`` (shared) or ``f_0 .. f_{s-1}`` (per stage); with
  ``learn_coefficients`` ``a`` (s, s), ``b`` (s,), ``c`` (s,; shared only); with
  ``learn_step_size`` ``log_step_size`` ().

  Example: one RK4 step of a learned conv vector field on 8 channels::

    >>> import jax, jax.numpy as jnp
    >>> from rknet_jax import TableauStep
    >>> x = jnp.ones((2, 8, 8, 8))
    >>> step = TableauStep(tableau="rk4", step_size=0.5)
    >>> variables = step.init(jax.random.key(0), x, train=False)
    >>> y, updates = step.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> y.shape, sorted(variables["params"])
    ((2, 8, 8, 8), ['f'])
  """

  tableau: tableaus_lib.ButcherTableau | str
  step_size: float = 1.0
  time: float = 0.0
  stage_functions: str = "shared"
  learn_coefficients: bool = False
  learn_step_size: bool = False
  implicit_iterations: int | None = None
  hidden_features: int | None = None
  kernel_size: Sequence[int] = (3, 3)
  vector_field: Callable[..., nn.Module] | None = None
  config: LayerConfig = LayerConfig()

  def __post_init__(self):
    # Validate on construction, before any parameter is created.
    tableaus_lib.get(self.tableau)  # KeyError listing the known names
    if self.stage_functions not in STAGE_FUNCTIONS:
      raise ValueError(
        f"stage_functions must be one of {STAGE_FUNCTIONS}, got {self.stage_functions!r}"
      )
    if not (
      isinstance(self.step_size, (int, float, np.floating, np.integer))
      and not isinstance(self.step_size, bool)
      and math.isfinite(self.step_size)
      and self.step_size > 0
    ):
      raise ValueError(f"step_size must be a positive finite number, got {self.step_size!r}")
    checks.check_optional_int(
      "TableauStep", "implicit_iterations", self.implicit_iterations, 1, checks.MAX_COUNT
    )
    if isinstance(self.vector_field, nn.Module):
      raise ValueError(
        "vector_field must be a factory (a Module class or "
        "functools.partial of one), not a Module instance: got "
        f"{type(self.vector_field).__name__} instance"
      )
    if self.vector_field is not None and not callable(self.vector_field):
      raise ValueError(f"vector_field must be callable, got {self.vector_field!r}")
    super().__post_init__()

  @property
  def butcher_tableau(self) -> tableaus_lib.ButcherTableau:
    """The resolved :class:`~rknet_jax.tableaus.ButcherTableau`."""
    return tableaus_lib.get(self.tableau)

  @property
  def num_evaluations(self) -> int:
    """Evaluations of the vector field per step (cost: each is one f, i.e. two convs).

    Explicit: the stages actually needed (all s with learnable coefficients; stages
    with b_i = 0 used by no later stage are skipped otherwise).  Implicit: the
    predictor (1 shared, s per stage) plus s per fixed-point iteration, except that a
    stage whose row of a is zero (fixed coefficients only) is evaluated once.
    """
    tableau = self.butcher_tableau
    s = tableau.num_stages
    if tableau.is_explicit:
      return s if self.learn_coefficients else sum(tableau.needed_stages)
    iterations = self.implicit_iterations or rk_lib.default_implicit_iterations(tableau.order)
    shared = self.stage_functions == "shared"
    predictor = 1 if shared else s
    zero_rows = (
      [] if self.learn_coefficients else [i for i, zero in enumerate(tableau.zero_rows) if zero]
    )
    # A zero row is evaluated once, at y_n; with a shared f and c_i = 0 that is z0.
    extra = sum(1 for i in zero_rows if not (shared and tableau.c[i] == 0))
    return predictor + extra + (s - len(zero_rows)) * iterations

  def _factory(self):
    if self.vector_field is not None:
      return self.vector_field
    return functools.partial(
      ConvVectorField,
      hidden_features=self.hidden_features,
      kernel_size=tuple(self.kernel_size),
      time_conditioning=self.stage_functions == "shared",
      config=self.config,
    )

  @nn.compact
  def __call__(self, y, train: bool = False, t=None):
    """Advances y (NHWC) by one step; ``t`` overrides ``time`` (may be traced)."""
    tableau = self.butcher_tableau
    s = tableau.num_stages
    shared = self.stage_functions == "shared"
    dtype, param_dtype = self.config.dtype, self.config.param_dtype
    y = jnp.asarray(y, dtype)
    t = self.time if t is None else t

    if self.learn_coefficients:

      def from_tableau(values):
        return lambda key, shape, dtype: jnp.asarray(values, dtype).reshape(shape)

      a = self.param("a", from_tableau(tableau.a), (s, s), param_dtype).astype(dtype)
      b = self.param("b", from_tableau(tableau.b), (s,), param_dtype).astype(dtype)
      if shared:
        c = self.param("c", from_tableau(tableau.c), (s,), param_dtype).astype(dtype)
      else:  # absorbed into f_i (equation 4): never read, so not a parameter
        c = tableau.c
    else:
      a, b, c = tableau.a, tableau.b, tableau.c

    if self.learn_step_size:
      log_h = self.param(
        "log_step_size",
        lambda key, shape, dtype: jnp.full(shape, math.log(self.step_size), dtype),
        (),
        param_dtype,
      )
      h = jnp.exp(log_h).astype(dtype)
    else:
      h = self.step_size

    factory = self._factory()
    if shared:
      f = factory(name="f")

      def stage_fn(i, ti, yi):
        return f(ti, yi, train=train)
    else:
      fs = {}

      def stage_fn(i, ti, yi):
        if i not in fs:  # created lazily: stages never evaluated get no parameters
          fs[i] = factory(name=f"f_{i}")
        return fs[i](ti, yi, train=train)

    iterations = None
    if tableau.is_implicit:
      iterations = self.implicit_iterations or rk_lib.default_implicit_iterations(tableau.order)
    report = tableau.is_implicit and self.is_mutable_collection("intermediates")
    out = rk_lib.runge_kutta_step(
      stage_fn,
      t,
      y,
      h,
      a,
      b,
      c,
      explicit=tableau.is_explicit,
      implicit_iterations=iterations or 1,
      solver="fixed_point",
      shared_predictor=shared,
      return_residual=report,
    )
    if not report:
      return out
    y_next, residual = out  # rk_lib.implicit_residuals reads it from an apply's state
    self.sow("intermediates", rk_lib.IMPLICIT_RESIDUAL, residual)
    return y_next
