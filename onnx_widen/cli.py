"""The `onnx-widen` command: widen, inspect, validate.

Errors are one line on stderr with exit 1 (the model) or 2 (the usage); --debug shows tracebacks.
click parses the command line (subcommands, typed options, --help for free); rich draws tables.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import tempfile

import click

from .errors import UsageError, WidenError


def _console(quiet=False):
    from rich.console import Console

    return Console(quiet=quiet, highlight=False)


def _parse_factor(text, name="--factor", minimum=2) -> int:
    try:
        value = int(str(text), 10)
    except ValueError:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _parse_positions(text):
    if text is None:
        return None
    try:
        return tuple(int(p, 10) for p in str(text).split(","))
    except ValueError:
        raise UsageError(f"--depth-at expects block numbers separated by commas (e.g. 1,3), got {text!r}") from None


def _parse_shapes(items) -> dict:
    out = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shape expects NAME=2x16, got {item!r}") from None
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="onnx-widen")
@click.pass_context
def main_group(ctx, debug):
    """Widen a Transformer exported to ONNX into an exactly equivalent wider model."""
    ctx.obj = {"debug": debug}


@main_group.command()
@click.argument("source", metavar="IN")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="Where to write the widened model.")
@click.option("--factor", "-k", default=None, help="Integer factor for hidden, FFN and head size  [default: 2].")
@click.option("--hidden", default=None, metavar="N", help="Target hidden size, any count (instead of --factor); "
              "what is not named keeps its size.")
@click.option("--residual-scale", type=click.Choice(["repeat", "orthogonal"]), default="repeat", show_default=True,
              help="repeat: canonical (eps kept); orthogonal: the post's R(x)/sqrt(k) with eps/k.")
@click.option("--ffn-factor", "ffn_factor", default=None, help="Integer factor for the FFN inner size (default: --factor).")
@click.option("--ffn-size", "ffn_size", default=None, metavar="N", help="Target FFN inner size, any count (instead of --ffn-factor).")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Exact symmetry-breaking noise (relative std) on weights that read copied units.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --noise (and of --allow-approximate's choice).")
@click.option("--rope", type=click.Choice(["spread", "remap"]), default="spread", show_default=True,
              help="spread: old pair j at new pair K*j, the wide config's frequencies; remap: repeat the frequencies.")
@click.option("--heads", "heads", default="keep", show_default=True, metavar="keep|grow|N",
              help="keep: head size times K; grow: K times the heads, each a copy (head size, softmax scale, RoPE kept); "
                   "N: that many heads, head size kept.")
@click.option("--kv-heads", "kv_heads", type=click.Choice(["tile", "keep"]), default="tile", show_default=True,
              help="With --heads grow|N under GQA: grow kv heads with their groups, or keep them and grow the query copies.")
@click.option("--depth", "depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Insert D pre-norm blocks (per stack), each a copy of the block before it with zero output projections.")
@click.option("--depth-at", "depth_at", default=None, metavar="P,Q", help="Insert the new blocks after these blocks (1-based; default: evenly spaced).")
@click.option("--allow-approximate", is_flag=True,
              help="Accept an approximate result and report its error: post-norm LayerNorm with --hidden (a random choice "
                   "of units), or --depth with --noise (noise on the new blocks' output projections).")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime check (not recommended).")
@click.option("--dry-run", is_flag=True, help="Print the plan (every rewritten constant, small and wide shape); write nothing.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--report", "report_path", metavar="FILE.json", help="Also write the summary as JSON.")
@click.option("--external-data", "external_data", default=None, metavar="NAME",
              help="Write the weights to the file NAME beside OUT (automatic, as OUT.data, over 2 GiB).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
def widen(source, out, factor, hidden, residual_scale, ffn_factor, ffn_size, noise, seed, rope, heads, kv_heads, depth, depth_at,
          allow_approximate, no_validate, dry_run, provider, report_path, external_data, quiet):
    """Widen IN by --factor (or to --hidden / --ffn-size / --heads N) and write OUT, after checking it
    computes the same function.

    IN may be a folder of exports of one model (encoder, decoder, decoder with past, config.json):
    every file is widened by the same rules and OUT is that folder, widened."""
    from .workflow import validation_failed, widen_file, write_report

    at = _parse_positions(depth_at)
    kw = _growth_options(factor, hidden, ffn_factor, ffn_size, heads, deepens=bool(depth or at))
    kw.update(residual=residual_scale, rope=rope, kv_heads=kv_heads, noise=noise, seed=seed, allow_approximate=allow_approximate,
              depth=depth, depth_at=at)
    if dry_run:
        return _print_plan(source, kw, report_path, quiet)
    k = kw.pop("factor")
    if os.path.isdir(source):
        if external_data is not None:
            raise UsageError("--external-data names one file; a folder's models each get their own (MODEL.onnx.data) when over 2 GiB")
        from .folder import widen_folder

        summary = widen_folder(source, out, k, validate=not no_validate, provider=provider, **kw)
        if report_path:
            write_report(summary, report_path)
        console = _console(quiet)
        for s in summary["files"].values():
            _print_widen(s, console)
        return
    with _progress(not quiet) as progress:
        summary = widen_file(source, out, k, validate=not no_validate, provider=provider, report=report_path,
                             external_data=external_data, progress=progress, **kw)
    if report_path:
        write_report(summary, report_path)
    _print_widen(summary, _console(quiet))
    if validation_failed(summary):
        raise WidenError(f"validation failed: {summary['validation_failure']}; nothing written")


# Below this many output bytes the write takes well under a second: no bar.
PROGRESS_MIN_BYTES = 64 << 20


@contextlib.contextmanager
def _progress(enabled: bool):
    """A progress bar for the write (tensors done, bytes written, rate) when stdout is a terminal
    and not --quiet: yields a factory progress(total_bytes, total_tensors) -> tick(bytes, tensor_done)."""
    if not (enabled and sys.stdout.isatty()):
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("writing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[done]}/{task.fields[count]} tensors"), TimeRemainingColumn(), transient=True)

    def factory(total_bytes, total_tensors):
        if total_bytes < PROGRESS_MIN_BYTES:
            return None
        task = bar.add_task("write", total=total_bytes, done=0, count=total_tensors)
        bar.start()
        done = [0]

        def tick(nbytes, tensor_done):
            done[0] += bool(tensor_done)
            bar.update(task, advance=nbytes, done=done[0])
        return tick

    try:
        yield factory
    finally:
        bar.stop()


def _growth_options(factor, hidden, ffn_factor, ffn_size, heads, deepens=False) -> dict:
    """--factor / --ffn-factor / --heads grow and the target sizes, checked against each other."""
    for a, b, x, y in (("--hidden", "--factor", hidden, factor), ("--ffn-size", "--ffn-factor", ffn_size, ffn_factor)):
        if x is not None and y is not None:
            raise UsageError(f"{a} and {b} are mutually exclusive (a target size or a factor)")
    out = {"hidden": _parse_factor(hidden, "--hidden", 1) if hidden is not None else None,
           "ffn_size": _parse_factor(ffn_size, "--ffn-size", 1) if ffn_size is not None else None}
    f = _parse_factor(ffn_factor, "--ffn-factor", 1) if ffn_factor is not None else None
    if heads in ("keep", "grow"):
        out["heads"], out["num_heads"] = heads, None
    else:
        out["heads"], out["num_heads"] = "keep", _parse_factor(heads, "--heads (keep, grow or a head count)", 1)
    targets = any(out[t] is not None for t in ("hidden", "ffn_size", "num_heads"))
    if factor is not None:
        k = _parse_factor(factor, minimum=1 if (f and f > 1) or targets or deepens else 2)
    else:
        k = None if targets else 2
    return {**out, "factor": k, "ffn_factor": f}


def _print_plan(source, kw, report_path, quiet):
    from rich.table import Table

    from .api import build_plan
    from .model_io import load_model
    from .plan import Options
    from .report import plan_rows

    plan = build_plan(load_model(source), Options(**kw))
    rows = plan_rows(plan)
    if report_path:
        with open(report_path, "w") as fh:
            json.dump({"plan": rows, "notes": plan.notes, "mapping": plan.io}, fh, indent=2)
    t = Table(title=f"plan for {source}")
    for col in ("constant", "role", "small", "wide", "factor / value", "at"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["constant"], r["role"], "x".join(map(str, r["small"])) or "scalar", "x".join(map(str, r["wide"])) or "scalar",
                  str(r.get("factor", r.get("value"))), r["node"])
    console = _console(quiet)
    console.print(t)
    if plan.depth:
        console.print(_depth_line(plan.depth))
    for note in plan.notes:
        console.print(f"note: {note}")
    console.print("dry run: nothing written")


def _print_widen(s, console):
    from rich.table import Table

    targets = "".join(f"  {k.replace('_', ' ')} {s[k]}" for k in ("hidden", "ffn_size", "num_heads") if s.get(k) is not None)
    console.print(f"[bold]{s['input']}[/] -> [bold]{s['output']}[/]  factor {s['factor']}{targets}  residual {s['residual']}"
                  + ("  [yellow]approximate[/]" if s.get("approximate") else ""))
    console.print("matched: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["matched"].items())))
    console.print(f"parameters: {s['params_before']:,} -> {s['params_after']:,}")
    if s.get("depth"):
        console.print(_depth_line(s["depth"]))
    for note in s["notes"]:
        console.print(f"note: {note}")
    if s["validation"] is not None:
        t = Table(title=f"validation ({s['validation']['provider']})")
        for col in ("output", "max abs err", "max rel err", "ok"):
            t.add_column(col)
        for name, o in s["validation"]["outputs"].items():
            t.add_row(name, f"{o['max_abs']:.3g}", f"{o['max_rel']:.3g}", "yes" if o["ok"] else "[red]NO[/]")
        console.print(t)
    console.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in s["time_s"].items()))


def _depth_line(d) -> str:
    stacks = ", ".join(f"{a} -> {b} blocks (new after block {', '.join(map(str, p))})"
                       for a, b, p in zip(d["blocks_before"], d["blocks_after"], d["after_block"]))
    line = f"depth: {stacks}; output projections of the new blocks " + ("noisy (approximate)" if d["approximate"] else "zero (exact)")
    if d.get("error"):
        line += "; error of the deepened model: " + ", ".join(f"{n} max rel {o['max_rel']:.3g}" for n, o in d["error"].items())
    return line


@main_group.command()
@click.argument("source", metavar="IN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plan", "plan_factor", default=None, metavar="K", help="Also print the plan for factor K (sizes before and after).")
def inspect(source, as_json, plan_factor):
    """Show what the matcher finds in IN and every width-path node no pattern covers."""
    from .api import inspect as api_inspect
    from .report import inspect_json

    an = api_inspect(source)
    data = inspect_json(an)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        _print_inspect(data, _console())
    if an.uncovered:
        sys.exit(1)
    if plan_factor is not None and not as_json:
        _print_plan(source, {"factor": _parse_factor(plan_factor)}, None, False)


def _print_inspect(d, console):
    from rich.table import Table

    for key, value in d.get("provenance", {}).items():
        console.print(f"{key}: {value}")
    console.print(f"opset {d['opset']}, {d['nodes']} nodes, {d['nodes_on_width_paths']} on width paths")
    t = Table(title="matched patterns")
    for col in ("kind", "where", "details"):
        t.add_column(col)
    for m in d["matches"]:
        details = ", ".join(f"{k}={v}" for k, v in m.items() if k not in ("kind", "nodes"))
        t.add_row(m["kind"], m["nodes"][0] if len(m["nodes"]) == 1 else f"{m['nodes'][0]} .. ({len(m['nodes'])} nodes)", details)
    console.print(t)
    s = Table(title="shape constants by role")
    for col in ("node", "operand", "small value", "axis roles"):
        s.add_column(col)
    for sc in d["shape_constants"]:
        s.add_row(sc["node"], sc["operand"], str(sc["value"]), " ".join(sc["roles"]))
    console.print(s)
    if d["uncovered"]:
        u = Table(title="[red]nodes on width paths that no pattern covers[/]")
        for col in ("node", "op", "why"):
            u.add_column(col)
        for x in d["uncovered"]:
            u.add_row(x["node"], x["op"], x["why"])
        console.print(u)
    else:
        console.print("every node on a width path is covered")


@main_group.command()
@click.argument("small", metavar="SMALL")
@click.argument("wide", metavar="WIDE")
@click.option("--factor", "-k", default=None, help="Assume the post's convention (repeat / sqrt K) when WIDE has no mapping metadata.")
@click.option("--shape", "shape_items", multiple=True, metavar="NAME=2x16", help="Input shape override (repeatable).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=None, help="Tolerance relative to the output's largest magnitude.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--localize", is_flag=True, help="On failure, name the first tensor where WIDE stops matching SMALL.")
def validate(small, wide, factor, shape_items, atol, rtol, provider, as_json, localize):
    """Run SMALL and WIDE on the same inputs and compare every output."""
    from .validation import ATOL, RTOL, validate as run_validate

    k = _parse_factor(factor) if factor is not None else None
    res = run_validate(small, wide, factor=k, shapes=_parse_shapes(shape_items) or None, atol=ATOL if atol is None else atol,
                       rtol=RTOL if rtol is None else rtol, provider=provider)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
    else:
        from rich.table import Table

        t = Table(title=f"{small} vs {wide}")
        for col in ("output", "shape", "max abs err", "max rel err", "ok"):
            t.add_column(col)
        for o in res.outputs:
            t.add_row(o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", "yes" if o.ok else "[red]NO[/]")
        _console().print(t)
    if not res.ok and _approximate(wide):
        if not as_json:
            _console().print("approximate model (widened with --allow-approximate): the error is reported, not checked")
        return
    if not res.ok:
        bad = [o.name for o in res.outputs if not o.ok]
        where = ""
        if localize:
            from .localize import localize as run_localize
            from .model_io import load_model

            first = run_localize(load_model(small), load_model(wide))
            if first:
                where = (f"; first divergence at tensor {first['tensor']!r} from node {first['node']!r} ({first['op']}, "
                         f"pattern {first['pattern']}): {first.get('error') or format(first['max_rel'], '.3g') + ' relative error'}")
        raise WidenError(f"outputs differ beyond tolerance: {', '.join(bad)}{where}")


def _approximate(path) -> bool:
    import onnx

    from .apply import read_mapping

    return bool((read_mapping(onnx.load(path, load_external_data=False)) or {}).get("approximate"))


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised like KeyboardInterrupt so that cleanups (temporary files) run."""


def _on_signal(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _signals_as_exceptions():
    saved = {}
    try:
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                saved[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


# onnxruntime logs kernel failures on the process's stderr (file descriptor 2) by itself, next to
# the exception that becomes our one line: the CLI keeps stderr to that one line.
_NATIVE_NOISE = re.compile(r"\[[EWIV]:onnxruntime:")


@contextlib.contextmanager
def _quiet_native_stderr(enabled=True):
    """Send fd 2 to a temporary file while a command runs, then replay every line that is not an
    onnxruntime log line (Python's own stderr output is kept, in order)."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    buf = tempfile.TemporaryFile()
    try:
        os.dup2(buf.fileno(), 2)
    except OSError:
        os.close(saved)
        buf.close()
        yield
        return
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        buf.seek(0)
        text = buf.read().decode("utf-8", "replace")
        buf.close()
        kept = "".join(line for line in text.splitlines(keepends=True) if line.strip() and not _NATIVE_NOISE.search(line))
        if kept:
            sys.stderr.write(kept)
            sys.stderr.flush()


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None):
    """The entry point: returns the exit code; errors are one line on stderr (--debug: tracebacks)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    with _signals_as_exceptions():
        with _quiet_native_stderr(not debug):
            code, message = _run(argv, debug)
    if message:
        click.echo(message, err=True)
    return code


def _run(argv, debug):
    """(exit code, the one line for stderr or None)."""
    try:
        main_group.main(args=argv, prog_name="onnx-widen", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code, None
    except SystemExit as e:  # a command's sys.exit(n)
        return (e.code if isinstance(e.code, int) else (0 if e.code is None else 1)), None
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        return 130, "onnx-widen: interrupted"
    except click.ClickException as e:
        if debug:
            raise
        return 2, f"onnx-widen: error: {e.format_message()}"
    except WidenError as e:
        if debug:
            raise
        return e.exit_code, f"onnx-widen: error: {_first_line(e)}"
    except KeyboardInterrupt:
        return 130, "onnx-widen: interrupted"
    except Terminated as e:
        return 128 + (e.args[0] if e.args else 15), "onnx-widen: terminated"
    except MemoryError:
        if debug:
            raise
        return 1, "onnx-widen: error: out of memory (try a smaller --factor or a machine with more memory)"
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return 1, f"onnx-widen: error: {e.strerror or _first_line(e)}{where}"
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        return 1, f"onnx-widen: internal error: {type(e).__name__}: {_first_line(e)} (rerun with --debug)"
    return 0, None


if __name__ == "__main__":
    sys.exit(main())
