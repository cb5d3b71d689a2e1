"""``iscsi-target``: run the target daemon and change it at run time.

Exit codes: 0 done; 1 the request failed (the message says why); 2 bad usage;
3 no daemon is running on the control socket.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from . import config as C
from .config import Config, ConfigError, Lun, PortalGroup, Target
from . import stats as S
from .control import SYSTEM_SOCKET, ControlClient, ControlError, DaemonNotRunning

DEFAULT_TARGET = "iqn.2026-11.org.sanstack:default"
DEFAULT_LUN_FILE = "lun0.img"
DEFAULT_LUN_SIZE = 1 << 30  # issue 2: "one 1 GiB sparse LUN"
DEFAULT_PORTAL = f"{C.LOOPBACK_V4}:{C.DEFAULT_PORT}"  # loopback unless told otherwise (issue 7)
EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON = 1, 2, 3


class Failed(click.ClickException):
    exit_code = EXIT_FAILED

    def show(self, file: Any = None) -> None:
        click.echo(f"iscsi-target: error: {self.format_message()}", err=True)


class NoDaemon(Failed):
    exit_code = EXIT_NO_DAEMON


# --------------------------------------------------------------------------- defaults


def default_data_dir() -> Path:
    """Where images and the config live when nothing says otherwise."""
    env = os.environ.get("SANSTACK_DATA_DIR")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/sanstack")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "sanstack"


def default_control_path() -> Path:
    """One well-known socket per user, independent of --data-dir, so admin commands find it."""
    env = os.environ.get("SANSTACK_CONTROL")
    if env:
        return Path(env).expanduser()
    if os.geteuid() == 0:
        return Path(SYSTEM_SOCKET)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "sanstack" / "iscsi-target.sock"
    return default_data_dir() / "control.sock"


# --------------------------------------------------------------------------- config builders


def default_config(data_dir: Path, portals: Iterable[str] = (DEFAULT_PORTAL,)) -> Config:
    """First run: one open target with one 1 GiB sparse LUN, on loopback unless ``portals``
    say otherwise (one portal group each, as the quick start makes them)."""
    target = Target(
        iqn=DEFAULT_TARGET,
        alias="sanstack default target",
        portal_groups=[PortalGroup(tag, [C.canonical_portal(p)]) for tag, p in enumerate(portals, 1)],
        luns=[Lun(number=0, path=DEFAULT_LUN_FILE, size=DEFAULT_LUN_SIZE)],
        open_access=True,
    )
    cfg = Config(data_dir=str(data_dir), targets=[target])
    target.luns[0].serial = C.default_serial(target.iqn, 0, str(cfg.resolve_path(DEFAULT_LUN_FILE)))
    cfg.validate()
    return cfg


def quickstart_config(target_name: str, lun_specs: Iterable[str], portals: Iterable[str],
                      alias: str | None = None, data_dir: Path | None = None) -> Config:
    """The ``serve --portal --target --lun`` form: open access, no CHAP, one TPG per portal.

    One portal group per ``--portal`` (tags 1, 2, ...) gives each path its own relative
    target port and target port group, which is what multipath/ALUA initiators need.
    """
    luns: list[Lun] = []
    for spec in lun_specs:
        lun = C.parse_lun_spec(spec)
        lun.path = os.path.abspath(os.path.expanduser(lun.path))
        luns.append(lun)
    used = {l.number for l in luns if l.number >= 0}
    for lun in luns:
        if lun.number < 0:
            lun.number = C.next_free(used)
            used.add(lun.number)
        if lun.size is None and not os.path.exists(lun.path):
            _head, sep, tail = lun.path.rpartition(":")
            hint = (f" ({tail!r} was taken as part of the file name: it is not a LUN option; "
                    f"options are {C.LUN_SPEC_OPTIONS})") if sep and "/" not in tail else ""
            raise ConfigError(f"--lun {spec}: the image {lun.path} does not exist; add a size to create it, "
                              f"e.g. {lun.path}:1G{hint}")
    groups = [PortalGroup(tag, [C.canonical_portal(p)]) for tag, p in enumerate(portals or [DEFAULT_PORTAL], 1)]
    target = Target(iqn=target_name, alias=alias, portal_groups=groups, luns=luns, open_access=True)
    # data_dir holds only daemon state here (reservations saved with APTPL); images are absolute.
    cfg = Config(data_dir=str(data_dir) if data_dir else None, targets=[target])
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------- output helpers


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain aligned table: columns are (key, heading)."""
    cells = [[h for _, h in columns]] + [["" if r.get(k) is None else _cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- control plumbing


def _control_option(fn: Callable) -> Callable:
    return click.option(
        "--control", "control", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="Control socket of the daemon [default: $SANSTACK_CONTROL, /run/sanstack/iscsi-target.sock as root].",
    )(fn)


def _json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def _call(control: Path | None, op: str, /, **args: Any) -> Any:
    ctx = click.get_current_context()
    path = control or (ctx.find_root().obj or {}).get("control") or default_control_path()
    try:
        res = ControlClient(path).call(op, **args)
        if isinstance(res, dict) and res.get("not_saved"):
            ctx.call_on_close(lambda: click.echo(
                "iscsi-target: note: this daemon runs a quick-start setup (serve --target/--lun), which has no "
                "config file: the change lasts until the daemon stops (serve --config FILE keeps changes)", err=True))
        return res
    except DaemonNotRunning as e:
        raise NoDaemon(f"{e}; start the daemon with `iscsi-target serve` (or pass --control PATH)") from None
    except ControlError as e:
        raise Failed(str(e)) from None


def _check(fn: Callable[[], Any]) -> Any:
    """Run a local validation; user mistakes become one-line errors."""
    try:
        return fn()
    except ConfigError as e:
        raise Failed(str(e)) from None


# --------------------------------------------------------------------------- root group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--control", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Control socket for admin commands (also per command).")
@click.pass_context
def main(ctx: click.Context, control: Path | None) -> None:
    """sanstack iSCSI target daemon and its admin commands.

    \b
    iscsi-target serve                      default target, 1 GiB LUN, 127.0.0.1:3260
    iscsi-target serve --portal 127.0.0.1:3261 --target iqn.2026-11.org.example:t1 --lun /path/disk.img:1G
    iscsi-target status
    iscsi-target stats -i 2 -c 5            I/O rates per session, five 2-second reports
    iscsi-target stats --luns               I/O rates per LUN

    Exit codes: 0 ok, 1 failed, 2 usage, 3 daemon not running.
    """
    ctx.ensure_object(dict)
    if control is not None:
        ctx.obj["control"] = control


# --------------------------------------------------------------------------- serve


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve from this config file (changes are saved to it).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SANSTACK_DATA_DIR",
              help="Config (target.json) and default images [default: $SANSTACK_DATA_DIR, else /var/lib/sanstack as "
                   "root, else ~/.local/share/sanstack].")
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT",
              help="Listen here; repeat for multipath (one portal group each): for the quick start (with "
                   "--target and --lun), or for the default target when its config is first created. "
                   "[default: 127.0.0.1:3260]")
@click.option("--target", "target_name", metavar="IQN", help="Quick start: the target's name.")
@click.option("--lun", "luns", multiple=True, metavar="PATH[:SIZE][:OPTION]...",
              help="Quick start: an image, created sparse if missing; repeat for more LUNs. "
                   "OPTION: ro, rw, removable, bs=512|4096, pbs=512|4096, serial=S, lun=N.")
@click.option("--alias", help="Quick start: TargetAlias.")
@_control_option
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve(config_file: Path | None, data_dir: Path | None, portals: tuple[str, ...], target_name: str | None,
          luns: tuple[str, ...], alias: str | None, control: Path | None, log_level: str) -> None:
    """Run the target daemon (until SIGTERM; SIGHUP reloads the config file)."""
    from .. import log as logsetup
    from .daemon import TargetDaemon

    quick = bool(target_name or luns)
    if alias is not None and not quick:
        raise click.UsageError("--alias belongs to the quick-start form (with --target and --lun); "
                               "for a configured target use `iscsi-target target set IQN --alias TEXT`")
    if quick and config_file:
        raise click.UsageError("give either --config or the quick-start options (--target/--lun/--portal), not both")
    if quick and not (target_name and luns):
        raise click.UsageError("quick start needs --target IQN and at least one --lun PATH[:SIZE]")
    config_path: Path | None
    data = (data_dir or default_data_dir()).expanduser().absolute()
    if portals and not quick and (config_file is not None or (data / C.CONFIG_FILENAME).exists()):
        # The default form takes portals only while it creates its config: after that the
        # file says where the target listens, and one place to change it is enough.
        where = config_file or data / C.CONFIG_FILENAME
        raise click.UsageError(
            f"--portal sets the portals of a new config (the quick start, or the default target's first "
            f"run); {where} already exists: change its portals with `iscsi-target portal add` / `portal remove`"
        )
    logsetup.setup(log_level)

    if quick:
        cfg = _check(lambda: quickstart_config(target_name, luns, portals, alias, data))
        config_path = None
    else:
        config_path = (config_file.expanduser().absolute() if config_file else data / C.CONFIG_FILENAME)
        if config_file is not None and not config_path.exists():
            raise Failed(f"{config_path}: no such config file; write one (README.md, \"The config file\"), or run "
                         f"`iscsi-target serve --data-dir DIR` once: it creates DIR/{C.CONFIG_FILENAME} with a "
                         "default target")
        if config_path.exists() or config_file is not None:
            cfg = _check(lambda: C.load_config(config_path))
            _check(lambda: C.check_not_writable_by_others(config_path))
            if not C.file_is_private(config_path):
                click.echo(f"iscsi-target: warning: {config_path} is readable by others and may hold CHAP secrets; "
                           "chmod 600 it", err=True)
        else:
            cfg = _check(lambda: default_config(data, portals or (DEFAULT_PORTAL,)))
            _check(lambda: _save_first(cfg, config_path))
            click.echo(f"iscsi-target: created {config_path} with target {DEFAULT_TARGET} "
                       f"(LUN 0: {data / DEFAULT_LUN_FILE}, 1 GiB sparse) on {', '.join(portals or (DEFAULT_PORTAL,))}",
                       err=True)

    control_path = control or (click.get_current_context().find_root().obj or {}).get("control") or default_control_path()
    try:
        daemon = TargetDaemon(cfg, config_path, control_path=control_path, control_optional=quick)
        _run(daemon.run())
    except ConfigError as e:
        raise Failed(str(e)) from None
    except OSError as e:
        raise Failed(f"{e.strerror or e}{': ' + e.filename if getattr(e, 'filename', None) else ''}") from None
    except ImportError as e:
        raise Failed(f"this installation lacks a part of the target ({e.name}): {e}") from None
    except Exception as e:
        from .control import OperationFailed

        if isinstance(e, OperationFailed):
            raise Failed(str(e)) from None
        raise


def _save_first(cfg: Config, path: Path) -> None:
    try:
        C.save_config(cfg, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def _run(coro: Any) -> None:
    """uvloop when installed (DESIGN.md); the plain loop otherwise."""
    from .tuning import tune_malloc

    tune_malloc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


# --------------------------------------------------------------------------- target


@main.group()
def target() -> None:
    """Add, remove, change and list targets."""


@target.command("add")
@click.argument("iqn")
@click.option("--alias", help="TargetAlias shown to initiators.")
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT",
              help=f"One portal group per portal [default: {DEFAULT_PORTAL}].")
@click.option("--open-access", is_flag=True,
              help="Any initiator may log in (no ACL needed) [default: only initiators with an ACL].")
@_control_option
def target_add(iqn: str, alias: str | None, portals: tuple[str, ...], open_access: bool, control: Path | None) -> None:
    """Create a target."""
    name = _check(lambda: C.canonical_iscsi_name(iqn))
    canon = _check(lambda: [C.canonical_portal(p) for p in portals])
    _call(control, "target.add", iqn=name, alias=alias, portals=canon or None, open_access=open_access)
    click.echo(f"target {name} added")


@target.command("remove")
@click.argument("iqn")
@click.option("--force", is_flag=True, help="Log out its sessions first.")
@_control_option
def target_remove(iqn: str, force: bool, control: Path | None) -> None:
    """Delete a target (its images stay on disk)."""
    res = _call(control, "target.remove", iqn=iqn, force=force)
    click.echo(f"target {res['target']} removed")


@target.command("set")
@click.argument("iqn")
@click.option("--alias", help="New TargetAlias.")
@click.option("--no-alias", is_flag=True, help="Remove the alias.")
@click.option("--open-access/--no-open-access", default=None, help="Let any initiator in, or only ACLs.")
@click.option("--target-reset/--no-target-reset", default=None,
              help="Let initiators send TARGET WARM/COLD RESET (resets every LU for all initiators; "
                   "cold also ends every session), or refuse it (TMF response 6).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Target-side iSCSI key preference, e.g. HeaderDigest=CRC32C (require) or CRC32C,None.")
@click.option("--clear-param", "clear_params", multiple=True, metavar="KEY",
              help="Drop a --param preference (back to the default).")
@_control_option
def target_set(iqn: str, alias: str | None, no_alias: bool, open_access: bool | None, target_reset: bool | None,
               params: tuple[str, ...], clear_params: tuple[str, ...], control: Path | None) -> None:
    """Change a target's alias, access mode, target-reset policy or iSCSI parameters."""
    if alias is not None and no_alias:
        raise click.UsageError("give either --alias or --no-alias, not both")
    parsed = _check(lambda: dict(C.canonical_param(*_key_value(p)) for p in params))
    _check(lambda: [C.param_name(k) for k in clear_params])
    res = _call(control, "target.set", iqn=iqn, alias=alias, clear_alias=no_alias, open_access=open_access,
                params=parsed, clear_params=list(clear_params), target_reset=target_reset)
    click.echo(f"target {res['iqn']}: open_access={_cell(res['open_access'])} "
               f"target_reset={_cell(res.get('target_reset', True))} params={_cell(res['params'])}")
    if res.get("logged_out"):
        click.echo(f"iscsi-target: note: {res['logged_out']} session(s) of initiators without an ACL were "
                   f"logged out (`iscsi-target acl add {res['iqn']} INITIATOR` lets one back in)", err=True)
    if res.get("keep_params"):
        click.echo(f"iscsi-target: note: {res['keep_params']} session(s) keep the parameters they negotiated; "
                   "the change applies to logins from now on", err=True)


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


@target.command("list")
@_json_option
@_control_option
def target_list(as_json: bool, control: Path | None) -> None:
    """List targets."""
    rows = _call(control, "target.list")
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        r["access"] = "open" if r["open_access"] else "acl"
        # Space-separated: each entry has its own comma (address,TPGT as in SendTargets).
        r["portals"] = " ".join(f"{p},{g['tag']}" for g in r["portal_groups"] for p in g["portals"]) or "-"
        r["auth"] = ("mutual-chap" if r["mutual_chap"] else "chap") if r["chap"] else "none"
        r["lun_summary"] = f"{len(r['luns'])} ({_cell(r['luns'])})" if r["luns"] else "0"
    click.echo(_table(rows, [("iqn", "TARGET"), ("alias", "ALIAS"), ("portals", "PORTALS,TPGT"), ("lun_summary", "LUNS"),
                             ("access", "ACCESS"), ("auth", "CHAP"), ("sessions", "SESSIONS")]))


# --------------------------------------------------------------------------- lun


@main.group()
def lun() -> None:
    """Add, remove, resize and list LUNs (initiators get REPORTED LUNS / CAPACITY DATA HAS CHANGED)."""


@lun.command("add")
@click.argument("iqn")
@click.argument("spec", metavar="PATH[:SIZE][:OPTION]...")
@click.option("--lun", "number", type=click.IntRange(0, C.MAX_LUN), help="LUN number [default: lowest free].")
@click.option("--size", help="Size, e.g. 1G (needed when the image does not exist).")
@click.option("--block-size", type=click.Choice(["512", "4096"]), help="Logical block size [default: 512].")
@click.option("--read-only", is_flag=True, default=None, help="Initiators may not write.")
@click.option("--removable", is_flag=True, default=None, help="Report a removable medium (RMB).")
@click.option("--serial", help="Unit serial number (VPD 0x80) [default: derived from target, LUN and path].")
@click.option("--vendor", help="INQUIRY vendor (8 characters) [default: SANSTACK].")
@click.option("--product", help="INQUIRY product (16 characters) [default: VIRTUAL-DISK].")
@_control_option
def lun_add(iqn: str, spec: str, number: int | None, size: str | None, block_size: str | None,
            read_only: bool | None, removable: bool | None, serial: str | None, vendor: str | None,
            product: str | None, control: Path | None) -> None:
    """Add an image as a LUN (created sparse if missing).

    \b
    OPTION: ro, rw, removable, bs=512|4096, pbs=512|4096, serial=S, lun=N
    e.g. /srv/disk.img:10G:bs=4096
    """
    parsed = _check(lambda: C.parse_lun_spec(spec))
    size_bytes = None if size is None else _check(lambda: C.parse_size(size))
    # An option and the spec saying different things: neither may silently win.
    for option, given, in_spec in (
        ("--lun", number, parsed.number if parsed.number >= 0 else None),
        ("--size", size_bytes, parsed.size),
        ("--block-size", None if block_size is None else int(block_size),
         parsed.block_size if ":bs=" in spec.lower() else None),
    ):
        if given is not None and in_spec is not None and given != in_spec:
            raise click.UsageError(f"{option} {given} contradicts the LUN spec {spec!r}; give it once")
    if size_bytes is not None:
        parsed.size = size_bytes
    if block_size is not None:
        parsed.block_size = int(block_size)
    path = os.path.abspath(os.path.expanduser(parsed.path))  # the daemon's cwd is not ours
    res = _call(
        control, "lun.add", iqn=iqn, path=path,
        number=number if number is not None else (parsed.number if parsed.number >= 0 else None),
        size=parsed.size, block_size=parsed.block_size,
        read_only=parsed.read_only if read_only is None else read_only,
        removable=parsed.removable if removable is None else removable,
        serial=serial or parsed.serial, vendor=vendor, product=product,
    )
    click.echo(f"{res['target']}: LUN {res['lun']} added ({path}, serial {res['serial']})")
    if res.get("warning"):
        click.echo(f"iscsi-target: warning: {res['warning']}", err=True)


@lun.command("remove")
@click.argument("iqn")
@click.argument("number", type=int)
@_control_option
def lun_remove(iqn: str, number: int, control: Path | None) -> None:
    """Remove a LUN (the image stays on disk)."""
    res = _call(control, "lun.remove", iqn=iqn, number=number)
    click.echo(f"{res['target']}: LUN {res['lun']} removed")
    if res.get("sessions"):
        click.echo(f"iscsi-target: note: {res['sessions']} session(s) were logged in to {res['target']}; "
                   "they are told the LUN list changed and get LOGICAL UNIT NOT SUPPORTED for it", err=True)


@lun.command("resize")
@click.argument("iqn")
@click.argument("number", type=int)
@click.argument("size")
@click.option("--force", is_flag=True, help="Allow shrinking (destroys data past the new end).")
@_control_option
def lun_resize(iqn: str, number: int, size: str, force: bool, control: Path | None) -> None:
    """Grow (or with --force shrink) a LUN online."""
    new_size = _check(lambda: C.parse_size(size))
    res = _call(control, "lun.resize", iqn=iqn, number=number, size=new_size, force=force)
    click.echo(f"{res['target']}: LUN {res['lun']} resized {C.format_size(res['was'])} -> {C.format_size(res['size'])}")


@lun.command("list")
@click.argument("iqn", required=False)
@_json_option
@_control_option
def lun_list(iqn: str | None, as_json: bool, control: Path | None) -> None:
    """List LUNs (of one target or all)."""
    rows = _call(control, "lun.list", iqn=iqn)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        r["size_h"] = C.format_size(r["size"]) if r.get("size") is not None else "-"
        r["used"] = S.allocation(r.get("allocated"), r.get("size"))
        r["mode"] = (("ro" if r["read_only"] else "rw") + (",swp" if r.get("swp") else "")
                     + (",removable" if r["removable"] else "") + (",ejected" if r.get("ejected") else "")
                     + (",io-errors" if r.get("io_errors") else "") + (",deleted" if r.get("image_deleted") else ""))
    click.echo(_table(rows, [("target", "TARGET"), ("lun", "LUN"), ("size_h", "SIZE"), ("used", "USED"),
                             ("block_size", "BS"), ("mode", "MODE"), ("serial", "SERIAL"), ("path", "IMAGE")]))
    for warning in S.overcommitted(rows):
        click.echo("\n" + warning)
    if any(r.get("swp") for r in rows):
        click.echo("\nswp: an initiator turned on software write protect (Control mode page SWP, e.g. "
                   "iscsi-swp -s on); writes get DATA PROTECT until an initiator turns it off")
    if any(r.get("ejected") for r in rows):
        click.echo("\nejected: an initiator unloaded the medium (START STOP UNIT, LOEJ=1, e.g. eject); "
                   "I/O gets NOT READY, MEDIUM NOT PRESENT until an initiator loads it again")
    for r in rows:
        if r.get("image_deleted"):
            click.echo(f"\ndeleted: {r['target']} LUN {r['lun']}: its image {r['path']} was deleted while served; "
                       f"the data lives on only in the open file until the daemon stops: copy it back now, "
                       f"e.g. cp --sparse=always {r['image_deleted']} {r['path']}.recovered")
        if r.get("io_errors"):
            click.echo(f"\nio-errors: {r['target']} LUN {r['lun']}: {r['io_errors']} command(s) failed on "
                       f"the image since it was opened (MEDIUM ERROR or DATA PROTECT); latest: {r.get('last_io_error')}")
        if r.get("write_back_failed"):
            click.echo(f"\n{r['target']} LUN {r['lun']}: written data did not reach the image "
                       f"({r['write_back_failed']}): every SYNCHRONIZE CACHE fails until the image is opened "
                       "again (lun remove + lun add, or a daemon restart); check the disk first")


# --------------------------------------------------------------------------- acl


@main.group()
def acl() -> None:
    """Which initiators may log in to a target, and which LUNs they see."""


@acl.command("add")
@click.argument("iqn")
@click.argument("initiator")
@click.option("--map", "maps", multiple=True, metavar="ACL_LUN=TARGET_LUN",
              help="Show target LUN as ACL_LUN to this initiator; repeat. [default: every LUN as itself]")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="iSCSI key preference for this initiator only, e.g. DataDigest=CRC32C.")
@_control_option
def acl_add(iqn: str, initiator: str, maps: tuple[str, ...], params: tuple[str, ...], control: Path | None) -> None:
    """Allow an initiator."""
    name = _check(lambda: C.canonical_iscsi_name(initiator))

    def parse() -> dict[str, int] | None:
        if not maps:
            return None
        out: dict[str, int] = {}
        given: dict[int, str] = {}
        for m in maps:
            a, t = _key_value(m)
            if not (a.isdigit() and t.isdigit()):
                raise ConfigError(f"--map {m!r}: expected ACL_LUN=TARGET_LUN, e.g. 0=3")
            if int(a) in given:  # the later one silently replaced the earlier
                raise ConfigError(f"--map: ACL LUN {int(a)} is given twice ({given[int(a)]} and {m}); "
                                  "an initiator sees one LU per LUN")
            given[int(a)] = m
            out[str(int(a))] = int(t)
        return out

    lun_map = _check(parse)
    parsed = _check(lambda: dict(C.canonical_param(*_key_value(p)) for p in params))
    res = _call(control, "acl.add", iqn=iqn, initiator=name, lun_map=lun_map, params=parsed or None)
    click.echo(f"{res['target']}: ACL for {res['initiator']} added")
    if res.get("open_access"):  # an ACL on an open target restricts nobody: say so
        click.echo(f"iscsi-target: note: {res['target']} has open access, so every initiator may still log in; "
                   f"`iscsi-target target set {res['target']} --no-open-access` lets in only the ACLs", err=True)


@acl.command("remove")
@click.argument("iqn")
@click.argument("initiator")
@_control_option
def acl_remove(iqn: str, initiator: str, control: Path | None) -> None:
    """Disallow an initiator (its sessions are logged out)."""
    res = _call(control, "acl.remove", iqn=iqn, initiator=initiator)
    click.echo(f"{res['target']}: ACL for {res['initiator']} removed")


@acl.command("list")
@click.argument("iqn", required=False)
@_json_option
@_control_option
def acl_list(iqn: str | None, as_json: bool, control: Path | None) -> None:
    """List ACLs."""
    rows = _call(control, "acl.list", iqn=iqn)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        r["luns"] = [f"{a}->{t}" for a, t in r["lun_map"].items()]
        r["auth"] = r["chap"] + (" (mutual)" if r["mutual_chap"] else "")
    click.echo(_table(rows, [("target", "TARGET"), ("initiator", "INITIATOR"), ("luns", "LUNS (ACL->TARGET)"),
                             ("auth", "CHAP"), ("params", "PARAMS")]))
    for warning in _shared_chap_warnings(rows):
        click.echo("\n" + warning)


def _shared_chap_warnings(rows: list[dict]) -> list[str]:
    """Targets whose one CHAP secret admits ACLs that see different LUNs: whoever has the
    secret may log in under any of those initiator names and reach that one's LUNs (RFC 7143
    §12.1.3: a secret SHOULD NOT authenticate several initiators, and implementations should
    warn about it)."""
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("chap") == "target":
            by_target.setdefault(r["target"], []).append(r)
    out = []
    for target, shared in by_target.items():
        if len({tuple(sorted(r["lun_map"].items())) for r in shared}) > 1:
            names = ", ".join(r["initiator"] for r in shared)
            out.append(f"warning: {target}: ACLs {names} see different LUNs but log in with the target's one CHAP "
                       "secret, so any of them can log in as another and reach its LUNs; give each its own "
                       "(iscsi-target chap set --target IQN --initiator IQN ...)")
    return out


# --------------------------------------------------------------------------- chap


def _scope_options(fn: Callable) -> Callable:
    fn = click.option("--initiator", metavar="IQN", help="The ACL of this initiator (with --target).")(fn)
    fn = click.option("--target", "target_iqn", metavar="IQN", help="A target (all its ACLs without own CHAP).")(fn)
    fn = click.option("--discovery", is_flag=True, help="Discovery (SendTargets) sessions.")(fn)
    return fn


def _scope(discovery: bool, target_iqn: str | None, initiator: str | None) -> str:
    if discovery and (target_iqn or initiator):
        raise click.UsageError("--discovery cannot be combined with --target/--initiator")
    if discovery:
        return "discovery"
    if not target_iqn:
        raise click.UsageError("say whose CHAP: --discovery, --target IQN, or --target IQN --initiator IQN")
    return "acl" if initiator else "target"


def _read_secret(secret_file: str | None, what: str) -> str:
    """From a file ('-' = stdin; one trailing newline dropped) or a hidden prompt; never echoed."""
    if secret_file is not None:
        # Bounded: a secret is short, and --secret-file /dev/zero must not eat the memory.
        limit = C.MAX_CHAP_SECRET_BYTES + 2  # the longest secret, "\r\n" would still be seen
        try:
            if secret_file == "-":
                raw = sys.stdin.buffer.read(limit + 1)
            else:
                with open(secret_file, "rb") as f:
                    raw = f.read(limit + 1)
        except OSError as e:
            raise Failed(f"cannot read {what} from {secret_file}: {e.strerror or e}") from None
        if len(raw) > limit:
            raise Failed(f"{what} in {secret_file} is longer than {C.MAX_CHAP_SECRET_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Failed(f"{what} in {secret_file} is not UTF-8 text") from None
        secret = text[:-1] if text.endswith("\n") else text
    else:
        secret = click.prompt(f"{what}", hide_input=True, confirmation_prompt=True)
    _check(lambda: C.validate_chap_secret(secret, what))
    return secret


@main.group()
def chap() -> None:
    """CHAP credentials (secrets are read from a prompt or a file, never shown)."""


@chap.command("set")
@_scope_options
@click.option("--username", required=True, help="CHAP_N the initiator must send.")
@click.option("--secret-file", metavar="FILE", help="Read the secret from FILE ('-' = stdin) instead of a prompt.")
@click.option("--mutual-username", help="Name the target answers with (mutual CHAP).")
@click.option("--mutual-secret-file", metavar="FILE", help="Mutual secret from FILE ('-' = stdin).")
@_control_option
def chap_set(discovery: bool, target_iqn: str | None, initiator: str | None, username: str,
             secret_file: str | None, mutual_username: str | None, mutual_secret_file: str | None,
             control: Path | None) -> None:
    """Require CHAP (RFC 7143 §12.1.3; secrets of at least 12 bytes)."""
    scope = _scope(discovery, target_iqn, initiator)
    if secret_file == "-" and mutual_secret_file == "-":
        raise click.UsageError("only one secret can come from stdin")
    secret = _read_secret(secret_file, "CHAP secret")
    mutual_secret = None
    if mutual_username:
        mutual_secret = _read_secret(mutual_secret_file, "mutual CHAP secret")
        if mutual_secret == secret:
            raise Failed("the mutual secret must differ from the initiator's secret")
    elif mutual_secret_file:
        raise click.UsageError("--mutual-secret-file needs --mutual-username")
    res = _call(control, "chap.set", scope=scope, iqn=target_iqn, initiator=initiator, username=username,
                secret=secret, mutual_username=mutual_username, mutual_secret=mutual_secret)
    click.echo(f"CHAP set for {res['scope']} (user {res['username']}{', mutual' if res['mutual'] else ''})")
    if res.get("sessions"):
        click.echo(f"iscsi-target: note: {res['sessions']} session(s) logged in before stay logged in; "
                   "CHAP applies to logins from now on", err=True)


@chap.command("clear")
@_scope_options
@_control_option
def chap_clear(discovery: bool, target_iqn: str | None, initiator: str | None, control: Path | None) -> None:
    """Remove CHAP credentials."""
    scope = _scope(discovery, target_iqn, initiator)
    res = _call(control, "chap.clear", scope=scope, iqn=target_iqn, initiator=initiator)
    click.echo(f"CHAP cleared for {res['scope']}")


# --------------------------------------------------------------------------- portal


@main.group()
def portal() -> None:
    """Network portals (address:port) of a target, each in a portal group (TPGT)."""


@portal.command("add")
@click.argument("iqn")
@click.argument("address", metavar="HOST:PORT")
@click.option("--tpgt", type=click.IntRange(C.MIN_TPGT, C.MAX_TPGT),
              help="Add to this portal group [default: a new group].")
@_control_option
def portal_add(iqn: str, address: str, tpgt: int | None, control: Path | None) -> None:
    """Offer a target on one more portal."""
    canon = _check(lambda: C.canonical_portal(address))
    res = _call(control, "portal.add", iqn=iqn, portal=canon, tag=tpgt)
    click.echo(f"{res['target']}: portal {res['portal']} added (TPGT {res['tag']})")


@portal.command("remove")
@click.argument("iqn")
@click.argument("address", metavar="HOST:PORT")
@_control_option
def portal_remove(iqn: str, address: str, control: Path | None) -> None:
    """Stop offering a target on a portal."""
    canon = _check(lambda: C.canonical_portal(address))
    res = _call(control, "portal.remove", iqn=iqn, portal=canon)
    click.echo(f"{res['target']}: portal {res['portal']} removed (TPGT {res['tag']})")
    if res.get("connections"):
        click.echo(f"iscsi-target: note: {res['connections']} connection(s) to {res['target']} made through "
                   f"{res['portal']} stay logged in; the portal only stops taking new logins", err=True)
    if res.get("portals_left") == 0:
        click.echo(f"iscsi-target: note: {res['target']} has no portal left; no initiator can reach it until "
                   f"`iscsi-target portal add {res['target']} HOST:PORT`", err=True)


@portal.command("list")
@click.argument("iqn", required=False)
@_json_option
@_control_option
def portal_list(iqn: str | None, as_json: bool, control: Path | None) -> None:
    """List portals."""
    rows = _call(control, "portal.list", iqn=iqn)
    if as_json:
        _echo_json(rows)
        return
    click.echo(_table(rows, [("target", "TARGET"), ("portal", "PORTAL"), ("tag", "TPGT"), ("listening", "LISTENING")]))


# --------------------------------------------------------------------------- status / config


def _sessions_table(sessions: list[dict]) -> str:
    """One line per session with its counters since login (``TargetSession.stats``)."""
    for r in sessions:
        counters = r.get("stats") or {}
        r["commands"] = counters.get("commands")
        r["received"] = S.human_bytes(counters.get("rx_bytes", 0))
        r["sent"] = S.human_bytes(counters.get("tx_bytes", 0))
    return _table(sessions, [("target", "TARGET"), ("initiator", "INITIATOR"), ("isid", "ISID"),
                             ("tsih", "TSIH"), ("type", "TYPE"), ("commands", "CMDS"),
                             ("received", "RECEIVED"), ("sent", "SENT")])


def _render_status(st: dict) -> str:
    lines = [
        f"config:   {st['config'] or '(quick start, not saved)'}",
        f"portals:  {', '.join(st['portals']) or '-'}",
        f"discovery CHAP: {_cell(st['discovery_chap'])}",
        "",
    ]
    targets = st["targets"]
    for r in targets:
        r["access"] = "open" if r["open_access"] else "acl"
        r["auth"] = ("mutual-chap" if r["mutual_chap"] else "chap") if r["chap"] else "none"
        # "1 (0)": how many LUNs, then their numbers — a bare "0" read as "no LUNs".
        r["lun_summary"] = f"{len(r['luns'])} ({_cell(r['luns'])})" if r["luns"] else "0"
        r["acl_count"] = len(r["acls"])
    lines.append(_table(targets, [("iqn", "TARGET"), ("lun_summary", "LUNS"), ("acl_count", "ACLS"),
                                  ("access", "ACCESS"), ("auth", "CHAP"), ("sessions", "SESSIONS")]))
    sessions = st["sessions"]
    lines.append("")
    if not sessions:
        lines.append("no sessions")
        return "\n".join(lines)
    lines.append(_sessions_table(sessions))
    for s in sessions:
        for c in s.get("connections") or []:
            params = c.get("params") or {}
            head = f"  {s.get('initiator')} cid={c.get('cid', '-')} {c.get('peer', '?')} -> {c.get('local', '?')}"
            lines.append(head)
            if params:
                lines.append("    " + " ".join(f"{k}={v}" for k, v in sorted(params.items())))
    return "\n".join(lines)


@main.command()
@_json_option
@_control_option
def status(as_json: bool, control: Path | None) -> None:
    """Portals, targets, sessions, connections and negotiated parameters."""
    st = _call(control, "status")
    if as_json:
        _echo_json(st)
    else:
        click.echo(_render_status(st))


@main.group()
def session() -> None:
    """Sessions logged in: list them, or end some now."""


@session.command("list")
@click.argument("iqn", required=False)
@_json_option
@_control_option
def session_list(iqn: str | None, as_json: bool, control: Path | None) -> None:
    """Sessions (of one target or all), with commands and bytes since login."""
    st = _call(control, "status")
    rows = st["sessions"]
    if iqn is not None:
        name = _known_target(st, iqn)
        rows = [r for r in rows if str(r.get("target", "")).lower() == name]
    if as_json:
        _echo_json(rows)
    elif not rows:
        click.echo("no sessions")
    else:
        click.echo(_sessions_table(rows))


def _known_target(st: dict, iqn: str) -> str:
    """``iqn`` in canonical form when the daemon has that target: a mistyped name must not
    read as "no sessions" (the other list commands refuse it the same way)."""
    name = _check(lambda: C.canonical_iscsi_name(iqn))
    known = [str(t.get("iqn")) for t in st.get("targets") or []]
    if name not in known:
        raise Failed(f"no target {name} (targets: {', '.join(known) or 'none'})")
    return name


@session.command("drop")
@click.argument("iqn")
@click.option("--initiator", help="Every session of this initiator.")
@click.option("--tsih", type=click.IntRange(1, 0xFFFF), help="The session with this TSIH (see `session list`).")
@click.option("--all", "all_sessions", is_flag=True, help="Every session of the target.")
@_control_option
def session_drop(iqn: str, initiator: str | None, tsih: int | None, all_sessions: bool, control: Path | None) -> None:
    """End sessions of a target now (the initiator is told first: RFC 7143 Async Message,
    session dropped).  Access is unchanged: an initiator may log in again at once (open-iscsi
    does); `acl remove` keeps it out."""
    if all_sessions and (initiator or tsih is not None):
        raise click.UsageError("--all goes alone (or name --initiator / --tsih instead)")
    res = _call(control, "session.drop", iqn=iqn, initiator=initiator, tsih=tsih, all_sessions=all_sessions)
    click.echo(f"{res['target']}: {res['dropped']} session(s) dropped (their initiators may log in again; "
               "`iscsi-target acl remove` keeps one out)")


@main.command()
@click.option("-i", "--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True,
              help="Seconds each report measures.")
@click.option("-c", "--count", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
              help="Reports to print, one per interval (Ctrl-C stops early).")
@click.option("--luns", is_flag=True, help="Per LUN (READs, WRITEs, MB/s) instead of per session.")
@_json_option
@_control_option
def stats(interval: float, count: int, luns: bool, as_json: bool, control: Path | None) -> None:
    """I/O rates per session (commands/s, MB/s received and sent) or with --luns per LUN
    (READs/s, WRITEs/s, other commands/s, MB/s read and written), as iostat measures them.

    Each report covers the INTERVAL before it; `iscsi-target status` shows the totals since
    each login."""
    before = _call(control, "status")
    try:
        for n in range(count):
            time.sleep(interval)
            after = _call(control, "status")
            if as_json:
                doc: dict[str, Any] = {"interval": interval}
                if luns:
                    doc["luns"] = S.lun_rates(before, after)
                else:
                    rows = S.rates(before, after)
                    doc.update(sessions=rows, total=S.totals(rows))
                click.echo(json.dumps(doc))
            else:
                if n:
                    click.echo("")
                click.echo(_lun_rates_table(before, after) if luns else _session_rates_table(before, after))
            before = after
    except KeyboardInterrupt:
        pass


def _session_rates_table(before: dict, after: dict) -> str:
    rows = S.rates(before, after)
    if not rows:
        return "no sessions"
    table = [S.display(r) for r in rows] + [S.display(S.totals(rows))]
    return _table(table, [("target", "TARGET"), ("initiator", "INITIATOR"), ("tsih", "TSIH"),
                          ("cmds_per_s", "CMD/s"), ("rx_mb_per_s", "RECV MB/s"), ("tx_mb_per_s", "SENT MB/s")])


def _lun_rates_table(before: dict, after: dict) -> str:
    rows = S.lun_rates(before, after)
    if not rows:
        return "no LUNs"
    return _table([S.display_lun(r) for r in rows],
                  [("target", "TARGET"), ("lun", "LUN"), ("reads_per_s", "READ/s"), ("writes_per_s", "WRITE/s"),
                   ("other_per_s", "OTHER/s"), ("read_mb_per_s", "READ MB/s"), ("write_mb_per_s", "WRITE MB/s")])


@main.group("config")
def config_group() -> None:
    """Show or reload the running configuration."""


@config_group.command("show")
@_control_option
def config_show(control: Path | None) -> None:
    """Print the running configuration (secrets masked)."""
    _echo_json(_call(control, "config.show"))


@config_group.command("reload")
@_control_option
def config_reload(control: Path | None) -> None:
    """Re-read the config file and apply the difference (same as SIGHUP)."""
    res = _call(control, "config.reload")
    click.echo(f"reloaded: {res['targets']} target(s)")


if __name__ == "__main__":  # pragma: no cover
    main()
