"""A MONAI bundle workflow that refuses unknown overrides and reports errors in one line.

``python -m monai.bundle run`` adds every ``--key value`` it does not know to the config, so a typo such as
``--weight_bit 2`` runs the whole job with the default of ``weight_bits``. :class:`EfficientQWorkflow` is MONAI's
:class:`~monai.bundle.ConfigWorkflow` with two additions, and is chosen with MONAI's own ``--workflow_name``::

    python -m monai.bundle run quantize --workflow_name monai_efficientq.workflow.EfficientQWorkflow \\
        --config_file "['configs/common.json','configs/evaluate.json','configs/quantize.json']" --weight_bits 3

- every override must name an id of the config (or a new argument of a component, e.g.
  ``--network_def#dropout_prob``); an unknown one is refused before anything runs, with the nearest valid id
  and the list of valid ones;
- an error while initialising or running is printed as one line on stderr (the innermost cause, not MONAI's
  "Failed to evaluate" wrappers) and the process exits with code 2; ``--debug True`` raises it with the full
  traceback instead (as it does when the class is used from Python with ``debug=True``).

The command-line tool ``monai-efficientq`` gives its errors the same way (``--debug`` there).

Nothing here imports ignite.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow

__all__ = [
    "EfficientQWorkflow", "UnknownOverrideError", "check_override_ids", "has_config_id", "one_line", "unwrap_config_error",
]

ID_SEP = "#"
_MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate")


class UnknownOverrideError(KeyError):
    """An override names an id the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def has_config_id(parser: ConfigParser, config_id: str) -> bool:
    """Whether the parser's config has ``config_id`` (e.g. ``validate#dataloader``), without parsing anything."""
    try:
        parser[config_id]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def _ids_at(parser: ConfigParser, parent: str) -> list[str]:
    """The ids directly under ``parent`` (``""``: the top level), MONAI's own keys (``_target_``, ...) left out."""
    node = parser[parent] if parent else parser.get()
    if isinstance(node, Mapping):
        keys = [str(k) for k in node if not str(k).startswith("_") and k != "imports"]
    elif isinstance(node, Sequence) and not isinstance(node, str):
        keys = [str(i) for i in range(len(node))]
    else:
        keys = []
    return sorted(keys)


def _unknown_message(parser: ConfigParser, config_id: str) -> str:
    parent, _, leaf = config_id.rpartition(ID_SEP)
    while parent and not has_config_id(parser, parent):  # climb to the deepest id that exists
        parent, _, _ = parent.rpartition(ID_SEP)
        leaf = config_id[len(parent) + 1 :] if parent else config_id
    valid = _ids_at(parser, parent)
    prefix = parent + ID_SEP if parent else ""
    near = difflib.get_close_matches(leaf.split(ID_SEP)[0], valid, n=1, cutoff=0.6)
    hint = f" Did you mean --{prefix}{near[0]}?" if near else ""
    where = f"under '{parent}'" if parent else "in the config"
    return (
        f"unknown override --{config_id}: there is no '{leaf}' {where}.{hint} Valid ids {where}: "
        f"{', '.join(valid)}."
    )


def check_override_ids(parser: ConfigParser, override: Mapping[str, Any]) -> None:
    """Refuse overrides whose id the config lacks, before anything is parsed or run.

    An override may replace any existing id (``weight_bits``, ``validate#dataloader#batch_size``) or add an
    argument to an existing component (a dict with ``_target_``: ``network_def#dropout_prob``); anything else is
    almost always a typo that MONAI would silently add as a new, unused id.

    Args:
        parser: a parser holding the config files (and metadata), before the overrides are applied.
        override: the ``{id: value}`` pairs given on the command line.

    Raises:
        UnknownOverrideError: naming the first unknown id, the nearest valid one and the valid ids beside it.
    """
    for config_id in override:
        if has_config_id(parser, config_id):
            continue
        parent = config_id.rpartition(ID_SEP)[0]
        if parent and has_config_id(parser, parent) and isinstance(parser[parent], Mapping) and "_target_" in parser[parent]:
            continue
        raise UnknownOverrideError(_unknown_message(parser, config_id))


def unwrap_config_error(err: BaseException) -> BaseException:
    """The error behind MONAI's wrappers: a failing ``$`` expression or ``_target_`` component is re-raised by the
    config parser as ``RuntimeError("Failed to evaluate ...")`` / ``("Failed to instantiate ...")`` from the real
    error; our own errors that wrap a cause with a hint are kept as they are."""
    while (
        isinstance(err, RuntimeError)
        and err.__cause__ is not None
        and str(err).startswith(_MONAI_WRAPPERS)
    ):
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
    """``err`` as one line: the message alone for the errors our checks raise, else ``Type: message``."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
    text = " ".join(str(message).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, KeyError, OSError)) else f"{type(err).__name__}: {text}"


class EfficientQWorkflow(ConfigWorkflow):
    """MONAI's :class:`~monai.bundle.ConfigWorkflow` with checked override ids and one-line errors.

    Args:
        config_file: the config file(s), as for ``ConfigWorkflow``.
        debug: raise errors with their traceback instead of printing one line and exiting with code 2.
        kwargs: the other ``ConfigWorkflow`` arguments (``meta_file``, ``logging_file``, ``run_id``, ...) and the
            overrides, each checked by :func:`check_override_ids`.
    """

    _ARGUMENTS = (
        "meta_file", "logging_file", "init_id", "run_id", "final_id", "tracking", "workflow_type", "properties_path",
    )

    def __init__(self, config_file: str | Sequence[str] | None = None, debug: bool = False, **kwargs: Any) -> None:
        arguments = {k: kwargs.pop(k) for k in self._ARGUMENTS if k in kwargs}
        override = kwargs
        _guarded(lambda: super(EfficientQWorkflow, self).__init__(config_file=config_file, **arguments), debug)
        self.debug = bool(debug)  # ConfigWorkflow's attribute hooks need its __init__ to have run first
        _guarded(lambda: check_override_ids(self.parser, override), self.debug)
        self.parser.update(pairs=override)

    def initialize(self) -> Any:
        return _guarded(super().initialize, self.debug)

    def run(self) -> Any:
        return _guarded(super().run, self.debug)

    def finalize(self) -> Any:
        return _guarded(super().finalize, self.debug)


def _guarded(step: Callable[[], Any], debug: bool) -> Any:
    """Run ``step``; an error becomes one line on stderr and exit code 2 unless ``debug``."""
    if debug:
        return step()
    try:
        return step()
    except KeyboardInterrupt:
        print("monai-efficientq: interrupted (files are written whole or not at all).", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - the command line's last word on every error
        print(
            f"monai-efficientq: error: {one_line(unwrap_config_error(err))} (add --debug True for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
