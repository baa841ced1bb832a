"""Nipype execution plugins: ``--nipype-plugin``, ``--plugin-file`` and their plugin arguments."""

from __future__ import annotations

import getpass
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, Qid2Error

PLUGINS = ("MultiProc", "Linear", "SLURM", "SLURMGraph")
DEFAULT_PLUGIN = "MultiProc"
SLURM_PLUGINS = ("SLURM", "SLURMGraph")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_bool(value) -> bool:
    return isinstance(value, bool)


# plugin_args each plugin understands (Nipype ignores unknown keys silently: we refuse them,
# so that a typo does not pass unnoticed), with a check and what it expects
_SLURM_COMMON = {
    "sbatch_args": (_is_str, "a string of sbatch options"),
    "template": (_is_str, "a batch script template (text or file path)"),
    "retry_timeout": (_positive_number, "a number of seconds > 0"),
    "max_tries": (_positive_int, "a positive integer"),
}
PLUGIN_ARGS = {
    "MultiProc": {
        "n_procs": (_positive_int, "a positive integer"),
        "memory_gb": (_positive_number, "a number of GB > 0"),
        "n_gpu_procs": (_non_negative_int, "an integer >= 0"),
        "raise_insufficient": (_is_bool, "true or false"),
        "maxtasksperchild": (_positive_int, "a positive integer"),
        "mp_context": (_is_str, "fork, spawn or forkserver"),
    },
    "Linear": {},
    "SLURM": {
        **_SLURM_COMMON,
        "max_jobs": (_positive_int, "a positive integer"),
        "jobid_re": (_is_str, "a regular expression"),
    },
    "SLURMGraph": {
        **_SLURM_COMMON,
        "dont_resubmit_completed_jobs": (_is_bool, "true or false"),
    },
}


@dataclass
class PluginSettings:
    """The Nipype plugin of one invocation.

    Attributes
    ----------
    name : str
        One of :data:`PLUGINS`.
    args : dict
        ``plugin_args`` given in the plugin file (checked).
    source : Path or None
        The plugin file, when one was given.

    """

    name: str = DEFAULT_PLUGIN
    args: dict = field(default_factory=dict)
    source: Path | None = None

    @property
    def submits_and_returns(self) -> bool:
        """True for plugins that submit the whole graph and return before it has run."""
        return self.name == "SLURMGraph"


def read_plugin_file(path: Path) -> tuple[str | None, dict]:
    """Read an fMRIPrep-style plugin YAML (``plugin: NAME`` and ``plugin_args: {...}``).

    Parameters
    ----------
    path : Path
        The YAML file.

    Returns
    -------
    plugin : str or None
        The ``plugin`` entry, if any.
    plugin_args : dict
        The ``plugin_args`` entry (empty when absent).

    Raises
    ------
    InputError
        Unreadable file, invalid YAML, or not the expected shape.

    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise InputError(path, f"is not valid YAML ({problem}{where})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(path, "must be a YAML mapping with 'plugin' and/or 'plugin_args'")
    unknown = sorted(set(map(str, data)) - {"plugin", "plugin_args"})
    if unknown:
        raise InputError(path, f"unknown key(s) {unknown}; expected 'plugin' and 'plugin_args'")
    plugin = data.get("plugin")
    if plugin is not None and not isinstance(plugin, str):
        raise InputError(path, f"'plugin' must be a name, one of {', '.join(PLUGINS)}")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise InputError(path, "'plugin_args' must be a mapping such as {n_procs: 4}")
    return plugin, args


def resolve_plugin(name: str | None = None, plugin_file: Path | None = None) -> PluginSettings:
    """Combine ``--nipype-plugin`` and ``--plugin-file`` into checked settings.

    The command-line name wins over the file's ``plugin``; without either, MultiProc.

    Parameters
    ----------
    name : str, optional
        ``--nipype-plugin``.
    plugin_file : Path, optional
        ``--plugin-file``.

    Returns
    -------
    PluginSettings

    Raises
    ------
    InputError
        Unknown plugin, unknown or ill-typed plugin arguments (naming the file), or a SLURM
        plugin without ``sbatch`` on the PATH.

    """
    file_plugin, args = read_plugin_file(plugin_file) if plugin_file else (None, {})
    chosen = name or file_plugin or DEFAULT_PLUGIN
    if chosen not in PLUGINS:
        raise InputError(
            plugin_file, f"unknown Nipype plugin {chosen!r}; qid2 supports {', '.join(PLUGINS)}"
        )
    allowed = PLUGIN_ARGS[chosen]
    for key, value in args.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise InputError(
                plugin_file, f"plugin_args: {key!r} is not an option of {chosen} (known: {known})"
            )
        check, expected = allowed[key]
        if not check(value):
            raise InputError(plugin_file, f"plugin_args: {key} must be {expected}, got {value!r}")
    if chosen in SLURM_PLUGINS and shutil.which("sbatch") is None:
        raise Qid2Error(
            f"the {chosen} plugin submits jobs with sbatch, which is not on the PATH; run on a "
            "SLURM login node or use --nipype-plugin MultiProc"
        )
    return PluginSettings(name=chosen, args=dict(args), source=plugin_file)


def plugin_run_args(
    settings: PluginSettings,
    *,
    nprocs: int,
    mem_gb: float | None = None,
    n_gpu_procs: int = 0,
    status_callback=None,
) -> dict:
    """Build the ``plugin_args`` for ``workflow.run``.

    Defaults come from the command line (``--nprocs``, ``--mem-gb``, the GPU slots); the plugin
    file's values win over them.

    Parameters
    ----------
    settings : PluginSettings
        From :func:`resolve_plugin`.
    nprocs : int
        Processes at once (MultiProc).
    mem_gb : float, optional
        Memory limit (MultiProc).
    n_gpu_procs : int
        GPU slots (MultiProc; nodes that declare ``use_gpu`` take one each).
    status_callback : callable, optional
        Nipype status callback (progress bar); not used by SLURMGraph.

    Returns
    -------
    dict

    """
    args: dict = {}
    if settings.name == "MultiProc":
        args = {"n_procs": nprocs, "raise_insufficient": False}
        if n_gpu_procs:
            args["n_gpu_procs"] = n_gpu_procs
        if mem_gb:
            args["memory_gb"] = mem_gb
    if settings.name == "SLURMGraph":
        # Nipype's SLURMGraph needs this key (it fails without it); True: a rerun with the same
        # work folder does not resubmit finished steps, as with the other plugins
        args["dont_resubmit_completed_jobs"] = True
    elif status_callback is not None:
        args["status_callback"] = status_callback
    args.update(settings.args)
    return args


def slurm_node_args(n_procs: int, mem_gb: float | None, use_gpu: bool) -> str:
    """``sbatch`` options for one Nipype node run as its own SLURM job.

    Parameters
    ----------
    n_procs : int
        Threads the node declares.
    mem_gb : float or None
        Memory the node declares.
    use_gpu : bool
        Whether the node runs on a GPU.

    Returns
    -------
    str

    """
    parts = [f"--cpus-per-task={max(1, int(n_procs))}"]
    if mem_gb:
        parts.append(f"--mem={max(256, math.ceil(mem_gb * 1024))}M")
    if use_gpu:
        parts.append("--gres=gpu:1")
    return " ".join(parts)


def prepare_environment(settings: PluginSettings) -> None:
    """Set what Nipype's SLURM plugins read from the environment (``LOGNAME`` names jobs)."""
    if settings.name in SLURM_PLUGINS and not os.environ.get("LOGNAME"):
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except Exception:  # no passwd entry (containers)
            os.environ["LOGNAME"] = "qid2"
