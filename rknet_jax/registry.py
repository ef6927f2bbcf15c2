"""Models by name: :func:`create_model`, :func:`list_models` and the baseline converters.

How a name reads (the paper's notation, section 3.2)::

    <family>-<s×r> <s×r> ...[-<letters>][-k<growth rate>]

* ``family``: ``ERKNet`` (explicit RK time-steps = dense blocks, section 3.3.1),
  ``IRKNet`` (implicit = clique blocks, section 3.3.2), ``RKNet`` (generic; explicit unless
  ``method="implicit"``), or ``<tableau>Net`` for a tableau RKNet, e.g. ``RK4Net``,
  ``Gauss_Legendre2Net`` (any name or alias of :func:`rknet_jax.tableaus.get`,
  case-insensitive).
* one ``s×r`` term per period (``x`` may replace ``×``): r time-steps of an s-stage method.
  For a tableau RKNet the first number is the number of vector fields per time-step:
  1 (one f(t, y) shared by all stages) or the tableau's stage count (one f_i per stage,
  equation 4); anything else is an error.  So ``RK4Net-1×3 1×3 1×3`` is three periods of
  three classic-RK4 time-steps each with one shared vector field, and ``RK4Net-4×3 4×3 4×3``
  the same with four per-stage vector fields.
* letters: ``A`` attentional transitions, ``B`` bottleneck layers (width
  ``bottleneck_width``, default 4k for ERK steps as in Table 3, k for IRK steps as in
  Table 2).  Tableau RKNets accept ``A`` only.
* ``-k<N>``: the growth rate, for names that need one to be complete (Table 2 lists
  ``IRKNet-5×1 5×1 5×1-AB`` with k = 150 and k = 180: the ready-made names are
  ``IRKNet-5×1 5×1 5×1-AB-k150`` and ``IRKNet-5×1 5×1 5×1-AB-k180``).

Baselines: ``DenseNet-121``/``-169``/``-201``/``-161`` (ImageNet, BC), ``DenseNet-BC-<L>-k<k>``
and ``DenseNet-<L>-k<k>`` (CIFAR, 3 blocks of (L-4)/6 bottleneck or (L-4)/3 plain layers),
``CliqueNet[-<letters of ABC>]-T<T>-k<k>`` (CIFAR, 3 blocks; T counts conv layers, so a
block has T/3 stages, or T/6 with B where each stage is a 1x1 and a 3x3 conv).

The names :func:`list_models` returns are ready-made configurations (every row of the
paper's Tables 1-3 and the baselines): ``create_model(name)`` needs no other argument, and
keyword arguments override the ready-made values.
"""

import dataclasses
import re
from typing import Any, Dict, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from rknet_jax import blocks
from rknet_jax import layers
from rknet_jax import models

__all__ = ["create_model", "list_models", "parse_name", "erknet_from_densenet",
           "irknet_from_cliquenet", "ParsedName"]

_TERM_FORM = "'s×r' (or 'sxr') with positive integers s and r, e.g. '7×1'"
_NAME_FORM = ("'<family>-<s×r> <s×r> ...[-<letters>][-k<N>]', e.g. 'ERKNet-7×1 6×1 6×1' or "
              "'IRKNet-5x1 5x1 5x1-AB-k150' (family ERKNet, IRKNet, RKNet or <tableau>Net)")
_RK_FAMILIES = {"ERKNet": "explicit", "IRKNet": "implicit", "RKNet": None}
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MORE_RK = ("bn_momentum", "bn_epsilon", "method")
_MORE_BASELINE = ("bn_momentum", "bn_epsilon")


@dataclasses.dataclass(frozen=True)
class ParsedName:
  """A parsed RKNet name (see the module docstring)."""
  family: str
  stages: tuple
  steps: tuple
  letters: str
  growth_rate: Optional[int]
  tableau: Optional[str] = None

  def canonical(self) -> str:
    """The name with '×' and letters in the order A, B."""
    terms = " ".join(f"{s}×{r}" for s, r in zip(self.stages, self.steps))
    out = f"{self.family}-{terms}"
    if self.letters:
      out += "-" + self.letters
    if self.growth_rate is not None:
      out += f"-k{self.growth_rate}"
    return out


def _bad(msg):
  return ValueError(msg)


def _parse_term(term: str, name: str):
  m = re.fullmatch(r"(\d+)[x×](\d+)", term)
  if not m:
    raise _bad(f"model name {name!r}: bad period term {term!r}: expected {_TERM_FORM}")
  s, r = int(m.group(1)), int(m.group(2))
  if s < 1 or r < 1:
    raise _bad(f"model name {name!r}: bad period term {term!r}: s and r must be >= 1; "
               f"expected {_TERM_FORM}")
  return s, r


def parse_name(name: str) -> ParsedName:
  """Parse an RKNet name (see the module docstring); ValueError quoting the bad part."""
  if not isinstance(name, str):
    raise _bad(f"model name must be a str, got {name!r}")
  text = name.strip()
  m = re.fullmatch(r"([A-Za-z0-9_]+)-(.*)", text)
  if not m:
    raise _bad(f"model name {name!r}: expected {_NAME_FORM}")
  family, rest = m.group(1), m.group(2)
  tableau = None
  if family not in _RK_FAMILIES:
    if not family.endswith("Net") or len(family) <= 3:
      raise _bad(f"model name {name!r}: unknown family {family!r}: expected ERKNet, IRKNet, "
                 f"RKNet, <tableau>Net or a baseline ({', '.join(_BASELINE_FORMS)})")
    tableau = _tableau_name(family[:-3], name)
  parts = rest.split("-")
  term_text, tags = parts[0], parts[1:]
  terms = term_text.split()
  if not terms:
    raise _bad(f"model name {name!r}: no period terms: expected {_NAME_FORM}")
  if term_text != " ".join(terms):
    raise _bad(f"model name {name!r}: period terms {term_text!r} must be separated by single "
               f"spaces, each {_TERM_FORM}")
  parsed = [_parse_term(t, name) for t in terms]
  letters, k = "", None
  for i, tag in enumerate(tags):
    if re.fullmatch(r"k\d+", tag):
      if i != len(tags) - 1:
        raise _bad(f"model name {name!r}: the growth-rate tag {tag!r} must come last")
      k = int(tag[1:])
      if k < 1:
        raise _bad(f"model name {name!r}: growth-rate tag {tag!r} must be positive")
    elif i == 0 and re.fullmatch(r"[A-Za-z]+", tag):
      allowed = "A" if tableau is not None else "AB"
      bad = sorted(set(tag) - set(allowed))
      if bad or len(set(tag)) != len(tag):
        raise _bad(f"model name {name!r}: bad suffix {tag!r}: letters from {allowed!r}, each "
                   "at most once (A = attentional transition, B = bottleneck)"
                   + ("; tableau RKNets take A only" if tableau is not None else ""))
      letters = "".join(c for c in "AB" if c in tag)
    else:
      raise _bad(f"model name {name!r}: bad part {tag!r}: expected suffix letters (A, B) and/or "
                 f"a growth-rate tag 'k<N>'; full form {_NAME_FORM}")
  return ParsedName(family, tuple(s for s, _ in parsed), tuple(r for _, r in parsed),
                    letters, k, tableau)


def _tableau_name(prefix, name):
  from rknet_jax import tableaus  # pylint: disable=g-import-not-at-top
  try:
    return tableaus.get(prefix).name
  except KeyError:
    raise _bad(f"model name {name!r}: unknown family {prefix + 'Net'!r}: expected ERKNet, "
               f"IRKNet, RKNet, or <tableau>Net with a tableau of rknet_jax.tableaus "
               f"({', '.join(tableaus.names())})") from None


# ---------------------------------------------------------------------------------------
# Ready-made configurations: the rows of the paper's Tables 1-3 and the baselines.

_CIFAR = dict(num_classes=10, stem="cifar", multiscale=True)
_IMAGENET = dict(num_classes=1000, stem="imagenet", multiscale=False)

_PRESETS: Dict[str, Dict[str, Any]] = {}
for _t in ("6×1 6×1 6×1", "7×1 6×1 6×1", "7×1 7×1 6×1", "7×1 7×1 7×1"):  # Table 1
  _PRESETS[f"ERKNet-{_t}"] = dict(_CIFAR, growth_rate=36)
for _t in ("3×1 3×1 3×1", "4×1 3×1 3×1", "4×1 4×1 3×1", "4×1 4×1 4×1"):
  _PRESETS[f"IRKNet-{_t}"] = dict(_CIFAR, growth_rate=36)
for _k in (150, 180):  # Table 2
  _PRESETS[f"IRKNet-5×1 5×1 5×1-AB-k{_k}"] = dict(_CIFAR, growth_rate=_k)
for _t, _m3 in (("3×1 3×1 3×1 1×1", 16), ("3×1 3×1 4×1 2×1", 20), ("3×1 3×1 6×1 2×1", 28)):
  _PRESETS[f"ERKNet-{_t}-B"] = dict(_IMAGENET, growth_rate=32,  # Table 3
                                    growth_multipliers=(2, 4, 8, _m3), bottleneck_width=128)

_BASELINES = ("DenseNet-121", "DenseNet-169", "DenseNet-201", "DenseNet-BC-250-k24",
              "CliqueNet-T18-k80", "CliqueNet-ABC-T30-k150")
_BASELINE_FORMS = ("DenseNet-121|161|169|201", "DenseNet-BC-<L>-k<k>", "DenseNet-<L>-k<k>",
                   "CliqueNet[-ABC]-T<T>-k<k>")
_DENSENET_IMAGENET = {121: ((6, 12, 24, 16), 32, 64), 169: ((6, 12, 32, 32), 32, 64),
                      201: ((6, 12, 48, 32), 32, 64), 161: ((6, 12, 36, 24), 48, 96)}


def list_models():
  """Names of the ready-made models: every row of Tables 1-3, then the baselines.

  Each works as ``create_model(name)`` with no other argument.  Table 2's two IRKNet rows
  share a name in the paper; here they carry a growth-rate tag (``-k150``, ``-k180``).
  """
  return list(_PRESETS) + list(_BASELINES)


# ---------------------------------------------------------------------------------------
# Option checking


def _per_period(value, P, what, name):
  if isinstance(value, bool):
    raise _bad(f"{name}: {what}={value!r}: expected a positive int or one per period")
  if isinstance(value, (int, np.integer)):
    value = (value,) * P
  try:
    value = tuple(value)
  except TypeError:
    raise _bad(f"{name}: {what}={value!r}: expected a positive int or a sequence of "
               f"{P} positive ints (one per period)") from None
  if len(value) != P:
    raise _bad(f"{name}: {what}={value!r} has {len(value)} entries, expected {P} (one per "
               "period)")
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise _bad(f"{name}: {what}={value!r}: every entry must be a positive int, got {v!r}")
  return tuple(int(v) for v in value)


def _check_dtype(dtype, name):
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise _bad(f"{name}: dtype={dtype!r}: expected float32, bfloat16 or float16") from None
  if dt not in [jnp.dtype(d) for d in _DTYPES]:
    raise _bad(f"{name}: dtype={dtype!r}: expected float32, bfloat16 or float16")
  return dt.type


def _check_more(more, allowed, name):
  unknown = sorted(set(more) - set(allowed))
  if unknown:
    raise _bad(f"{name}: unknown option(s) {unknown}: allowed extra options are "
               f"{sorted(allowed)}")


def _check_scalar_options(name, num_classes, dropout_rate, remat, bn_momentum, bn_epsilon):
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise _bad(f"{name}: num_classes={num_classes!r}: expected a positive int")
  if not isinstance(dropout_rate, (int, float)) or not 0.0 <= dropout_rate < 1.0:
    raise _bad(f"{name}: dropout_rate={dropout_rate!r}: expected 0 <= rate < 1")
  if not isinstance(remat, bool):
    raise _bad(f"{name}: remat={remat!r}: expected True or False")
  if not 0.0 <= bn_momentum < 1.0:
    raise _bad(f"{name}: bn_momentum={bn_momentum!r}: expected 0 <= momentum < 1")
  if not bn_epsilon > 0.0:
    raise _bad(f"{name}: bn_epsilon={bn_epsilon!r}: expected > 0")


def _pick(value, preset, key, default):
  if value is not None:
    return value
  return preset.get(key, default)


# ---------------------------------------------------------------------------------------
# create_model


def create_model(name: str, *, growth_rate: Union[int, Sequence[int], None] = None,
                 num_classes: Optional[int] = None, stem: Optional[str] = None,
                 growth_multipliers: Optional[Sequence[int]] = None,
                 bottleneck_width: Union[int, Sequence[int], None] = None,
                 attention: Optional[bool] = None, multiscale: Optional[bool] = None,
                 num_updates: int = 1, update_order: str = "gauss_seidel",
                 share_weights: bool = True, dropout_rate: float = 0.0,
                 dtype: Any = jnp.float32, remat: bool = False, **more):
  """Build an RKNet, tableau RKNet or baseline by name (module docstring: how names read).

  Args:
    name: model name, e.g. ``"ERKNet-7×1 6×1 6×1"``, ``"IRKNet-5x1 5x1 5x1-AB-k150"``,
      ``"RK4Net-1x3 1x3 1x3"``, ``"DenseNet-121"``; see :func:`list_models`.
    growth_rate: k, one int or one per period; required unless the name is ready-made or
      carries ``-k<N>``.
    num_classes: classifier outputs (default 10, or the ready-made model's).
    stem: "cifar" or "imagenet" (default "cifar", or the ready-made model's).
    growth_multipliers: m per period (default 1 everywhere; IRKNets need m = 1, Rule 4).
    bottleneck_width: w (int or one per period) for "B" names; default 4k (ERK), k (IRK).
    attention: attentional transitions; default: whether the name has "A".
    multiscale: multiscale feature strategy (default True, or the ready-made model's).
    num_updates: alternate updates per IRK time-step (paper: 1).
    update_order: "gauss_seidel" (paper) or "jacobi".
    share_weights: IRK clique-block weight sharing (True: CliqueNet/paper; False: the
      authors' later RKCNN code).
    dropout_rate: dropout after every conv (default 0: off, no 'dropout' rng needed).
    dtype: compute dtype, float32 (default), bfloat16 or float16; params stay float32 and
      the logits are float32.
    remat: rematerialise the concat-BN-ReLU-conv segments (same results, less memory).
    **more: ``bn_momentum`` (0.9), ``bn_epsilon`` (1e-5); ``method`` ("explicit" or
      "implicit", generic ``RKNet-`` names only); for tableau RKNets, options of
      :class:`~rknet_jax.tableau_block.TableauStep`.

  Returns:
    A Flax Linen module following the model contract of DESIGN.md.

  Raises:
    ValueError: a bad name or option, quoting the bad part and the expected form, before
      any array is built.
  """
  if not isinstance(name, str):
    raise _bad(f"model name must be a str, got {name!r}")
  name = name.strip()
  dtype = _check_dtype(dtype, name)
  bn_momentum = more.get("bn_momentum", layers.DEFAULT_BN_MOMENTUM)
  bn_epsilon = more.get("bn_epsilon", layers.DEFAULT_BN_EPSILON)
  _check_scalar_options(name, 10 if num_classes is None else num_classes, dropout_rate,
                        remat, bn_momentum, bn_epsilon)
  common = dict(dropout_rate=float(dropout_rate), bn_momentum=float(bn_momentum),
                bn_epsilon=float(bn_epsilon), dtype=dtype, remat=remat)
  if name.startswith(("DenseNet", "CliqueNet")):
    _check_more(more, _MORE_BASELINE, name)
    return _baseline(name, growth_rate=growth_rate, num_classes=num_classes, stem=stem,
                     growth_multipliers=growth_multipliers,
                     bottleneck_width=bottleneck_width, attention=attention,
                     multiscale=multiscale, num_updates=num_updates,
                     update_order=update_order, share_weights=share_weights, common=common)
  p = parse_name(name)
  preset = _PRESETS.get(p.canonical(), {})
  P = len(p.stages)

  # growth rate: the name's tag, the ready-made value, or the argument (which must agree
  # with a tag).
  if p.growth_rate is not None and growth_rate is not None:
    if _per_period(growth_rate, P, "growth_rate", name) != (p.growth_rate,) * P:
      raise _bad(f"{name}: growth_rate={growth_rate!r} contradicts the name's tag "
                 f"'-k{p.growth_rate}'")
  k = growth_rate if growth_rate is not None else (p.growth_rate or preset.get("growth_rate"))
  if k is None:
    tagged = [n for n in _PRESETS if n.startswith(p.canonical() + "-k")]
    raise _bad(f"{name}: growth_rate is required (an int k or one per period), e.g. "
               f"create_model({name!r}, growth_rate=36), or a ready-made name from "
               f"list_models(){' such as ' + ' or '.join(map(repr, tagged)) if tagged else ''}")
  ks = _per_period(k, P, "growth_rate", name)
  ms = _per_period(_pick(growth_multipliers, preset, "growth_multipliers", 1), P,
                   "growth_multipliers", name)
  num_classes = _pick(num_classes, preset, "num_classes", 10)
  stem = _pick(stem, preset, "stem", "cifar")
  if stem not in models.STEMS:
    raise _bad(f"{name}: stem={stem!r}: expected one of {models.STEMS}")
  multiscale = _pick(multiscale, preset, "multiscale", True)
  if not isinstance(multiscale, bool):
    raise _bad(f"{name}: multiscale={multiscale!r}: expected True or False")
  if attention is None:
    attention = "A" in p.letters
  elif not isinstance(attention, bool):
    raise _bad(f"{name}: attention={attention!r}: expected True, False or None")
  elif "A" in p.letters and not attention:
    raise _bad(f"{name}: attention=False contradicts the name's suffix letter 'A'")

  if p.tableau is not None:
    step_options = {kk: v for kk, v in more.items() if kk not in ("bn_momentum", "bn_epsilon")}
    try:
      models.check_tableau_step_options(step_options)
    except ValueError as e:
      raise _bad(f"{name}: {e}") from None
    if bottleneck_width is not None:
      raise _bad(f"{name}: bottleneck_width applies to ERK/IRK time-steps, not to tableau "
                 "RKNets")
    for arg, val, default in (("num_updates", num_updates, 1),
                              ("update_order", update_order, "gauss_seidel"),
                              ("share_weights", share_weights, True)):
      if val != default:
        raise _bad(f"{name}: {arg}={val!r} applies to IRKNets, not to tableau RKNets (use "
                   "implicit_iterations for an implicit tableau)")
    model = models.TableauRKNet(
        tableau=p.tableau, stages=p.stages, steps=p.steps, growth_rates=ks,
        growth_multipliers=ms, num_classes=num_classes, stem=stem, attention=attention,
        multiscale=multiscale, step_options=tuple(sorted(step_options.items())), **common)
    try:
      model.check()
    except ValueError as e:
      raise _bad(f"{name}: {e}") from None
    return model

  _check_more(more, _MORE_RK, name)
  method = _RK_FAMILIES[p.family]
  if "method" in more:
    if method is not None and more["method"] != method:
      raise _bad(f"{name}: method={more['method']!r} contradicts the family {p.family!r} "
                 f"({method})")
    method = more["method"]
  method = method or "explicit"
  if method not in models.METHODS:
    raise _bad(f"{name}: method={method!r}: expected one of {models.METHODS}")
  if method == "explicit":
    for arg, val, default in (("num_updates", num_updates, 1),
                              ("update_order", update_order, "gauss_seidel"),
                              ("share_weights", share_weights, True)):
      if val != default:
        raise _bad(f"{name}: {arg}={val!r} applies to implicit (IRK) time-steps only, not "
                   "to explicit ones")
  if method == "implicit" and any(m != 1 for m in ms):
    raise _bad(f"{name}: growth_multipliers={ms}: Rule 4 of the paper fixes m = 1 in "
               "IRKNets (implicit time-steps)")
  if update_order not in blocks.UPDATE_ORDERS:
    raise _bad(f"{name}: update_order={update_order!r}: expected one of "
               f"{blocks.UPDATE_ORDERS}")
  if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
    raise _bad(f"{name}: num_updates={num_updates!r}: expected an int >= 1")
  if not isinstance(share_weights, bool):
    raise _bad(f"{name}: share_weights={share_weights!r}: expected True or False")
  if method == "implicit" and share_weights and min(p.stages) < 2:
    raise _bad(f"{name}: an IRK time-step with shared weights needs s >= 2 in every period "
               f"(with s = 1 the update pass has no other stage to read), got stages "
               f"{p.stages}")
  if "B" in p.letters:
    default_w = tuple(4 * kk for kk in ks) if method == "explicit" else ks
    widths = _pick(bottleneck_width, preset, "bottleneck_width", None)
    widths = default_w if widths is None else _per_period(widths, P, "bottleneck_width", name)
  else:
    if bottleneck_width is not None:
      raise _bad(f"{name}: bottleneck_width={bottleneck_width!r} needs the bottleneck suffix "
                 "letter 'B' in the name")
    widths = None
  model = models.RKNet(
      stages=p.stages, steps=p.steps, growth_rates=ks, growth_multipliers=ms, method=method,
      num_classes=num_classes, stem=stem, bottleneck_widths=widths, attention=attention,
      multiscale=multiscale, num_updates=num_updates, update_order=update_order,
      share_weights=share_weights, **common)
  model.check()
  return model


def _baseline(name, *, growth_rate, num_classes, stem, growth_multipliers,
              bottleneck_width, attention, multiscale, num_updates, update_order,
              share_weights, common):
  """DenseNet / CliqueNet by name."""
  for arg, val in (("growth_multipliers", growth_multipliers),
                   ("bottleneck_width", bottleneck_width), ("attention", attention),
                   ("multiscale", multiscale)):
    if val is not None:
      raise _bad(f"{name}: option {arg}={val!r} does not apply to a baseline (its name "
                 f"fixes the architecture: {', '.join(_BASELINE_FORMS)})")
  if share_weights is not True:
    raise _bad(f"{name}: share_weights applies to IRKNets only")

  def check_k(k):
    if growth_rate is not None and growth_rate != k:
      raise _bad(f"{name}: growth_rate={growth_rate!r} contradicts the name (k = {k})")

  num_classes_ = num_classes
  m = re.fullmatch(r"DenseNet-(\d+)", name)
  if m:
    depth = int(m.group(1))
    if depth not in _DENSENET_IMAGENET:
      raise _bad(f"{name}: unknown ImageNet DenseNet depth {depth}: expected one of "
                 f"{sorted(_DENSENET_IMAGENET)}, or a CIFAR form 'DenseNet-<L>-k<k>' / "
                 "'DenseNet-BC-<L>-k<k>'")
    if update_order != "gauss_seidel" or num_updates != 1:
      raise _bad(f"{name}: num_updates/update_order apply to clique blocks only")
    layers_, k, init = _DENSENET_IMAGENET[depth]
    check_k(k)
    return _dense(layers_, k, init, 4 * k, 0.5, num_classes_ or 1000, stem or "imagenet",
                  common)
  m = re.fullmatch(r"DenseNet-(BC-)?(\d+)-k(\d+)", name)
  if m:
    bc, depth, k = bool(m.group(1)), int(m.group(2)), int(m.group(3))
    if update_order != "gauss_seidel" or num_updates != 1:
      raise _bad(f"{name}: num_updates/update_order apply to clique blocks only")
    per = 6 if bc else 3
    if k < 1 or depth <= 4 or (depth - 4) % per:
      raise _bad(f"{name}: depth L={depth} needs L - 4 to be a positive multiple of {per} "
                 f"({'DenseNet-BC' if bc else 'DenseNet'}: 3 blocks of (L-4)/{per} layers) "
                 "and k >= 1")
    check_k(k)
    n = (depth - 4) // per
    return _dense((n,) * 3, k, 2 * k if bc else 16, 4 * k if bc else None,
                  0.5 if bc else 1.0, num_classes_ or 10, stem or "cifar", common)
  m = re.fullmatch(r"CliqueNet(?:-([A-Z]+))?-T(\d+)-k(\d+)", name)
  if m:
    letters, T, k = m.group(1) or "", int(m.group(2)), int(m.group(3))
    if set(letters) - set("ABC") or len(set(letters)) != len(letters):
      raise _bad(f"{name}: bad CliqueNet options {letters!r}: letters from 'ABC', each at most "
                 "once (A attention, B bottleneck, C compression)")
    # T counts conv layers: 3 blocks of T/3; with B every stage is two layers (1x1, 3x3),
    # so T = 30 with B is 5 stages per block (CliqueNet-ABC T=30: 10.48 M parameters).
    per = 6 if "B" in letters else 3
    if T < 2 * per or T % per or k < 1:
      raise _bad(f"{name}: T={T} must be a multiple of {per} and >= {2 * per} (3 blocks of "
                 f"T/{per} >= 2 stages{', two layers each with B' if per == 6 else ''}), "
                 "and k >= 1")
    check_k(k)
    if update_order not in blocks.UPDATE_ORDERS:
      raise _bad(f"{name}: update_order={update_order!r}: expected one of "
                 f"{blocks.UPDATE_ORDERS}")
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
      raise _bad(f"{name}: num_updates={num_updates!r}: expected an int >= 0")
    model = models.CliqueNet((T // per,) * 3, (k,) * 3, 64, attention="A" in letters,
                             bottleneck="B" in letters, compression="C" in letters,
                             num_updates=num_updates, update_order=update_order,
                             num_classes=num_classes_ or 10, stem=stem or "cifar", **common)
    model.check()
    return model
  raise _bad(f"model name {name!r}: unknown baseline: expected one of "
             f"{', '.join(_BASELINE_FORMS)}")


def _dense(block_layers, k, init, width, compression, num_classes, stem, common):
  if stem not in models.STEMS:
    raise _bad(f"stem={stem!r}: expected one of {models.STEMS}")
  model = models.DenseNet(tuple(block_layers), k, init, width, compression,
                          num_classes=num_classes, stem=stem, **common)
  model.check()
  return model


# ---------------------------------------------------------------------------------------
# Converters (paper sections 3.3.1 and 3.3.2)


def _as_config(config, cls, what):
  if isinstance(config, str):
    config = create_model(config)
  if isinstance(config, cls):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")}
  if isinstance(config, dict):
    return dict(config)
  raise _bad(f"{what}: expected a model name, a {cls.__name__} module or a dict of its "
             f"fields, got {type(config).__name__}")


def erknet_from_densenet(config) -> Dict[str, Any]:
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
    raise _bad(f"erknet_from_densenet: the DenseNet config lacks {e}") from None
  compression = float(cfg.get("compression", 1.0))
  width = cfg.get("bottleneck_width")
  stages, ms = [], []
  for n, L in enumerate(block_layers):
    if c % k:
      raise _bad(f"erknet_from_densenet: Rule 1 broken: dense block {n + 1} starts with {c} "
                 f"channels, not m*k for an integer m (k = {k})")
    m = c // k
    if L % m:
      raise _bad(f"erknet_from_densenet: Rule 3 broken: dense block {n + 1} has {L} layers, "
                 f"not s*m for an integer s (m = {c}/{k} = {m})")
    stages.append(L // m)
    ms.append(m)
    if n < len(block_layers) - 1:
      c = int(compression * (c + L * k))
  terms = " ".join(f"{s}×1" for s in stages)
  out = dict(name=f"ERKNet-{terms}" + ("-B" if width is not None else ""), growth_rate=k,
             growth_multipliers=tuple(ms), num_classes=cfg.get("num_classes", 10),
             stem=cfg.get("stem", "cifar"), multiscale=False)
  if width is not None:
    out["bottleneck_width"] = int(width)
  return out


def irknet_from_cliquenet(config, *, strict: bool = False) -> Dict[str, Any]:
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
    ks = tuple(cfg["growth_rates"])
  except KeyError as e:
    raise _bad(f"irknet_from_cliquenet: the CliqueNet config lacks {e}") from None
  num_updates = int(cfg.get("num_updates", 1))
  if num_updates < 1:
    raise _bad("irknet_from_cliquenet: equation 6 broken: with num_updates = 0 there is no "
               "alternate update, stage i never reads stages j > i, and the block is an "
               "explicit method (use erknet_from_densenet-style ERKNets)")
  for n, s in enumerate(block_layers):
    if s < 2:
      raise _bad(f"irknet_from_cliquenet: equation 6 broken: block {n + 1} has {s} layer(s); "
                 "an implicit stage needs other stages to read")
  if strict:
    c = int(cfg.get("init_features", 64))
    for n, s in enumerate(block_layers):
      if c != ks[n]:
        raise _bad(f"irknet_from_cliquenet: Rules 1 and 4 broken: block {n + 1} starts with "
                   f"{c} channels, not m*k with m = 1 (k = {ks[n]})")
      c = s * ks[n]
  letters = ("A" if cfg.get("attention") else "") + ("B" if cfg.get("bottleneck") else "")
  terms = " ".join(f"{s}×1" for s in block_layers)
  out = dict(name=f"IRKNet-{terms}" + (f"-{letters}" if letters else ""),
             growth_rate=ks[0] if len(set(ks)) == 1 else ks,
             num_classes=cfg.get("num_classes", 10), stem=cfg.get("stem", "cifar"),
             multiscale=True, num_updates=num_updates,
             update_order=cfg.get("update_order", "gauss_seidel"))
  return out
