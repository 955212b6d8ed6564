"""The `onnx-widen` command: widen, inspect, validate.

Errors are one line on stderr with exit 1 (the model) or 2 (the usage); --debug shows tracebacks.
click parses the command line (subcommands, typed options, --help for free); rich draws tables.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

from .errors import UsageError, WidenError


def _console(quiet=False):
    from rich.console import Console

    return Console(quiet=quiet, highlight=False)


def _parse_factor(text) -> int:
    try:
        value = int(str(text), 10)
    except ValueError:
        raise UsageError(f"--factor must be an integer >= 2, got {text!r}") from None
    if value < 2:
        raise UsageError(f"--factor must be an integer >= 2, got {value}")
    return value


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
@click.option("--factor", "-k", default="2", show_default=True, help="Integer factor for hidden, FFN and head size.")
@click.option("--residual-scale", type=click.Choice(["repeat", "orthogonal"]), default="repeat", show_default=True,
              help="repeat: canonical (eps kept); orthogonal: the post's R(x)/sqrt(k) with eps/k.")
@click.option("--rope", type=click.Choice(["spread", "remap"]), default="spread", show_default=True,
              help="spread: old pair j at new pair K*j, the wide config's frequencies; remap: repeat the frequencies.")
@click.option("--no-validate", is_flag=True, help="Skip the onnxruntime check (not recommended).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--report", "report_path", metavar="FILE.json", help="Also write the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
def widen(source, out, factor, residual_scale, rope, no_validate, provider, report_path, quiet):
    """Widen IN by --factor and write OUT, after checking it computes the same function."""
    from .workflow import widen_file

    k = _parse_factor(factor)
    summary = widen_file(source, out, k, residual_scale, validate=not no_validate, provider=provider, rope=rope)
    if report_path:
        with open(report_path, "w") as f:
            json.dump(summary, f, indent=2)
    _print_widen(summary, _console(quiet))
    if summary["validation"] is not None and not summary["validation"]["ok"]:
        raise WidenError(f"validation failed: {summary['validation_failure']}; nothing written")


def _print_widen(s, console):
    from rich.table import Table

    console.print(f"[bold]{s['input']}[/] -> [bold]{s['output']}[/]  factor {s['factor']}  residual {s['residual']}")
    console.print("matched: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["matched"].items())))
    console.print(f"parameters: {s['params_before']:,} -> {s['params_after']:,}")
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


@main_group.command()
@click.argument("source", metavar="IN")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(source, as_json):
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


def _print_inspect(d, console):
    from rich.table import Table

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
def validate(small, wide, factor, shape_items, atol, rtol, provider, as_json):
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
    if not res.ok:
        bad = [o.name for o in res.outputs if not o.ok]
        raise WidenError(f"outputs differ beyond tolerance: {', '.join(bad)}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        main_group.main(args=argv, prog_name="onnx-widen", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("onnx-widen: aborted", err=True)
        return 1
    except click.ClickException as e:
        if debug:
            raise
        click.echo(f"onnx-widen: error: {e.format_message()}", err=True)
        return 2
    except WidenError as e:
        if debug:
            raise
        click.echo(f"onnx-widen: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("onnx-widen: interrupted", err=True)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        click.echo(f"onnx-widen: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
