"""Selection policy: locks, allow/deny lists (wildcards) and priority boosts.

Three sources, merged with precedence code > environment > file:

* code: ``configure(...)`` (process-wide) and ``prefer(...)`` (a context manager, innermost wins);
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
    boosts: Mapping[str, int] = field(default_factory=dict)

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

    def boost(self, spec: KernelSpec) -> int:
        return sum(v for p, v in self.boosts.items() if self._matches(p, spec))


def make_policy(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    boost: Mapping[str, int] | None = None,
    where: str = "code",
) -> Policy:
    """Validated Policy from plain values; ``where`` names the source in errors."""
    locks: dict[Op, str] = {}
    for op, kernel in (lock or {}).items():
        key = op.value if isinstance(op, Op) else op
        if key not in _OPS:
            raise PolicyError(f"{where}: lock", key, f"an op in {sorted(_OPS)}")
        if not isinstance(kernel, str) or not kernel:
            raise PolicyError(f"{where}: lock.{key}", kernel, "a kernel name")
        locks[_OPS[key]] = kernel
    boosts: dict[str, int] = {}
    for pat, val in (boost or {}).items():
        if not isinstance(val, int) or isinstance(val, bool):
            raise PolicyError(f"{where}: boost.{pat}", val, "an integer")
        boosts[str(pat)] = val
    for name, pats in (("allow", allow), ("deny", deny)):
        if isinstance(pats, str) or not all(isinstance(p, str) and p for p in pats):
            raise PolicyError(f"{where}: {name}", pats, "a list of kernel/backend patterns")
    return Policy(locks, tuple(allow), tuple(deny), boosts)


def parse_env_policy(text: str) -> Policy:
    """Parse ``LZ_KERNEL_POLICY`` (``;``-separated ``key=value`` entries)."""
    lock: dict[str, str] = {}
    boost: dict[str, int] = {}
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
            lock[key[5:]] = value
        elif key.startswith("boost."):
            try:
                boost[key[6:]] = int(value)
            except ValueError:
                raise PolicyError(where, value, "an integer boost") from None
        elif key in ("allow", "deny"):
            (allow if key == "allow" else deny).extend(p.strip() for p in value.split(","))
        else:
            raise PolicyError(where, key, "lock.<op>, boost.<pattern>, allow or deny")
    return make_policy(lock, allow, deny, boost, where="LZ_KERNEL_POLICY")


def load_policy_file(path: str | Path) -> Policy:
    """Parse a YAML policy file; every error names the file and line."""
    import yaml

    path = Path(path)
    text = path.read_text()
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
        key = key_node.value
        if key not in ("lock", "allow", "deny", "boost"):
            raise PolicyError(where, key, "one of lock, allow, deny, boost")
        value = yaml.safe_load(yaml.serialize(val_node))
        try:
            parts[key] = value
            make_policy(**{k: v for k, v in parts.items() if k == key}, where=where)
        except PolicyError:
            raise
        except (TypeError, AttributeError):
            raise PolicyError(where, value, f"a valid '{key}' section") from None
    return make_policy(**parts, where=str(path))  # type: ignore[arg-type]


# ---- the process-wide policy stack -----------------------------------------------------------
_code_policy = Policy()
_prefer_stack: list[Policy] = []
_epoch = [0]  # bumped on every change; the selector's cache is keyed on it


def epoch() -> int:
    return _epoch[0]


def configure(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    boost: Mapping[str, int] | None = None,
    reset: bool = False,
) -> Policy:
    """Set the process-wide code policy (merged over any earlier ``configure`` unless
    ``reset``). Returns the new code policy."""
    global _code_policy
    new = make_policy(lock, allow, deny, boost)
    _code_policy = new if reset else new.over(_code_policy)
    _epoch[0] += 1
    return _code_policy


@contextlib.contextmanager
def prefer(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] = (),
    deny: Iterable[str] = (),
    boost: Mapping[str, int] | None = None,
) -> Iterator[Policy]:
    """Temporarily layer a policy over the code policy (innermost wins)."""
    p = make_policy(lock, allow, deny, boost)
    _prefer_stack.append(p)
    _epoch[0] += 1
    try:
        yield p
    finally:
        _prefer_stack.pop()
        _epoch[0] += 1


_env_policy: list[Policy] = []  # parsed once; reload_policy() re-reads


def reload_policy() -> None:
    """Re-read LZ_KERNEL_POLICY and LZ_KERNEL_POLICY_FILE (they are read once, at first use)."""
    _env_policy.clear()
    _epoch[0] += 1


def _env_and_file() -> Policy:
    if not _env_policy:
        env, file = envs.kernel_policy(), envs.kernel_policy_file()
        if file and not Path(file).is_file():
            raise PolicyError("LZ_KERNEL_POLICY_FILE", file, "an existing YAML file")
        base = load_policy_file(file) if file else Policy()
        _env_policy.append((parse_env_policy(env) if env else Policy()).over(base))
    return _env_policy[0]


def effective_policy() -> Policy:
    """prefer() layers > configure() > LZ_KERNEL_POLICY > LZ_KERNEL_POLICY_FILE."""
    p = _code_policy.over(_env_and_file())
    for layer in _prefer_stack:
        p = layer.over(p)
    return p
