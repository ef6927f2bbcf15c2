"""Model names in the paper's notation (section 3.2), read into specs.

How a name reads::

    <family>-<s×r> <s×r> ...[-<letters>][-k<growth rate>]

* ``family``: ``ERKNet`` (explicit RK time-steps = dense blocks, section 3.3.1),
  ``IRKNet`` (implicit = clique blocks, section 3.3.2), ``RKNet`` (generic; explicit unless
  ``method="implicit"``), or ``<tableau>Net`` for a tableau RKNet, e.g. ``RK4Net``,
  ``Gauss_Legendre2Net`` (any name or alias of :func:`rknet_jax.tableaus.get`,
  case-insensitive).
* one ``s×r`` term per period (``x`` may replace ``×``): r time-steps of an s-stage method.
  For a tableau RKNet the first number is the number of vector fields per time-step:
  1 (one f(t, y) shared by all stages) or the tableau's stage count (one f_i per stage,
  equation 4).
* letters: ``A`` attentional transitions, ``B`` bottleneck layers (width
  ``bottleneck_width``, default 4k for ERK steps as in Table 3, k for IRK steps as in
  Table 2).  Tableau RKNets accept ``A`` only.
* ``-k<N>``: the growth rate (Table 2 lists ``IRKNet-5×1 5×1 5×1-AB`` with k = 150 and
  k = 180).

Baselines: ``DenseNet-121``/``-169``/``-201``/``-161`` (ImageNet, BC), ``DenseNet-BC-<L>-k<k>``
and ``DenseNet-<L>-k<k>`` (CIFAR, 3 blocks of (L-4)/6 bottleneck or (L-4)/3 plain layers),
``CliqueNet[-<letters of ABC>]-T<T>-k<k>`` (CIFAR, 3 blocks; T counts conv layers, so a
block has T/3 stages, or T/6 with B where each stage is a 1x1 and a 3x3 conv).

:func:`spec_from_name` reads a name and keyword fields into a :mod:`rknet_jax.spec` spec;
``spec.name`` writes the name back.  The ready-made models of the paper's tables are added by
:func:`rknet_jax.registry.parse_name`.
"""

import dataclasses
import re
import unicodedata

from rknet_jax import checks, families
from rknet_jax import spec as spec_lib

__all__ = [
  "ParsedName",
  "parse",
  "spec_from_name",
  "check_ascii",
  "rknet_spec_from_name",
  "densenet_spec_from_name",
  "cliquenet_spec_from_name",
]

_TERM_FORM = "'s×r' (or 'sxr') with positive integers s and r, e.g. '7×1'"
_NAME_FORM = (
  "'<family>-<s×r> <s×r> ...[-<letters>][-k<N>]', e.g. 'ERKNet-7×1 6×1 6×1' or "
  "'IRKNet-5x1 5x1 5x1-AB-k150' (family ERKNet, IRKNet, RKNet or <tableau>Net)"
)
_RK_FAMILIES = {"ERKNet": "explicit", "IRKNet": "implicit", "RKNet": None}
BASELINE_FORMS = (
  "DenseNet-121|161|169|201",
  "DenseNet-BC-<L>-k<k>",
  "DenseNet-<L>-k<k>",
  "CliqueNet[-ABC]-T<T>-k<k>",
)
_MAX_DIGITS = 7  # longer numbers exceed every bound of rknet_jax.spec

# Letters that look like the ASCII ones a name uses (Cyrillic, Greek) and signs that look
# like 'x'/'×' or '-'; anything else non-ASCII is named with its Unicode name.
_LOOKALIKES = dict(
  zip("АВЕКМНОРСТХаеосрхукΑΒΕΚΜΝΟΡΤΧΙκοχ✕✖⨯╳−–—‐", "ABEKMHOPCTXaeocpxykABEKMNOPTXIkox××××----")
)


@dataclasses.dataclass(frozen=True)
class ParsedName:
  """The parts of an RKNet name (the module docstring)."""

  family: str
  stages: tuple
  steps: tuple
  letters: str
  growth_rate: int | None
  tableau: str | None = None

  def canonical(self) -> str:
    """The name with '×', letters in the order A, B, and the ``-k`` tag if given."""
    out = f"{self.family}-" + " ".join(f"{s}×{r}" for s, r in zip(self.stages, self.steps))
    if self.letters:
      out += "-" + self.letters
    if self.growth_rate is not None:
      out += f"-k{self.growth_rate}"
    return out


def check_ascii(name: str) -> None:
  """ValueError naming a non-ASCII character of ``name`` (other than '×') and its look-alike."""
  for i, c in enumerate(name):
    if c.isascii() or c == "×":
      continue
    ascii_form = unicodedata.normalize("NFKC", c)
    alike = _LOOKALIKES.get(c, ascii_form if ascii_form.isascii() else None)
    raise ValueError(
      f"model name {name!r}: character {c!r} at position {i} "
      f"(U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}) is not ASCII"
      + (f"; did you mean {alike!r}?" if alike else "")
      + " Names use ASCII letters, digits, '-', spaces and '×' (or 'x')."
    )


def _number(text, name, what):
  if len(text) > _MAX_DIGITS:
    raise ValueError(
      f"model name {name!r}: {what} {text} is too large (bounds: "
      f"rknet_jax.spec.MAX_LAYERS = {checks.MAX_LAYERS} layers, "
      f"MAX_WIDTH = {checks.MAX_WIDTH} channels)"
    )
  return int(text)


def _parse_term(term: str, name: str):
  m = re.fullmatch(r"(\d+)[x×](\d+)", term)
  if not m:
    raise ValueError(f"model name {name!r}: bad period term {term!r}: expected {_TERM_FORM}")
  s, r = _number(m.group(1), name, "s"), _number(m.group(2), name, "r")
  if s < 1 or r < 1:
    raise ValueError(
      f"model name {name!r}: bad period term {term!r}: s and r must be >= 1; expected {_TERM_FORM}"
    )
  return s, r


def _tableau_name(prefix, name):
  from rknet_jax import tableaus

  try:
    return tableaus.get(prefix).name
  except KeyError:
    raise ValueError(
      f"model name {name!r}: unknown family {prefix + 'Net'!r}: expected "
      "ERKNet, IRKNet, RKNet, or <tableau>Net with a tableau of "
      f"rknet_jax.tableaus ({', '.join(tableaus.names())})"
    ) from None


def parse(name: str) -> ParsedName:
  """The parts of an RKNet name; ValueError quoting the bad part and the expected form."""
  if not isinstance(name, str):
    raise ValueError(f"model name must be a str, got {name!r}")
  text = name.strip()
  check_ascii(text)
  m = re.fullmatch(r"([A-Za-z0-9_]+)-(.*)", text)
  if not m:
    raise ValueError(f"model name {name!r}: expected {_NAME_FORM}")
  family, rest = m.group(1), m.group(2)
  tableau = None
  if family not in _RK_FAMILIES:
    if not family.endswith("Net") or len(family) <= 3:
      raise ValueError(
        f"model name {name!r}: unknown family {family!r}: expected ERKNet, "
        f"IRKNet, RKNet, <tableau>Net or a baseline ({', '.join(BASELINE_FORMS)})"
      )
    tableau = _tableau_name(family[:-3], name)
  term_text, *tags = rest.split("-")
  terms = term_text.split()
  if not terms:
    raise ValueError(f"model name {name!r}: no period terms: expected {_NAME_FORM}")
  if term_text != " ".join(terms):
    raise ValueError(
      f"model name {name!r}: period terms {term_text!r} must be separated by "
      f"single spaces, each {_TERM_FORM}"
    )
  parsed = [_parse_term(t, name) for t in terms]
  letters, k = "", None
  for i, tag in enumerate(tags):
    if re.fullmatch(r"k\d+", tag):
      if i != len(tags) - 1:
        raise ValueError(f"model name {name!r}: the growth-rate tag {tag!r} must come last")
      k = _number(tag[1:], name, "k")
      if k < 1:
        raise ValueError(f"model name {name!r}: growth-rate tag {tag!r} must be positive")
    elif i == 0 and re.fullmatch(r"[A-Za-z]+", tag):
      allowed = "A" if tableau is not None else "AB"
      if set(tag) - set(allowed) or len(set(tag)) != len(tag):
        raise ValueError(
          f"model name {name!r}: bad suffix {tag!r}: letters from {allowed!r}, "
          "each at most once (A = attentional transition, B = bottleneck)"
          + ("; tableau RKNets take A only" if tableau is not None else "")
        )
      letters = "".join(c for c in "AB" if c in tag)
    else:
      raise ValueError(
        f"model name {name!r}: bad part {tag!r}: expected suffix letters (A, B) "
        f"and/or a growth-rate tag 'k<N>'; full form {_NAME_FORM}"
      )
  return ParsedName(
    family, tuple(s for s, _ in parsed), tuple(r for _, r in parsed), letters, k, tableau
  )


def _field_names(cls, *excluded):
  return [f.name for f in dataclasses.fields(cls) if f.name not in excluded]


def spec_from_name(name: str, hint: str = "", /, **fields) -> spec_lib.ModelSpec:
  """The spec a name and keyword fields describe; fields equal to None count as not given.

  The name is read by the registered family that claims it (:mod:`rknet_jax.families`).

  Args:
    name: a model name (the module docstring).
    hint: appended to the "growth_rate is required" error (e.g. ready-made names).
    **fields: the spec's fields that the name does not fix (growth_rate,
      growth_multipliers, bottleneck_width, num_classes, stem, layer options, ...);
      ``attention=True`` adds attention, ``method`` chooses it for generic ``RKNet-`` names;
      for tableau RKNets the options of ``spec.TABLEAU_STEP_OPTIONS`` (to ``step_options``).

  Raises:
    ValueError: a bad name, an unknown keyword (naming the closest known one), a field that
      contradicts the name, or an invalid value, before any array is built.
  """
  if not isinstance(name, str):
    raise ValueError(f"model name must be a str, got {name!r}")
  name = name.strip()
  check_ascii(name)
  fields = {k: v for k, v in fields.items() if v is not None}
  family = families.for_name(name)
  if family is None:
    parse(name)  # raises, naming the bad part of an RKNet name
    raise ValueError(f"model name {name!r}: expected {_NAME_FORM}")
  return family.spec_from_name(name, hint, fields)


def rknet_spec_from_name(name: str, hint: str, fields) -> spec_lib.ModelSpec:
  """The :class:`~rknet_jax.spec.RKNetSpec` or ``TableauRKNetSpec`` of an RKNet name."""
  p = parse(name)
  periods = len(p.stages)
  if p.tableau is not None:
    cls, fixed = spec_lib.TableauRKNetSpec, ("stages", "steps", "tableau")
    step_options = spec_lib.TABLEAU_STEP_OPTIONS
  else:
    cls, fixed, step_options = spec_lib.RKNetSpec, ("stages", "steps", "bottleneck"), ()
  checks.check_keywords(name, fields, _field_names(cls, *fixed) + list(step_options))
  step = {k: fields.pop(k) for k in list(fields) if k in step_options}
  if step:
    fields["step_options"] = {**dict(fields.get("step_options", ())), **step}
  if p.growth_rate is not None:
    given = fields.setdefault("growth_rate", p.growth_rate)
    if checks.per_period(name, "growth_rate", given, periods) != (p.growth_rate,) * periods:
      raise ValueError(
        f"{name}: growth_rate={given!r} contradicts the name's tag '-k{p.growth_rate}'"
      )
  if "growth_rate" not in fields:
    raise ValueError(
      f"{name}: growth_rate is required (an int k or one per period), e.g. "
      f"create_model({name!r}, growth_rate=36){hint}"
    )
  if "A" in p.letters:
    if fields.setdefault("attention", True) is not True:
      raise ValueError(
        f"{name}: attention={fields['attention']!r} contradicts the name's suffix letter 'A'"
      )
  if p.tableau is not None:
    return _make(cls, name, dict(stages=p.stages, steps=p.steps, tableau=p.tableau, **fields))
  method = _RK_FAMILIES[p.family]
  if method is not None and fields.setdefault("method", method) != method:
    raise ValueError(
      f"{name}: method={fields['method']!r} contradicts the family {p.family!r} ({method})"
    )
  return _make(
    cls, name, dict(stages=p.stages, steps=p.steps, bottleneck="B" in p.letters, **fields)
  )


def _make(cls, name, fields):
  """``cls(**fields)``, its errors naming the model as the user wrote it."""
  try:
    return cls(**fields)
  except ValueError as e:
    prefix = f"{cls.__name__}:"
    if str(e).startswith(prefix):
      raise ValueError(f"{name}:{str(e)[len(prefix) :]}") from None
    raise


def densenet_spec_from_name(name: str, hint: str, fields) -> spec_lib.DenseNetSpec:
  """The :class:`~rknet_jax.spec.DenseNetSpec` of a DenseNet name (it fixes the
  architecture); ``hint`` is unused (a DenseNet name needs no growth rate)."""
  del hint
  m = re.fullmatch(r"DenseNet-(\d+)", name)
  if m:
    depth = _number(m.group(1), name, "depth")
    if depth not in spec_lib.DENSENET_IMAGENET:
      raise ValueError(
        f"{name}: unknown ImageNet DenseNet depth {depth}: expected one of "
        f"{sorted(spec_lib.DENSENET_IMAGENET)}, or a CIFAR form "
        "'DenseNet-<L>-k<k>' / 'DenseNet-BC-<L>-k<k>'"
      )
    block_layers, k, init = spec_lib.DENSENET_IMAGENET[depth]
    arch = dict(
      block_layers=block_layers,
      growth_rate=k,
      init_features=init,
      bottleneck_width=4 * k,
      compression=0.5,
    )
    return _baseline(
      spec_lib.DenseNetSpec, name, arch, fields, dict(num_classes=1000, stem="imagenet")
    )
  m = re.fullmatch(r"DenseNet-(BC-)?(\d+)-k(\d+)", name)
  if m:
    bc = bool(m.group(1))
    depth, k = _number(m.group(2), name, "depth"), _number(m.group(3), name, "k")
    per = 6 if bc else 3
    if k < 1 or depth <= 4 or (depth - 4) % per:
      raise ValueError(
        f"{name}: depth L={depth} needs L - 4 to be a positive multiple of "
        f"{per} ({'DenseNet-BC' if bc else 'DenseNet'}: 3 blocks of "
        f"(L-4)/{per} layers) and k >= 1"
      )
    arch = dict(
      block_layers=((depth - 4) // per,) * 3,
      growth_rate=k,
      init_features=2 * k if bc else 16,
      bottleneck_width=4 * k if bc else None,
      compression=0.5 if bc else 1.0,
    )
    return _baseline(spec_lib.DenseNetSpec, name, arch, fields, {})
  _unknown_baseline(name)


def cliquenet_spec_from_name(name: str, hint: str, fields) -> spec_lib.CliqueNetSpec:
  """The :class:`~rknet_jax.spec.CliqueNetSpec` of a CliqueNet name (it fixes the
  architecture); ``hint`` is unused."""
  del hint
  m = re.fullmatch(r"CliqueNet(?:-([A-Z]+))?-T(\d+)-k(\d+)", name)
  if not m:
    _unknown_baseline(name)
  letters = m.group(1) or ""
  T, k = _number(m.group(2), name, "T"), _number(m.group(3), name, "k")
  if set(letters) - set("ABC") or len(set(letters)) != len(letters):
    raise ValueError(
      f"{name}: bad CliqueNet options {letters!r}: letters from 'ABC', each "
      "at most once (A attention, B bottleneck, C compression)"
    )
  # T counts conv layers: 3 blocks of T/3; with B every stage is two layers (1x1, 3x3),
  # so T = 30 with B is 5 stages per block (CliqueNet-ABC T=30: 10.48 M parameters).
  per = 6 if "B" in letters else 3
  if T < 2 * per or T % per or k < 1:
    raise ValueError(
      f"{name}: T={T} must be a multiple of {per} and >= {2 * per} (3 blocks "
      f"of T/{per} >= 2 stages{', two layers each with B' if per == 6 else ''}"
      "), and k >= 1"
    )
  arch = dict(
    block_layers=(T // per,) * 3,
    growth_rate=(k,) * 3,
    attention="A" in letters,
    bottleneck="B" in letters,
    compression="C" in letters,
  )
  return _baseline(spec_lib.CliqueNetSpec, name, arch, fields, {})


def _unknown_baseline(name):
  raise ValueError(
    f"model name {name!r}: unknown baseline: expected one of {', '.join(BASELINE_FORMS)}"
  )


def _baseline(cls, name, arch, fields, defaults):
  checks.check_keywords(name, fields, _field_names(cls))
  for field, value in fields.items():
    if field in arch:
      implied = arch[field]
      same = (
        checks.per_period(name, field, value, len(implied)) == implied
        if isinstance(implied, tuple)
        else value == implied
      )
      if not same:
        raise ValueError(
          f"{name}: {field}={value!r} contradicts the name ({field} = "
          f"{implied!r}); the name fixes the architecture "
          f"({', '.join(BASELINE_FORMS)})"
        )
  return _make(cls, name, {**defaults, **fields, **arch})
