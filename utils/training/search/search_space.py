"""Search spaces for ``test_hyperparameter_search``: both spec forms parsed and checked before any trial."""
from __future__ import annotations

from ..settings import FineTuneSettings

DEFAULT_SEARCH_SPACE = {
    "learning_rate": ("log", 1e-5, 1e-3),
    "batch_size": ("categorical", [4, 8, 16]),
    "warmup_ratio": ("float", 0.0, 0.2),
    "weight_decay": ("float", 0.0, 0.1),
}
# The previous module's search-space names.
LEGACY_NAMES = {"lr": "learning_rate", "wd": "weight_decay", "warmup": "warmup_steps"}
# A (low, high) range without a kind is searched on a log scale for these settings when low > 0:
# both span orders of magnitude. Every other range is linear.
LOG_SCALE_SETTINGS = ("learning_rate", "weight_decay")
KINDS = ("log", "float", "int", "categorical")
NOT_SEARCHABLE = set(FineTuneSettings.names_where(search=False))  # declared in the settings groups


def parse_search_space(space: dict | None) -> dict[str, tuple[str, str, tuple]]:
    """``{name: (setting, kind, args)}``; raises ``ValueError`` naming a bad entry before any trial runs.

    Accepted specs: ``("log"|"float"|"int", low, high)``, ``("categorical", [choices])``, a plain list
    (categorical) or a ``(low, high)`` tuple (ints: an int range; floats: log scale for
    ``LOG_SCALE_SETTINGS`` when low > 0, else linear).
    """
    space = DEFAULT_SEARCH_SPACE if space is None else space
    if not isinstance(space, dict) or not space:
        raise ValueError(f"search_space must be a non-empty dict of name -> spec, got {space!r}.")
    parsed, named_by = {}, {}
    for name, spec in space.items():
        setting = LEGACY_NAMES.get(name, name)
        if setting not in FineTuneSettings.keyword_names() or setting in NOT_SEARCHABLE:
            raise ValueError(f"search_space names {name!r}, which is not a searchable keyword of test_fine_tuning. "
                             f"Use one of: {sorted(FineTuneSettings.keyword_names() - NOT_SEARCHABLE)}.")
        if setting in named_by:
            # Both would be suggested and one silently override the other in every trial.
            raise ValueError(f"search_space has both {named_by[setting]!r} and {name!r}, which name the same setting "
                             f"({setting}); keep one of them.")
        named_by[setting] = name
        kind, args = _parse_spec(name, setting, spec)
        for value in (args[0] if kind == "categorical" else args):
            _check_value(name, setting, value)
        parsed[name] = (setting, kind, args)
    return parsed


def parse_model_space(space: dict | None, search_space: dict) -> dict[str, tuple[str, tuple]]:
    """``{name: (kind, args)}`` for the model's parameters (both spec forms, as :func:`parse_search_space`; a float
    ``(low, high)`` is linear); raises ``ValueError`` before any trial on a bad entry or a name that is also a
    ``test_fine_tuning`` keyword or a ``search_space`` name (one name, one meaning)."""
    if space is None:
        return {}
    if not isinstance(space, dict) or not space:
        raise ValueError(f"model_space must be a non-empty dict of name -> spec (e.g. {{'n_layer': ('int', 1, 4), "
                         f"'n_embd': [64, 128]}}), got {space!r}.")
    keywords = FineTuneSettings.keyword_names() | set(LEGACY_NAMES)
    parsed = {}
    for name, spec in space.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"model_space names {name!r}: names are passed to model_factory as dict keys and set on "
                             "the config, so they must be identifiers such as 'n_layer'.")
        if name in keywords or name in search_space:
            raise ValueError(f"model_space names {name!r}, which is also a test_fine_tuning keyword or a search_space "
                             "name; search training keywords in search_space and the model's own parameters in "
                             "model_space, each name in one of them.")
        kind, args = _parse_spec(name, None, spec, what="model_space")
        parsed[name] = (kind, args)
    return parsed


def model_points(model_space: dict, limit: int = 100_000):
    """The space's points in order, floats at their low end (the points a constraint can be checked on up front);
    at most ``limit`` of them."""
    import itertools

    axes = [args[0] if kind == "categorical" else (range(args[0], args[1] + 1) if kind == "int" else [args[0]])
            for kind, args in model_space.values()]
    for values in itertools.islice(itertools.product(*axes), limit):
        yield dict(zip(model_space, values))


def reference_point(model_space: dict, constraints) -> dict:
    """The first point of the space the constraints accept: the study's reference model is built from it before any
    trial. Raises ``ValueError`` when the constraints accept none of the points checked."""
    checked = 0
    for point in model_points(model_space):
        checked += 1
        if constraints is None or _accepts(constraints, point):
            return point
    floats = [name for name, (kind, _) in model_space.items() if kind in ("float", "log")]
    raise ValueError(f"model_constraints accept none of the {checked:,} points of model_space checked"
                     f"{' (float parameters at their low end: ' + ', '.join(floats) + ')' if floats else ''}, so "
                     "every trial would be refused. Widen model_space or correct the constraint (it returns True "
                     "for the parameters a model can be built with, e.g. lambda p: p['n_embd'] % p['n_head'] == 0).")


def _accepts(constraints, point: dict) -> bool:
    verdict = constraints(dict(point))
    if verdict is None:  # a forgotten return would refuse every point
        raise TypeError(f"model_constraints must return True or False for a dict of model parameters; it returned "
                        f"None for {point}.")
    return bool(verdict)


def accepted(constraints, point: dict) -> bool:
    """Whether ``constraints`` (None: everything) accept the model parameters ``point``."""
    return constraints is None or _accepts(constraints, point)


def _parse_spec(name, setting, spec, what="search_space"):
    bad = ValueError(f"{what}[{name!r}] = {spec!r} is not a spec. Use ('log', low, high), ('float', low, high), "
                     "('int', low, high), ('categorical', [choices]), a list of choices or a (low, high) tuple.")
    if isinstance(spec, list):
        kind, args = "categorical", (spec,)
    elif isinstance(spec, tuple) and spec and spec[0] in KINDS:
        kind, args = spec[0], tuple(spec[1:])
    elif (isinstance(spec, tuple) and len(spec) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)):
        if all(isinstance(v, int) for v in spec):
            kind = "int"
        else:
            kind = "log" if setting in LOG_SCALE_SETTINGS and spec[0] > 0 else "float"
        args = tuple(spec)
    else:
        raise bad
    if kind == "categorical":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise bad
        return kind, (list(args[0]),)
    if len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
        raise bad
    low, high = args
    if not low < high:
        raise ValueError(f"{what}[{name!r}]: low ({low}) must be below high ({high}).")
    if kind == "log" and low <= 0:
        raise ValueError(f"{what}[{name!r}]: a log range needs low > 0, got {low}. Use ('float', {low}, {high}).")
    if kind == "int" and not all(isinstance(v, int) for v in args):
        raise ValueError(f"{what}[{name!r}]: an int range needs int bounds, got {args}.")
    return kind, args


def _check_value(name, setting, value):
    try:
        FineTuneSettings(**{setting: value}).validate()
    except (TypeError, ValueError) as error:
        raise ValueError(f"search_space[{name!r}] can take {value!r}, which test_fine_tuning refuses: "
                         f"{error}") from None


def suggest(trial, name: str, kind: str, args: tuple):
    if kind == "categorical":
        return trial.suggest_categorical(name, args[0])
    if kind == "int":
        return trial.suggest_int(name, *args)
    return trial.suggest_float(name, *args, log=kind == "log")
