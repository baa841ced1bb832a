"""Entry point of the ``qid2`` command: parse, check inputs, build and run the workflow."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from .. import __version__
from ..config import Config
from ..errors import InputError, Qid2Error
from ..hpc_plugin import SLURM_PLUGINS, PluginSettings, resolve_plugin

LOGGER = logging.getLogger("qid2")


def _config_from_args(argv: list[str] | None) -> Config:
    return _parse_args(argv)[0]


def _parse_args(argv: list[str] | None) -> tuple[Config, dict]:
    """Parse the command line into the Config and the (unchecked) Nipype plugin request."""
    from ..bids import load_bids_filter_file
    from .parser import _build_parser

    parser = _build_parser()
    args = parser.parse_args(argv)
    if (
        isinstance(args.sampler_t_start, int)
        and args.sampler_steps is not None
        and args.sampler_steps > args.sampler_t_start + 1
    ):
        parser.error(
            f"--sampler-steps ({args.sampler_steps}) must not exceed --sampler-t-start + 1 "
            f"({args.sampler_t_start + 1})"
        )
    options = vars(args)
    filter_file = options.pop("bids_filter_file")
    options["bids_filters"] = load_bids_filter_file(filter_file) if filter_file else None
    if options["nprocs"] is None:
        options.pop("nprocs")
    options["command_line"] = ["qid2", *(sys.argv[1:] if argv is None else argv)]
    plugin_request = {
        "name": options.pop("nipype_plugin"),
        "plugin_file": options.pop("plugin_file"),
    }
    return Config(**options), plugin_request


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose + 1, 2)  # default INFO, -v DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(message)s", "%H:%M:%S"))
    # periodic progress lines go to the log file always, to the terminal only without a bar
    handler.addFilter(lambda record: not (getattr(record, "progress", False) and _tty()))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _nipype_logging(verbose: int) -> dict:
    level = "DEBUG" if verbose >= 2 else "INFO" if verbose else "WARNING"
    return {"workflow_level": level, "interface_level": level, "utils_level": level}


class _FirstLineFormatter(logging.Formatter):
    """Nipype's records on the terminal: time, logger and the message's first line only.

    Nipype logs a failed step with its whole traceback (after "Saving crash info to ...");
    the traceback stays in the crash file and the log file, the terminal gets one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines()
        first = lines[0].strip() if lines else ""
        return f"{self.formatTime(record, '%H:%M:%S')} [{record.name}] {first}"


def _one_line_nipype_terminal() -> None:
    for handler in logging.getLogger("nipype").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(_FirstLineFormatter())


def _add_log_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    for name in ("qid2", "nipype.workflow", "nipype.interface"):
        logging.getLogger(name).addHandler(handler)


def preflight(config: Config) -> list:
    """Check every input before anything is written; return the runs to process.

    Parameters
    ----------
    config : Config
        Settings of the invocation.

    Returns
    -------
    list of DWIRun

    Raises
    ------
    Qid2Error
        On the first problem found, naming the file.

    """
    from ..bids import collect_dwi_runs, detect_input_type
    from ..datacheck import check_dwi_data, read_dwi_data, usable_shells
    from ..derivatives import check_output_dir, check_writable_dir
    from ..engines.base import get_engine
    from ..gradients import load_target_bvecs
    from ..upsampling import load_dwi_header, match_shells, read_gradients

    try:
        is_dir = config.bids_dir.is_dir()
        readable = is_dir and os.access(config.bids_dir, os.R_OK | os.X_OK)
    except PermissionError:
        is_dir, readable = True, False
    if not is_dir:
        raise InputError(config.bids_dir, "bids_dir does not exist or is not a folder")
    if not readable:
        raise InputError(
            config.bids_dir,
            f"bids_dir cannot be read by this user (uid {os.getuid()}); fix its permissions",
        )
    get_engine(config.engine, **config.engine_options)
    # cheap checks of where qid2 writes come before the (slow) validator
    check_output_dir(config.bids_dir, config.output_dir)
    check_writable_dir(config.work_dir, "work_dir")
    input_type = config.input_type
    if input_type == "auto":
        input_type = detect_input_type(config.bids_dir)
        LOGGER.info("input type: %s", input_type)
    if input_type == "raw" and not config.skip_bids_validation:
        from ..validation import validate_input

        LOGGER.info("validating %s with bids-validator-deno", config.bids_dir)
        result = validate_input(config.bids_dir)
        LOGGER.info("BIDS validation: %s", result.summary())
        _VALIDATION["result"] = result
    if config.target_bvecs is not None:
        load_target_bvecs(config.target_bvecs)
    runs = collect_dwi_runs(
        config.bids_dir,
        input_type=input_type,
        participant_labels=config.participant_label,
        session_ids=config.session_id,
        bids_filters=config.bids_filters,
    )
    selected = []
    for run in runs:
        img = load_dwi_header(run.dwi)
        table = read_gradients(run.dwi, run.bval, run.bvec, run.bmatrix, img)
        shells = match_shells(table, config.shells, table.shell_tolerance)
        if not shells:
            LOGGER.warning(
                "%s: none of the requested shells %s (it has %s); skipped",
                run.relpath,
                config.shells,
                sorted(table.shells),
            )
            continue
        check_dwi_data(run.dwi, read_dwi_data(run.dwi, img), table.bvals)
        shells, reasons = usable_shells(table, shells)
        if not shells:
            raise InputError(run.dwi, f"no shell can be up-sampled: {'; '.join(reasons)}")
        for reason in reasons:
            LOGGER.warning("%s: %s", run.relpath, reason)
        if run.mask is not None and load_dwi_header_3d(run.mask) != img.shape[:3]:
            raise InputError(run.mask, f"mask grid differs from the DWI grid {img.shape[:3]}")
        selected.append(run)
    if not selected:
        raise InputError(config.bids_dir, f"no DWI run has any of the shells {config.shells}")
    from ..failures import check_free_space

    check_free_space(config.output_dir, config.work_dir, [r.dwi for r in selected])
    return selected


#: The validator's result of this invocation (written to the log folder once it exists).
_VALIDATION: dict = {}


def write_validation_report(logs: Path, stamp: str) -> Path | None:
    """Write the BIDS validator's warnings (and errors) to ``logs/bids-validator-<stamp>.json``.

    Parameters
    ----------
    logs : Path
        The output's log folder.
    stamp : str
        The invocation's stamp (as in ``qid2-<stamp>.log``).

    Returns
    -------
    Path or None
        The file, or None when the validator did not run.

    """
    from collections import Counter

    from ..derivatives import atomic_write_text

    result = _VALIDATION.pop("result", None)
    if result is None:
        return None
    codes = Counter(str(i.get("code")) for i in result.warnings)
    path = logs / f"bids-validator-{stamp}.json"
    document = {
        "summary": result.summary(),
        "n_errors": len(result.errors),
        "n_warnings": len(result.warnings),
        "warning_codes": dict(codes.most_common()),
        "errors": result.errors,
        "warnings": result.warnings,
    }
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    if codes:
        top = ", ".join(f"{code} ({n})" for code, n in codes.most_common(5))
        LOGGER.info("BIDS validator warnings: %s; all in %s", top, path)
    return path


def load_dwi_header_3d(path: Path) -> tuple[int, ...]:
    """Spatial shape of a NIfTI mask (header only)."""
    import nibabel as nib

    try:
        return tuple(nib.load(str(path)).shape[:3])
    except Exception as exc:
        raise InputError(path, f"cannot be read as NIfTI ({exc})") from None


def _progress_callback(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="qid2", unit="step", disable=None, file=sys.stderr)
    failed: list[str] = []
    started: dict[str, float] = {}
    done = [0]

    def callback(node, status):
        _check_terminated()
        name = node.fullname.removeprefix("qid2_wf.")
        if status == "start":
            started[name] = time.perf_counter()
            LOGGER.info("[%d/%d] running %s", done[0] + 1, total, name)
        if status in ("end", "exception"):
            done[0] += 1
            bar.update(1)
            seconds = time.perf_counter() - started.get(name, time.perf_counter())
            if status == "end":
                LOGGER.info("[%d/%d] done %s (%.1f s)", done[0], total, name, seconds)
        if status == "exception":
            failed.append(name)
            LOGGER.error("step failed: %s", node.fullname)

    return bar, callback, failed


def run_participant(config: Config, plugin: PluginSettings | None = None) -> int:
    """Run the participant level; return the exit status.

    Parameters
    ----------
    config : Config
        Settings of the invocation.
    plugin : PluginSettings, optional
        The Nipype plugin (checked by :func:`~qid2_bidsapp.hpc_plugin.resolve_plugin`);
        default MultiProc.

    Returns
    -------
    int

    """
    from nipype import config as nipype_config

    from ..derivatives import write_dataset_description
    from ..engines.qid2 import qid2_uses_cuda
    from ..failures import explain_failed_steps, full_disk
    from ..hpc_plugin import plugin_run_args, prepare_environment
    from ..reports.subject import build_subject_report
    from ..workflows.base import init_qid2_wf, set_slurm_node_args

    if config.reports_only:
        return _reports_only(config, build_subject_report)
    plugin = plugin or PluginSettings()
    runs = preflight(config)
    LOGGER.info("%d DWI run(s) of %d participant(s)", len(runs), len({r.subject for r in runs}))
    # inputs are fine: from here on, the output folder may be written
    write_dataset_description(config.output_dir, config.bids_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    logs = config.output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"qid2-{stamp}.log"
    _add_log_file(log_path)
    config.to_json(logs / f"config-{stamp}.json")
    write_validation_report(logs, stamp)
    LOGGER.info("qid2 %s; log: %s", __version__, log_path)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    crash_dir = logs / "crash"
    nipype_config.update_config(
        {
            "execution": {
                "crashdump_dir": str(crash_dir),
                "crashfile_format": "txt",
                "stop_on_first_crash": config.stop_on_first_crash,
                "remove_unnecessary_outputs": False,
                "hash_method": "content",
                "poll_sleep_duration": 0.2,
            },
            "monitoring": {"enabled": False},
            "logging": _nipype_logging(config.verbose),
        }
    )
    from nipype import logging as nipype_logging

    nipype_logging.update_logging(nipype_config)
    _one_line_nipype_terminal()
    workflow = init_qid2_wf(config=config, runs=runs, log_path=str(log_path))
    if config.write_graph:
        _write_graph(workflow, logs)
    # the qid2 nodes declare use_gpu: one at a time on the GPU (they all use cuda:0)
    n_gpu_procs = 1 if config.engine == "qid2" and qid2_uses_cuda(config.device) else 0
    if plugin.name in SLURM_PLUGINS:
        set_slurm_node_args(workflow)
        prepare_environment(plugin)
    bar, callback, failed = _progress_callback(len(workflow._get_all_nodes()))
    plugin_args = plugin_run_args(
        plugin,
        nprocs=config.nprocs,
        mem_gb=config.mem_gb,
        n_gpu_procs=n_gpu_procs,
        status_callback=callback,
    )
    LOGGER.info(
        "Nipype plugin %s%s",
        plugin.name,
        f" (from {plugin.source})" if plugin.source else "",
    )
    from nipype.pipeline.plugins import multiproc

    if not getattr(multiproc.process_initializer, "qid2_wrapped", False):
        multiproc.process_initializer = _quiet_worker_initializer(multiproc.process_initializer)
    if not hasattr(multiproc, "_qid2_original_run_node"):
        multiproc._qid2_original_run_node = multiproc.run_node
        multiproc.run_node = _run_node_never_raising
    start = time.perf_counter()
    wall_start = time.time()
    try:
        workflow.run(plugin=plugin.name, plugin_args=plugin_args)
    except OSError as exc:  # Nipype's own writes (results, crash files) failed: disk, quota
        bar.close()
        where = exc.filename or full_disk([config.output_dir, config.work_dir]) or config.work_dir
        raise Qid2Error(
            f"{where}: {exc.strerror or exc}; free some space (or fix the folder) and rerun with "
            "the same -w (runs that finished are complete in the output folder)"
        ) from None
    except RuntimeError as exc:
        bar.close()

        crashes = [p for p in crash_dir.glob("crash-*") if p.stat().st_mtime >= wall_start - 1]
        cause = explain_failed_steps(sorted(crashes))
        disk = full_disk([config.output_dir, config.work_dir])
        if disk is not None:  # the likeliest cause, and the crash file may not say where
            raise _disk_full(disk) from None
        if cause:
            raise Qid2Error(f"{cause} (details: {crash_dir}, log: {log_path})") from None
        what = f"{len(failed)} step(s) failed: {', '.join(failed[:3])}" if failed else str(exc)
        more = ", ..." if len(failed) > 3 else ""
        raise Qid2Error(
            f"{what}{more}; crash reports in {crash_dir} (log: {log_path}); runs that finished "
            "are complete in the output folder, rerun with the same -w to resume"
        ) from None
    except (KeyboardInterrupt, Qid2Error):
        bar.close()
        raise
    except Exception as exc:  # a failure of Nipype itself (not of a step): one line, trace in log
        bar.close()
        LOGGER.debug("the workflow engine failed", exc_info=True)
        disk = full_disk([config.output_dir, config.work_dir])
        if disk is not None:
            raise _disk_full(disk) from None
        raise Qid2Error(
            f"the workflow engine (Nipype) failed: {type(exc).__name__}: {exc} (traceback in the "
            f"log: {log_path}); rerun with the same -w to resume"
        ) from None
    bar.close()
    _check_terminated()
    if plugin.submits_and_returns:
        print(
            f"qid2: submitted the workflow as SLURM jobs ({plugin.name}, scripts in "
            f"{config.work_dir / 'qid2_wf' / 'batch'}); outputs and reports appear in "
            f"{config.output_dir} as the jobs finish"
        )
        return 0
    LOGGER.info("finished in %.1f s", time.perf_counter() - start)
    for subject in sorted({r.subject for r in runs}):
        print(f"qid2: report for sub-{subject}: {config.output_dir / f'sub-{subject}.html'}")
    return 0


def _write_graph(workflow, logs: Path) -> None:
    try:
        workflow.write_graph(
            graph2use="colored", format="svg", simple_form=True, dotfilename=str(logs / "graph.dot")
        )
    except Exception as exc:  # graphviz missing: keep the .dot file
        LOGGER.warning("could not render the workflow graph (%s); wrote the .dot file", exc)


def _reports_only(config: Config, build) -> int:
    from ..bids import strip_label

    if not config.output_dir.is_dir():
        raise InputError(config.output_dir, "output_dir does not exist: nothing to report on")
    subjects = (
        [strip_label(p, "sub-") for p in config.participant_label]
        if config.participant_label
        else sorted(p.name[4:] for p in config.output_dir.glob("sub-*") if p.is_dir())
    )
    if not subjects:
        raise InputError(config.output_dir, "no sub-* folders: run the participant level first")
    for subject in subjects:
        print(f"qid2: report for sub-{subject}: {build(config.output_dir, subject)}")
    return 0


def run_group(config: Config) -> int:
    """Run the group level; return the exit status.

    Parameters
    ----------
    config : Config
        Settings of the invocation.

    Returns
    -------
    int

    """
    from ..reports.group import build_group_report

    if not config.output_dir.is_dir():
        raise InputError(
            config.output_dir, "output_dir does not exist: run the participant level first"
        )
    table, html = build_group_report(config.output_dir)
    print(f"qid2: group QC table: {table}")
    print(f"qid2: group report: {html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run qid2 from the command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 on an error the user can act on, 2 on usage errors.

    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.signal(signal.SIGINT, _raise_interrupted)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_stop_unraisable(previous_hook)
    _STOP_REQUESTED[0] = False
    # a log file on a full or vanished disk must not print "--- Logging error ---" tracebacks
    logging.raiseExceptions = False
    try:
        config, plugin_request = _parse_args(argv)
        _setup_logging(config.verbose)
        os.environ.setdefault("OMP_NUM_THREADS", str(config.omp_nthreads))
        if config.analysis_level == "group":
            return run_group(config)
        # checked before anything is written, like the other inputs
        return run_participant(config, resolve_plugin(**plugin_request))
    except Qid2Error as exc:
        print(f"qid2: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_Terminated)
        _stop_workers()
        what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(
            f"qid2: {what}; runs that finished are complete in the output folder, nothing else "
            "was published; rerun with the same -w to resume",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = previous_hook


def _disk_full(disk: Path) -> Qid2Error:
    return Qid2Error(
        f"{disk}: no space left on the device; free some space and rerun with the same -w "
        "(runs that finished are complete in the output folder)"
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the run stops like on Ctrl-C."""


#: Set by the SIGTERM / SIGINT handlers (``"term"`` / ``"int"``): an exception raised from a
#: signal handler can be swallowed (it may land inside code whose exceptions Python ignores,
#: e.g. a logging lock release), so the progress callback and the end of the run check this
#: flag too.
_STOP_REQUESTED: list = [False]


def _raise_terminated(signum, frame) -> None:
    _STOP_REQUESTED[0] = "term"
    raise _Terminated()


def _raise_interrupted(signum, frame) -> None:
    _STOP_REQUESTED[0] = _STOP_REQUESTED[0] or "int"
    raise KeyboardInterrupt()


def _check_terminated() -> None:
    if _STOP_REQUESTED[0] == "term":
        raise _Terminated()
    if _STOP_REQUESTED[0]:
        raise KeyboardInterrupt()


def _quiet_stop_unraisable(hook):
    """Wrap ``sys.unraisablehook`` to drop the exceptions of stop signals.

    A stop signal's exception swallowed where Python ignores exceptions (a finaliser, a lock
    release) is expected and handled by `_check_terminated`, so it must not print
    "Exception ignored ... Traceback" on the user's terminal.
    """

    def quiet(unraisable) -> None:
        if _STOP_REQUESTED[0] and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        hook(unraisable)

    return quiet


def _stop_workers() -> None:
    """Terminate the worker processes (Nipype MultiProc) and wait for them."""
    import multiprocessing

    # the pool's callbacks now fail with BrokenProcessPool: expected while stopping, not news
    logging.getLogger("concurrent.futures").disabled = True
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


def _quiet_worker_initializer(original):
    """Wrap Nipype's worker initializer: workers ignore Ctrl-C (the main process stops them)."""

    def initializer(*args):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        original(*args)

    initializer.qid2_wrapped = True
    return initializer


def _run_node_never_raising(node, updatehash, taskid):
    """Nipype MultiProc's ``run_node``, returning a failure instead of raising.

    When a step fails and its result file cannot be written (a full work disk), Nipype's
    ``run_node`` raises from its own error handler; the pool's callback then never marks the
    task done and the run waits forever. Here that case becomes an ordinary failed step (with
    its traceback, for the crash file), so the run ends with one line.
    """
    import traceback

    from nipype.pipeline.plugins import multiproc

    nipype_run_node = getattr(multiproc, "_qid2_original_run_node", multiproc.run_node)
    try:
        return nipype_run_node(node, updatehash, taskid)
    except BaseException:
        # a list of lines, as Nipype's own run_node gives (its report_crash appends to it)
        lines = traceback.format_exc().splitlines(True)
        return {"result": None, "traceback": lines, "taskid": taskid}


if __name__ == "__main__":
    sys.exit(main())
