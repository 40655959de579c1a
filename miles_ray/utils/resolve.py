"""The one resolver of plug-ins: a registered name, or a ``pkg.module:attr`` import path.

Every extension point (policy losses, advantage / KL estimators, loss aggregations, group filters,
rewards, rollout functions, environments, data sources, learning-rate schedules, training backends,
weight transports) is a :class:`~miles_ray.utils.registry.Registry`; its lookups go through
:func:`resolve`, so each of them takes an import path as well as a registered name.

Invariants (asserted in tests/unit/plugins/test_contracts.py):

- a registered name wins over an import path (``synthetic:arithmetic`` stays a name);
- every failure is a :class:`PluginError` (a ``UserValueError``) whose one-line message names the config
  field, the spec, what failed (not registered, module not found, import failed, attribute missing,
  not callable, wrong signature, wrong return type) and the fix;
- an unknown name is also a ``KeyError`` (``registry.get_fn`` raised one before import paths existed);
- a plug-in given as an import path is checked against its registry's :class:`Contract` when it is
  resolved: its signature must take the arguments the framework passes, and, where the contract has a
  ``probe`` (cheap, pure extension points), one call with tiny inputs must return the documented type.
  Registered entries are trusted (no checks).

This module imports nothing above :mod:`miles_ray.errors` (it sits in the base floor).
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from miles_ray.errors import UserValueError

_IDENT = r"[A-Za-z_]\w*"
IMPORT_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


class PluginError(UserValueError):
    """A plug-in spec that cannot be used; the message names the field, the spec, the failure and the fix."""


class UnknownPluginError(PluginError, KeyError):
    """Neither a registered name nor an import path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Contract:
    """How the framework calls the plug-ins of one registry.

    ``args`` / ``kwargs`` are the names of the positional and keyword arguments it passes (the
    signature check binds them); ``call`` and ``returns`` are the documented call and return type (for
    messages and docs); ``attrs`` are attributes the object must have (an environment class's ``reset``
    and ``step``); ``probe(obj)`` calls the plug-in with tiny inputs and returns a problem with what
    it returned (``None``: fine); ``batched`` is the contract of a plug-in whose ``batched`` is true."""
    call: str
    returns: str
    args: tuple = ()
    kwargs: tuple = ()
    attrs: tuple = ()
    probe: Optional[Callable[[Any], Optional[str]]] = None
    batched: Optional["Contract"] = None


def is_import_path(spec: Any) -> bool:
    """``pkg.module:attr`` (dotted module, a colon, a dotted attribute)."""
    return isinstance(spec, str) and bool(IMPORT_PATH.match(spec))


def resolve(spec: str, registry_or_kind, field: Optional[str] = None, choices: Optional[Iterable[str]] = None):
    """The object ``spec`` names: a key of ``registry_or_kind`` (a Registry), or an import path
    (a bare kind string accepts import paths only). ``field`` is the config key named in errors
    (default: the registry's ``field``, else its kind); ``choices`` the names listed when ``spec`` is
    unknown (default: the registry's). Raises :class:`PluginError`."""
    registry = None if isinstance(registry_or_kind, str) else registry_or_kind
    kind = registry_or_kind if registry is None else registry.kind
    field = field or getattr(registry, "field", None) or kind
    if registry is not None and spec in registry:
        return registry[spec]
    if not is_import_path(spec):
        names = sorted(registry if choices is None and registry is not None else choices or [])
        raise UnknownPluginError(f"{field}='{spec}' is not a registered {kind} ({', '.join(names) or 'none'}) and "
                                 f"not an import path; fix: use one of those names or 'my_pkg.my_module:my_fn'")
    obj = import_object(spec, field)
    contract = getattr(registry, "contract", None)
    if contract is not None:
        check_contract(obj, spec, field, kind, contract)
    return obj


def import_object(spec: str, field: str):
    """``pkg.module:attr`` imported; errors say whether the module or the attribute is missing."""
    module_name, _, attr = spec.partition(":")
    where = f"{field}='{spec}'"
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise PluginError(f"{where}: cannot import module '{module_name}' (module not found: no module named "
                              f"'{err.name}'); fix: install its package or add the folder that holds it to "
                              "PYTHONPATH") from None
        raise PluginError(f"{where}: cannot import module '{module_name}' (importing it failed: {err}); fix: "
                          "install what it imports") from None
    except Exception as err:  # noqa: BLE001  (the user's module raised while importing)
        raise PluginError(f"{where}: cannot import module '{module_name}' (importing it raised "
                          f"{type(err).__name__}: {err}); fix: the error in that module") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            have = sorted(n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None)))
            raise PluginError(f"{where}: module '{module_name}' has no function or class '{attr}' (attribute missing); "
                              f"fix: the name after ':' must be one it defines ({', '.join(have[:12]) or 'none'})")
        obj = getattr(obj, part)
    return obj


def check_contract(obj, spec: str, field: str, kind: str, contract: Contract) -> None:
    """``obj`` is callable, has ``contract.attrs``, takes the contract's arguments and (with a probe)
    returns the documented type; else :class:`PluginError`."""
    where = f"{field}='{spec}'"
    fix = f"fix: {_a(kind)} {kind} is called as {contract.call} and returns {contract.returns}"
    if not callable(obj):
        raise PluginError(f"{where}: is a {type(obj).__name__}, not callable; {fix}")
    if getattr(obj, "batched", False) and contract.batched is not None:
        contract = contract.batched
        fix = f"fix: a batched {kind} is called as {contract.call} and returns {contract.returns}"
    missing = [a for a in contract.attrs if not callable(getattr(obj, a, None))]
    if missing:
        raise PluginError(f"{where}: has no {', '.join(m + '()' for m in missing)} (attribute missing); {fix}")
    problem = signature_problem(obj, contract)
    if problem:
        raise PluginError(f"{where}: wrong signature: {problem}; {fix}")
    if contract.probe is None:
        return
    try:
        problem = contract.probe(obj)
    except Exception as err:  # noqa: BLE001  (the plug-in raised on the example inputs)
        problem = f"calling it with example inputs raised {type(err).__name__}: {err}"
    if problem:
        raise PluginError(f"{where}: wrong return type: {problem}; {fix}")


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def signature_problem(obj, contract: Contract) -> Optional[str]:
    """Why ``obj`` cannot take the contract's arguments (``None``: it can, or it has no signature)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins and C extensions: nothing to check
        return None
    try:
        sig.bind(*contract.args, **{k: None for k in contract.kwargs})
    except TypeError as err:
        name = getattr(obj, "__name__", type(obj).__name__)
        return f"{name}{sig} cannot be called as {contract.call} ({err})"
    return None
