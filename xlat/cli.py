"""The ``xlat`` command line: object then verb, ``-j/--json`` everywhere.

Every command but ``run``, ``check`` and ``lab`` is a client of the daemon's
control socket. Errors are one line on stderr; exit 2 for usage, 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from xlat import compiled
from xlat.config import (
    DEFAULT_BPFFS,
    DEFAULT_CONTROL,
    DEFAULT_FILE,
    DEFAULT_STATE_DIR,
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
)
from xlat.control.api import ControlError, call
from xlat.eventloop import LOOPS
from xlat.tables import table


def _json_anywhere(ctx: click.Context, _: click.Parameter, value: bool) -> bool:
    """``-j`` after the subcommand, or before it (``xlat -j session list``)."""
    root = ctx.find_root().obj or {}
    return value or bool(root.get("json"))


json_option = click.option("-j", "--json", "as_json", is_flag=True, callback=_json_anywhere,
                           help="Print JSON only.")


def _emit(as_json: bool, data: Any, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=None if as_json else 2) if as_json else human(data))


def _ask(ctx: click.Context, cmd: str, **args: Any) -> Any:
    return call(ctx.obj["control"], cmd, {k: v for k, v in args.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xlat", message=f"xlat %(version)s, {compiled.describe()}")
@click.option("--control", type=click.Path(path_type=Path), envvar="XLAT_CONTROL",
              default=DEFAULT_CONTROL, show_default=True, help="The daemon's control socket.")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON only (every command).")
@click.pass_context
def cli(ctx: click.Context, control: Path, as_json: bool) -> None:
    """xlat: a kernel-assisted IPv4<->IPv6 gateway for VoIP."""
    ctx.obj = {"control": control, "json": as_json}


config_file_option = click.option(
    "-c", "--config", "config_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help=f"TOML file. [default: {DEFAULT_FILE}, if it exists]")


@cli.command()
@config_file_option
@click.option("--media-v4", multiple=True, metavar="ADDR", help="IPv4 media (and SIP) address.")
@click.option("--media-v6", multiple=True, metavar="ADDR", help="IPv6 media (and SIP) address.")
@click.option("--interface", multiple=True, metavar="IF",
              help="Attach the datapath here (default: every non-loopback interface up).")
@click.option("--ports", metavar="MIN-MAX", help="Relay port range on each media address. "
              "[default: 30000-39999]")
@click.option("--sip-listen", multiple=True, metavar="[udp:|tcp:|tls:]A:P|none",
              help="SIP listen address: UDP and TCP, or only the transport prefixed "
                   "(default: port 5060 of each media address).")
@click.option("--domain", multiple=True, metavar="NAME", help="A domain we serve.")
@click.option("--route", multiple=True, metavar="'DOMAIN|*=SIP-URI'",
              help="Next hop for requests to DOMAIN (`*`: every request nothing else "
                   "claims), e.g. '*=sip:pbx.example.net' (HOST a name or an IP; "
                   ":PORT and ;transport= optional, RFC 3263 finds the rest).")
@click.option("--trusted", multiple=True, metavar="PREFIX",
              help="SIP from here is not rate-limited (a trunk, an upstream proxy); route "
                   "targets never are.")
@click.option("--dns-server", multiple=True, metavar="ADDR[:PORT]",
              help="Ask this DNS server (default: those of /etc/resolv.conf).")
@click.option("--prefer-family", type=click.Choice(["ipv6", "ipv4"]),
              help="Of a host name with AAAA and A records, try this family first. "
                   "[default: ipv6]")
@click.option("--tls-cert", metavar="FILE",
              help="Our certificate chain (PEM) for SIP over TLS.")
@click.option("--tls-key", metavar="FILE",
              help="The private key of --tls-cert (PEM).")
@click.option("--tls-ca", metavar="FILE",
              help="CA certificates (PEM) that TLS servers must chain to "
                   "[default: the system's].")
@click.option("--ng-listen", metavar="A:P", help="rtpengine NG control (UDP); off by default.")
@click.option("--users", metavar="FILE",
              help="Registrar users (TOML, HA1 hashes; see `xlat user hash`): turns on the "
                   "local registrar with Digest auth. Re-read when it changes. [default: off]")
@click.option("--registrar-upstream", metavar="sip:HOST:PORT",
              help="Forward REGISTER there with a Path header instead of a local registrar.")
@click.option("--metrics-listen", metavar="A:P",
              help="Prometheus metrics over HTTP (/metrics); off by default.")
@click.option("--allow-remote-control", is_flag=True, default=None,
              help="Let --ng-listen and --metrics-listen use non-loopback addresses.")
@click.option("--datapath", type=click.Choice(["ebpf", "userspace", "auto"]),
              help="What relays media: the kernel (fails closed), Python sockets, or auto "
                   "(the kernel, else sockets with a warning). [default: ebpf]")
@click.option("--delete-delay", type=float, metavar="S",
              help="Seconds a BYE'd or NG-deleted session lingers. [default: 10]")
@click.option("--timeout", type=float, metavar="S",
              help="Idle timeout of every flow. [default: 60]")
@click.option("--latch", type=click.Choice(["off", "learn", "strict"]),
              help="Symmetric RTP: learn the real source, or accept only the SDP's. "
                   "[default: learn]")
@click.option("--rate-limit", type=int, metavar="PPS",
              help="Per-flow packet-rate cap, 0 = none. [default: 2000]")
@click.option("--fallback-relay/--no-fallback-relay", default=None,
              help="eBPF mode: also relay, with sockets, what the kernel path passes up "
                   "(fragments, IPv4 options); costs 4 sockets per call. [default: off]")
@click.option("--keep-datapath", is_flag=True, default=None,
              help="On exit leave maps, filters and the nft table for the next daemon.")
@click.option("--bpffs", help=f"Where maps are pinned. [default: {DEFAULT_BPFFS}]")
@click.option("--state-dir", help="Where the crash journal lives: a daemon started after a "
              f"crash adopts every call it holds. [default: {DEFAULT_STATE_DIR}]")
@click.option("--log-level", type=click.Choice(list(LOG_LEVELS)), help="[default: info]")
@click.option("--log-format", type=click.Choice(list(LOG_FORMATS)),
              help="text, or json: one object per line. [default: text]")
@click.option("--event-loop", type=click.Choice(list(LOOPS)),
              help="auto: uvloop where installed, else the standard library's. "
                   "[default: auto]")
@click.pass_context
def run(ctx: click.Context, config_file: Path | None, **options: Any) -> None:
    """Run the gateway daemon (in the foreground)."""
    from xlat import config, daemon, logs

    def load() -> config.Config:  # again on SIGHUP: the file, then these options on top
        return config.build(config_file or config.default_file(), control=ctx.obj["control"],
                            **options)

    cfg = load()
    logs.setup(cfg.log_level, cfg.log_format)
    for warning in cfg.warnings:
        logging.getLogger("xlat").warning("%s", warning)
    sys.exit(daemon.run(cfg, load))


@cli.group("config")
def config_group() -> None:
    """The configuration file."""


@config_group.command("check")
@config_file_option
@json_option
def config_check(config_file: Path | None, as_json: bool) -> None:
    """Check a file as `xlat run -c FILE` reads it: one line per problem, exit 1."""
    from xlat import config

    file = config_file or config.default_file()
    if file is None:
        raise ConfigError(f"no file to check: {DEFAULT_FILE} does not exist (give -c FILE)")
    try:
        cfg = config.build(file)
    except ConfigError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "file": str(file), "problems": [
                {"source": p.source, "key": p.key, "reason": p.reason} for p in e.problems]}))
            sys.exit(1)
        raise
    for warning in cfg.warnings:
        click.echo(f"xlat: warning: {warning}", err=True)
    _emit(as_json, {"ok": True, "file": str(file), "warnings": list(cfg.warnings)},
          lambda _: "ok")


@cli.command()
@click.option("--keep-datapath/--no-keep-datapath", default=None,
              help="Leave the kernel state and the journaled calls to the next daemon "
                   "(media keeps flowing), or tear both down. [default: as the daemon "
                   "was started]")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="S", help="How long to wait for it to exit.")
@click.pass_context
def stop(ctx: click.Context, keep_datapath: bool | None, timeout: float) -> None:
    """Stop the running daemon (through its control socket); returns once it is done."""
    args = {} if keep_datapath is None else {"keep_datapath": keep_datapath}
    call(ctx.obj["control"], "exit", args, timeout=timeout, until_closed=True)


# ---- sessions ----------------------------------------------------------------------


SESSION_HEADER = ("ID", "STATE", "ORIGIN", "PACKETS", "PEER A", "RELAY A", "RELAY B",
                  "PEER B", "CALL-ID")


def _sessions_table(sessions: list[dict[str, Any]]) -> str:
    """Sessions, one line each (the first stream's legs: A faces the offerer or
    --peer-a); columns as wide as their widest address."""
    if not sessions:
        return "no sessions"

    def legs(s: dict[str, Any]) -> list[str]:
        if len(s["legs"]) != 2:
            return ["-"] * 4
        a, b = s["legs"]
        return [a["peer"] or "?", a["relay"], b["relay"], b["peer"] or "?"]

    return "\n".join(table(SESSION_HEADER, ([s["id"], s["state"], s["origin"],
                                             str(s["packets"]), *legs(s), s["call_id"] or "-"]
                                            for s in sessions), right={3}))


@cli.group()
def session() -> None:
    """Media sessions (from SIP, NG or made by hand)."""


@session.command("list")
@json_option
@click.pass_context
def session_list(ctx: click.Context, as_json: bool) -> None:
    """List sessions."""
    _emit(as_json, _ask(ctx, "session.list"), _sessions_table)


def _one_of(session_id: str | None, call_id: str | None) -> None:
    if (session_id is None) == (call_id is None):
        raise click.UsageError("give either a session ID or --call-id ID")


call_id_option = click.option("--call-id", metavar="ID",
                              help="Every session of this SIP Call-ID (forks: one per answer).")


@session.command("show")
@click.argument("session_id", metavar="[ID]", required=False)
@call_id_option
@json_option
@click.pass_context
def session_show(ctx: click.Context, session_id: str | None, call_id: str | None,
                 as_json: bool) -> None:
    """Show one session with its flows; with --call-id, every session of that call
    (-j: a JSON array, one object per session)."""
    _one_of(session_id, call_id)
    if call_id is not None:
        _emit(as_json, _ask(ctx, "call.show", call_id=call_id),
              lambda ss: _sessions_table(ss) + "\n" +
              _flows_table([f for s in ss for f in s["flows"]]))
        return
    _emit(as_json, _ask(ctx, "session.show", id=session_id),
          lambda s: _sessions_table([s]) + "\n" + _flows_table(s["flows"]))


@session.command("add")
@click.option("--peer-a", required=True, metavar="ADDR:PORT", help="Peer A (RTP).")
@click.option("--peer-b", required=True, metavar="ADDR:PORT", help="Peer B (RTP).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Idle timeout. [default: 60]")
@click.option("--lifetime", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Absolute cap. [default: none]")
@json_option
@click.pass_context
def session_add(ctx: click.Context, peer_a: str, peer_b: str, timeout: float | None,
                lifetime: float | None, as_json: bool) -> None:
    """Relay between two fixed peers: A talks to legs[0].relay, B to legs[1].relay."""
    from xlat.addr import AddressError, Endpoint

    for opt, value in (("--peer-a", peer_a), ("--peer-b", peer_b)):
        try:
            Endpoint.parse(value)
        except AddressError as e:
            raise click.BadParameter(str(e), param_hint=opt) from None
    result = _ask(ctx, "session.add", peer_a=peer_a, peer_b=peer_b, timeout=timeout,
                  lifetime=lifetime)
    if as_json:
        click.echo(json.dumps({"id": result["id"], "legs": result["legs"]}))
    else:
        click.echo(_sessions_table([result]))


@session.command("del")
@click.argument("session_id", metavar="[ID]", required=False)
@call_id_option
@json_option
@click.pass_context
def session_del(ctx: click.Context, session_id: str | None, call_id: str | None,
                as_json: bool) -> None:
    """Remove a session at once; with --call-id, every session of that call."""
    _one_of(session_id, call_id)
    if call_id is not None:
        _emit(as_json, _ask(ctx, "call.del", call_id=call_id),
              lambda r: f"deleted {' '.join(r['deleted'])} (call-id {r['call_id']})")
        return
    _emit(as_json, _ask(ctx, "session.del", id=session_id), lambda r: f"deleted {r['id']}")


@session.command("flush")
@json_option
@click.pass_context
def session_flush(ctx: click.Context, as_json: bool) -> None:
    """Remove every session."""
    _emit(as_json, _ask(ctx, "session.flush"), lambda r: f"deleted {r['deleted']} session(s)")


# ---- flows and stats -----------------------------------------------------------------


def _flows_table(flows: list[dict[str, Any]]) -> str:
    if not flows:
        return "no flows"
    return "\n".join(table(("SESSION", "MATCH", "TO", "PACKETS", "BYTES"),
                           ([f["session"], f["match"], f["to"] or "(learning)",
                             str(f["packets"]), str(f["bytes"])] for f in flows),
                           right={3, 4}))


@cli.group()
def flow() -> None:
    """Kernel flows (one per direction per RTP/RTCP port)."""


@flow.command("list")
@json_option
@click.pass_context
def flow_list(ctx: click.Context, as_json: bool) -> None:
    """List flows with their counters."""
    _emit(as_json, _ask(ctx, "flow.list"), _flows_table)


def _stats_text(s: dict[str, Any]) -> str:
    lines = [f"datapath {s['datapath']} relays media, up {s['uptime']} s",
             f"sessions {s['sessions']} ({s['deleting']} deleting), flows {s['flows']}"]
    lines += [f"ports {fam}: {p['in_use']}/{p['capacity']} pairs" for fam, p in s["ports"].items()]
    if s.get("table_restored"):
        lines.append(f"table inet xlat re-created {s['table_restored']} time(s) after a flush")
    meanings = s.get("reasons", {})
    lines += [f"{r:<18} {d['packets']:>10} packets {d['bytes']:>12} bytes  {meanings.get(r, '')}"
              for r, d in s["drops"].items()]
    return "\n".join(lines)


@cli.command()
@json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counters: sessions, ports, drops by reason."""
    _emit(as_json, _ask(ctx, "stats"), _stats_text)


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              metavar="S", help="Seconds between refreshes.")
@click.option("--count", type=click.IntRange(min=1), metavar="N",
              help="Stop after N refreshes. [default: until q or Ctrl-C]")
@click.option("--max-calls", type=click.IntRange(min=0), default=200, show_default=True,
              metavar="N", help="List calls only while the daemon has at most N sessions "
              "(listing costs it about 0.15 ms per session, each refresh).")
@json_option
@click.pass_context
def monitor(ctx: click.Context, interval: float, count: int | None, max_calls: int,
            as_json: bool) -> None:
    """Live view of calls, packet rates and drops, refreshed each second; q or Ctrl-C
    quits. On a terminal a full screen, busiest calls first; when stdout is not a
    terminal one summary line per refresh, with -j one JSON object per refresh (calls
    included)."""
    from xlat import monitor as mon

    control = ctx.obj["control"]
    mon.run(lambda with_sessions: mon.fetch(control, with_sessions, max_calls),
            title=f"xlat monitor {control}", interval=interval, count=count,
            as_json_lines=as_json)


def _relaying(control: Path, kernel_ok: bool) -> tuple[str, bool, str]:
    """The ``datapath`` row of ``xlat check``: what a running daemon relays media with,
    else what ``xlat run`` would do here."""
    try:
        running = call(control, "stats", timeout=2.0)["datapath"]
    except ControlError:
        running = None
    if running is not None:
        return ("datapath", True, f"{running} relays media in the xlat on {control}")
    if kernel_ok:
        return ("datapath", True, "ebpf relays media (xlat run, --datapath ebpf)")
    return ("datapath", False, "the kernel path cannot come up: xlat run refuses to start; "
            "fix: the FAIL lines above, or --datapath auto to relay in Python")


@cli.group("log")
def log_group() -> None:
    """The running daemon's log."""


@log_group.command("level")
@click.argument("level", required=False, type=click.Choice(list(LOG_LEVELS)))
@json_option
@click.pass_context
def log_level(ctx: click.Context, level: str | None, as_json: bool) -> None:
    """Show the log level, or change it (no restart)."""
    _emit(as_json, _ask(ctx, "log.level", level=level),
          lambda r: r["level"] if "was" not in r else f"log level {r['level']} (was {r['was']})")


@cli.command()
@json_option
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Check that every kernel feature and tool the datapath needs is here, and say
    which datapath relays media."""
    from xlat.media.ebpf import check_kernel
    from xlat.media.nft import check_nft

    results = [*check_kernel(), *check_nft()]
    results.append(("signalling cores", True, compiled.describe()))
    results.append(_relaying(ctx.obj["control"], all(ok for _, ok, _ in results)))
    if as_json:
        click.echo(json.dumps([{"check": n, "ok": ok, "detail": d} for n, ok, d in results]))
    else:
        for name, ok, detail in results:
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    missing = [name for name, ok, _ in results if not ok]
    if missing:
        raise ControlError(f"missing: {', '.join(missing)}")


# ---- the namespace lab -------------------------------------------------------------


@cli.group()
def user() -> None:
    """Registrar users (the --users file)."""


@user.command("hash")
@click.argument("name")
@click.option("--realm", required=True, help="The users file's realm (HA1 depends on it).")
def user_hash(name: str, realm: str) -> None:
    """Print NAME's line for the [users] table of a users file: its HA1 for SHA-256 and
    MD5 (RFC 7616 §3.4.2). The password is read from stdin (prompted on a terminal)."""
    from xlat.sip.auth import PREFERENCE, ha1

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise click.ClickException("empty password")
    hashes = ", ".join(f'{a} = "{ha1(a, name, realm, password)}"' for a in PREFERENCE)
    click.echo(f"{json.dumps(name)} = {{ {hashes} }}")


@cli.group()
def lab() -> None:
    """A namespace lab: IPv6 phone — xlat gateway — IPv4 phone (needs root)."""


@lab.command("up")
@click.option("--tag", default="demo", show_default=True, help="Names the lab's namespaces.")
def lab_up(tag: str) -> None:
    """Build the lab and start xlat in its gateway namespace."""
    from xlat import demo

    try:
        demo.up(tag)
    except demo.DemoError as e:
        raise click.ClickException(str(e)) from None


@lab.command("call")
@click.option("--tag", default="demo", show_default=True)
@click.option("--seconds", type=click.IntRange(1, 600), default=5, show_default=True,
              help="How long the call lasts.")
def lab_call(tag: str, seconds: int) -> None:
    """Place a real SIPp call with RTP from the IPv6 phone to the IPv4 phone."""
    from xlat import demo

    try:
        ok = demo.call(tag, seconds)
    except demo.DemoError as e:
        raise click.ClickException(str(e)) from None
    if not ok:
        raise click.ClickException("the call failed (see above)")


@lab.command("down")
@click.option("--tag", default="demo", show_default=True)
def lab_down(tag: str) -> None:
    """Stop xlat and remove the lab."""
    from xlat import demo

    demo.down(tag)


@lab.command("demo")
def lab_demo() -> None:
    """Up, one call with the kernel counters moving, down."""
    from xlat import demo

    sys.exit(demo.demo())


def main() -> None:
    """Entry point: one-line errors, exit 2 for usage and 1 for everything else."""
    try:
        cli.main(standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"xlat: error: {e.format_message()}", err=True)
        sys.exit(2)
    except ConfigError as e:
        for problem in e.problems:
            click.echo(f"xlat: {problem}", err=True)
        sys.exit(1)
    except (ControlError, click.ClickException) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"xlat: {msg}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
