"""Models by name or spec: :func:`create_model`, :func:`parse_name`, :func:`list_models`.

A model is described by a spec (:mod:`rknet_jax.spec`: one frozen, validated dataclass per
family) and named in the paper's notation (:mod:`rknet_jax.names`: how names read).
:func:`parse_name` reads a name (plus keyword fields) into a spec, starting from the
ready-made values when the name is a row of the paper's tables (:mod:`rknet_jax.paper`);
:func:`create_model` builds the Flax module of a name or a spec.  The converters
:func:`erknet_from_densenet` and :func:`irknet_from_cliquenet` apply the paper's rules
(sections 3.3.1 and 3.3.2) to a baseline.
"""

import dataclasses
from typing import Any

from rknet_jax import checks, families, models, names, paper
from rknet_jax import spec as spec_lib

__all__ = [
  "create_model",
  "list_models",
  "parse_name",
  "build",
  "resolve",
  "module_kwargs",
  "erknet_from_densenet",
  "irknet_from_cliquenet",
]


def list_models():
  """Names of the ready-made models: every row of Tables 1-3, then more baselines.

  Each works as ``create_model(name)`` with no other argument.  Table 2's two IRKNet rows
  share a name in the paper; here they carry a growth-rate tag (``-k150``, ``-k180``).
  """
  return list(paper.READY_MADE)


def parse_name(name: str, **overrides) -> spec_lib.ModelSpec:
  """The spec of a model name (:mod:`rknet_jax.names`) with ``overrides`` applied.

  A ready-made name (:func:`list_models`) starts from its row's values; keyword arguments
  replace them.  For tableau RKNets, options of
  :class:`~rknet_jax.tableau_block.TableauStep` (``models.TABLEAU_STEP_OPTIONS``) may be
  given as keywords and go to ``step_options``.

  Raises:
    ValueError: a bad name, an unknown keyword (naming the closest known one), a value
      that contradicts the name or is invalid; nothing is built.
  """
  if not isinstance(name, str):
    raise ValueError(f"model name must be a str, got {name!r}")
  overrides = {k: v for k, v in overrides.items() if v is not None}  # None: not given
  fields = {**paper.ready_made(name), **overrides}
  return names.spec_from_name(name, _ready_made_hint(name), **fields)


def _ready_made_hint(name: str) -> str:
  """ ", or a ready-made name such as ..." for an RKNet name with tagged ready-made rows."""
  try:
    canonical = names.parse(name).canonical()
  except ValueError:
    return ""
  tagged = [n for n in list_models() if n.startswith(canonical + "-k")]
  return f", or a ready-made name such as {' or '.join(map(repr, tagged))}" if tagged else ""


def create_model(name: str | spec_lib.ModelSpec, **overrides):
  """Build an RKNet, tableau RKNet or baseline from a name or a spec.

  Args:
    name: a model name, e.g. ``"ERKNet-7×1 6×1 6×1"``,
      ``"IRKNet-5x1 5x1 5x1-AB-k150"``, ``"RK4Net-1x3 1x3 1x3"``, ``"DenseNet-121"`` (see
      :func:`list_models` and :mod:`rknet_jax.names`), or a spec of :mod:`rknet_jax.spec`.
    **overrides: spec fields, e.g. ``growth_rate`` (k, one int or one per period; required
      unless the name is ready-made or carries ``-k<N>``), ``num_classes``, ``stem``,
      ``growth_multipliers``, ``bottleneck_width``, ``attention``, ``multiscale``,
      ``num_updates``, ``update_order``, ``share_weights``, ``method`` (generic ``RKNet-``
      names), ``dropout_rate``, ``bn_momentum``, ``bn_epsilon``, ``dtype`` (float32,
      bfloat16 or float16 compute; params and logits stay float32), ``remat``; for tableau
      RKNets the TableauStep options.  Layer options left out take the model class's
      default (:mod:`rknet_jax.models` names each source).

  Returns:
    A Flax Linen module following the model contract of docs/design.md.

  Raises:
    ValueError: a bad name or option, quoting the bad part and the expected form, before
      any array is built.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from rknet_jax import create_model
    >>> model = create_model("ERKNet-1x1 1x1", growth_rate=4)
    >>> x = jnp.ones((2, 8, 8, 3))                      # NHWC
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> sorted(variables)
    ['batch_stats', 'params']
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
    >>> create_model("ERKNet-1x1 1x1", grwoth_rate=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...did you mean 'growth_rate'?...
  """
  if isinstance(name, spec_lib.ModelSpec):
    spec = name.replace(**overrides) if overrides else name
  else:
    spec = parse_name(name, **overrides)
  return build(spec)


def module_kwargs(spec: spec_lib.ModelSpec) -> dict[str, Any]:
  """The module fields of a spec: its fields under the same names, the layer options left
  None dropped (the module's default applies) and ``dtype`` as a dtype."""
  out = {k: v for k, v in spec.fields().items() if not (k in spec_lib.LAYER_OPTIONS and v is None)}
  if "dtype" in out:
    out["dtype"] = checks.DTYPES[out["dtype"]]
  return out


def build(spec: spec_lib.ModelSpec):
  """The Flax module of a (valid) spec of any registered family; nothing is initialised.

  Raises:
    ValueError: for an object that is not a spec of a registered family, or an option the
      module's own check refuses (e.g. a tableau step option's value), naming the model.
  """
  model = families.of_spec(spec).module_class()(**module_kwargs(spec))
  try:
    model.check()
  except ValueError as e:
    raise ValueError(f"{spec.owner}: {e}") from None
  return model


def resolve(spec: spec_lib.ModelSpec) -> spec_lib.ModelSpec:
  """``spec`` with every layer option left None set to the model class's default.

  What a workdir's ``model.json`` stores, so a later change of a default does not change a
  trained model.
  """
  module_cls = families.of_spec(spec).module_class()
  defaults = {f.name: f.default for f in dataclasses.fields(module_cls)}
  filled = {
    f: defaults[f] for f in spec_lib.LAYER_OPTIONS if getattr(spec, f) is None and f in defaults
  }
  if "dtype" in filled:
    filled["dtype"] = checks.dtype_name(type(spec).__name__, filled["dtype"])
  return dataclasses.replace(spec, **filled)


# ---------------------------------------------------------------------------------------
# Converters (paper sections 3.3.1 and 3.3.2)


def _as_config(config, cls, what):
  """The fields of a baseline given by name, spec, module or dict (spec field names)."""
  if isinstance(config, str):
    config = parse_name(config)
  if isinstance(config, (spec_lib.ModelSpec, cls)):
    return {
      f.name: getattr(config, f.name)
      for f in dataclasses.fields(config)
      if f.name not in ("parent", "name")
    }
  if isinstance(config, dict):
    return dict(config)
  raise ValueError(
    f"{what}: expected a model name, a {cls.__name__} module or a dict of its "
    f"fields, got {type(config).__name__}"
  )


def erknet_from_densenet(config) -> dict[str, Any]:
  """The ERKNet the paper's Rules 1-3 make of a DenseNet (section 3.3.1).

  Each dense block becomes a period with one time-step (r = 1): the block input has
  c_n = m_n k channels (Rule 1), its L_n layers are s_n groups of m_n growths (Rules 2-3),
  and the summation y + sum of groups replaces the concatenation.  The transitions keep
  DenseNet's output widths (so m_{n+1} = DenseNet's transition output / k), and the
  postprocessor pools the last period only, as DenseNet does.  E.g. DenseNet-121 gives
  ``ERKNet-3×1 3×1 3×1 1×1-B`` with m = 2, 4, 8, 16: the first row of Table 3.

  Args:
    config: a DenseNet name (``"DenseNet-121"``), a :class:`~rknet_jax.models.DenseNet`, or
      a dict of its fields (``block_layers``, ``growth_rate``, ``init_features``, optional
      ``bottleneck_width``, ``compression``, ``num_classes``, ``stem``).

  Returns:
    A dict of :func:`create_model` arguments, including ``name``: ``create_model(**cfg)``.

  Raises:
    ValueError: naming the rule the DenseNet breaks (e.g. DenseNet-169: Rule 3, its last
      block has 32 layers, not a multiple of m = 20).
  """
  cfg = _as_config(config, models.DenseNet, "erknet_from_densenet")
  try:
    block_layers = tuple(cfg["block_layers"])
    k = int(cfg["growth_rate"])
    c = int(cfg["init_features"])
  except KeyError as e:
    raise ValueError(f"erknet_from_densenet: the DenseNet config lacks {e}") from None
  compression = float(cfg.get("compression", 1.0))
  width = cfg.get("bottleneck_width")
  stages, ms = [], []
  for n, L in enumerate(block_layers):
    if c % k:
      raise ValueError(
        f"erknet_from_densenet: Rule 1 broken: dense block {n + 1} starts "
        f"with {c} channels, not m*k for an integer m (k = {k})"
      )
    m = c // k
    if L % m:
      raise ValueError(
        f"erknet_from_densenet: Rule 3 broken: dense block {n + 1} has {L} "
        f"layers, not s*m for an integer s (m = {c}/{k} = {m})"
      )
    stages.append(L // m)
    ms.append(m)
    if n < len(block_layers) - 1:
      c = int(compression * (c + L * k))
  terms = " ".join(f"{s}×1" for s in stages)
  out = dict(
    name=f"ERKNet-{terms}" + ("-B" if width is not None else ""),
    growth_rate=k,
    growth_multipliers=tuple(ms),
    num_classes=cfg.get("num_classes", 10),
    stem=cfg.get("stem", "cifar"),
    multiscale=False,
  )
  if width is not None:
    out["bottleneck_width"] = int(width)
  return out


def irknet_from_cliquenet(config, *, strict: bool = False) -> dict[str, Any]:
  """The IRKNet the paper's Rules 1-4 make of a CliqueNet (section 3.3.2).

  Each clique block becomes a period with one time-step (r = 1) of an s-stage IRK method,
  s = the block's layers, the same k, A and B (bottleneck width k) options, the same number
  and order of alternate updates.  Rule 4 (m = 1) makes the state y carry k channels, so the
  stem and the transitions output k channels instead of CliqueNet's 64 and s*k (with
  ``strict=True`` that mismatch is an error instead); the summation y + sum of stages
  replaces the concatenation, the postprocessor pools y of every period (multiscale, as
  CliqueNet), and CliqueNet's compression C of the pooled block features has no counterpart
  (dropped).  E.g. CliqueNet-ABC-T30-k150 gives ``IRKNet-5×1 5×1 5×1-AB`` with k = 150, the
  Table 2 row.

  Raises:
    ValueError: naming the broken rule (no alternate update: equation 6 needs every stage
      to read all others; a block of one layer; with ``strict``, Rules 1/4 on the widths).
  """
  cfg = _as_config(config, models.CliqueNet, "irknet_from_cliquenet")
  try:
    block_layers = tuple(cfg["block_layers"])
    ks = checks.per_period(
      "irknet_from_cliquenet", "growth_rate", cfg["growth_rate"], len(block_layers)
    )
  except KeyError as e:
    raise ValueError(f"irknet_from_cliquenet: the CliqueNet config lacks {e}") from None
  num_updates = int(cfg.get("num_updates", 1))
  if num_updates < 1:
    raise ValueError(
      "irknet_from_cliquenet: equation 6 broken: with num_updates = 0 there is "
      "no alternate update, stage i never reads stages j > i, and the block is "
      "an explicit method (use erknet_from_densenet-style ERKNets)"
    )
  checks.check_shared_weight_stages("irknet_from_cliquenet", block_layers)
  if strict:
    c = int(cfg.get("init_features", 64))
    for n, s in enumerate(block_layers):
      if c != ks[n]:
        raise ValueError(
          f"irknet_from_cliquenet: Rules 1 and 4 broken: block {n + 1} starts "
          f"with {c} channels, not m*k with m = 1 (k = {ks[n]})"
        )
      c = s * ks[n]
  letters = ("A" if cfg.get("attention") else "") + ("B" if cfg.get("bottleneck") else "")
  terms = " ".join(f"{s}×1" for s in block_layers)
  out = dict(
    name=f"IRKNet-{terms}" + (f"-{letters}" if letters else ""),
    growth_rate=ks[0] if len(set(ks)) == 1 else ks,
    num_classes=cfg.get("num_classes", 10),
    stem=cfg.get("stem", "cifar"),
    multiscale=True,
    num_updates=num_updates,
    update_order=cfg.get("update_order", "gauss_seidel"),
  )
  return out
