"""Selection policy: locks, allow/deny lists (wildcards) and priority boosts.

Three sources, merged with precedence code > environment > file:

* code: ``configure(...)`` and ``prefer(...)`` (a context manager, innermost wins), which act on
  the process-wide selector's :class:`PolicyState` (every selector owns one; there is no module
  state here);
* environment: ``LZ_KERNEL_POLICY``, e.g.
  ``lock.attention_decode=flashinfer.decode;deny=xformers*,flash_attn*;boost.triton*=10``;
* file: YAML named by ``LZ_KERNEL_POLICY_FILE`` (or ``load_policy_file``)::

      lock: {attention_decode: flashinfer.decode}
      allow: ["flashinfer*", "torch*"]
      deny: ["xformers*"]
      boost: {"triton*": 10}

Patterns (``fnmatch``) match a kernel's name or its backend. Locks and boosts merge key by key
(the higher source wins); deny lists add up; the highest source that gives an allow list wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from layerzero_serve import _envs as envs
from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelSpec, Op

_OPS = {op.value: op for op in Op}


class PolicyError(ValidationError):
    """An invalid policy (file line, environment entry or code argument)."""


@dataclass(frozen=True, slots=True)
class Policy:
    locks: Mapping[Op, str] = field(default_factory=dict)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    boosts: Mapping[str, float] = field(default_factory=dict)

    def over(self, lower: Policy) -> Policy:
        """This policy layered over ``lower`` (this one has precedence)."""
        return Policy(
            locks={**lower.locks, **self.locks},
            allow=self.allow or lower.allow,
            deny=tuple(dict.fromkeys(lower.deny + self.deny)),
            boosts={**lower.boosts, **self.boosts},
        )

    def fingerprint(self) -> str:
        text = repr(
            (
                sorted((k.value, v) for k, v in self.locks.items()),
                self.allow,
                self.deny,
                sorted(self.boosts.items()),
            )
        )
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    # ---- queries used by the selector --------------------------------------------------------
    @staticmethod
    def _matches(pattern: str, spec: KernelSpec) -> bool:
        return fnmatchcase(spec.name, pattern) or fnmatchcase(spec.backend, pattern)

    def denied(self, spec: KernelSpec) -> str | None:
        for p in self.deny:
            if self._matches(p, spec):
                return p
        return None

    def allowed(self, spec: KernelSpec) -> bool:
        return not self.allow or any(self._matches(p, spec) for p in self.allow)

    def boost(self, spec: KernelSpec) -> float:
        return sum(v for p, v in self.boosts.items() if self._matches(p, spec))


MAX_BOOST = 1e6  # |boost| bound: far above any priority, far below float overflow


def _patterns(where: str, name: str, pats: object) -> tuple[str, ...]:
    """allow/deny as a tuple of non-empty patterns (None = empty); iterables are materialised
    once, so a generator is not consumed by validation."""
    allowed = "a list/tuple of non-empty kernel/backend patterns (or None)"
    if pats is None:
        return ()
    if isinstance(pats, (str, bytes, Mapping)):
        raise PolicyError(f"{where}: {name}", pats, allowed)
    try:
        out = tuple(pats)  # type: ignore[arg-type]
    except TypeError:
        raise PolicyError(f"{where}: {name}", pats, allowed) from None
    for p in out:
        if not isinstance(p, str) or not p.strip():
            raise PolicyError(f"{where}: {name}", out, allowed, f"bad pattern {p!r}")
    return out


def _mapping(where: str, name: str, value: object, allowed: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: {name}", value, allowed)
    return value


def make_policy(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] | None = (),
    deny: Iterable[str] | None = (),
    boost: Mapping[str, float] | None = None,
    where: str = "code",
) -> Policy:
    """Validated Policy from plain values; ``where`` names the source in errors."""
    locks: dict[Op, str] = {}
    lock_map = _mapping(where, "lock", lock, "a mapping {op: kernel name} (or None)")
    for op, kernel in lock_map.items():
        key = op.value if isinstance(op, Op) else op
        if not isinstance(key, str) or key not in _OPS:
            raise PolicyError(f"{where}: lock", key, f"an op in {sorted(_OPS)}")
        if not isinstance(kernel, str) or not kernel.strip():
            raise PolicyError(f"{where}: lock.{key}", kernel, "a non-empty kernel name")
        locks[_OPS[key]] = kernel
    boosts: dict[str, float] = {}
    boost_map = _mapping(where, "boost", boost, "a mapping {pattern: number} (or None)")
    for pat, val in boost_map.items():
        if not isinstance(pat, str) or not pat.strip():
            raise PolicyError(f"{where}: boost", pat, "a non-empty kernel/backend pattern as key")
        ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        if ok:
            try:
                ok = math.isfinite(val) and abs(val) <= MAX_BOOST
            except OverflowError:  # an int too large for a float
                ok = False
        if not ok:
            raise PolicyError(
                f"{where}: boost.{pat}", val, f"a finite number in [-{MAX_BOOST:g}, {MAX_BOOST:g}]"
            )
        boosts[pat] = val
    return Policy(locks, _patterns(where, "allow", allow), _patterns(where, "deny", deny), boosts)


def _env_boost(where: str, value: str) -> float:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise PolicyError(where, value, "a number (boost)") from None


def parse_env_policy(text: str) -> Policy:
    """Parse ``LZ_KERNEL_POLICY`` (``;``-separated ``key=value`` entries); every error names
    the entry."""
    if not isinstance(text, str):
        raise PolicyError("LZ_KERNEL_POLICY", text, "a str of ';'-separated key=value entries")
    lock: dict[str, str] = {}
    boost: dict[str, float] = {}
    allow: list[str] = []
    deny: list[str] = []
    for i, entry in enumerate(e.strip() for e in text.split(";")):
        if not entry:
            continue
        where = f"LZ_KERNEL_POLICY entry {i + 1} ({entry!r})"
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise PolicyError(where, entry, "key=value")
        if key.startswith("lock."):
            make_policy(lock={key[5:]: value}, where=where)
            lock[key[5:]] = value
        elif key.startswith("boost."):
            pat = key[6:]
            b = _env_boost(where, value)
            make_policy(boost={pat: b}, where=where)
            boost[pat] = b
        elif key in ("allow", "deny"):
            pats = [p.strip() for p in value.split(",")]
            make_policy(**{key: pats}, where=where)
            (allow if key == "allow" else deny).extend(pats)
        else:
            raise PolicyError(where, key, "lock.<op>, boost.<pattern>, allow or deny")
    return make_policy(lock, allow, deny, boost, where="LZ_KERNEL_POLICY")


def load_policy_file(path: str | Path) -> Policy:
    """Parse a YAML policy file; every error is a PolicyError naming the file (and the line
    when known)."""
    import yaml

    if not isinstance(path, (str, Path)) or not str(path):
        raise PolicyError("path", path, "a YAML file path (str or Path)")
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(str(path), "undecodable bytes", "a UTF-8 YAML file", str(e)) from None
    except OSError as e:
        raise PolicyError(str(path), "unreadable file", "a readable YAML file", str(e)) from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise PolicyError(f"{path}:{line}", "invalid YAML", "a YAML mapping", str(e)) from None
    if root is None:
        return Policy()
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError(f"{path}:{root.start_mark.line + 1}", "top level", "a mapping")
    parts: dict[str, object] = {}
    for key_node, val_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key not in ("lock", "allow", "deny", "boost"):
            shown = key if key is not None else f"<{type(key_node).__name__}>"
            raise PolicyError(where, shown, "one of lock, allow, deny, boost")
        # Construct the section from its own node with the safe constructor: marks (lines)
        # stay those of the file, and unsafe tags or unhashable keys are PolicyErrors.
        loader = yaml.SafeLoader("")
        try:
            value = loader.construct_document(val_node)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or val_node.start_mark
            raise PolicyError(
                f"{path}:{mark.line + 1}",
                f"invalid '{key}' section",
                f"a valid '{key}' section",
                str(e).replace("\n", " "),
            ) from None
        except (TypeError, ValueError, RecursionError) as e:
            raise PolicyError(
                where, f"invalid '{key}' section", f"a valid '{key}' section", str(e)
            ) from None
        finally:
            loader.dispose()
        try:
            make_policy(**{key: value}, where=where)  # type: ignore[arg-type]
        except PolicyError:
            raise
        except (TypeError, AttributeError, ValueError):
            raise PolicyError(where, value, f"a valid '{key}' section") from None
        parts[key] = value
    return make_policy(**parts, where=str(path))  # type: ignore[arg-type]


# ---- a selector's policy state ---------------------------------------------------------------
class PolicyState:
    """The policy one selector decides under (``Selector.policy``; the process-wide functions
    ``configure``/``prefer``/``reload_policy`` act on the process-wide selector's): the code
    policy (:meth:`configure`), the :meth:`prefer` layers, and the environment/file policy
    (``LZ_KERNEL_POLICY`` over ``LZ_KERNEL_POLICY_FILE``), read at first use and cached until
    :meth:`reload`. ``epoch`` counts changes; the selector's decision cache is keyed on it.

    CUDA graphs: host only; a policy applies to plans selected afterwards, not to graphs already
    captured.
    """

    __slots__ = ("_code", "_env", "_layers", "epoch")

    def __init__(self) -> None:
        self._code = Policy()
        self._layers: list[Policy] = []
        self._env: Policy | None = None  # parsed at first use; reload() re-reads
        self.epoch = 0

    def __repr__(self) -> str:
        layers = len(self._layers)
        return f"PolicyState(code={self._code!r}, prefer_layers={layers}, epoch={self.epoch})"

    def configure(
        self,
        lock: Mapping[str | Op, str] | None = None,
        allow: Iterable[str] | None = (),
        deny: Iterable[str] | None = (),
        boost: Mapping[str, float] | None = None,
        reset: bool = False,
    ) -> Policy:
        """Set the code policy (merged over the earlier one unless ``reset``); returns it."""
        if not isinstance(reset, bool):
            raise PolicyError("reset", reset, "a bool")
        new = make_policy(lock, allow, deny, boost)
        self._code = new if reset else new.over(self._code)
        self.epoch += 1
        return self._code

    @contextlib.contextmanager
    def prefer(
        self,
        lock: Mapping[str | Op, str] | None = None,
        allow: Iterable[str] | None = (),
        deny: Iterable[str] | None = (),
        boost: Mapping[str, float] | None = None,
    ) -> Iterator[Policy]:
        """Layer a policy over the code policy for the ``with`` block (innermost wins)."""
        p = make_policy(lock, allow, deny, boost)
        self._layers.append(p)
        self.epoch += 1
        try:
            yield p
        finally:
            self._layers.pop()
            self.epoch += 1

    def reload(self) -> None:
        """Re-read LZ_KERNEL_POLICY and LZ_KERNEL_POLICY_FILE at the next use."""
        self._env = None
        self.epoch += 1

    def _env_and_file(self) -> Policy:
        if self._env is None:
            env, file = envs.kernel_policy(), envs.kernel_policy_file()
            if file and not Path(file).is_file():
                raise PolicyError("LZ_KERNEL_POLICY_FILE", file, "an existing YAML file")
            base = load_policy_file(file) if file else Policy()
            self._env = (parse_env_policy(env) if env else Policy()).over(base)
        return self._env

    def effective(self) -> Policy:
        """prefer() layers > configure() > LZ_KERNEL_POLICY > LZ_KERNEL_POLICY_FILE."""
        p = self._code.over(self._env_and_file())
        for layer in self._layers:
            p = layer.over(p)
        return p
