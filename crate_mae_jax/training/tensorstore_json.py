"""Frees the references that tensorstore's JSON-to-Python conversion leaks.

tensorstore's Python binding builds every JSON object it hands back as a dict with
`PyDict_SetItem(dict, key.release(), value.release())`; `PyDict_SetItem` takes
references of its own, so every key and value of every JSON object returned keeps
one reference too many and is never freed (lists are built right). Every
tensorstore release that orbax-checkpoint 0.12.8 accepts (0.1.84 to 0.1.86, the
newest) does this, and Orbax converts on every save: the kvstore spec of each array
(`KvStore.Spec(...).to_json()`), its metadata (`TensorStore.spec().to_json()`) and
its I/O telemetry (`experimental_collect_matching_metrics`, twice per item). A
training process grew by about 100 KB per checkpoint of the tiny model, more with
more arrays (BENCHMARKS.md, "Resident memory").

`install()` wraps exactly those functions so that each drops the extra reference of
every key and value of the dicts it returns. Each function is checked on a probe
call first and wrapped only when it leaks exactly one reference per entry, so a
tensorstore that fixes the binding is left as it is.
"""
import ctypes
import functools
import sys
import threading

from absl import logging

_MARK = "_crate_mae_jax_refcount_fix"
_lock = threading.Lock()
_installed: dict[str, bool] = {}

_decref = ctypes.pythonapi.Py_DecRef
_decref.argtypes = [ctypes.py_object]
_decref.restype = None


def _dicts(obj):
  """Every dict inside `obj` (a JSON value: dicts, lists and scalars)."""
  stack = [obj]
  while stack:
    item = stack.pop()
    if type(item) is dict:  # pylint: disable=unidiomatic-typecheck
      yield item
      stack.extend(item.values())
    elif type(item) is list:  # pylint: disable=unidiomatic-typecheck
      stack.extend(item)


def release(obj) -> None:
  """Drops the one extra reference of each key and value of each dict in `obj`
  (only for a value just returned by a leaking tensorstore conversion)."""
  for d in list(_dicts(obj)):
    for key, value in list(d.items()):
      _decref(key)
      _decref(value)


def extra_references(obj) -> int | None:
  """References beyond the dict's own of a fresh value in `obj` (a string of 2+
  characters, a list or a dict: never a shared object), None when there is none.
  1 for a leaking conversion, 0 for a correct one."""
  for d in _dicts(obj):
    for key in d:
      value = d[key]
      if type(value) in (dict, list) or (type(value) is str and len(value) > 1):
        del value
        # the dict's reference and getrefcount's argument
        return sys.getrefcount(d[key]) - 2
  return None


def _wrap(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    out = fn(*args, **kwargs)
    release(out)
    return out
  setattr(wrapper, _MARK, True)
  return wrapper


def _targets(ts):
  """(name, owner, attribute, probe) of each conversion that Orbax calls."""
  return [
      ("Spec.to_json", ts.Spec, "to_json",
       lambda f: f(ts.Spec({"driver": "zarr", "kvstore": {"driver": "memory",
                                                          "path": "probe/"}}))),
      ("KvStore.Spec.to_json", ts.KvStore.Spec, "to_json",
       lambda f: f(ts.KvStore.Spec({"driver": "memory", "path": "probe/"}))),
      ("experimental_collect_matching_metrics", ts, "experimental_collect_matching_metrics",
       lambda f: f("")),
  ]


def install() -> dict[str, bool]:
  """Wraps the leaking conversions (once per process); {name: wrapped}."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel
  with _lock:
    if _installed:
      return dict(_installed)
    for name, owner, attr, probe in _targets(ts):
      fn = getattr(owner, attr, None)
      if fn is None or getattr(fn, _MARK, False):
        _installed[name] = fn is not None
        continue
      try:
        out = probe(fn)
        extra = extra_references(out)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("tensorstore %s: refcount probe failed (%s); left as it is", name, e)
        extra = None
      if extra == 1:
        release(out)
        setattr(owner, attr, _wrap(fn))
      elif extra not in (0, None):
        logging.warning("tensorstore %s keeps %d extra references per JSON entry; left as "
                        "it is", name, extra)
      _installed[name] = extra == 1
    return dict(_installed)
