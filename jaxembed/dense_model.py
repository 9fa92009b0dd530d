"""The dense model saved with a checkpoint: an import path, JSON kwargs and params.

``DenseModel`` names the model's code by import path (``"package.module:attribute"``: a pure
function ``(params, activations) -> outputs`` or a Flax ``nn.Module`` subclass) and holds its
params, so a checkpoint (``jaxembed.checkpoint``) can store the whole model and ``jaxembed
export`` serve it. Nothing is pickled: the path and kwargs are JSON, the params arrays.
``DenseModel.resolve`` imports the named module (which runs its code, as any import does);
nothing else here imports it.

Used by ``jaxembed.checkpoint``: ``check_model`` (before a save), ``params_structure`` /
``params_from_structure`` (the params' structure as JSON and back), ``plain_params`` (Flax's
FrozenDicts as dicts) and ``model_summary`` (what a step's config says, importing nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxembed import _nest

__all__ = [
    "DenseModel",
    "check_model",
    "model_summary",
    "params_from_structure",
    "params_structure",
    "plain_params",
]

_TARGET_FORMS = (
    "name a function `(params, activations) -> outputs` or a flax.linen.Module subclass defined "
    "at the top level of an importable module, as 'package.module:name'"
)


def _is_dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _check_apply_path(path: str) -> str:
    """``path`` if it reads ``package.module:attribute``; a ValueError naming the fix if not."""
    module, colon, attr = path.partition(":")
    if not colon or not _is_dotted(module) or not _is_dotted(attr):
        raise ValueError(
            f"DenseModel apply {path!r} is not an import path 'package.module:attribute' (e.g. "
            f"'jaxembed.demo.model:predict'); {_TARGET_FORMS}."
        )
    if module == "__main__" or module.startswith("__main__."):
        raise ValueError(
            f"DenseModel apply {path!r} names the script being run (__main__), which another "
            "process (e.g. `jaxembed export`) cannot import; define it in an importable module "
            "(e.g. mypackage/model.py) and name it 'mypackage.model:name'."
        )
    return path


def _apply_path(apply: Any) -> str:
    """The import path of ``apply``: a path string, or a module-level function or class."""
    if isinstance(apply, str):
        return _check_apply_path(apply)
    module = getattr(apply, "__module__", None)
    qualname = getattr(apply, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        what = type(apply).__name__
        raise TypeError(
            f"DenseModel apply must be an import path or a module-level function or class; a "
            f"{what} has no import path (for a functools.partial, name the function and store its "
            f"keyword arguments as kwargs=...); {_TARGET_FORMS}."
        )
    if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        raise ValueError(
            f"DenseModel apply is a lambda (in {module}), which has no import path; define it with "
            f"`def` at the top level of an importable module and pass that function (or "
            f"'{module}:name')."
        )
    if "<locals>" in qualname:
        raise ValueError(
            f"DenseModel apply {qualname} is defined inside a function (in {module}), so it has "
            "no import path; move it to the top level of an importable module."
        )
    path = _check_apply_path(f"{module}:{qualname}")
    if _import_target(path) is not apply:
        raise ValueError(
            f"DenseModel apply {path!r} does not import back as the object given (it was "
            "rebound or wrapped after its definition); pass the import path of the object you "
            "mean as a string."
        )
    return path


def _json_kwargs(kwargs: Mapping[str, Any] | None, apply: str) -> dict[str, Any]:
    """``kwargs`` as it reads back from JSON (tuples become lists); a TypeError if not JSON."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"DenseModel kwargs of {apply!r} must be a mapping with string keys, got "
            f"{type(kwargs).__name__}."
        )

    def check(value: Any, where: str) -> None:
        if value is None or isinstance(value, (bool, int, float, str)):
            if isinstance(value, float) and not np.isfinite(value):
                raise TypeError(f"DenseModel kwargs{where} of {apply!r} is {value}, not JSON.")
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check(v, f"{where}[{i}]")
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(
                        f"DenseModel kwargs{where} of {apply!r} has the key {k!r}; JSON keys are "
                        "strings."
                    )
                check(v, f"{where}[{k!r}]")
            return
        raise TypeError(
            f"DenseModel kwargs{where} of {apply!r} is a {type(value).__name__}, which JSON "
            "cannot store; kwargs are written to the checkpoint's config as JSON, so give "
            "numbers, strings, booleans, None, lists and dicts (build other objects inside the "
            "module from them)."
        )

    for key, value in kwargs.items():
        check(value, f"[{key!r}]")
    return json.loads(json.dumps(dict(kwargs)))


def params_structure(tree: Any, where: str = "params") -> dict:
    """The structure of ``tree`` as JSON: dicts, lists and tuples kept, each array leaf its
    shape and dtype; a TypeError naming the first leaf that is not an array."""
    if isinstance(tree, Mapping):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(
                f"DenseModel {where} has a non-string key ({sorted(map(repr, tree))[:3]}); "
                "params must be nested dicts with string keys, lists and tuples of arrays, "
                "as Flax's are."
            )
        return {"dict": {k: params_structure(v, f"{where}[{k!r}]") for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not hasattr(type(tree), "_fields"):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {kind: [params_structure(v, f"{where}[{i}]") for i, v in enumerate(tree)]}
    dtype = getattr(tree, "dtype", None)
    if isinstance(tree, (jax.Array, np.ndarray, np.generic)) and dtype is not None:
        dtype = np.dtype(dtype)
        if dtype == np.bool_ or np.issubdtype(dtype, np.integer) or _is_float(dtype):
            return {"array": {"shape": list(np.shape(tree)), "dtype": str(dtype)}}
    raise TypeError(
        f"DenseModel {where} is a {type(tree).__name__}"
        f"{f' of dtype {dtype}' if dtype is not None else ''}; params must be nested dicts "
        "(string keys), lists and tuples of boolean, integer or floating arrays, as Flax's are: "
        "convert numbers with np.asarray, and keep other state (e.g. optax's) in `extra`."
    )


def _is_float(dtype: np.dtype) -> bool:
    return bool(jax.numpy.issubdtype(dtype, jax.numpy.floating))


def params_from_structure(node: dict, leaf: Callable[[list[int], str], Any]) -> Any:
    """The params' structure (``params_structure``) with ``leaf(shape, dtype)`` for each array."""
    return _nest.from_json(node, lambda n: leaf(n["array"]["shape"], n["array"]["dtype"]))


def plain_params(tree: Any) -> Any:
    """``tree`` with every mapping a dict (e.g. Flax's FrozenDict), as ``save`` writes it."""
    if isinstance(tree, Mapping):
        return {k: plain_params(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(plain_params(v) for v in tree)
    return tree


def _import_target(apply: str) -> Any:
    """Imports the module of ``apply`` and returns its attribute; ImportError naming the fix."""
    module_name, _, attr = apply.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ImportError(
                f"Cannot import the dense model {apply!r}: there is no module {missing!r} here; "
                "install the package that provides it (or add its folder to PYTHONPATH).",
                name=module_name,
            ) from err
        raise ImportError(
            f"Cannot import the dense model {apply!r}: module {module_name!r} needs {missing!r}, "
            "which is not installed here; install it.",
            name=module_name,
        ) from err
    except Exception as err:  # the module's own code failed while importing
        raise ImportError(
            f"Cannot import the dense model {apply!r}: importing module {module_name!r} raised "
            f"{type(err).__name__}: {err}; fix that module (or its environment).",
            name=module_name,
        ) from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(
                f"Cannot import the dense model {apply!r}: module {module_name!r} has no "
                f"attribute {attr!r} (renamed or removed?); {_TARGET_FORMS}.",
                name=module_name,
            ) from None
    return obj


def _apply_function(target: Any, apply: str, kwargs: Mapping[str, Any]) -> Callable:
    """The pure ``(params, activations) -> outputs`` function that ``target`` stands for."""
    linen = sys.modules.get("flax.linen")  # loaded if ``target`` is a Flax module
    is_module_class = linen is not None and isinstance(target, type)
    if is_module_class and issubclass(target, linen.Module):  # type: ignore[union-attr]
        try:
            return target(**kwargs).apply
        except TypeError as err:
            raise TypeError(
                f"The dense model {apply!r} (a flax.linen.Module) cannot be built with kwargs "
                f"{kwargs} ({err}); store the module's fields as kwargs."
            ) from err
    if linen is not None and isinstance(target, linen.Module):
        raise TypeError(
            f"The dense model {apply!r} is a flax.linen.Module instance; name its class instead "
            "and store its fields as kwargs, e.g. DenseModel(Tower, params, kwargs={...})."
        )
    if isinstance(target, type) or not callable(target):
        raise TypeError(
            f"The dense model {apply!r} is a {type(target).__name__}"
            f"{' (a class that is not a flax.linen.Module)' if isinstance(target, type) else ''}, "
            f"not a function; {_TARGET_FORMS}."
        )
    return functools.partial(target, **kwargs) if kwargs else target


@dataclasses.dataclass(frozen=True, init=False, eq=False)
class DenseModel:
    """The dense model saved with the embedding state: where its code is, and its params.

    A checkpoint that stores one serves the whole model from ``jaxembed export`` (no training
    code needed beyond the module named here). Nothing is pickled: the checkpoint's config holds
    ``apply`` and ``kwargs`` as JSON, and the params are an orbax item, checksummed like the
    tables.

    Attributes:
        apply: import path ``"package.module:attribute"`` of either a pure function
            ``(params, activations) -> outputs`` (called with ``**kwargs``) or a Flax
            ``nn.Module`` subclass (built as ``cls(**kwargs)``; its ``.apply`` serves).
            ``activations`` has the structure of the ``Embedding``'s ``feature_config``; the
            outputs are an array or a dict of arrays. The constructor also takes the function or
            class itself and records its path; a lambda, a function defined inside another
            function or in ``__main__`` (the script being run) has no path another process can
            import: define it in an importable module.
        params: the model's parameters: nested dicts (string keys), lists and tuples of
            boolean, integer or floating arrays, e.g. Flax's ``init`` output.
        kwargs: JSON-able keyword arguments (numbers, strings, booleans, None, lists, dicts);
            tuples read back as lists, so they are stored as lists from the start.

    ``resolve()`` imports the module named by ``apply``, which runs that module's code, as any
    import does: resolve models only from checkpoints you trust as you trust the packages you
    install. ``read_config``, ``restore_model`` and ``jaxembed inspect`` never import it.

    Example:
        >>> import jax, jax.numpy as jnp, tempfile, jaxembed as je
        >>> table = je.TableConfig(10, 4, name="items")
        >>> emb = je.Embedding({"item": je.FeatureConfig(table)}, je.optimizers.SGD(0.1))
        >>> state = emb.init(jax.random.key(0))
        >>> from jaxembed.demo import model as demo
        >>> acts = {"user": jnp.ones((2, 4)), "item": jnp.ones((2, 4)),
        ...         "categories": jnp.ones((2, 4)), "history": jnp.ones((2, 3, 4))}
        >>> params = demo.Tower(hidden=(8,)).init(jax.random.key(0), acts)
        >>> dense = je.checkpoint.DenseModel(demo.Tower, params, kwargs={"hidden": (8,)})
        >>> dense.apply, dense.kwargs
        ('jaxembed.demo.model:Tower', {'hidden': [8]})
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, state, step=1, model=dense)
        >>> restored = je.checkpoint.restore_model(path)  # imports nothing
        >>> restored.resolve()(restored.params, acts).shape  # imports jaxembed.demo.model
        (2,)
    """

    apply: str
    params: Any
    kwargs: dict[str, Any]

    def __init__(
        self, apply: str | Callable, params: Any, *, kwargs: Mapping[str, Any] | None = None
    ):
        path = _apply_path(apply)
        object.__setattr__(self, "apply", path)
        object.__setattr__(self, "kwargs", _json_kwargs(kwargs, path))
        params_structure(params)  # a TypeError naming the first leaf that is not an array
        object.__setattr__(self, "params", params)

    def __repr__(self) -> str:
        leaves = jax.tree.leaves(self.params)
        count = sum(int(np.size(x)) for x in leaves)
        return (
            f"DenseModel(apply={self.apply!r}, kwargs={self.kwargs!r}, params=<{len(leaves)} "
            f"arrays, {count:,} parameters>)"
        )

    def resolve(self) -> Callable[[Any, Any], Any]:
        """Imports ``apply`` (running its module's code) and returns the pure function
        ``(params, activations) -> outputs``: the function itself (with ``kwargs`` bound), or
        a Flax module's ``cls(**kwargs).apply``.

        Raises:
            ImportError: the module cannot be imported (not installed, or its code raised) or
                has no such attribute; the message names the path and the fix.
            TypeError: the attribute is neither a function nor a ``flax.linen.Module``
                subclass, or the module class does not accept ``kwargs``.
        """
        return _apply_function(_import_target(self.apply), self.apply, self.kwargs)

    def metadata(self) -> dict:
        """What the step's config records: the path, the kwargs and the params' structure."""
        return {"apply": self.apply, "kwargs": self.kwargs, "params": params_structure(self.params)}


def check_model(model: Any) -> DenseModel:
    """``model`` if it is a DenseModel whose target resolves here; otherwise a clear error."""
    if not isinstance(model, DenseModel):
        raise TypeError(
            f"`model` must be a je.checkpoint.DenseModel(apply, params, kwargs=...), got "
            f"{type(model).__name__}; the import path of the apply function is what lets "
            "`jaxembed export` rebuild the model."
        )
    try:
        model.resolve()
    except ImportError as err:
        raise ValueError(
            f"{err} The checkpoint stores only this import path, so it must import wherever the "
            "checkpoint is exported."
        ) from err
    return model


def model_summary(config: Mapping[str, Any]) -> dict | None:
    """What a step's config (``read_config``) says about its dense model, without importing
    it: ``{"apply", "kwargs", "arrays", "parameters"}``, or None if none is stored.

    Example:
        >>> import jax, jax.numpy as jnp, tempfile, jaxembed as je
        >>> from jaxembed.demo import model as demo
        >>> acts = {"user": jnp.ones((2, 4)), "item": jnp.ones((2, 4)),
        ...         "categories": jnp.ones((2, 4)), "history": jnp.ones((2, 3, 4))}
        >>> params = demo.Tower(hidden=(8,)).init(jax.random.key(0), acts)
        >>> dense = je.checkpoint.DenseModel(demo.Tower, params, kwargs={"hidden": (8,)})
        >>> emb = je.Embedding({"item": je.FeatureConfig(je.TableConfig(10, 4, name="items"))})
        >>> path = tempfile.mkdtemp()
        >>> je.checkpoint.save(path, emb, emb.init(jax.random.key(0)), step=1, model=dense)
        >>> summary = je.checkpoint.model_summary(je.checkpoint.read_config(path))  # no import
        >>> summary["apply"], summary["kwargs"], summary["arrays"], summary["parameters"]
        ('jaxembed.demo.model:Tower', {'hidden': [8]}, 4, 129)
    """
    stored = config.get("model")
    if stored is None:
        return None
    shapes: list[list[int]] = []
    params_from_structure(stored["params"], lambda shape, dtype: shapes.append(shape))
    return {
        "apply": stored["apply"],
        "kwargs": stored["kwargs"],
        "arrays": len(shapes),
        "parameters": int(sum(int(np.prod(s)) for s in shapes)),
    }
