"""The shipped documentation and units: lint-clean, in step with the CLI, and valid for systemd.

The man page, the README option tables and the units are written by hand; these tests are what
keeps them from drifting away from ``fcgispawn --help`` (the click command is the source of
truth) and from what ``mandoc``, ``groff`` and ``systemd-analyze`` accept.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from fcgispawn import cli
from tests.procs import REPO, VENV_BIN

MAN_PAGE = REPO / "man" / "fcgispawn.1"
README = REPO / "README.md"
UNITS = REPO / "units"
EXAMPLES = REPO / "examples"
SHIPPED_UNITS = ("fcgispawn@.socket", "fcgispawn@.service", "fcgispawn-bind@.service")
INSTALLED_FCGISPAWN = "/usr/local/bin/fcgispawn"
OPTION_TOKEN = re.compile(r"(?<![\w\\-])(--?[A-Za-z][\w-]*)")


def _cli_command() -> click.Command:
    """The click command behind the console script ``fcgispawn = fcgispawn.cli:main``."""
    if isinstance(cli.main, click.Command):
        return cli.main
    found = [v for v in vars(cli).values() if isinstance(v, click.Command)]
    assert len(found) == 1, f"expected one click command in fcgispawn.cli, found {found}"
    return found[0]


def _cli_options() -> list[click.Option]:
    """Every option ``--help`` lists, the help option included (it needs the context settings)."""
    command = _cli_command()
    ctx = click.Context(command, info_name="fcgispawn", **command.context_settings)
    return [p for p in command.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]


def _cli_flags() -> set[str]:
    return {flag for opt in _cli_options() for flag in (*opt.opts, *opt.secondary_opts)}


def _roff_to_text(line: str) -> str:
    """Drop the font escapes and unescape the hyphens, enough to find option names."""
    line = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\%", "", line).replace("\\~", " ")
    return line.replace("\\-", "-").replace("\\(dq", '"')


def _man_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for line in MAN_PAGE.read_text().splitlines():
        if line.startswith(".SH "):
            current = line[4:].strip().strip('"')
            sections[current] = []
        elif current:
            sections[current].append(line)
    return sections


def _man_option_entries() -> dict[str, str]:
    """Option name -> the text of its OPTIONS entry, read from each ``.TP`` tag and body."""
    entries: dict[str, str] = {}
    lines = _man_sections()["OPTIONS"]
    for i, line in enumerate(lines):
        if line != ".TP" or i + 1 >= len(lines):
            continue
        tag = _roff_to_text(lines[i + 1])
        body: list[str] = []
        for following in lines[i + 2 :]:
            if following == ".TP" or following.startswith((".SS", ".SH")):
                break
            body.append(re.sub(r"^\.[A-Z]+ ?", "", _roff_to_text(following)))
        # The tag is e.g. '.BR -s ", " --socket " path"': every option name in it is documented.
        for flag in OPTION_TOKEN.findall(tag):
            entries.setdefault(flag, " ".join(body))
    return entries


def _readme_option_table_flags() -> set[str]:
    """Flags in the first column of the tables under README's "## Options"."""
    text = README.read_text()
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    flags: set[str] = set()
    for row in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
        if not row.startswith("|") or set(row) <= set("|-: "):
            continue
        for cell in cells[:2]:
            for code in re.findall(r"`([^`]*)`", cell):
                flags.update(OPTION_TOKEN.findall(code.split(" ")[0]))
    return flags


def _normalise_default(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- man page: lint ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc not installed")
def test_man_page_has_no_mandoc_lint_warnings() -> None:
    result = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(MAN_PAGE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_page_has_no_groff_warnings() -> None:
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(MAN_PAGE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_man_page_has_the_sections_an_operator_looks_for() -> None:
    sections = _man_sections()
    for name in (
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "DIFFERENCES FROM SPAWN-FCGI",
        "SIGNALS",
        "ENVIRONMENT",
        "EXIT STATUS",
        "FILES",
        "EXAMPLES",
        "SEE ALSO",
    ):
        assert name in sections, f"man page lacks section {name}"
    environment = _roff_to_text("\n".join(sections["ENVIRONMENT"]))
    for var in (
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "FCGI_WEB_SERVER_ADDRS",
        "PHP_FCGI_CHILDREN",
    ):
        assert var in environment, f"ENVIRONMENT does not describe {var}"
    see_also = _roff_to_text("\n".join(sections["SEE ALSO"]))
    for ref in ("spawn-fcgi (1)", "multiwatch (1)", "systemd.socket (5)", "nginx (8)"):
        assert ref in see_also
    signals = "\n".join(sections["SIGNALS"])
    for sig in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1"):
        assert sig in signals
    examples = _roff_to_text("\n".join(sections["EXAMPLES"]))
    servers = ("fastcgi_pass", "bin-path", "ProxyPass", "FcgidWrapper", "fcgi-app", "systemctl")
    for server in servers:
        assert server in examples


# --- drift between the CLI and the docs ---------------------------------------------------------


def test_every_cli_option_has_an_entry_in_the_man_page() -> None:
    entries = _man_option_entries()
    missing = sorted(_cli_flags() - set(entries))
    assert not missing, f"options in --help but not in man/fcgispawn.1 OPTIONS: {missing}"


def test_man_page_documents_no_option_the_cli_lacks() -> None:
    stale = sorted(set(_man_option_entries()) - _cli_flags())
    assert not stale, f"options in man/fcgispawn.1 that --help does not list: {stale}"


def test_man_page_states_the_cli_defaults() -> None:
    entries = _man_option_entries()
    wrong = []
    for opt in _cli_options():
        if opt.show_default is not True or opt.is_flag or opt.default in (None, "", ()):
            continue
        expected = f"Default: {_normalise_default(opt.default)}"
        text = entries.get(opt.opts[0], "")
        if expected not in text:
            wrong.append(f"{opt.opts[0]}: expected {expected!r} in {text!r}")
    assert not wrong, "\n".join(wrong)


def test_every_cli_option_is_in_the_readme_option_tables() -> None:
    missing = sorted(_cli_flags() - _readme_option_table_flags())
    assert not missing, f"options in --help but not in README's option tables: {missing}"


def test_readme_option_tables_list_no_option_the_cli_lacks() -> None:
    stale = sorted(_readme_option_table_flags() - _cli_flags())
    assert not stale, f"options in README's option tables that --help does not list: {stale}"


def test_cli_help_lists_every_option_the_drift_tests_check() -> None:
    """The drift tests read the click command; this pins that it is what ``--help`` prints."""
    result = subprocess.run(
        [str(VENV_BIN / "fcgispawn"), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    shown = set(OPTION_TOKEN.findall(result.stdout.split("Options:", 1)[1].split("\n\n")[0]))
    assert _cli_flags() <= shown


# --- command lines in the docs ----------------------------------------------------------------

DOC_COMMAND = re.compile(r"(?<![\w@.-])fcgispawn +(-[^\s\"#&`|][^\"#&`|\n]*)")
INFORMATION_FLAGS = {"-h", "--help", "-v", "--version"}


def _documented_command_lines() -> Iterator[tuple[str, list[str]]]:
    """Every ``fcgispawn -...`` command line in the code blocks of the README and the guide,
    in the man page, the example configs and the units, as argv (without the program)."""
    texts: list[tuple[str, str]] = []
    for path in (README, REPO / "docs" / "migration.md"):
        blocks = re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), re.M | re.S)
        texts.append((path.name, "\n".join(blocks)))
    for path in [*sorted(EXAMPLES.glob("*.conf")), *sorted(UNITS.iterdir())]:
        texts.append((path.name, path.read_text()))
    man_lines = MAN_PAGE.read_text().splitlines()
    texts.append((MAN_PAGE.name, "\n".join(_roff_to_text(line) for line in man_lines)))
    for name, text in texts:
        for match in DOC_COMMAND.finditer(text):
            argv = match.group(1).split()
            if not INFORMATION_FLAGS & set(argv):
                yield f"{name}: {match.group(0).strip()}", argv


def test_every_documented_command_line_is_accepted_by_the_cli() -> None:
    command = _cli_command()
    seen = 0
    for where, argv in _documented_command_lines():
        args = [a for a in argv if not a.startswith("$")]  # $FCGISPAWN_ARGS in the units
        try:
            command.make_context("fcgispawn", args)  # parses and type-checks, runs nothing
        except click.ClickException as exc:
            pytest.fail(f"{where}: {exc.format_message()}")
        seen += 1
    assert seen >= 10, f"only {seen} documented command lines found: is the pattern broken?"


# --- README --------------------------------------------------------------------------------------


def test_readme_keeps_the_two_commands_at_the_top() -> None:
    head = README.read_text().splitlines()[:8]
    assert head[0] == "# fcgispawn"
    assert "bash scripts/demo.sh" in head
    assert "bash scripts/test.sh" in head


def _relative_links(path: Path) -> Iterator[str]:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("doc", ["README.md", "docs/migration.md"])
def test_relative_links_in_docs_point_at_files_that_exist(doc: str) -> None:
    path = REPO / doc
    broken = [t for t in _relative_links(path) if not (path.parent / t).exists()]
    assert not broken, f"{doc} links to missing files: {broken}"


# --- units ----------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as section -> [(key, value)], keeping repeated keys in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def parse_environment_file(text: str) -> dict[str, str]:
    """systemd EnvironmentFile= syntax, the subset the shipped example uses."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value)
        env[key.strip()] = " ".join(words) if len(words) != 1 else words[0]
    return env


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", text)
    assert match, f"cannot read a time span from {text!r}"
    scale = {"ms": 0.001, "s": 1.0, None: 1.0, "min": 60.0}[match.group(2)]
    return float(match.group(1)) * scale


def test_socket_unit_listens_where_the_docs_say_with_backlog_mode_and_group() -> None:
    unit = parse_unit(UNITS / "fcgispawn@.socket")
    assert unit_value(unit, "Socket", "ListenStream") == "/run/fcgispawn/%i.sock"
    assert unit_value(unit, "Socket", "Backlog") == "1024"
    assert unit_value(unit, "Socket", "SocketMode") == "0660"
    assert unit_value(unit, "Socket", "SocketGroup") == "www-data"
    fdname = next(o for o in _cli_options() if o.name == "fdname").default
    assert unit_value(unit, "Socket", "FileDescriptorName") == fdname


@pytest.mark.parametrize("name", ["fcgispawn@.service", "fcgispawn-bind@.service"])
def test_service_units_notify_reload_with_hup_and_outwait_the_graceful_timeout(name: str) -> None:
    unit = parse_unit(UNITS / name)
    assert unit_value(unit, "Service", "Type") == "notify"
    assert unit_value(unit, "Service", "NotifyAccess") == "main"
    assert unit_value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(unit, "Service", "KillSignal") == "SIGTERM"
    assert unit_value(unit, "Service", "Restart") == "on-failure"
    assert unit_value(unit, "Service", "EnvironmentFile") == "/etc/fcgispawn/%i.conf"
    exec_start = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert exec_start[:2] == [INSTALLED_FCGISPAWN, "-n"]
    assert "$FCGISPAWN_ARGS" in exec_start
    graceful = next(o for o in _cli_options() if o.name == "graceful_timeout").default
    assert isinstance(graceful, float | int)
    assert _seconds(unit_value(unit, "Service", "TimeoutStopSec")) > graceful
    for key in ("StandardOutput", "StandardError"):
        assert unit_value(unit, "Service", key) == "journal"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules"):
        assert unit_value(unit, "Service", key) == "yes"
    assert unit_value(unit, "Service", "ProtectSystem") == "strict"
    assert unit_value(unit, "Service", "ProtectHome") == "read-only"
    assert unit_value(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"


def test_bind_service_binds_its_own_socket_in_its_runtime_directory() -> None:
    unit = parse_unit(UNITS / "fcgispawn-bind@.service")
    exec_start = shlex.split(unit_value(unit, "Service", "ExecStart"))
    assert exec_start[:4] == [INSTALLED_FCGISPAWN, "-n", "-s", "/run/fcgispawn/%i.sock"]
    assert unit_value(unit, "Service", "RuntimeDirectory") == "fcgispawn"


def _fcgispawn_arg_sets() -> Iterator[tuple[str, list[str]]]:
    """Every FCGISPAWN_ARGS in example.conf, the commented alternatives included."""
    for raw in (UNITS / "example.conf").read_text().splitlines():
        line = raw.lstrip("#").strip()
        if line.startswith("FCGISPAWN_ARGS="):
            # systemd splits an unbraced $FCGISPAWN_ARGS at whitespace, quotes already gone.
            yield line, shlex.split(line.partition("=")[2])[0].split()


@pytest.mark.parametrize("args", [a for _, a in _fcgispawn_arg_sets()], ids=" ".join)
def test_example_conf_arguments_are_accepted_by_the_cli(args: list[str]) -> None:
    command = _cli_command()
    # Parsing only: make_context checks every flag and value type without running anything.
    ctx = command.make_context("fcgispawn", ["-n", *args])
    assert ctx.params["no_fork"] is True


def test_example_conf_sets_fcgispawn_args_and_pythonpath() -> None:
    env = parse_environment_file((UNITS / "example.conf").read_text())
    assert "--wsgi" in env["FCGISPAWN_ARGS"].split()
    assert env["PYTHONPATH"]


def instantiate_units(dest: Path, instance: str, fcgispawn: Path, conf: Path) -> list[Path]:
    """Copies of the shipped templates as instances, pointed at an existing fcgispawn and conf.

    ``systemd-analyze verify`` checks that ExecStart's binary exists, so /usr/local/bin is
    rewritten to the venv's script; everything else stays as shipped.
    """
    made = []
    for name in SHIPPED_UNITS:
        text = (UNITS / name).read_text()
        text = text.replace(INSTALLED_FCGISPAWN, str(fcgispawn))
        text = text.replace("/etc/fcgispawn/%i.conf", str(conf))
        target = dest / name.replace("@.", f"@{instance}.")
        target.write_text(text)
        made.append(target)
    return made


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify_accepts_every_shipped_unit(tmp_path: Path) -> None:
    conf = tmp_path / "demo.conf"
    shutil.copy(UNITS / "example.conf", conf)
    units = instantiate_units(tmp_path, "demo", VENV_BIN / "fcgispawn", conf)
    # Documentation=man:fcgispawn(1) is checked too: let man(1) find the page in this repo.
    man1 = tmp_path / "man" / "man1"
    man1.mkdir(parents=True)
    shutil.copy(MAN_PAGE, man1 / "fcgispawn.1")
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": f"{tmp_path / 'man'}:"},
        timeout=60,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


# --- packaging ---------------------------------------------------------------------------------


def test_package_installs_the_man_page_units_and_examples() -> None:
    """pip install puts them under PREFIX/share, where man(1) and the docs look for them."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    data_files = config.get("tool", {}).get("setuptools", {}).get("data-files")
    if data_files is None:
        pytest.xfail("pyproject.toml has no [tool.setuptools.data-files] yet (the lead's file)")
    installed = {
        f"{target}/{Path(src).name}" for target, srcs in data_files.items() for src in srcs
    }
    expected = {"share/man/man1/fcgispawn.1"}
    expected |= {f"share/fcgispawn/units/{name}" for name in (*SHIPPED_UNITS, "example.conf")}
    configs = (*EXAMPLES.glob("*.conf"), *EXAMPLES.glob("*.cfg"))
    expected |= {f"share/fcgispawn/examples/{p.name}" for p in configs}
    assert expected <= installed, sorted(expected - installed)
    for srcs in data_files.values():
        for src in srcs:
            assert (REPO / src).is_file(), f"data-files names a missing file: {src}"
